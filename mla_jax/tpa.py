"""Tensor Product Attention (Zhang et al. 2025, "Tensor Product Attention Is All You Need",
arXiv 2501.06425; docs/design.md#12-tpa): every token's queries, keys and values are rank-R
sums of outer products of a head factor a [H] and a token factor b [d_h], both linear in x_t.

  Q_t = 1/R_Q sum_r a^Q_r(x_t) (x) b^Q_r(x_t)      (and K, V with R_K, R_V)   eq. 3.1
  a^Q(x_t) = x_t W_aQ [H, R_Q];  b^Q(x_t) = x_t W_bQ [R_Q, d_h]
  RoPE rotates the token factors b^Q and b^K (each rank's row, eqs. 3.5-3.6), so
  RoPE(Q_t) = 1/R_Q A^Q^T RoPE(B^Q): the heads' contraction commutes with the rotation.

tpa_q_rank = 0 is the paper's TPA-KVonly: queries from a standard per-head projection, only
keys and values factorised. The cache holds the factors (a^K, RoPE(b^K), a^V, b^V), not the
keys and values: (R_K + R_V)(H + d_h) per token and layer (TPACache). A decode step contracts
them in factored form without expanding a key or value (FlashTPA decoding, section 5 of the
paper); a whole sequence or a prefill chunk expands them into per-head keys and values and runs
ordinary attention, which costs less per score when many queries read the same keys.

Shape letters beyond layers.py's: i, j, u the query, key and value ranks R_Q, R_K, R_V.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import rope, variants
from mla_jax.attention import resolve_positions
from mla_jax.attention_op import (
  AttentionOp,
  attention_weights,
  cache_mask,
  causal_attention,
  causal_mask,
  masked_softmax,
)
from mla_jax.cache import write_at
from mla_jax.config import ModelConfig
from mla_jax.layers import dense, weight
from mla_jax.sharding import constrain


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=['a_k', 'b_k', 'a_v', 'b_v'], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class TPACache:
  """One layer's TPA cache, token-major: a_k [b, s, h, j], b_k [b, s, j, k] (after RoPE),
  a_v [b, s, h, u], b_v [b, s, u, k]. Float only: TPA has no 8-bit cache."""

  a_k: jax.Array
  b_k: jax.Array
  a_v: jax.Array
  b_v: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> TPACache:
    h, k, rk, rv = cfg.n_heads, cfg.head_dim, cfg.tpa_k_rank, cfg.tpa_v_rank
    zeros = lambda shape, axes: constrain(jnp.zeros((batch, max_len, *shape), dtype),
                                          ('batch', 'seq', *axes))
    return cls(zeros((h, rk), ('heads', None)), zeros((rk, k), (None, 'head_dim')),
               zeros((h, rv), ('heads', None)), zeros((rv, k), (None, 'head_dim')))

  def write(self, a_k_bthj, b_k_btjk, a_v_bthu, b_v_btuk, positions_bt) -> TPACache:
    """Stores new factors at each sequence's own positions [b, t]."""
    put = lambda buf, new: write_at(buf, new, positions_bt, seq_axis=1)
    return TPACache(put(self.a_k, a_k_bthj), put(self.b_k, b_k_btjk), put(self.a_v, a_v_bthu),
                    put(self.b_v, b_v_btuk))


def expand(a_bshr, b_bsrk):
  """The tensor product of eq. 3.1, 1/R sum_r a_r (x) b_r, heads first: [b, h, s, k]."""
  return jnp.einsum('bshr,bsrk->bhsk', a_bshr, b_bsrk) / a_bshr.shape[-1]


