"""Attention modules: GQAttention (MHA / GQA / MQA) and MLAttention (DeepSeek-V2 appendix C).

A module holds its projections and its cache's reads and writes; how attention runs is its
AttentionOp's (mla_jax.attention_op: the kernel of each kind of call, resolved once when the
model is built, and the einsum reference). Modules are called with positions_bt=None for a
whole sequence at positions 0 .. t - 1 (training), which takes op.causal; with explicit
positions, masks are built from them.

An 8-bit cache (ModelConfig.cache_dtype, mla_jax.quant) is read through its cache's `read`:
8-bit values converted to the compute dtype as dot operands, and per-token scales that
attention_op folds into the scores, q . (k s) = (q . k) s, and into the probabilities,
p . (v s) = (p s) . v. No dequantized copy of the cache is made, except by flash prefill, which
dequantizes the keys and values it reads (flash attention takes no scales). The decode kernels
take the 8-bit values and their scales as they are. Shape letters are listed in layers.py.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mla_jax import quant, rope
from mla_jax.attention_op import (
  AttentionOp,
  attention_weights,
  cache_mask,
  causal_mask,
  resolve,
  scale_tokens,
)
from mla_jax.cache import KVCache, LatentCache
from mla_jax.config import ModelConfig
from mla_jax.layers import RMSNorm, dense, weight


def _per_group(scale_bs):
  """A latent array's scale [b, s] as the [b, 1, s] of one group shared by every head."""
  return None if scale_bs is None else scale_bs[:, None]


def resolve_positions(x_btd, positions_bt):
  """(positions [b, t], whether they are a whole sequence 0 .. t - 1 given as None)."""
  if positions_bt is not None:
    return positions_bt, False
  b, t = x_btd.shape[:2]
  return jnp.broadcast_to(jnp.arange(t), (b, t)), True


def call_kind(whole: bool, cache, t: int) -> str:
  """Which of AttentionOp's kinds a call is: 'whole' (a whole sequence without a cache),
  'decode' (one token per sequence against a cache), else 'prefill' (queries by position mask,
  against a cache or at explicit positions)."""
  if cache is None:
    return 'whole' if whole else 'prefill'
  return 'decode' if t == 1 else 'prefill'


