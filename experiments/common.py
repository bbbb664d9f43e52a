"""What every experiment and benchmark shares: the flags --out and --quick, one way to load
configs/<name>.py, where results go, and the provenance each result file records (the
command, the commit, the machine, the date and the package versions).

--out is a folder everywhere: a script writes its files into it. Without --out, a full run
writes experiments/results/<experiment>/ (the committed results) and a --quick run its
workdir, or a temporary folder: a pipeline check never overwrites a committed result.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

from absl import flags

from mla_jax.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'experiments' / 'results'
# The packages whose versions a result records (those installed).
PACKAGES = ('jax', 'jaxlib', 'flax', 'numpy', 'optax', 'orbax-checkpoint', 'torch',
            'transformers')

flags.DEFINE_string('out', None, 'the folder the results go into (default: '
                    'experiments/results/<experiment>; with --quick, the workdir or a '
                    'temporary folder, never the committed results)')
flags.DEFINE_bool('quick', False, 'small sizes and few steps: checks the pipeline; the '
                  'numbers mean nothing')
FLAGS = flags.FLAGS


def out_dir(experiment: str, workdir: str | None = None) -> pathlib.Path:
  """--out, or the default above."""
  if FLAGS.out:
    return pathlib.Path(FLAGS.out)
  if FLAGS.quick:
    return pathlib.Path(workdir or tempfile.gettempdir()) / ('' if workdir else experiment)
  return RESULTS / experiment


def load_config(name: str, arg: str = ''):
  """configs/<name>.py's get_config(arg): the one way the experiments load a config."""
  if not name.isidentifier() or not (ROOT / 'configs' / f'{name}.py').exists():
    known = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem[0] != '_')
    raise InputError(f'no config configs/{name}.py; use one of {known}')
  return importlib.import_module(f'configs.{name}').get_config(arg)


def available_cores() -> list[int]:
  if hasattr(os, 'sched_getaffinity'):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def machine() -> str:
  """The CPU, its widest vector extension and the cores this process may use. The extension
  is named because the same run on two hosts can differ in the last bits (the matmul
  libraries pick their kernels from the CPU), which 200 steps of training carry to ~1e-3 in
  a loss (docs/results.md, "Reproducing it")."""
  cpu = platform.processor() or platform.machine()
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  if cpuinfo.exists():
    lines = cpuinfo.read_text().splitlines()
    names = [line.split(':', 1)[1].strip() for line in lines if line.startswith('model name')]
    cpu_flags = next((set(line.split(':', 1)[1].split()) for line in lines
                      if line.startswith('flags')), set())
    isa = next((name for flag, name in (('avx512f', 'AVX-512'), ('avx2', 'AVX2'))
                if flag in cpu_flags), None)
    cpu = (names[0] if names else cpu) + (f' ({isa})' if isa else '')
  return f'{cpu}, {len(available_cores())} cores available, Python {platform.python_version()}'


@functools.cache
def commit() -> str:
  """HEAD's hash, '+dirty' when tracked files differ from it; 'unknown' outside a checkout. Asked
  once a process: a benchmark that rewrites its committed JSON after each row must not find its
  own output and call the code it measures dirty."""
  git = lambda *args: subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True)
  head = git('rev-parse', 'HEAD')
  if head.returncode:
    return 'unknown'
  dirty = git('diff', '--quiet', 'HEAD', '--').returncode != 0
  return head.stdout.strip() + ('+dirty' if dirty else '')


def versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for package in PACKAGES:
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
      out[package] = importlib.metadata.version(package)
  return out


def command() -> str:
  """The command line that runs this process (`python -m <module> <flags>`)."""
  spec = getattr(sys.modules['__main__'], '__spec__', None)
  program = f'python -m {spec.name}' if spec else f'python {sys.argv[0]}'
  return ' '.join([program, *sys.argv[1:]])


def setup(**fields) -> dict:
  """A report's setup section: the command, the machine and the date, then `fields`."""
  return dict(command=command(), machine=machine(), date=datetime.date.today().isoformat(),
              **fields)


def provenance() -> dict:
  """What a result file records about how it was made. The device is asked of jax here, so a
  process that forks workers calls this after they have run."""
  import jax  # not at import: a parent that only starts workers must not start jax's threads

  device = jax.devices()[0]
  return dict(command=command(), commit=commit(), machine=machine(),
              device=f'{device.device_kind} ({device.platform} x {jax.device_count()})',
              date=datetime.date.today().isoformat(), versions=versions())


def write_json(path: pathlib.Path, payload: dict) -> pathlib.Path:
  """payload with its provenance (unless it has one) as indented JSON, written whole."""
  path.parent.mkdir(parents=True, exist_ok=True)
  payload = payload if 'provenance' in payload else {'provenance': provenance(), **payload}
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  tmp.write_text(json.dumps(payload, indent=1))
  tmp.replace(path)
  return path