class TPAttention(nnx.Module):
  """Tensor Product Attention; tpa_q_rank = 0: TPA-KVonly (module docstring)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, op: AttentionOp | None = None):
    self.cfg = cfg  # op is unused: the spec declares no kernels, so it is the einsum path
    d, h, k = cfg.d_model, cfg.n_heads, cfg.head_dim
    head_factor = lambda r: weight(rngs, cfg, (d, h, r), ('embed', 'heads', None), fan_in=d)
    token_factor = lambda r: weight(rngs, cfg, (d, r, k), ('embed', None, 'head_dim'), fan_in=d)
    if cfg.tpa_q_rank:
      self.w_aq, self.w_bq = head_factor(cfg.tpa_q_rank), token_factor(cfg.tpa_q_rank)
    else:
      self.w_q = weight(rngs, cfg, (d, h, k), ('embed', 'heads', 'head_dim'), fan_in=d)
    self.w_ak, self.w_bk = head_factor(cfg.tpa_k_rank), token_factor(cfg.tpa_k_rank)
    self.w_av, self.w_bv = head_factor(cfg.tpa_v_rank), token_factor(cfg.tpa_v_rank)
    self.w_o = weight(rngs, cfg, (h, k, d), ('heads', 'head_dim', 'embed'), fan_in=h * k)

  def init_cache(self, batch: int, max_len: int, dtype) -> TPACache:
    return TPACache.init(self.cfg, batch, max_len, dtype)

  def _w(self, p):
    return p[...].astype(self.cfg.compute_dtype)

  def factors(self, x_btd, positions_bt):
    """The query's (a^Q [b, t, h, i], RoPE(b^Q) [b, t, i, k]), or (None, RoPE(q) [b, t, h, k])
    for KV-only, and the keys' and values' factors (a^K, RoPE(b^K), a^V, b^V)."""
    cfg = self.cfg
    cos, sin = rope.rope_angles(positions_bt, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    rotate = lambda x: rope.apply_rope(x, cos, sin, cfg.rope_layout)  # over the rank axis too
    proj = lambda name: dense(x_btd, self._w(getattr(self, name)))
    query = ((proj('w_aq'), rotate(proj('w_bq'))) if cfg.tpa_q_rank
             else (None, rotate(proj('w_q'))))
    return query, (proj('w_ak'), rotate(proj('w_bk')), proj('w_av'), proj('w_bv'))

  def __call__(self, x_btd, positions_bt=None, cache: TPACache | None = None):
    cfg = self.cfg
    positions_bt, whole = resolve_positions(x_btd, positions_bt)
    (a_q, b_q), kv = self.factors(x_btd, positions_bt)
    scale = cfg.head_dim**-0.5 * rope.softmax_mscale(cfg.rope_scaling)**2
    if cache is not None:
      cache = cache.write(*kv, positions_bt)
      kv = tuple(x.astype(cfg.compute_dtype) for x in (cache.a_k, cache.b_k, cache.a_v,
                                                       cache.b_v))
      mask = cache_mask(positions_bt, kv[0].shape[1])
    else:  # None: a whole sequence, for the causal kernel
      mask = None if whole else causal_mask(positions_bt, positions_bt)
    if cache is not None and x_btd.shape[1] == 1:
      o = self._factored(a_q, b_q, kv, mask, scale)
    else:
      q_bthk = b_q if a_q is None else jnp.einsum('bthi,btik->bthk', a_q, b_q) / cfg.tpa_q_rank
      o = self._expanded(q_bthk, kv, mask, scale)
    return dense(o.astype(x_btd.dtype), self._w(self.w_o), n_in=2), cache

  def _expanded(self, q_bthk, kv, mask_bts, scale):
    """Ordinary attention over the expanded keys and values [b, h, s, k]: a whole sequence
    (mask None) through the einsum causal kernel, else by position mask."""
    a_k, b_k, a_v, b_v = kv
    k_bhsk, v_bhsk = expand(a_k, b_k), expand(a_v, b_v)
    if mask_bts is None:  # every head its own group of one
      o = causal_attention(q_bthk.transpose(0, 2, 1, 3)[:, :, None], k_bhsk, v_bhsk, scale)
      return o[:, :, 0].transpose(0, 2, 1, 3)
    probs = attention_weights((q_bthk[:, :, :, None],), (k_bhsk,), mask_bts, scale)[:, :, 0]
    return jnp.einsum('bhsk,bhts->bthk', v_bhsk, probs.astype(v_bhsk.dtype),
                      preferred_element_type=jnp.float32)

  def _factored(self, a_q, b_q, kv, mask_bts, scale):
    """One query token per sequence against the cached factors, never expanding a cached key
    or value (FlashTPA decoding): the scores q_h . K_s,h = 1/R_K sum_j a^K_sh,j (q_h . b^K_sj),
    with q_h . b^K_sj from the query's factors, 1/R_Q sum_i a^Q_h,i (b^Q_i . b^K_sj), where
    that is cheaper (variants.tpa_factored_queries); then the output 1/R_V sum_u sum_s
    (p_hs a^V_sh,u) b^V_su. The 1/R of the scores go into the softmax's scale, so what runs
    per cached token is the contractions variants.Variant.decode_flops counts."""
    cfg = self.cfg
    a_k, b_k, a_v, b_v = kv
    f32 = dict(preferred_element_type=jnp.float32)
    scale = scale / cfg.tpa_k_rank
    if a_q is None or not variants.tpa_factored_queries(cfg):
      q_bhk = (b_q[:, 0] if a_q is None else
               jnp.einsum('bhi,bik->bhk', a_q[:, 0], b_q[:, 0]) / cfg.tpa_q_rank)
      qb_bhsj = jnp.einsum('bsjk,bhk->bhsj', b_k, q_bhk, **f32)
    else:
      bb_bsij = jnp.einsum('bsjk,bik->bsij', b_k, b_q[:, 0], **f32)
      qb_bhsj = jnp.einsum('bsij,bhi->bhsj', bb_bsij, a_q[:, 0], **f32)
      scale = scale / cfg.tpa_q_rank
    scores_bhs = jnp.einsum('bshj,bhsj->bhs', a_k, qb_bhsj, **f32)
    probs_bhs = masked_softmax(scores_bhs[:, :, None, None], mask_bts, scale)[:, :, 0, 0]
    weights_bshu = a_v * probs_bhs.transpose(0, 2, 1)[..., None].astype(a_v.dtype)
    o_bhk = jnp.einsum('bsuk,bshu->bhk', b_v, weights_bshu, **f32) / cfg.tpa_v_rank
    return o_bhk[:, None]
