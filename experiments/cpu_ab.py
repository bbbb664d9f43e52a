r"""The CPU train step under each attention_impl, beside transformers' model, in one process
(docs/benchmarks.md, "Against PyTorch on this CPU").

  python -m experiments.cpu_ab --variants=mla,mha                  # 2 threads
  taskset -c 1 python -m experiments.cpu_ab --out=/tmp/ab1         # CPU s per step, one core
  python -m experiments.cpu_ab --quick --out=/tmp/ab               # a pipeline check

Each build (--impls: ModelConfig.attention_impl) is the train step as `python -m mla_jax.train`
builds it (timing.fixed_batch_step), compiled from one initial state and timed alternately
with the torch peer (timing.compare); its first step prints its loss and gradient norm, which
agree across builds to float rounding. cpu_ab.json records the kernels each build resolved to
(attention_op.resolve). Without torch (the dev extra) the builds are timed alone.
"""

from __future__ import annotations

import jax
from absl import flags

from experiments import common, tables, timing, torch_peer
from mla_jax import attention_op, cli, sharding
from mla_jax.config import ModelConfig

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', ['mla', 'mha'], 'configs/<name>.py to time')
flags.DEFINE_list('impls', ['einsum', 'auto'], 'ModelConfig.attention_impl of each build')
flags.DEFINE_integer('blocks', 3, 'alternating blocks')
flags.DEFINE_integer('block_steps', 2, 'steps of each build per block')


def builds(config, impls) -> dict[str, timing.Step]:
  """The train step under each attention_impl, on one fixed batch, each with its own copy of
  one initial state."""
  mesh = sharding.make_mesh(config.mesh)
  steps = {}
  with jax.set_mesh(mesh):
    state, _, batch = timing.fixed_batch_step(config, mesh)
    for impl in impls:
      build_config = config.copy_and_resolve_references()
      build_config.model.attention_impl = impl
      compiled = timing.fixed_batch_step(build_config, mesh)[1].lower(state, batch).compile()
      steps[impl] = timing.carried(compiled, jax.tree.map(lambda x: x.copy(), state), batch,
                                   mesh=mesh)
      metrics = steps[impl]()
      print(f"{config.model.attention} {impl}: first step loss {float(metrics['loss']):.7f}, "
            f"grad norm {float(metrics['grad_norm']):.7f}", flush=True)
  return steps


def main():
  batch, seq_len = (4, 64) if FLAGS.quick else (16, 256)
  cores = len(common.available_cores())
  results, ops = {}, {}
  for variant in FLAGS.variants:
    config = torch_peer.peer_config(variant, batch, seq_len, 'tiny' if FLAGS.quick else '')
    for impl in FLAGS.impls:  # a bad value fails before anything is compiled
      ModelConfig.from_dict({**config.model.to_dict(), 'attention_impl': impl})
    steps = builds(config, FLAGS.impls)
    ops[variant] = {impl: attention_op.resolve(ModelConfig.from_dict(
        {**config.model.to_dict(), 'attention_impl': impl})).to_dict() for impl in FLAGS.impls}
    if torch_peer.available():
      steps['torch'] = torch_peer.torch_step(ModelConfig.from_dict(config.model), batch,
                                             seq_len, threads=cores,
                                             **torch_peer.opt_kwargs(config))
    else:
      print(torch_peer.MISSING, flush=True)
    results[variant] = timing.compare(steps, batch * seq_len, FLAGS.blocks, FLAGS.block_steps)
  payload = dict(cores=cores, batch=batch, seq_len=seq_len, ops=ops, results=results)
  print(f'{cores} core(s), batch {batch} x {seq_len}, float32:')
  print('\n'.join(tables.cpu_ab_table(payload)))
  path = common.write_json(common.out_dir('cpu_ab') / 'cpu_ab.json', payload)
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
