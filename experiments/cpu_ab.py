r"""The CPU train step's two speed changes, each on and off, beside transformers' model.

  taskset -c 1 python -m experiments.cpu_ab --variants=mla,mha --out=DIR   # CPU s per step

Four builds of the same train step, compiled from the same state in one process and timed
alternately (torch_peer.compare) with the torch peer:
  masked   the training forward at explicit positions: the masked [b, g, p, t, s] softmax of
           attention_weights (the path every training step took before causal_attention)
  blocks   a whole sequence, as the trainer runs it: attention.causal_attention (query
           blocks that skip the masked keys, heads-first)
  +eigen   the same compiled with EIGEN_DOTS: XLA:CPU's dots on Eigen rather than YNNPACK
           (an experimental XLA option, not set by the trainer: its effect was not stable
           across measurements, docs/benchmarks.md)
Pinned to one core, the CPU seconds per step do not depend on what else runs on the machine
(experiments/results/cpu_profile.md); the first step of each build also prints its loss and
gradient norm, which agree across builds to float rounding.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
from absl import flags

from experiments import timing, torch_peer
from mla_jax import attention, cli, sharding
from mla_jax.config import ModelConfig

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', ['mla', 'mha'], 'configs/<name>.py to time')
flags.DEFINE_integer('blocks', 3, 'alternating blocks')
flags.DEFINE_integer('block_steps', 2, 'steps of each build per block')
flags.DEFINE_string('out', None, 'folder for cpu_ab.json (optional)')

EIGEN_DOTS = {'xla_cpu_experimental_ynn_fusion_type': ''}
# name: (traced as a whole sequence, compiled with EIGEN_DOTS)
BUILDS = {'masked': (False, False), 'blocks': (True, False), 'masked+eigen': (False, True),
          'blocks+eigen': (True, True)}


def builds(config) -> dict[str, torch_peer.Step]:
  """The train step of each BUILDS entry, on one fixed batch, each with its own state."""
  mesh = sharding.make_mesh(config.mesh)
  resolve = attention.resolve_positions
  steps = {}
  with jax.set_mesh(mesh):
    state, _, batch = timing.fixed_batch_step(config, mesh)
    for name, (whole, eigen) in BUILDS.items():
      step = timing.fixed_batch_step(config, mesh)[1]
      if not whole:  # traced with positions given: the masked path (restored right after)
        attention.resolve_positions = lambda x, p: (resolve(x, p)[0], False)
      try:
        compiled = step.lower(state, batch).compile(
            compiler_options=EIGEN_DOTS if eigen else {})
      finally:
        attention.resolve_positions = resolve
      holder = [jax.tree.map(lambda x: x.copy(), state)]
      holder[0], metrics = compiled(holder[0], batch)
      print(f"{config.model.attention} {name}: first step loss {float(metrics['loss']):.7f}, "
            f"grad norm {float(metrics['grad_norm']):.7f}", flush=True)

      def run(compiled=compiled, holder=holder):
        with jax.set_mesh(mesh):
          holder[0], metrics = compiled(holder[0], batch)
          jax.block_until_ready(metrics)

      steps[name] = run
  return steps


def main():
  batch, seq_len, cores = 16, 256, len(os.sched_getaffinity(0))
  results = {}
  for variant in FLAGS.variants:
    config = torch_peer.peer_config(variant, batch, seq_len)
    steps = builds(config)
    steps['torch'] = torch_peer.torch_step(ModelConfig.from_dict(config.model), batch, seq_len,
                                           threads=cores, **torch_peer.opt_kwargs(config))
    results[variant] = torch_peer.compare(steps, batch * seq_len, FLAGS.blocks,
                                          FLAGS.block_steps)
  print(f'CPU s per step ({cores} core(s), batch {batch} x {seq_len}, float32):')
  print('| build | ' + ' | '.join(FLAGS.variants) + ' |')
  print('|---|' + '---:|' * len(FLAGS.variants))
  for name in (*BUILDS, 'torch'):
    print(f'| {name} | ' + ' | '.join(f"{results[v][name]['cpu_s']:.2f}"
                                      for v in FLAGS.variants) + ' |')
  if FLAGS.out:
    path = pathlib.Path(FLAGS.out) / 'cpu_ab.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'cores': cores, 'batch': batch, 'seq_len': seq_len,
                                'jax': jax.__version__, 'results': results}, indent=1))
    print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