class GQAttention(nnx.Module):
  """Multi-head attention with n_kv_heads key/value heads: MHA (G = H), GQA, MQA (G = 1)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, op: AttentionOp | None = None):
    self.cfg, self.op = cfg, resolve(cfg) if op is None else op
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.w_q = weight(rngs, cfg, (d, h, k), ('embed', 'heads', 'head_dim'), fan_in=d)
    self.w_k = weight(rngs, cfg, (d, g, k), ('embed', 'kv_heads', 'head_dim'), fan_in=d)
    self.w_v = weight(rngs, cfg, (d, g, k), ('embed', 'kv_heads', 'head_dim'), fan_in=d)
    self.w_o = weight(rngs, cfg, (h, k, d), ('heads', 'head_dim', 'embed'), fan_in=h * k)
    if cfg.qkv_bias:  # Qwen2's; zero at init, so a fresh model scores as one without them
      zeros = lambda shape, axes: nnx.Param(jnp.zeros(shape, jnp.dtype(cfg.param_dtype)),
                                            axes=axes)
      self.b_q = zeros((h, k), ('heads', 'head_dim'))
      self.b_k = zeros((g, k), ('kv_heads', 'head_dim'))
      self.b_v = zeros((g, k), ('kv_heads', 'head_dim'))

  def _project(self, x_btd, name: str):
    """x W (+ b when cfg.qkv_bias), in the compute dtype: [b, t, heads, k]."""
    dtype = self.cfg.compute_dtype
    y = dense(x_btd, getattr(self, 'w_' + name)[...].astype(dtype))
    if self.cfg.qkv_bias:
      y = y + getattr(self, 'b_' + name)[...].astype(dtype)[None, None]  # over [b, t]
    return y

  def init_cache(self, batch: int, max_len: int, dtype) -> KVCache:
    return KVCache.init(self.cfg, batch, max_len, dtype,
                        einsum_reads=self.op.einsum_cache_layout)

  def __call__(self, x_btd, positions_bt=None, cache: KVCache | None = None):
    cfg = self.cfg
    w = lambda p: p[...].astype(cfg.compute_dtype)
    positions_bt, whole = resolve_positions(x_btd, positions_bt)
    cos, sin = rope.rope_angles(positions_bt, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q = rope.apply_rope(self._project(x_btd, 'q'), cos, sin, cfg.rope_layout)  # [b, t, h, k]
    k = rope.apply_rope(self._project(x_btd, 'k'), cos, sin, cfg.rope_layout)  # [b, t, g, k]
    v = self._project(x_btd, 'v')  # [b, t, g, k]
    scale = cfg.head_dim**-0.5 * rope.softmax_mscale(cfg.rope_scaling)**2
    b, t, h, _ = q.shape
    q = q.reshape(b, t, cfg.n_kv_heads, h // cfg.n_kv_heads, -1)  # [b, t, g, p, k]
    if cache is not None:
      cache = cache.write(k, v, positions_bt)
    kind, op = call_kind(whole, cache, t), self.op
    if kind == 'whole':
      o = op.causal(q, k, v, scale)
    elif kind == 'decode' and op.decode != 'einsum':
      o = self._decode_kernel(q, cache, positions_bt, scale)
    elif kind == 'prefill' and op.prefill != 'einsum':
      o = self._flash(q, k, v, cache, positions_bt, scale)
    else:
      o = self._einsum(q, k, v, cache, positions_bt, scale)
    return dense(o.reshape(b, t, h, -1).astype(x_btd.dtype), w(self.w_o), n_in=2), cache

  def _decode_kernel(self, q_btgpk, cache, positions_bt, scale):
    assert not cache.v_transposed, 'the decode kernel reads values [b, g, s, k]'
    k, k_scale, v, v_scale = cache.read()  # 8-bit values stay 8-bit: the kernel scales them
    o = self.op.gqa_decode(q_btgpk[:, 0], k, v, positions_bt[:, 0] + 1, scale,
                           k_scale_bgs=k_scale, v_scale_bgs=v_scale)
    return o[:, None]

  def _flash(self, q_btgpk, k_btgk, v_btgk, cache, positions_bt, scale):
    b, t, g, p, _ = q_btgpk.shape
    if cache is None:
      keys_bsgk, values_bsgk, mask = k_btgk, v_btgk, causal_mask(positions_bt, positions_bt)
    else:  # flash attention takes no scales: dequantize what it reads
      assert not cache.v_transposed, 'flash attention reads values [b, g, s, k]'
      k, v = (quant.dequantize(x, q_btgpk.dtype) for x in (cache.k, cache.v))
      keys_bsgk, values_bsgk = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
      mask = cache_mask(positions_bt, keys_bsgk.shape[1])
    o = self.op.flash(q_btgpk.reshape(b, t, g * p, -1), keys_bsgk, values_bsgk, mask, scale)
    return o.reshape(b, t, g, p, -1)

  def _einsum(self, q_btgpk, k_btgk, v_btgk, cache, positions_bt, scale):
    """The reference by position mask: over the sequence's own keys, or over the cache."""
    if cache is None:  # the keys and values are this sequence's own, heads-major like a cache
      keys_bgsk, k_scale, values, v_scale = (k_btgk.transpose(0, 2, 1, 3), None,
                                             v_btgk.transpose(0, 2, 1, 3), None)
      mask = causal_mask(positions_bt, positions_bt)
    else:
      keys_bgsk, k_scale, values, v_scale = cache.read(self.cfg.compute_dtype)
      mask = cache_mask(positions_bt, keys_bgsk.shape[2])
    probs = attention_weights((q_btgpk,), (keys_bgsk,), mask, scale, (k_scale,))
    spec = ('bgks,bgpts->btgpk' if cache is not None and cache.v_transposed
            else 'bgsk,bgpts->btgpk')
    return jnp.einsum(spec, values, scale_tokens(probs, v_scale).astype(values.dtype),
                      preferred_element_type=jnp.float32)


