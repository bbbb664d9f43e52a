r"""The CPU train step's speed changes, added one at a time, beside transformers' model.

  python -m experiments.cpu_ab --variants=mla,mha --out=DIR                # 2 threads
  taskset -c 1 python -m experiments.cpu_ab --variants=mla,mha --out=DIR   # CPU s per step

Builds of the same train step, compiled from the same state in one process and timed
alternately (torch_peer.compare) with the torch peer:
  einsum    every projection contracted over x's own axes (jnp.tensordot: the form of the
            einsums before layers.dense, with their weight gradients' slow transposes), XLA's
            defaults, attention on the einsum path (attention_impl='einsum')
  dense     the projections as layers.dense does them (one [b * t, in] . [in, out] matmul),
            XLA's defaults, einsum attention
  options   dense compiled as the trainer compiles it: trainer.cpu_compiler_options()
            (Eigen dots, 512-bit vectors), einsum attention
  trainer   options with attention_impl='auto': the C++ CPU attention kernel
            (mla_jax.kernels.cpu_attention), what `python -m mla_jax.train` runs on a CPU
Pinned to one core, the CPU seconds per step do not depend on what else runs on the machine
(experiments/results/cpu_profile.md); the first step of each build also prints its loss and
gradient norm, which agree across builds to float rounding.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
from absl import flags

from experiments import runner, timing, torch_peer
from mla_jax import attention, cli, layers, model, sharding, trainer
from mla_jax.config import ModelConfig
from mla_jax.kernels import cpu_attention

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', ['mla', 'mha'], 'configs/<name>.py to time')
flags.DEFINE_integer('blocks', 3, 'alternating blocks')
flags.DEFINE_integer('block_steps', 2, 'steps of each build per block')
flags.DEFINE_string('out', None, 'folder for cpu_ab.json (optional)')


def _einsum(x, w, n_in: int = 1, out_dtype=None):
  """The product of layers.dense over x's own axes, as the einsums before it took it."""
  return jnp.tensordot(x, w, n_in, preferred_element_type=out_dtype)


# name: (the projection function, XLA compiler options (None: the trainer's), attention_impl)
BUILDS = {'einsum': (_einsum, {}, 'einsum'), 'dense': (layers.dense, {}, 'einsum'),
          'options': (layers.dense, None, 'einsum'), 'trainer': (layers.dense, None, 'auto')}
_USERS = (layers, attention, model)  # the modules that call dense


def builds(config) -> dict[str, torch_peer.Step]:
  """The train step of each BUILDS entry, on one fixed batch, each with its own copy of one
  initial state."""
  mesh = sharding.make_mesh(config.mesh)
  steps = {}
  with jax.set_mesh(mesh):
    state, _, batch = timing.fixed_batch_step(config, mesh)
    for name, (project, options, attention_impl) in BUILDS.items():
      build_config = config.copy_and_resolve_references()
      build_config.model.attention_impl = attention_impl
      step = timing.fixed_batch_step(build_config, mesh, compiler_options=options)[1]
      saved = {module: module.dense for module in _USERS}
      for module in _USERS:  # traced with this projection (restored right after)
        module.dense = project
      try:
        compiled = step.lower(state, batch).compile()
      finally:
        for module, dense in saved.items():
          module.dense = dense
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
                                'jax': jax.__version__, 'machine': runner.machine(),
                                'trainer_options': trainer.cpu_compiler_options(),
                                'cpu_kernel': cpu_attention.available(),
                                'results': results}, indent=1))
    print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
