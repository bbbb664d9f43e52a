r"""Training throughput: the train step alone, inside the training loop, and beside PyTorch
(docs/benchmarks.md, "Training throughput": what is timed, the sizes, the peer and MFU).

  python -m experiments.bench_train              # experiments/results/bench_train/bench_train.json
  python -m experiments.bench_train --quick --out=/tmp/bt       # tiny configs: a smoke run
  python -m experiments.bench_train --size=peer --variants=mha,mla --peer --loop=false
  python -m experiments.bench_train --size=large --variants=mha,mla --impls=einsum,kernels \
      --peer --loop=false                                        # the accelerator report's rows
  python -m experiments.bench_train --moe           # .../bench_train/bench_train_moe.json

Sizes (config_for): `default`, each variant's configs/<name>.py; `peer`, that model at batch
16 x 256; `large`, d_model 1024, 8 layers, 16 heads of 64, batch 32 x 1024; `tiny`,
configs/<name>.py:tiny (what --quick runs). The loop is timed per logging window after the
first, with validation and checkpoints pushed past its end; the peer is experiments/torch_peer.py.
MFU counts the flops of the parameters a token passes through (an MoE layer's K chosen experts
of E: model.active_param_count).

--moe times DeepSeekMoE instead (docs/benchmarks.md, "Mixture of experts"): configs/mla_moe.py
(at --size) beside transformers holding the same initial weights (its loss at init checked
equal to ours) under both its experts implementations, with our dense all-experts reference
(moe_impl='dense') and, on a CPU, ragged_dot's dropless step alongside (moe_impl 'auto' takes
blocks there: mla_jax.moe.experts_blocked), and its first MoE layer alone beside transformers';
the same model at the smaller batches of --moe_batches beside transformers; then our dropless
step against that reference at 64 experts, 6 per token (MOE_GEOMETRY), with the step flops
each must spend.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common, tables, timing
from experiments.timing import (
  Rows,
  attention_kernel,
  flops_per_token,
  large_config,
  machine_limits,
  time_train_step,
)
from mla_jax import cli, moe, platform, sharding, training
from mla_jax.config import ModelConfig
from mla_jax.model import active_param_count, param_count

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', ['mha', 'gqa', 'mqa', 'mla'], 'configs/<name>.py to measure')
flags.DEFINE_enum('size', 'default', ('default', 'peer', 'large', 'tiny'),
                  'model and batch (docstring)')
flags.DEFINE_list('impls', ['auto'], 'attention_impl values to time (auto: the platform default)')
flags.DEFINE_integer('direct_steps', 8, 'timed direct calls of the train step')
flags.DEFINE_bool('loop', True, 'also time the training loop over real data')
flags.DEFINE_string('data_files', '', 'a text glob for the loop instead of the default corpus')
flags.DEFINE_integer('window', 8, 'steps per timed window of the training loop')
flags.DEFINE_bool('peer', False, "also time transformers' model on the same config")
flags.DEFINE_float('peak_tflops', 0.0, 'the peak for MFU (0: the matmul rate measured now)')
flags.DEFINE_bool('moe', False, 'time the MoE model (module docstring) instead of --variants')
flags.DEFINE_list('moe_batches', ['4', '1'], '--moe: smaller batches (windows) at which the MoE '
                  'model is also timed beside transformers (empty: none)')
flags.register_validator('moe_batches', lambda v: all(b.isdigit() and int(b) > 0 for b in v),
                         '--moe_batches takes positive integers, e.g. --moe_batches=4,1')
flags.DEFINE_bool('deterministic', False, 'deterministic GPU ops, as train.deterministic=True '
                  'gives the train command (bit-exact resume; no cuDNN attention)')


def config_for(variant: str, size: str, impl: str):
  """The training config of one row (see the module docstring)."""
  if size == 'large':
    config = large_config(variant)
  else:
    config = common.load_config(variant, 'tiny' if size == 'tiny' else '')
  if size == 'peer':
    config.data.update(batch_size=16, seq_len=256)
  config.model.attention_impl = impl
  config.train.deterministic = FLAGS.deterministic
  return config


def _loop_tokens_per_s(config, window: int, data_files: str) -> float:
  with tempfile.TemporaryDirectory() as workdir:
    if data_files:
      config.data.files = data_files
    config.train.update(steps=3 * window, log_every=window, checkpoint_every=10**9,
                        eval_every=10**9)
    training.train_and_evaluate(config, workdir, final_eval=False)
    rows = [json.loads(line)
            for line in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  return float(np.median([r['tokens_per_s'] for r in rows[1:] if 'tokens_per_s' in r]))


def bench_row(variant: str, impl: str, peak_flops: float) -> dict:
  config = config_for(variant, size(), impl)
  cfg = ModelConfig.from_dict(config.model)
  tokens = config.data.batch_size * config.data.seq_len
  row = {'variant': variant, 'impl': impl, 'params': param_count(cfg),
         'active_params': active_param_count(cfg),
         'dtype': str(cfg.compute_dtype), 'batch': config.data.batch_size,
         'seq_len': config.data.seq_len,  # first: a failure here loses no timing
         'attention_kernel': attention_kernel(config, sharding.make_mesh(config.mesh))}
  if FLAGS.peer:
    from experiments import torch_peer  # torch and transformers: the dev extra
    side_by_side = torch_peer.time_side_by_side(config, steps=FLAGS.direct_steps)
    row.update(side_by_side)
    step_s = side_by_side['jax_step_s']
    row['compile_s'] = side_by_side['jax_compile_s']
  else:
    timed = time_train_step(config, sharding.make_mesh(config.mesh), FLAGS.direct_steps)
    step_s, row['compile_s'] = timed['step_s'], timed['compile_s']
  row['tokens_per_s'] = tokens / step_s
  row['mfu'] = row['tokens_per_s'] * flops_per_token(cfg, config.data.seq_len) / peak_flops
  if FLAGS.loop:
    row['loop_tokens_per_s'] = _loop_tokens_per_s(config, FLAGS.window, FLAGS.data_files)
    row['loop_vs_direct'] = row['loop_tokens_per_s'] / row['tokens_per_s']
  return row


# The geometry --moe times the dropless step at against the dense reference: configs/mla_moe.py
# with DeepSeek-V2-Lite's expert counts (64 routed, 6 per token, 2 shared) a quarter of d_model
# wide; the dense path computes 64 / 6 = 10.7x the routed experts' flops. Its batch is a
# quarter of the config's: on a CPU, XLA lowers ragged_dot to a matmul of every row against
# every expert ([N K, E d] built whole: 3.2 GB at 32 x 256 tokens).
MOE_GEOMETRY = dict(n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, n_group=8,
                    topk_group=4)
MOE_FIELDS = ('n_routed_experts', 'num_experts_per_tok', 'n_shared_experts',
              'moe_intermediate_size', 'n_group', 'topk_group', 'scoring_func', 'topk_method')


def moe_configs(size: str) -> dict:
  """name -> (config, timed beside transformers, with our reference steps) of each --moe row:
  configs/mla_moe.py at `size`; the same at each of --moe_batches, beside transformers only
  (where its per-expert overheads weigh more); then MOE_GEOMETRY against our references."""
  config = config_for('mla_moe', size, 'auto')
  rows = {'mla_moe': (config, True, True)}
  for batch in map(int, FLAGS.moe_batches):
    smaller = copy.deepcopy(config)
    smaller.data.batch_size = batch
    rows[f'mla_moe_b{batch}'] = (smaller, True, False)
  geometry = copy.deepcopy(config)
  geometry.model.update(MOE_GEOMETRY, moe_intermediate_size=config.model.d_model // 4)
  geometry.data.batch_size = max(1, config.data.batch_size // 4)
  return {**rows, 'moe_64_top6': (geometry, False, True)}


def moe_row(name: str, config, peak_flops: float, peer: bool, references: bool) -> dict:
  """One --moe row: our dropless step ('dropless': moe_impl 'auto', blocks on a CPU) on config,
  with `references` our other ways of running the experts (the dense reference, 'dense': every
  expert on every token; on a CPU ragged_dot's dropless step, 'ragged'), and with `peer`
  transformers' under each of its experts implementations (holding our initial weights, its
  loss at init checked equal to ours) and the first MoE layer alone beside theirs, all
  alternately; per step its timing and MFU on the active parameters, ours / it in tokens/s, and
  the flops per token each way of running the experts must spend."""
  from experiments import torch_peer  # torch and transformers: the dev extra
  cfg = ModelConfig.from_dict(config.model)
  tokens, seq_len = config.data.batch_size * config.data.seq_len, config.data.seq_len
  row = {'name': name, 'params': param_count(cfg), 'active_params': active_param_count(cfg),
         **{k: config.model[k] for k in MOE_FIELDS}, 'batch': config.data.batch_size,
         'seq_len': seq_len, 'compile_s': {}, 'loss_init': {}}
  builds = {'dropless': config}  # moe_impl 'auto': blocks on a CPU, ragged_dot elsewhere
  for impl in (('ragged', 'dense') if platform.current() == 'cpu' else ('dense',)) * references:
    builds[impl] = copy.deepcopy(config)
    builds[impl].model.moe_impl = impl
  steps = {}
  for impl, build in builds.items():
    start = time.perf_counter()
    steps[impl] = torch_peer.jax_step(build)
    row['loss_init'][impl] = float(steps[impl]()['loss'])  # compiles; before the first update
    row['compile_s'][impl] = time.perf_counter() - start
  blocks = max(2, FLAGS.direct_steps // 2)
  block_steps = max(1, FLAGS.direct_steps // blocks)
  if peer:
    with tempfile.TemporaryDirectory() as tmp:
      peers, row['loss_init']['torch'] = torch_peer.same_weights_peers(
          config, pathlib.Path(tmp), row['loss_init']['dropless'])
    # the first MoE layer alone, while the peers still hold our initial weights
    layer = cfg.first_k_dense_replace
    ours = {'dropless': cfg.moe_impl, **({'dense': 'dense'} if references else {})}
    layer_steps = torch_peer.moe_layer_steps(config, peers, ours, layer)
    if platform.current() == 'cpu':  # what XLA:CPU's batched products of blocks cost
      layer_steps.update(block_product_steps(cfg, tokens))
    layers = timing.compare(layer_steps, tokens, blocks, block_steps)
    row['layer'] = {'index': layer, 'steps': {n: layers[n] for n in layer_steps},
                    'ratios': {n: layers[f'ratio_dropless_over_{n}'] for n in layer_steps
                               if n != 'dropless'}}
    steps.update(peers)
  result = timing.compare(steps, tokens, blocks, block_steps)
  model = flops_per_token(cfg, seq_len)
  row['flops_per_token'] = {'model': model,
                            'dense': flops_per_token(cfg, seq_len, cfg.n_routed_experts)}
  if platform.current() == 'cpu':  # ragged_dot as XLA:CPU lowers it: all E experts, N K rows
    row['flops_per_token']['ragged_as_lowered'] = flops_per_token(
        cfg, seq_len, cfg.n_routed_experts * cfg.num_experts_per_tok)
  row['steps'] = {n: {**result[n], 'mfu': result[n]['tokens_per_s'] * model / peak_flops}
                  for n in steps}
  row['ratios'] = {n: result[f'ratio_dropless_over_{n}'] for n in steps if n != 'dropless'}
  return row


def block_product_steps(cfg: ModelConfig, tokens: int) -> dict:
  """The routed experts' three SwiGLU products alone, forward and backward, on random rows laid
  out as moe.experts_blocked lays out tokens * K rows (whole blocks, as many as its bound),
  two ways: 'blocks', its product of each block with its expert's weights (batched); 'one',
  a single product of as many rows with one expert's weights (the same flops without blocks)."""
  e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.moe_intermediate_size
  rows = tokens * cfg.num_experts_per_tok
  block = moe.block_rows(rows, e)
  blocks = moe.block_count(rows, e, block)
  keys = jax.random.split(jax.random.key(0), 4)
  x_bmd = jax.random.normal(keys[0], (blocks, block, d))
  w = [jax.random.normal(k, shape) / np.sqrt(shape[1])
       for k, shape in zip(keys[1:], ((e, d, f), (e, d, f), (e, f, d)), strict=True)]
  expert_b = jnp.arange(blocks) * e // blocks  # sorted by expert, as the blocks are

  def blocks_out(x_bmd, wg, wu, wd):
    return moe.block_products(x_bmd, expert_b, wg, wu, wd)

  def one_out(x_bmd, wg, wu, wd):
    x_Md = x_bmd.reshape(-1, d)
    return (jax.nn.silu(x_Md @ wg[0]) * (x_Md @ wu[0])) @ wd[0]

  steps = {}
  for name, out in (('blocks', blocks_out), ('one', one_out)):
    grad = jax.jit(jax.grad(lambda *a, out=out: jnp.sum(out(*a) ** 2), argnums=(0, 1, 2, 3)))
    steps[name] = lambda grad=grad: jax.block_until_ready(grad(x_bmd, *w))
  return steps


