"""Grouped-Tied Attention (GTA): Zadouri, Strauss & Dao, "Hardware-Efficient Attention for Fast
Decoding", 2025 (arXiv 2505.21487); docs/design.md#13-gta-and-gla has the equations.

GQA whose G key heads and G value heads are one tied state per group, kv = x W_KV [b, t, g, k]:
it is the group's value, and its first d_h - d_R dims are the key's part without RoPE. The
key's other d_R dims come from one separate rope key, k_rope = RoPE(x W_KR) [b, t, r], which
every head shares (as MLA's does). Queries are x W_Q with RoPE on their last d_R dims. The
cache holds kv and k_rope: n_kv_heads * d_h + d_R per token and layer, about half of GQA's.

Followed as the authors' modeling_llama_GTA.py computes it, except where the paper's count of
the cache and the code differ: the code caches the rope key repeated to every query head; the
paper counts it once, and so does TiedCache. The code's W_KR (torch's nn.Linear) has a bias;
the paper's equations have none, and neither has this module. The score scale is d_h^-1/2,
flash attention's default for the code's d_h-wide heads.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import rope
from mla_jax.attention import call_kind, resolve_positions
from mla_jax.attention_op import AttentionOp, attention_weights, cache_mask, causal_mask, resolve
from mla_jax.cache import store, zeros
from mla_jax.config import ModelConfig
from mla_jax.layers import dense, weight


@functools.partial(jax.tree_util.register_dataclass, data_fields=['kv', 'k_rope'],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TiedCache:
  """One layer's GTA cache: the tied states kv [b, g, s, k], heads-major as KVCache keeps its
  keys (a decode step reads each group's [s, k] block once, for scores and values), and the
  one rope key k_rope [b, s, r]."""

  kv: jax.Array
  k_rope: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> TiedCache:
    g, k, r = cfg.n_kv_heads, cfg.head_dim, cfg.qk_rope_head_dim
    return cls(zeros((batch, g, max_len, k), dtype, ('batch', 'kv_heads', 'seq', 'head_dim'),
                     feature_axis=3),
               zeros((batch, max_len, r), dtype, ('batch', 'seq', 'head_dim'), feature_axis=2))

  def write(self, kv_btgk, k_rope_btr, positions_bt) -> TiedCache:
    """Stores new tied states and rope keys at each sequence's own positions [b, t]."""
    return TiedCache(store(self.kv, kv_btgk, positions_bt, seq_axis=2),
                     store(self.k_rope, k_rope_btr, positions_bt, seq_axis=1))


class GTAttention(nnx.Module):
  """q = x W_Q [h, d_h] (RoPE on its last d_R dims); kv = x W_KV [g, d_h]; k_rope = RoPE(x W_KR)
  [d_R]. Head i of group i // P scores q[:d_h - d_R] . kv[:d_h - d_R] + q[d_h - d_R:] . k_rope
  and reads the value kv."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, op: AttentionOp | None = None):
    self.cfg, self.op = cfg, resolve(cfg) if op is None else op
    d, h, g, k, r = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                     cfg.qk_rope_head_dim)
    self.w_q = weight(rngs, cfg, (d, h, k), ('embed', 'heads', 'head_dim'), fan_in=d)
    self.w_kv = weight(rngs, cfg, (d, g, k), ('embed', 'kv_heads', 'head_dim'), fan_in=d)
    self.w_kr = weight(rngs, cfg, (d, r), ('embed', 'head_dim'), fan_in=d)
    self.w_o = weight(rngs, cfg, (h, k, d), ('heads', 'head_dim', 'embed'), fan_in=h * k)

  def init_cache(self, batch: int, max_len: int, dtype) -> TiedCache:
    return TiedCache.init(self.cfg, batch, max_len, dtype)

  def __call__(self, x_btd, positions_bt=None, cache: TiedCache | None = None):
    cfg, op = self.cfg, self.op
    w = lambda p: p[...].astype(cfg.compute_dtype)
    n = cfg.head_dim - cfg.qk_rope_head_dim  # the tied state's dims that are key without RoPE
    positions_bt, whole = resolve_positions(x_btd, positions_bt)
    cos, sin = rope.rope_angles(positions_bt, cfg.qk_rope_head_dim, cfg.rope_theta,
                                cfg.rope_scaling)
    q = dense(x_btd, w(self.w_q))  # [b, t, h, k]
    q = jnp.concatenate([q[..., :n], rope.apply_rope(q[..., n:], cos, sin, cfg.rope_layout)],
                        axis=-1)
    kv = dense(x_btd, w(self.w_kv))  # [b, t, g, k]
    k_rope = rope.apply_rope(dense(x_btd, w(self.w_kr)), cos, sin, cfg.rope_layout)  # [b, t, r]
    scale = cfg.head_dim**-0.5 * rope.softmax_mscale(cfg.rope_scaling)**2
    b, t, h, _ = q.shape
    q = q.reshape(b, t, cfg.n_kv_heads, h // cfg.n_kv_heads, -1)  # [b, t, g, p, k]
    if cache is not None:
      cache = cache.write(kv, k_rope, positions_bt)
    kind = call_kind(whole, cache, t)
    if kind == 'whole':
      o = op.causal(q, self._keys(kv, k_rope), kv, scale)
    elif kind == 'decode' and op.decode != 'einsum':
      o = self._decode_kernel(q, cache, positions_bt, scale)
    elif kind == 'prefill' and op.prefill != 'einsum':
      if cache is None:
        kv_bsgk, k_rope_bsr, mask = kv, k_rope, causal_mask(positions_bt, positions_bt)
      else:
        kv_bsgk, k_rope_bsr = cache.kv.transpose(0, 2, 1, 3), cache.k_rope
        mask = cache_mask(positions_bt, k_rope_bsr.shape[1])
      g, p = q.shape[2:4]
      o = op.flash(q.reshape(b, t, g * p, -1), self._keys(kv_bsgk, k_rope_bsr), kv_bsgk, mask,
                   scale).reshape(b, t, g, p, -1)
    else:
      o = self._einsum(q, kv, k_rope, cache, positions_bt, scale)
    return dense(o.reshape(b, t, h, -1).astype(x_btd.dtype), w(self.w_o), n_in=2), cache

  def _keys(self, kv_bsgk, k_rope_bsr):
    """Whole keys [b, s, g, k] for flash attention: the tied state's first d_h - d_R dims and
    the rope key, the same in every group."""
    n = self.cfg.head_dim - self.cfg.qk_rope_head_dim
    k_rope = jnp.broadcast_to(k_rope_bsr[:, :, None], (*kv_bsgk.shape[:3], k_rope_bsr.shape[-1]))
    return jnp.concatenate([kv_bsgk[..., :n], k_rope.astype(kv_bsgk.dtype)], axis=-1)

  def _einsum(self, q_btgpk, kv_btgk, k_rope_btr, cache, positions_bt, scale):
    """The reference by position mask: two score parts, the nope one on the tied state's first
    d_h - d_R dims (read in place) and the rope one on the shared rope key; values kv."""
    n = self.cfg.head_dim - self.cfg.qk_rope_head_dim
    if cache is None:
      kv_bgsk, k_rope_bsr = kv_btgk.transpose(0, 2, 1, 3), k_rope_btr
      mask = causal_mask(positions_bt, positions_bt)
    else:
      kv_bgsk, k_rope_bsr = cache.kv, cache.k_rope
      mask = cache_mask(positions_bt, k_rope_bsr.shape[1])
    b, g, s, _ = kv_bgsk.shape
    k_rope_bgsr = jnp.broadcast_to(k_rope_bsr[:, None], (b, g, s, k_rope_bsr.shape[-1]))
    probs = attention_weights((q_btgpk[..., :n], q_btgpk[..., n:]),
                              (kv_bgsk[..., :n], k_rope_bgsr), mask, scale)
    return jnp.einsum('bgsk,bgpts->btgpk', kv_bgsk, probs.astype(kv_bgsk.dtype),
                      preferred_element_type=jnp.float32)

  def _decode_kernel(self, q_btgpk, cache, positions_bt, scale):
    """One decode step through the GQA kernel with the value tied to the key array: each
    program loads a block of kv once, for the scores and for the values. The nope query is
    zero-padded to d_h (its rope dims go to the second score part), so q . kv reads only the
    state's first d_h - d_R dims without slicing a tile to a width Triton cannot take."""
    n = self.cfg.head_dim - self.cfg.qk_rope_head_dim
    q = q_btgpk[:, 0]  # [b, g, p, k]
    q_tied = jnp.concatenate([q[..., :n], jnp.zeros_like(q[..., n:])], axis=-1)
    o = self.op.gqa_decode(q_tied, cache.kv, None, positions_bt[:, 0] + 1, scale,
                           q_rope_bgpr=q[..., n:], k_rope_bsr=cache.k_rope)
    return o[:, None]
