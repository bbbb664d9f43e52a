r"""The train step under several meshes on simulated CPU devices: step time and collectives.

  python -m experiments.bench_mesh          # experiments/results/bench_mesh/bench_mesh.json
  python -m experiments.bench_mesh --quick --out=/tmp/mesh   # tiny configs, 2 meshes, 1 step

For each variant's default config and each mesh (data, fsdp, tensor): the median time of the
train step called directly, its ratio to pure data parallelism, and what the compiled HLO
communicates per step: the number of each collective and the bytes all-gathered, as a
multiple of the parameter bytes. Under fsdp each weight should be gathered about twice per
step (forward, and again for the backward pass) and its gradient reduce-scattered once; an
all-gather of activations or of a whole stacked tensor inside the layer loop would show as a
multiple far above that. Simulated devices share this machine's cores, so the step times
compare layouts, not hardware.
"""

from __future__ import annotations

import re

import jax
from absl import app, flags

from experiments import common, tables
from experiments.timing import time_train_step
from mla_jax import cli, sharding
from mla_jax.config import ModelConfig
from mla_jax.model import param_count

FLAGS = flags.FLAGS
flags.DEFINE_integer('devices', 8, 'simulated CPU devices')
flags.DEFINE_list('variants', ['mha', 'mla'], 'configs/<name>.py to measure')
flags.DEFINE_multi_string('mesh', ['8,1,1', '1,8,1', '2,4,1', '2,2,2'],
                          'a mesh as data,fsdp,tensor; repeat the flag (the first is the baseline)')
flags.DEFINE_integer('steps', 3, 'timed calls of the train step per mesh')

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'collective-permute', 'all-to-all')
_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1}


def collectives(hlo: str) -> tuple[dict[str, int], int]:
  """Counts of each collective op in an HLO module, and the bytes its all-gathers produce."""
  counts = dict.fromkeys(COLLECTIVES, 0)
  gathered = 0
  for line in hlo.splitlines():
    match = re.search(r'=\s*(\(?[^=]*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(', line)
    if not match:
      continue
    counts[match.group(2)] += 1
    if match.group(2) == 'all-gather':
      for dtype, dims in re.findall(r'(\w+)\[([\d,]*)\]', match.group(1)):
        size = 1
        for d in filter(None, dims.split(',')):
          size *= int(d)
        gathered += size * _DTYPE_BYTES.get(dtype, 4)
  return counts, gathered


def main(argv):
  del argv
  cli.quiet_logging()
  jax.config.update('jax_num_cpu_devices', FLAGS.devices)
  rows = []
  meshes = FLAGS.mesh[:2] if FLAGS.quick else FLAGS.mesh
  steps = 1 if FLAGS.quick else FLAGS.steps
  for name in FLAGS.variants:
    config = common.load_config(name, 'tiny' if FLAGS.quick else '')
    param_bytes = 4 * param_count(ModelConfig.from_dict(config.model))
    baseline = None
    for mesh_arg in meshes:
      # data,fsdp,tensor as the table shows them (the expert axis, for MoE models, may follow)
      sizes = dict(zip(sharding.MESH_AXES, map(int, mesh_arg.split(',')), strict=False))
      timed = time_train_step(config, sharding.make_mesh(sizes), steps)
      counts, gathered = collectives(timed['hlo'])
      baseline = baseline or timed['step_s']
      rows.append({'variant': name, 'mesh': sizes, 'step_s': timed['step_s'],
                   'vs_data_parallel': timed['step_s'] / baseline,
                   'compile_s': timed['compile_s'], 'collectives': counts,
                   'all_gathered_bytes': gathered, 'gathered_vs_params': gathered / param_bytes})
      print(rows[-1], flush=True)
  payload = {'devices': f'{FLAGS.devices} simulated {jax.devices()[0].platform} devices',
             'rows': rows}
  print('\n'.join(tables.bench_mesh_table(payload)))
  path = common.write_json(common.out_dir('bench_mesh') / 'bench_mesh.json', payload)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