class MLAttention(nnx.Module):
  """Multi-head Latent Attention with optional query compression and decoupled RoPE.

  c_q = RMSNorm(h W_DQ); q = c_q W_UQ (or h W_Q when q_lora_rank = 0)      eqs. 37-39
  [c_kv, k_r] = h W_DKV; c_kv = RMSNorm(c_kv); k_rope = RoPE(k_r)           eqs. 41, 43
  k_nope = c_kv W_UK; v = c_kv W_UV                                         eqs. 42, 45
  Only c_kv and k_rope are cached (LatentCache).

  Generalised so that MHA / GQA / MQA embed in it exactly (mla_jax.to_mla): cfg.rope_block
  rotates the rope key and queries in blocks of rope_block dims, each with the frequencies of a
  rope_block-wide rotation; cfg.kv_norm=False drops the latent RMSNorm; d_n = 0 leaves no
  nope part (no W_UK: the scores are the rope parts' alone).
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, op: AttentionOp | None = None):
    self.cfg, self.op = cfg, resolve(cfg) if op is None else op
    d, h, c = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank
    n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    self._init_queries(cfg, rngs)
    self.w_dkv = weight(rngs, cfg, (d, c + r), ('embed', 'kv_lora'), fan_in=d)
    if cfg.kv_norm:
      self.kv_norm = RMSNorm(c, cfg, axis='kv_lora')
    if n:  # orbax cannot save a zero-size array: with d_n = 0 there is no W_UK at all
      self.w_uk = weight(rngs, cfg, (c, h, n), ('kv_lora', 'heads', 'head_dim'), fan_in=c)
    self.w_uv = weight(rngs, cfg, (c, h, v), ('kv_lora', 'heads', 'head_dim'), fan_in=c)
    self.w_o = weight(rngs, cfg, (h, v, d), ('heads', 'head_dim', 'embed'), fan_in=h * v)

  def _init_queries(self, cfg: ModelConfig, rngs: nnx.Rngs):
    """q = c_q W_UQ with c_q = RMSNorm(h W_DQ), or h W_Q: [n + r] per head (eqs. 37-39)."""
    d, h, qc = cfg.d_model, cfg.n_heads, cfg.q_lora_rank
    width = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if qc:
      self.w_dq = weight(rngs, cfg, (d, qc), ('embed', 'q_lora'), fan_in=d)
      self.q_norm = RMSNorm(qc, cfg, axis='q_lora')
      self.w_uq = weight(rngs, cfg, (qc, h, width), ('q_lora', 'heads', 'head_dim'), fan_in=qc)
    else:
      self.w_q = weight(rngs, cfg, (d, h, width), ('embed', 'heads', 'head_dim'), fan_in=d)

  def init_cache(self, batch: int, max_len: int, dtype) -> LatentCache:
    return LatentCache.init(self.cfg, batch, max_len, dtype)

  def _latent(self, x_btd, cos, sin):
    """(c_kv [b, t, c] after the latent RMSNorm, k_rope [b, t, r] rotated): eqs. 41, 43."""
    c = self.cfg.kv_lora_rank
    kv = dense(x_btd, self._w(self.w_dkv))  # [b, t, c + r]
    c_kv = self.kv_norm(kv[..., :c]) if self.cfg.kv_norm else kv[..., :c]
    return c_kv, self._rope(kv[..., c:], cos, sin)

  def _w(self, p):
    return p[...].astype(self.cfg.compute_dtype)

  def _rope(self, x, cos, sin):
    """RoPE over the last axis, in blocks of cfg.rope_block dims when it is set (the angles
    broadcast over the block axis)."""
    block = self.cfg.rope_block
    if block is None:
      return rope.apply_rope(x, cos, sin, self.cfg.rope_layout)
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    return rope.apply_rope(blocks, cos, sin, self.cfg.rope_layout).reshape(x.shape)

  def _queries(self, x_btd):
    if self.cfg.q_lora_rank:
      c_q = self.q_norm(dense(x_btd, self._w(self.w_dq)))
      return dense(c_q, self._w(self.w_uq))
    return dense(x_btd, self._w(self.w_q))

  def __call__(self, x_btd, positions_bt=None, cache: LatentCache | None = None):
    """Without a cache (training) the naive path runs: at t = s it does less arithmetic than
    the absorbed one (d_n + d_r + d_v vs 2 d_c + d_r per score, per head). With a cache,
    cfg.mla_decode picks the path; flash prefill (t > 1) runs the naive path, whose head
    widths (d_n + d_r, d_v) flash attention takes, where the absorbed path's (d_c + d_r) is
    too wide for it."""
    cfg, op = self.cfg, self.op
    n = cfg.qk_nope_head_dim
    positions_bt, whole = resolve_positions(x_btd, positions_bt)
    cos, sin = rope.rope_angles(positions_bt, cfg.rope_block or cfg.qk_rope_head_dim,
                                cfg.rope_theta, cfg.rope_scaling)
    q = self._queries(x_btd)
    q_nope, q_rope = q[..., :n], self._rope(q[..., n:], cos, sin)
    c_kv, k_rope = self._latent(x_btd, cos, sin)
    if cache is not None:
      cache = cache.write(c_kv, k_rope, positions_bt)
    scale = ((n + cfg.qk_rope_head_dim)**-0.5 * rope.softmax_mscale(cfg.rope_scaling)**2)
    kind = call_kind(whole, cache, x_btd.shape[1])
    if kind == 'decode' and cfg.mla_decode == 'naive':
      kind = 'prefill'  # naive decode steps attend like a prefill: per-head keys and values
    if kind == 'decode' and op.decode != 'einsum':
      o = self._absorbed_kernel(q_nope, q_rope, cache, positions_bt, scale)
    elif kind == 'prefill' and op.prefill != 'einsum':
      if cache is not None:  # flash attention takes no scales: dequantize what it reads
        c_kv, k_rope = (quant.dequantize(x, q.dtype) for x in (cache.c_kv, cache.k_rope))
        mask = cache_mask(positions_bt, k_rope.shape[1])  # k_rope [b, s, r]: slots
      else:
        mask = causal_mask(positions_bt, positions_bt)
      q_h, k_h, v_h = self._heads(q_nope, q_rope, c_kv, k_rope)
      o = op.flash(q_h, k_h, v_h, mask, scale).astype(q_nope.dtype)
    else:  # kind 'whole' (op.causal, in _naive), or the einsum reference
      latent = (c_kv, None, k_rope, None) if cache is None else cache.read(cfg.compute_dtype)
      if kind == 'whole':
        mask = None
      elif cache is None:
        mask = causal_mask(positions_bt, positions_bt)
      else:
        mask = cache_mask(positions_bt, latent[2].shape[1])
      absorbed = cache is not None and cfg.mla_decode == 'absorbed'
      o = (self._absorbed if absorbed else self._naive)(q_nope, q_rope, latent, mask, scale)
    return dense(o, self._w(self.w_o), n_in=2), cache

  def _naive(self, q_nope, q_rope, latent, mask, scale):
    """Per-head keys and values up-projected from the latent (_heads), then ordinary MHA.
    latent: (c_kv, its scale, k_rope, its scale), as LatentCache.read gives it; mask None: a
    whole sequence (op.causal)."""
    c_kv, c_kv_scale, k_rope, k_rope_scale = latent
    q, k, v = self._heads(q_nope, q_rope, c_kv, k_rope, c_kv_scale, k_rope_scale)
    if mask is None:  # a whole sequence: every head its own group of one
      o = self.op.causal(q[:, :, :, None], k, v, scale)
      return o[:, :, :, 0].astype(q_nope.dtype)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # heads first, as a cache's
    probs = attention_weights((q[:, :, :, None],), (k,), mask, scale)[:, :, 0]
    return jnp.einsum('bhsv,bhts->bthv', v, probs.astype(v.dtype),
                      preferred_element_type=jnp.float32).astype(q_nope.dtype)

  def _absorbed(self, q_nope, q_rope, latent, mask, scale):
    """W_UK folds into the query, W_UV into the output: attention runs in the latent space."""
    c_kv, c_kv_scale, k_rope, k_rope_scale = latent
    q_parts, k_parts = (q_rope[:, :, None],), (k_rope[:, None],)
    k_scales = (_per_group(k_rope_scale),)
    if self.cfg.qk_nope_head_dim:
      q_lat = jnp.einsum('bthn,chn->bthc', q_nope, self._w(self.w_uk))
      q_parts, k_parts = (q_lat[:, :, None], *q_parts), (c_kv[:, None], *k_parts)
      k_scales = (_per_group(c_kv_scale), *k_scales)
    probs = attention_weights(q_parts, k_parts, mask, scale, k_scales)
    probs = scale_tokens(probs, _per_group(c_kv_scale))[:, 0]  # c_kv is the value too
    o_lat = jnp.einsum('bsc,bhts->bthc', c_kv, probs.astype(c_kv.dtype),
                       preferred_element_type=jnp.float32).astype(q_nope.dtype)
    return jnp.einsum('bthc,chv->bthv', o_lat, self._w(self.w_uv))

  def _heads(self, q_nope, q_rope, c_kv, k_rope, c_kv_scale=None, k_rope_scale=None):
    """The naive path's per-head (queries, keys, values) [b, ., h, .]: keys and values
    up-projected from the latent, the one rope key broadcast to every head, and the nope and
    rope halves concatenated into one [n + r] query and key per head, as DeepSeek's reference
    does (one score matmul instead of two [b, h, t, s] products and their sum). An 8-bit
    cache's per-token scales go onto the up-projected keys and values, which this path builds
    in full anyway."""
    v = dense(c_kv, self._w(self.w_uv))  # [b, s, h, v]
    b, s, h, _ = v.shape
    k_rope_h = jnp.broadcast_to(k_rope[:, :, None], (b, s, h, k_rope.shape[-1]))
    if c_kv_scale is not None:
      v = v * c_kv_scale[:, :, None, None].astype(v.dtype)
      k_rope_h = k_rope_h.astype(v.dtype) * k_rope_scale[:, :, None, None].astype(v.dtype)
    q, k = q_rope, k_rope_h.astype(v.dtype)
    if self.cfg.qk_nope_head_dim:
      k_nope = dense(c_kv, self._w(self.w_uk))
      if c_kv_scale is not None:
        k_nope = k_nope * c_kv_scale[:, :, None, None].astype(k_nope.dtype)
      q, k = jnp.concatenate([q_nope, q], axis=-1), jnp.concatenate([k_nope, k], axis=-1)
    return q, k, v

  def _absorbed_kernel(self, q_nope, q_rope, cache, positions_bt, scale):
    """One decode step of the absorbed path through the Pallas kernel, which reads each
    sequence's latent cache up to its length (an 8-bit one as stored, with its scales). With
    d_n = 0 the scores read k_rope alone: the GQA kernel with one group, keys k_rope and
    values c_kv."""
    c_kv, c_kv_scale, k_rope, k_rope_scale = cache.read()
    lengths = positions_bt[:, 0] + 1
    if self.cfg.qk_nope_head_dim:
      q_lat = jnp.einsum('bthn,chn->bthc', q_nope, self._w(self.w_uk))
      o_lat = self.op.mla_decode(q_lat[:, 0], q_rope[:, 0], c_kv, k_rope, lengths, scale,
                                 c_kv_scale_bs=c_kv_scale, k_rope_scale_bs=k_rope_scale)
    else:
      o_lat = self.op.gqa_decode(q_rope[:, 0][:, None], k_rope[:, None], c_kv[:, None],
                                 lengths, scale, k_scale_bgs=_per_group(k_rope_scale),
                                 v_scale_bgs=_per_group(c_kv_scale))[:, 0]
    return jnp.einsum('bhc,chv->bhv', o_lat.astype(q_nope.dtype), self._w(self.w_uv))[:, None]
