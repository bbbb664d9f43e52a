r"""Decode benchmark: time per generated token and cache size for every attention variant
(docs/benchmarks.md, "Decode").

  python -m experiments.bench_decode      # experiments/results/bench_decode/bench_decode.json
  python -m experiments.bench_decode --quick --out=/tmp/bd     # a small smoke version

The rows are timing.decode_configs' (MHA, GQA, MQA, MLA naive and absorbed, GTA, GLA-2, TPA) at one
d_model, head count and depth, each timed by
timing.decode_row over a random cache with every sequence at the context's last position, so
the step reads the whole cache; fraction = max(bytes the step must read / bandwidth, flops /
matmul rate) / measured time, both rates measured in the run (timing.machine_limits).

An 8-bit cache (--cache_dtypes=int8,float8_e4m3fn) counts its float32 scales in its bytes, so
in the limit. On a CPU the einsum path converts its values to the compute dtype as dot
operands, which XLA:CPU writes out as a temporary (one layer's values, unscaled): there an
8-bit cache saves memory, not time; the decode kernels (kernels rows) read the 8-bit values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import mla_jax
from experiments import common, tables, timing
from experiments.timing import machine_limits, median_seconds
from mla_jax import cli, platform

FLAGS = flags.FLAGS
flags.DEFINE_list('contexts', ['1024', '4096', '16384'], 'context lengths')
flags.DEFINE_list('batches', ['1', '8'], 'batch sizes')
flags.DEFINE_integer('d_model', 1024, 'model width')
flags.DEFINE_integer('n_heads', 16, 'query heads')
flags.DEFINE_integer('n_layers', 4, 'layers')
flags.DEFINE_string('dtype', 'float32', 'compute and parameter dtype (and the cache\'s, for none)')
flags.DEFINE_list('cache_dtypes', ['none'], "cache storage of each row: none (the compute "
                  "dtype), float32, bfloat16, int8 or float8_e4m3fn (8-bit with scales)")
flags.DEFINE_list('impls', ['auto'], "attention_impl of each row: einsum (the XLA einsum path), "
                  "kernels (the Pallas decode kernels), or auto: einsum on a CPU (where they "
                  "only run interpreted), both elsewhere")
flags.DEFINE_integer('matmul_n', 0, 'size of the matmul that measures the peak rate (0: 2048 '
                     'on a CPU, 8192 elsewhere)')
flags.DEFINE_integer('runs', 7, 'timed runs per row (median reported)')


def python_overhead_check(runs: int) -> dict:
  """No Python per token: generate's time per token vs one jitted one-token forward."""
  cfg = mla_jax.ModelConfig(d_model=64, n_heads=4, n_layers=1, max_seq_len=256)
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  prompts = np.ones((1, 64), np.int32)
  gen = lambda n: mla_jax.generate(model, prompts, max_new_tokens=n)
  n = 64
  per_token = (median_seconds(lambda: gen(n + 1), runs)
               - median_seconds(lambda: gen(1), runs)) / n
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  one = median_seconds(lambda: forward(state, jnp.ones((1, 1), jnp.int32)), runs)
  return {'generate_ms_per_token': 1e3 * per_token, 'jitted_forward_ms': 1e3 * one,
          'ratio': per_token / one}


def main(argv):
  del argv
  if FLAGS.quick:
    contexts, batches, size = [256, 1024], [1, 4], dict(d_model=128, n_heads=4, n_layers=2)
  else:
    contexts = [int(c) for c in FLAGS.contexts]
    batches = [int(b) for b in FLAGS.batches]
    size = dict(d_model=FLAGS.d_model, n_heads=FLAGS.n_heads, n_layers=FLAGS.n_layers)
  on_cpu = platform.current() == 'cpu'
  impls = list(FLAGS.impls)
  if impls == ['auto']:  # the decode kernels only run interpreted on a CPU
    impls = ['einsum'] if on_cpu else ['einsum', 'kernels']
  cache_dtypes = [None if name == 'none' else name for name in FLAGS.cache_dtypes]
  limits = machine_limits(FLAGS.runs, mib=256 if FLAGS.quick else 1024, dtype=FLAGS.dtype,
                          n=FLAGS.matmul_n or (2048 if on_cpu else 8192))
  rows = timing.Rows(common.out_dir('bench_decode') / 'bench_decode.json', machine=limits,
                     device=str(jax.devices()[0]), dtype=FLAGS.dtype, **size)
  for batch in batches:
    for context in contexts:
      for name, cfg in timing.decode_configs(dtype=FLAGS.dtype, impls=impls,
                                             cache_dtypes=cache_dtypes, **size).items():
        row = rows.add(
            functools.partial(timing.decode_row, name, cfg, batch, context, limits, FLAGS.runs),
            variant=name, batch=batch, context=context)
        if row is not None:
          print(f"{name:30s} b={batch} ctx={context:6d} {row['ms_per_token']:9.2f} ms "
                f"fraction {row['fraction_of_limit']:.2f}", flush=True)
  overhead = python_overhead_check(FLAGS.runs)
  print('\n'.join(tables.bench_decode_report({'machine': limits, 'rows': rows.rows})))
  print(f"\nno Python per token: generate {overhead['generate_ms_per_token']:.3f} ms/token vs "
        f"one jitted forward {overhead['jitted_forward_ms']:.3f} ms "
        f"(ratio {overhead['ratio']:.2f}; 1-layer d=64 model, context 128)")
  rows.save(python_overhead=overhead)
  rows.finish()

if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
