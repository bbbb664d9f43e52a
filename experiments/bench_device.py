r"""The accelerator report: one command that checks and times mla_jax on whatever device is here.

  python -m experiments.bench_device --out=experiments/results/device        # < 8 min, H200
  python -m experiments.bench_device --out=/tmp/device --quick               # CPU smoke run

Parts, each in its own process (a crash or a memory blow-up of one does not lose the
others; each has a time limit), their JSON collected into OUT/report.json and OUT/report.md:
1. check: the fused paths against the einsum path on this device, for every variant
   (experiments/device_check.py): float32 at 'highest' matmul precision and bfloat16.
2. train: training throughput at the large config (d_model 1024, 8 layers, 16 heads of 64,
   batch 32 x 1024, bfloat16) for MHA and MLA under each attention_impl: tokens/s, MFU,
   compile time, beside transformers' model in the same process when torch is installed.
3. decode: the decode benchmark in bfloat16 at batch 8 and 32, contexts 4k / 16k / 64k, every
   variant through the einsum path and the Pallas kernels, with the fraction of the bandwidth
   limit.
4. train_deterministic: the fused rows of 2. under deterministic GPU ops, which is what
   bit-exact resume (train.deterministic=True) costs: XLA's attention instead of cuDNN's.
And the environment: jax, jaxlib, flax and device versions.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys
import time

import jax
from absl import app, flags

from mla_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'a folder for report.json, report.md and each part\'s JSON')
flags.DEFINE_bool('quick', False, 'tiny sizes: checks the pipeline (on a CPU too)')
flags.DEFINE_list('parts', ['check', 'train', 'decode', 'train_deterministic'],
                  'which parts to run, in order')
flags.DEFINE_float('peak_tflops', 0.0, 'peak for MFU (0: 989 on H100/H200, else measured)')
flags.mark_flag_as_required('out')

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Nominal dense bfloat16 peaks (TFLOP/s) for MFU; other devices use the measured matmul rate.
PEAKS = {'H100': 989.0, 'H200': 989.0}


def _peak() -> float:
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops
  kind = jax.devices()[0].device_kind
  return next((peak for name, peak in PEAKS.items() if name in kind), 0.0)


def commands(out: pathlib.Path, quick: bool) -> dict[str, tuple[list[str], int]]:
  """part -> (command, time limit in seconds)."""
  py = (sys.executable, '-m')
  has_torch = all(importlib.util.find_spec(m) for m in ('torch', 'transformers'))
  peer = ['--peer'] if has_torch else []
  large = ['--size=large', '--variants=mha,mla', '--direct_steps=10', '--loop=false',
           f'--peak_tflops={_peak()}']
  if quick:
    return {
        'check': ([*py, 'experiments.device_check', f'--out={out / "check.json"}', '--quick'],
                  600),
        'train': ([*py, 'experiments.bench_train', '--size=tiny', '--variants=mha,mla',
                        '--impls=einsum,fused', '--direct_steps=2', '--loop=false',
                        f'--out={out / "train.json"}'], 900),
        'decode': ([*py, 'experiments.bench_decode', '--quick', '--impls=einsum,fused',
                         '--runs=2', f'--out={out / "decode.json"}'], 900),
        'train_deterministic': ([*py, 'experiments.bench_train', '--size=tiny',
                                 '--variants=mla', '--impls=fused', '--direct_steps=2',
                                 '--loop=false', '--deterministic=true',
                                 f'--out={out / "train_deterministic.json"}'], 900),
    }
  return {
      'check': ([*py, 'experiments.device_check', f'--out={out / "check.json"}'], 150),
      'train': ([*py, 'experiments.bench_train', *large, '--impls=einsum,fused', *peer,
                 f'--out={out / "train.json"}'], 200),
      'decode': ([*py, 'experiments.bench_decode', '--dtype=bfloat16', '--batches=8,32',
                       '--contexts=4096,16384,65536', '--impls=einsum,fused', '--runs=5',
                       f'--out={out / "decode.json"}'], 200),
      # What bit-exact resume (train.deterministic=True) costs against the default.
      'train_deterministic': ([*py, 'experiments.bench_train', *large, '--impls=fused',
                               '--deterministic=true',
                               f'--out={out / "train_deterministic.json"}'], 90),
  }


def run_part(name: str, command: list[str], limit: int, out: pathlib.Path) -> dict:
  start = time.perf_counter()
  log = out / f'{name}.log'
  with log.open('w') as f:
    try:
      code = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            timeout=limit).returncode
    except subprocess.TimeoutExpired:
      code = 'timeout'
  result = {'part': name, 'command': ' '.join(command[2:]), 'exit': code,
            'seconds': time.perf_counter() - start}
  data = out / f'{name}.json'
  if data.exists():
    result['result'] = json.loads(data.read_text())
  print(f"{name}: exit {code} in {result['seconds']:.0f} s", flush=True)
  return result


def environment() -> dict:
  import flax
  import jaxlib
  d = jax.devices()[0]
  return {'device': str(d), 'device_kind': d.device_kind, 'platform': d.platform,
          'device_count': jax.device_count(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
          'date': time.strftime('%Y-%m-%d')}


def markdown(env: dict, parts: list[dict]) -> str:
  lines = [f"# Device report: {env['device_kind']} ({env['platform']}), {env['date']}", '',
           f"jax {env['jax']}, flax {env['flax']}.", '']
  for p in parts:
    lines += [f"## {p['part']} (exit {p['exit']}, {p['seconds']:.0f} s)", '',
              f"`python -m {p['command']}`", '']
    result = p.get('result', {})
    if 'table' in result:
      lines += [result['table'], '']
    lines += [f"- failed: {f}" for f in result.get('failures', [])]
  return '\n'.join(lines)


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  env = environment()
  print(f"{env['device_kind']} ({env['platform']} x {env['device_count']}), jax {env['jax']}",
        flush=True)
  todo = commands(out, FLAGS.quick)
  parts = [run_part(name, *todo[name], out) for name in FLAGS.parts]
  (out / 'report.json').write_text(json.dumps({'environment': env, 'parts': parts}, indent=1))
  (out / 'report.md').write_text(markdown(env, parts))
  print(f'wrote {out / "report.md"}')
  if any(p['exit'] != 0 for p in parts):
    raise SystemExit('error: a part failed; see its log in ' + str(out))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
