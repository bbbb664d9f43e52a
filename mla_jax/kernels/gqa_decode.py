"""MHA / GQA / MQA decode as a Pallas flash-decoding kernel.

Queries are grouped by KV head as in attention.py: q [b, g, p, k], p query heads per KV group
(MHA: p = 1, MQA: g = 1), against the cache k, v [b, g, s, k] (KVCache's heads-major layout;
MHA's transposed values [b, g, k, s] would need the [b, g, s, k] layout here). Each program
reads one group's keys and values once for its p heads:

  o[g, p] = softmax_s(q[g, p] . k[g, s] * scale, s < length_b) @ v[g, :length_b]

Per sequence a step reads g * length_b * (d_k + d_v) cache elements, plus 2 * g * 4 bytes a
token of scales for an 8-bit cache, the queries and num_splits * g * p * (d_v + 2) float32 of
partial outputs. split_kv.py has the algorithm (online softmax, split-KV, log-sum-exp
combine). Unlike jax's pallas/ops/gpu/decode_attention.py, the allocated context need not be a
multiple of the block or the split (the last block's loads are masked), keys and values may
have different widths, and work follows each sequence's length.
"""

from __future__ import annotations

import functools

import jax

from mla_jax.kernels.split_kv import check_ranks, split_kv_decode


@functools.partial(jax.jit, static_argnames=('scale', 'block_s', 'num_splits', 'block_h',
                                             'num_warps', 'num_stages', 'interpret', 'backend'))
def gqa_decode(q_bgpk, k_bgsk, v_bgsk, lengths_b, scale: float, *, k_scale_bgs=None,
               v_scale_bgs=None, q_rope_bgpr=None, k_rope_bsr=None,
               block_s: int | None = None, num_splits: int | None = None,
               block_h: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, interpret: bool = False, backend: str = 'auto'):
  """o [b, g, p, k] float32 of one query token per sequence over cache slots [0, lengths[b]).

  k_bgsk, v_bgsk: bfloat16 / float32, or int8 / float8_e4m3fn with the float32 per-token
  scales k_scale_bgs, v_scale_bgs (value = stored * scale); lengths_b >= 1. The keyword
  options are mla_decode's.

  Grouped-tied attention (GTA, mla_jax.gta): v_bgsk=None makes the value the key array
  itself, loaded once per block for both products (the tied state), and q_rope_bgpr with
  k_rope_bsr adds a second score part, q_rope . k_rope, whose one key head every group reads
  in place. GTA passes its nope query zero-padded to d_h, so that q . kv scores only the
  state's first d_h - d_R dims.
  """
  check_ranks(q_bgpk=(q_bgpk, 'bgpk'), k_bgsk=(k_bgsk, 'bgsk'), v_bgsk=(v_bgsk, 'bgsk'),
              lengths_b=(lengths_b, 'b'), k_scale_bgs=(k_scale_bgs, 'bgs'),
              v_scale_bgs=(v_scale_bgs, 'bgs'), q_rope_bgpr=(q_rope_bgpr, 'bgpr'),
              k_rope_bsr=(k_rope_bsr, 'bsr'))
  b, g, p, d_k = q_bgpk.shape
  s = k_bgsk.shape[2]
  if (q_rope_bgpr is None) != (k_rope_bsr is None) or (v_bgsk is None and v_scale_bgs is not None):
    raise ValueError('pass q_rope_bgpr and k_rope_bsr together, and no v_scale_bgs without '
                     'v_bgsk (a tied value is scaled as the key).')
  r = None if k_rope_bsr is None else k_rope_bsr.shape[2]
  expected = {'k_bgsk': (k_bgsk, (b, g, s, d_k)),
              'v_bgsk': (v_bgsk, None if v_bgsk is None else (b, g, s, v_bgsk.shape[3])),
              'lengths_b': (lengths_b, (b,)), 'k_scale_bgs': (k_scale_bgs, (b, g, s)),
              'v_scale_bgs': (v_scale_bgs, (b, g, s)), 'q_rope_bgpr': (q_rope_bgpr, (b, g, p, r)),
              'k_rope_bsr': (k_rope_bsr, (b, s, r))}
  for name, (x, shape) in expected.items():
    if x is not None and x.shape != shape:
      raise ValueError(f'{name} has shape {x.shape}; expected {shape} to match q_bgpk '
                       f'{q_bgpk.shape} and k_bgsk {k_bgsk.shape}.')
  q_parts, k_parts, k_scales = (q_bgpk,), (k_bgsk,), (k_scale_bgs,)
  if k_rope_bsr is not None:  # [b, 1, s, r]: one group, shared by all (split_kv._group)
    q_parts, k_parts = (*q_parts, q_rope_bgpr), (*k_parts, k_rope_bsr[:, None])
    k_scales = (*k_scales, None)
  return split_kv_decode(
      q_parts, k_parts, lengths_b, scale, v=v_bgsk, k_scales=k_scales,
      v_scale=v_scale_bgs, block_s=block_s, num_splits=num_splits, block_h=block_h,
      num_warps=num_warps, num_stages=num_stages, interpret=interpret, backend=backend)
