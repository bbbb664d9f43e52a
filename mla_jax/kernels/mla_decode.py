"""Absorbed MLA decode as a Pallas flash-decoding kernel (DeepSeek-V2 appendix C, eqs. 42-46).

With W_UK folded into the query and W_UV into the output (attention.py, MLAttention._absorbed),
one decode step of MLA is single-group attention over the latent cache: for sequence b, all H
query heads at once,

  score[h, s] = (q_lat[h] . c_kv[s] + q_rope[h] . k_rope[s]) * scale
  o_lat[h]    = softmax_s(score[h, :length_b]) @ c_kv[:length_b]

c_kv doubles as the value, so each cache row is read once for all heads and both products:
per sequence the step reads length_b * (d_c + d_r) cache elements (at d_c = 256, d_r = 32 in
bfloat16, 576 bytes a token), plus 2 * 4 bytes a token of dequantization scales for an 8-bit
cache, the queries H * (d_c + d_r), and num_splits * H * (d_c + 2) float32 of partial outputs.
That is the step's floor in bytes; docs/benchmarks.md has what it measures against that floor.
split_kv.py has the algorithm: online softmax over key blocks in
float32, the sequence split across programs (split-KV), a log-sum-exp combine.

The two score dots stay separate instead of one dot over the concatenated [c_kv, k_rope]:
d_c and d_r are each a power of two and d_c + d_r = 288 is not (Triton tiles must be powers
of two, so a joint tile would be padded to 512 columns); LatentCache stores them as two arrays,
which a joint tile would have to copy together every step; and each has its own 8-bit scale.
"""

from __future__ import annotations

import functools

import jax

from mla_jax.kernels.split_kv import check_ranks, split_kv_decode


@functools.partial(jax.jit, static_argnames=('scale', 'block_s', 'num_splits', 'block_h',
                                             'num_warps', 'num_stages', 'interpret', 'backend'))
def mla_decode(q_lat_bhc, q_rope_bhr, c_kv_bsc, k_rope_bsr, lengths_b, scale: float, *,
               c_kv_scale_bs=None, k_rope_scale_bs=None, block_s: int | None = None,
               num_splits: int | None = None, block_h: int | None = None,
               num_warps: int | None = None, num_stages: int | None = None,
               interpret: bool = False, backend: str = 'auto'):
  """o_lat [b, h, c] float32 of one query token per sequence over cache slots [0, lengths[b]).

  q_lat_bhc: q_nope folded with W_UK; q_rope_bhr: the rotated rope query; c_kv_bsc,
  k_rope_bsr: the latent cache (bfloat16, float32, or int8 / float8_e4m3fn with the float32
  per-token scales c_kv_scale_bs, k_rope_scale_bs: value = stored * scale); lengths_b >= 1.
  block_s / num_splits / block_h / num_warps / num_stages: None picks the backend's default
  (split_kv.py). backend: 'auto', 'triton' or 'mosaic'; interpret=True runs it on CPU.
  """
  check_ranks(q_lat_bhc=(q_lat_bhc, 'bhc'), q_rope_bhr=(q_rope_bhr, 'bhr'),
              c_kv_bsc=(c_kv_bsc, 'bsc'), k_rope_bsr=(k_rope_bsr, 'bsr'),
              lengths_b=(lengths_b, 'b'), c_kv_scale_bs=(c_kv_scale_bs, 'bs'),
              k_rope_scale_bs=(k_rope_scale_bs, 'bs'))
  b, h, c = q_lat_bhc.shape
  s, r = k_rope_bsr.shape[1:]
  expected = {'q_rope_bhr': (q_rope_bhr, (b, h, r)), 'c_kv_bsc': (c_kv_bsc, (b, s, c)),
              'lengths_b': (lengths_b, (b,)), 'c_kv_scale_bs': (c_kv_scale_bs, (b, s)),
              'k_rope_scale_bs': (k_rope_scale_bs, (b, s))}
  for name, (x, shape) in expected.items():
    if x is not None and x.shape != shape:
      raise ValueError(f'{name} has shape {x.shape}; expected {shape} to match q_lat_bhc '
                       f'{q_lat_bhc.shape} and k_rope_bsr {k_rope_bsr.shape}.')
  group = lambda x: None if x is None else x[:, None]  # g = 1: one latent "KV head"
  o = split_kv_decode(
      (group(q_lat_bhc), group(q_rope_bhr)), (group(c_kv_bsc), group(k_rope_bsr)), lengths_b,
      scale, k_scales=(group(c_kv_scale_bs), group(k_rope_scale_bs)), block_s=block_s,
      num_splits=num_splits, block_h=block_h, num_warps=num_warps, num_stages=num_stages,
      interpret=interpret, backend=backend)
  return o[:, 0]


@functools.partial(jax.jit, static_argnames=('scale', 'block_s', 'num_splits', 'block_h',
                                             'num_warps', 'num_stages', 'interpret', 'backend'))
def gla_decode(q_lat_bgpc, q_rope_bgpr, c_kv_bgsc, k_rope_bsr, lengths_b, scale: float, *,
               block_s: int | None = None, num_splits: int | None = None,
               block_h: int | None = None, num_warps: int | None = None,
               num_stages: int | None = None, interpret: bool = False, backend: str = 'auto'):
  """Absorbed GLA decode (mla_jax.gla): mla_decode once per latent head, as one call whose
  programs are (sequence, latent head, head block, split). o_lat [b, g, p, c] float32.

  q_lat_bgpc: each group's p query heads folded with their latent head's W_UK; c_kv_bgsc: the
  g latent heads, heads-major as GroupedLatentCache stores them; k_rope_bsr: the one rope key
  every latent head's program reads in place. Per sequence a step reads length_b * (d_c + g
  d_r) cache elements (k_rope once per latent head); on a device holding one latent head
  (tensor parallel over g) that is length_b * (d_c / g + d_r). Options are mla_decode's.
  """
  check_ranks(q_lat_bgpc=(q_lat_bgpc, 'bgpc'), q_rope_bgpr=(q_rope_bgpr, 'bgpr'),
              c_kv_bgsc=(c_kv_bgsc, 'bgsc'), k_rope_bsr=(k_rope_bsr, 'bsr'),
              lengths_b=(lengths_b, 'b'))
  b, g, p, c = q_lat_bgpc.shape
  s, r = k_rope_bsr.shape[1:]
  expected = {'q_rope_bgpr': (q_rope_bgpr, (b, g, p, r)), 'c_kv_bgsc': (c_kv_bgsc, (b, g, s, c)),
              'lengths_b': (lengths_b, (b,))}
  for name, (x, shape) in expected.items():
    if x.shape != shape:
      raise ValueError(f'{name} has shape {x.shape}; expected {shape} to match q_lat_bgpc '
                       f'{q_lat_bgpc.shape} and k_rope_bsr {k_rope_bsr.shape}.')
  return split_kv_decode(
      (q_lat_bgpc, q_rope_bgpr), (c_kv_bgsc, k_rope_bsr[:, None]), lengths_b, scale,
      block_s=block_s, num_splits=num_splits, block_h=block_h, num_warps=num_warps,
      num_stages=num_stages, interpret=interpret, backend=backend)
