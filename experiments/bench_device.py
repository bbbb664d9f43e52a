r"""The accelerator report: one command that checks and times mla_jax on whatever device is here.

  python -m experiments.bench_device --out=experiments/results/h200   # H200: < 8 min + train_moe
  python -m experiments.bench_device --out=/tmp/device --quick              # CPU smoke run

Its parts (PARTS, below; docs/benchmarks.md, "The accelerator report", says what each
measures) each run in their own process with a time limit (a crash or a memory blow-up of one
does not lose the others) and write OUT/<part>/; their JSON is collected into OUT/report.json
and OUT/report.md (tables rendered by experiments/tables.py), with the jax, jaxlib, flax and
device versions.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import jax
from absl import app, flags

from experiments import common, report, tables, torch_peer
from mla_jax import cli, platform

FLAGS = flags.FLAGS
flags.DEFINE_list('parts', ['check', 'train', 'decode', 'train_deterministic', 'train_moe'],
                  'which parts to run, in order')
flags.DEFINE_float('peak_tflops', 0.0, 'peak for MFU (0: 989 on H100/H200, else measured)')

# part -> (the script it runs, which writes <script>.json into OUT/<part>/, and its table)
PARTS = {'check': ('device_check', tables.device_check_table),
         'train': ('bench_train', tables.bench_train_table),
         'decode': ('bench_decode', tables.bench_decode_report),
         'train_deterministic': ('bench_train', tables.bench_train_table),
         'train_moe': ('bench_train', tables.bench_train_table)}


def _peak() -> float:
  """--peak_tflops, else the device's nominal peak (platform.PEAK_TFLOPS), else 0: the parts
  measure the matmul rate."""
  return FLAGS.peak_tflops or (platform.peak_flops() or 0.0) / 1e12


def commands(out: pathlib.Path, quick: bool) -> dict[str, tuple[list[str], int]]:
  """part -> (command, time limit in seconds)."""
  py = (sys.executable, '-m')
  peer = ['--peer'] if torch_peer.available() else []
  large = ['--size=large', '--variants=mha,mla', '--direct_steps=10', '--loop=false',
           f'--peak_tflops={_peak()}']
  if quick:
    return {
        'check': ([*py, 'experiments.device_check', f'--out={out / "check"}', '--quick'],
                  600),
        'train': ([*py, 'experiments.bench_train', '--size=tiny', '--variants=mha,mla',
                        '--impls=einsum,kernels', '--direct_steps=2', '--loop=false',
                        f'--out={out / "train"}'], 900),
        'decode': ([*py, 'experiments.bench_decode', '--quick', '--impls=einsum,kernels',
                         '--runs=2', f'--out={out / "decode"}'], 900),
        'train_deterministic': ([*py, 'experiments.bench_train', '--size=tiny',
                                 '--variants=mla', '--impls=kernels', '--direct_steps=2',
                                 '--loop=false', '--deterministic=true',
                                 f'--out={out / "train_deterministic"}'], 900),
        'train_moe': ([*py, 'experiments.bench_train', '--size=tiny', '--variants=mla_moe',
                       '--direct_steps=2', '--loop=false', f'--out={out / "train_moe"}'], 900),
    }
  return {
      'check': ([*py, 'experiments.device_check', f'--out={out / "check"}'], 150),
      'train': ([*py, 'experiments.bench_train', *large, '--impls=einsum,kernels', *peer,
                 f'--out={out / "train"}'], 200),
      'decode': ([*py, 'experiments.bench_decode', '--dtype=bfloat16', '--batches=8,32',
                       '--contexts=4096,16384,65536', '--impls=einsum,kernels', '--runs=5',
                       f'--out={out / "decode"}'], 200),
      # What bit-exact resume (train.deterministic=True) costs against the default.
      'train_deterministic': ([*py, 'experiments.bench_train', *large, '--impls=kernels',
                               '--deterministic=true',
                               f'--out={out / "train_deterministic"}'], 90),
      # configs/mla_moe.py at the large size (its experts as wide against d_model): tokens/s
      # and MFU on the parameters a token passes through.
      'train_moe': ([*py, 'experiments.bench_train', *large, '--variants=mla_moe',
                     '--impls=kernels', *peer, f'--out={out / "train_moe"}'], 200),
  }


def run_part(name: str, command: list[str], limit: int, out: pathlib.Path) -> dict:
  start = time.perf_counter()
  log = out / f'{name}.log'
  with log.open('w') as f:
    try:
      code = subprocess.run(command, cwd=common.ROOT, stdout=f, stderr=subprocess.STDOUT,
                            timeout=limit).returncode
    except subprocess.TimeoutExpired:
      code = 'timeout'
  result = {'part': name, 'command': ' '.join(command[2:]), 'exit': code,
            'seconds': time.perf_counter() - start}
  data = out / name / f'{PARTS[name][0]}.json'
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


def markdown(payload: dict) -> str:
  env, parts = payload['environment'], payload['parts']
  lines = [f"# Device report: {env['device_kind']} ({env['platform']}), {env['date']}", '',
           f"jax {env['jax']}, flax {env['flax']}.", '']
  for p in parts:
    lines += [f"## {p['part']} (exit {p['exit']}, {p['seconds']:.0f} s)", '',
              f"`python -m {p['command']}`", '']
    result = p.get('result', {})
    if result.get('rows'):
      lines += [*PARTS[p['part']][1](result), '']
    lines += [f"- failed: {f}" for f in result.get('failures', [])]
  return '\n'.join(lines)


def main(argv):
  del argv
  out = common.out_dir('bench_device')
  out.mkdir(parents=True, exist_ok=True)
  env = environment()
  print(f"{env['device_kind']} ({env['platform']} x {env['device_count']}), jax {env['jax']}",
        flush=True)
  todo = commands(out, FLAGS.quick)
  parts = [run_part(name, *todo[name], out) for name in FLAGS.parts]
  report.write(out, 'report', {'environment': env, 'parts': parts}, markdown)
  if any(p['exit'] != 0 for p in parts):
    raise SystemExit('error: a part failed; see its log in ' + str(out))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
