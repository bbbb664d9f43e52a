r"""The kernels (attention_impl='kernels') against the einsum path on this device, for every
registered variant.

  python -m experiments.device_check --out=DIR [--quick]       # DIR/device_check.json

float32 (matmuls at 'highest' precision): kernels' and einsum logits, and logits through the decode
cache (prefill + one-token steps: the Pallas kernels), must agree within 1e-5 as on a CPU.
bfloat16: both paths are compared with the float32 einsum reference, in the whole-sequence
forward (training's path) and through the cache, each path's error the larger of the two; the
kernels' may not exceed 2x the einsum path's own (flash attention rounds differently, not
worse). Part of experiments.bench_device; runs on a CPU too (kernels interpreted).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from absl import app, flags
from flax import nnx

import mla_jax
from experiments import common, tables
from experiments.timing import Rows
from mla_jax import cli, variants
from mla_jax.model import with_config

FLAGS = flags.FLAGS


def _max_error(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def _forward(model, tokens) -> np.ndarray:
  """Float32 logits [t, V] of one whole sequence, jitted: called eagerly, a model's forward
  compiles each of its ops on its own, which on a GPU takes longer than the whole check."""
  graphdef, state = nnx.split(model)
  logits = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, tokens[None])
  return np.asarray(logits[0], np.float32)


def check_variant(name: str, size: dict, tokens: np.ndarray) -> dict:
  fields = {**size, **variants.get(name).example}
  if 'kv_lora_rank' in fields:  # MLA at the paper's ratios (the kernels' block sizes want them)
    d_h = size['d_model'] // size['n_heads']
    fields.update(kv_lora_rank=4 * d_h, qk_rope_head_dim=d_h // 2)
  cfg = mla_jax.ModelConfig(attention=name, attention_impl='einsum', vocab_size=256,
                            max_seq_len=1024, **fields)
  reference = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  kernels = with_config(reference, attention_impl='kernels')
  row = {'variant': name}
  with jax.default_matmul_precision('highest'):
    want = _forward(reference, tokens)
    row['f32_logits'] = _max_error(_forward(kernels, tokens), want)
    row['f32_cache'] = _max_error(mla_jax.logits_through_cache(kernels, tokens), want)
  # bfloat16: the whole-sequence forward (training's path: cuDNN's causal mode on a GPU) and
  # the cache (chunked prefill with a position mask, then the decode kernels)
  bf16 = {impl: with_config(reference, dtype='bfloat16', attention_impl=impl)
          for impl in ('einsum', 'kernels')}
  errors = {impl: max(_max_error(_forward(m, tokens), want),
                      _max_error(mla_jax.logits_through_cache(m, tokens), want))
            for impl, m in bf16.items()}
  row.update(bf16_einsum=errors['einsum'], bf16_kernels=errors['kernels'],
             bf16_ratio=errors['kernels'] / max(errors['einsum'], 1e-30))
  row['ok'] = bool(max(row['f32_logits'], row['f32_cache']) <= tables.FLOAT32_ATOL
                   and row['bf16_ratio'] <= tables.BF16_RATIO)
  return row


def main(argv):
  del argv
  size = (dict(d_model=64, n_layers=2, n_heads=4, d_ff=128) if FLAGS.quick else
          dict(d_model=512, n_layers=2, n_heads=8, d_ff=1024))
  # 96 tokens: a prefill chunk of 8, then 88 decode steps through the kernels
  tokens = np.random.default_rng(0).integers(0, 256, 24 if FLAGS.quick else 96)
  rows = Rows(common.out_dir('device_check') / 'device_check.json', device=str(jax.devices()[0]))
  for name in variants.names():
    rows.add(functools.partial(check_variant, name, size, tokens), {'ok': False}, variant=name)
    print(rows.rows[-1], flush=True)
  print('\n'.join(tables.device_check_table({'rows': rows.rows})))
  rows.finish()
  if not all(r['ok'] for r in rows.rows):
    raise SystemExit('error: a kernel disagrees with the einsum path on this device')

if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