def moe_main(rows: Rows, peak: float) -> None:
  from experiments import torch_peer
  peer = torch_peer.available()
  if not peer:
    print(torch_peer.MISSING, flush=True)
  for name, (config, beside, references) in moe_configs(size()).items():
    row = rows.add(functools.partial(moe_row, name, config, peak, peer and beside, references),
                   name=name)
    if row is not None:
      print(row, flush=True)
  print('\n'.join([*tables.bench_train_moe_table({'rows': rows.rows}), '',
                   *tables.bench_train_moe_flops_table({'rows': rows.rows}), '',
                   *tables.bench_train_moe_layer_table({'rows': rows.rows})]))


def size() -> str:
  return 'tiny' if FLAGS.quick else FLAGS.size


def main():
  config = config_for('mha', size(), 'auto')
  training.request_determinism(config)  # before jax starts its backends: XLA reads its flags once
  if FLAGS.peer:  # torch shares the device: jax must not take 75% of its memory up front
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  dtype = str(ModelConfig.from_dict(config.model).compute_dtype)
  measured = machine_limits(5, mib=256, dtype=dtype,
                            n=2048 if platform.current() == 'cpu' else 8192)
  peak = FLAGS.peak_tflops * 1e12 or measured['matmul_flops_per_s']
  rows = Rows(common.out_dir('bench_train') / f"bench_train{'_moe' if FLAGS.moe else ''}.json",
              device=str(jax.devices()[0]), size=size(), peak_flops=peak,
              measured_matmul_flops_per_s=measured['matmul_flops_per_s'],
              deterministic=FLAGS.deterministic)
  if FLAGS.moe:
    moe_main(rows, peak)
    rows.finish()
    return
  for variant in FLAGS.variants:
    for impl in FLAGS.impls:
      row = rows.add(functools.partial(bench_row, variant, impl, peak), variant=variant,
                     impl=impl)
      if row is not None:
        print(row, flush=True)
  print(f"MFU against {peak / 1e12:.1f} TFLOP/s ({'given' if FLAGS.peak_tflops else 'measured'}"
        f', {dtype})\n' + '\n'.join(tables.bench_train_table({'rows': rows.rows})))
  rows.finish()

if __name__ == '__main__':
  cli.run(main)
