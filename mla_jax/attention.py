"""Attention: GQAttention (MHA / GQA / MQA) and MLAttention (DeepSeek-V2 appendix C).

Two implementations of the same math, chosen by ModelConfig.attention_impl (cfg.fused):
the explicit einsum path below, which is the reference and the test oracle, and the fused
path: flash attention for training and prefill (mla_jax.fused) and split-KV flash-decoding
Pallas kernels for one-token decode steps (mla_jax.kernels; where the head widths do not fit
the compiled kernel, kernels.fits, the step takes the einsum path). Modules are called with
positions_bt=None for a whole sequence at positions 0 .. t - 1 (training), which lets fused
attention use its causal mode; with explicit positions, masks are built from them.

The einsum path calls one masked-softmax helper, `attention_weights`, with grouped heads: queries
[b, t, g, p, e] read the keys [b, g, s, e] of their group g. MHA is g = H, p = 1; MQA is g = 1,
p = H. MLA's absorbed decode is, in this language, MQA over the latent: one group whose "key" is
(c_kv, k_rope) and whose "value" is c_kv, with W_UK folded into the query and W_UV into the
output (docs/design.md#3-mla). Shape letters are listed in layers.py.

A whole sequence without a cache (the training forward) takes `causal_attention` instead: the
same arithmetic with the queries in blocks that skip the masked keys, in heads-first layout,
which is what makes the einsum path fast where attention is not fused (XLA's CPU backend).
With attention_impl='auto' on a CPU it hands the work to a fused C++ kernel
(mla_jax.kernels.cpu_attention) where that applies.

In every probs-times-values einsum the cached array is the first operand and is contracted
along the axis it stores contiguously: written the other way, XLA's CPU dot copies (transposes)
the whole cache on every decode step (see cache.py and the README's decode benchmark).

An 8-bit cache (ModelConfig.cache_dtype, mla_jax.quant) is read through its cache's `read`:
8-bit values converted to the compute dtype as dot operands, and per-token scales that
`attention_weights` folds into the scores, q . (k s) = (q . k) s, and `weigh` into the
probabilities, p . (v s) = (p s) . v. No dequantized (scaled) copy of the cache is made,
except by fused prefill, which dequantizes the keys and values it reads (flash attention takes
no scales); mla_jax.quant says what XLA:CPU does with the conversion. The decode kernels take
the 8-bit values and their scales as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import kernels, quant, rope
from mla_jax.cache import KVCache, LatentCache
from mla_jax.config import ModelConfig
from mla_jax.fused import fused_attention
from mla_jax.kernels import cpu_attention
from mla_jax.layers import RMSNorm, dense, weight

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked row gives no NaN


def visible(q_positions_bt, k_positions_bs):
  """[b, t, s] True where key s may be read by query t: causal on positions."""
  return k_positions_bs[:, None, :] <= q_positions_bt[:, :, None]


def attention_weights(q_parts, k_parts, visible_bts, scale: float, k_scales=None):
  """softmax(sum_i q_i k_i^T * scale), masked -> probabilities [b, g, p, t, s], float32.

  q_parts: query pieces [b, t, g, p, e_i]; k_parts: the matching key pieces [b, g, s, e_i].
  Their dot products add, so MLA's nope and rope halves (and the latent cache's two arrays)
  are never concatenated. k_scales: per part, None or an 8-bit key's per-token scale [b, g, s]
  (g may be 1), applied to that part's scores. Each module applies the probabilities to its
  values itself, in the layout its cache keeps (through `weigh` for 8-bit values).
  """
  k_scales = (None,) * len(k_parts) if k_scales is None else k_scales
  scores = sum(weigh(jnp.einsum('btgpe,bgse->bgpts', q, k, preferred_element_type=jnp.float32),
                     k_scale)
               for q, k, k_scale in zip(q_parts, k_parts, k_scales, strict=True))
  scores = jnp.where(visible_bts[:, None, None], scores * scale, _MASKED)
  return jax.nn.softmax(scores, axis=-1)


# Query blocks of a whole-sequence (training) forward; see causal_attention. Two measured best
# on a 2-core CPU (experiments/results/cpu_profile.md): four cut more masked work but make the
# dots too small to run efficiently.
QUERY_BLOCKS = 2


def whole_sequence_attention(q_btgpe, k_btge, v_btgv, scale: float, kernel: bool):
  """softmax(q k^T * scale, causal) v -> [b, t, g, p, v] float32, for a whole sequence at
  positions 0 .. t - 1 without a cache (training and evaluation forwards), in the projections'
  token-major layout: queries [b, t, g, p, e], keys [b, t, g, e], values [b, t, g, v].

  kernel (ModelConfig.cpu_kernel): the C++ CPU kernel where it applies
  (kernels.cpu_attention.applies: built, float32, one device), which reads this layout as it
  is; its results equal causal_attention's to float32 rounding. Otherwise causal_attention,
  heads first.
  """
  if kernel and cpu_attention.applies(q_btgpe, k_btge, v_btgv):
    return cpu_attention.causal_attention(q_btgpe, k_btge, v_btgv, scale)
  o = causal_attention(q_btgpe.transpose(0, 2, 3, 1, 4), k_btge.transpose(0, 2, 1, 3),
                       v_btgv.transpose(0, 2, 1, 3), scale)
  return o.transpose(0, 3, 1, 2, 4)


def causal_attention(q_bgpte, k_bgse, v_bgsv, scale: float):
  """softmax(q k^T * scale, causal) v -> [b, g, p, t, v] float32, for a whole sequence at
  positions 0 .. t - 1 without a cache: whole_sequence_attention's einsum path.

  The same arithmetic as attention_weights plus the value product, arranged for speed where
  attention is not fused (the einsum path; XLA's CPU backend): the queries go in QUERY_BLOCKS
  blocks along t, and a block reads only the keys up to its last position, so the masked
  upper-right part of the scores (a quarter of them with two blocks) is never computed; and
  the heads lead, [b, g, p, t, .], so both dots produce their outputs in the layout the next
  op reads instead of transposing arrays the size of the scores. A masked score adds exactly
  0 to the softmax (exp of _MASKED underflows), so the skipped keys change nothing. The
  softmax's division comes after the value product, on [t, v] instead of [t, s] (one pass
  over the scores fewer each way; -3 to -5% of the CPU train step), with the row maximum held
  constant for the gradient: a softmax does not depend on it.
  """
  t = q_bgpte.shape[3]
  blocks = QUERY_BLOCKS if t % QUERY_BLOCKS == 0 else 1
  out = []
  for lo, hi in ((i * t // blocks, (i + 1) * t // blocks) for i in range(blocks)):
    scores = jnp.einsum('bgpte,bgse->bgpts', q_bgpte[:, :, :, lo:hi], k_bgse[:, :, :hi],
                        preferred_element_type=jnp.float32)
    visible_ts = visible(jnp.arange(lo, hi)[None], jnp.arange(hi)[None])[0]
    scores = jnp.where(visible_ts, scores * scale, _MASKED)
    unnormalized = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    o = jnp.einsum('bgpts,bgsv->bgptv', unnormalized.astype(v_bgsv.dtype), v_bgsv[:, :, :hi],
                   preferred_element_type=jnp.float32)
    out.append(o / jnp.sum(unnormalized, axis=-1, keepdims=True))
  return out[0] if blocks == 1 else jnp.concatenate(out, axis=3)


def weigh(x_bgpts, scale_bgs):
  """x * the per-token scale of an 8-bit cache array [b, g, s] (None: x unchanged): on scores,
  q . (k s) = (q . k) s; on probabilities before the value product, p . (v s) = (p s) . v."""
  return x_bgpts if scale_bgs is None else x_bgpts * scale_bgs[:, :, None, None, :]


def _per_group(scale_bs):
  """A latent array's scale [b, s] as the [b, 1, s] of one group shared by every head."""
  return None if scale_bs is None else scale_bs[:, None]


def _interpret() -> bool:
  """Pallas kernels run in interpret mode on a CPU (tests; slow), compiled elsewhere."""
  return jax.default_backend() == 'cpu'


def resolve_positions(x_btd, positions_bt):
  """(positions [b, t], whether they are a whole sequence 0 .. t - 1 given as None)."""
  if positions_bt is not None:
    return positions_bt, False
  b, t = x_btd.shape[:2]
  return jnp.broadcast_to(jnp.arange(t), (b, t)), True


def _mask(positions_bt, cache, k_len: int):
  """visible() [b, t, s] for a forward without a cache (the keys are the queries' own tokens)
  or with one (the keys are cache slots 0 .. k_len - 1, slot = position)."""
  if cache is None:
    return visible(positions_bt, positions_bt)
  slots = jnp.broadcast_to(jnp.arange(k_len), (positions_bt.shape[0], k_len))
  return visible(positions_bt, slots)


def _fused_mask(positions_bt, whole: bool, cache, k_len: int):
  """The fused path's mask: None (its causal mode) for a whole sequence without a cache."""
  return None if whole and cache is None else _mask(positions_bt, cache, k_len)


class GQAttention(nnx.Module):
  """Multi-head attention with n_kv_heads key/value heads: MHA (G = H), GQA, MQA (G = 1)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, g, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.w_q = weight(rngs, cfg, (d, h, k), ('embed', 'heads', 'head_dim'), fan_in=d)
    self.w_k = weight(rngs, cfg, (d, g, k), ('embed', 'kv_heads', 'head_dim'), fan_in=d)
    self.w_v = weight(rngs, cfg, (d, g, k), ('embed', 'kv_heads', 'head_dim'), fan_in=d)
    self.w_o = weight(rngs, cfg, (h, k, d), ('heads', 'head_dim', 'embed'), fan_in=h * k)

  def __call__(self, x_btd, positions_bt=None, cache: KVCache | None = None):
    cfg = self.cfg
    w = lambda p: p[...].astype(cfg.compute_dtype)
    positions_bt, whole = resolve_positions(x_btd, positions_bt)
    cos, sin = rope.rope_angles(positions_bt, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q = rope.apply_rope(dense(x_btd, w(self.w_q)), cos, sin, cfg.rope_layout)  # [b, t, h, k]
    k = rope.apply_rope(dense(x_btd, w(self.w_k)), cos, sin, cfg.rope_layout)  # [b, t, g, k]
    v = dense(x_btd, w(self.w_v))  # [b, t, g, k]
    scale = cfg.head_dim**-0.5 * rope.softmax_mscale(cfg.rope_scaling)**2
    if cache is not None:
      cache = cache.write(k, v, positions_bt)
    if cfg.fused:
      o = self._fused(q, k, v, cache, positions_bt, whole, scale)
    else:
      o = self._einsum(q, k, v, cache, positions_bt, whole, scale)
    return dense(o.astype(x_btd.dtype), w(self.w_o), n_in=2), cache

  def _einsum(self, q_bthk, k_btgk, v_btgk, cache, positions_bt, whole, scale):
    b, t, h, _ = q_bthk.shape
    g = self.cfg.n_kv_heads
    if whole and cache is None:
      return whole_sequence_attention(q_bthk.reshape(b, t, g, h // g, -1), k_btgk, v_btgk,
                                      scale, self.cfg.cpu_kernel).reshape(b, t, h, -1)
    if cache is None:  # the keys and values are this sequence's own, heads-major like a cache
      keys_bgsk, k_scale, values, v_scale = (k_btgk.transpose(0, 2, 1, 3), None,
                                             v_btgk.transpose(0, 2, 1, 3), None)
    else:
      keys_bgsk, k_scale, values, v_scale = cache.read(self.cfg.compute_dtype)
    v_transposed = cache is not None and cache.v_transposed
    mask = _mask(positions_bt, cache, keys_bgsk.shape[2])
    probs = attention_weights((q_bthk.reshape(b, t, g, h // g, -1),), (keys_bgsk,), mask, scale,
                              (k_scale,))
    spec = 'bgks,bgpts->btgpk' if v_transposed else 'bgsk,bgpts->btgpk'
    o = jnp.einsum(spec, values, weigh(probs, v_scale).astype(values.dtype),
                   preferred_element_type=jnp.float32)
    return o.reshape(b, t, h, -1)

  def _fused(self, q_bthk, k_btgk, v_btgk, cache, positions_bt, whole, scale):
    b, t, h, _ = q_bthk.shape
    if cache is not None and t == 1:  # a decode step: the split-KV flash-decoding kernel
      if not kernels.fits((q_bthk.shape[-1],), v_btgk.shape[-1], _interpret()):
        return self._einsum(q_bthk, k_btgk, v_btgk, cache, positions_bt, whole, scale)
      g = self.cfg.n_kv_heads
      k, k_scale, v, v_scale = cache.read()  # 8-bit values stay 8-bit: the kernel scales them
      o_bgpk = kernels.gqa_decode(q_bthk.reshape(b, g, h // g, -1), k, v, positions_bt[:, 0] + 1,
                                  scale, k_scale_bgs=k_scale, v_scale_bgs=v_scale,
                                  interpret=_interpret())
      return o_bgpk.reshape(b, 1, h, -1)
    if cache is None:
      keys_bsgk, values_bsgk = k_btgk, v_btgk
    else:  # the fused path keeps values [b, g, s, k] (cache.values_transposed)
      k, v = (quant.dequantize(x, q_bthk.dtype) for x in (cache.k, cache.v))
      keys_bsgk, values_bsgk = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mask = _fused_mask(positions_bt, whole, cache, keys_bsgk.shape[1])
    return fused_attention(q_bthk, keys_bsgk, values_bsgk, mask, scale)


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

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, c, qc = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank, cfg.q_lora_rank
    n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if qc:
      self.w_dq = weight(rngs, cfg, (d, qc), ('embed', 'q_lora'), fan_in=d)
      self.q_norm = RMSNorm(qc, cfg, axis='q_lora')
      self.w_uq = weight(rngs, cfg, (qc, h, n + r), ('q_lora', 'heads', 'head_dim'), fan_in=qc)
    else:
      self.w_q = weight(rngs, cfg, (d, h, n + r), ('embed', 'heads', 'head_dim'), fan_in=d)
    self.w_dkv = weight(rngs, cfg, (d, c + r), ('embed', 'kv_lora'), fan_in=d)
    if cfg.kv_norm:
      self.kv_norm = RMSNorm(c, cfg, axis='kv_lora')
    if n:  # orbax cannot save a zero-size array: with d_n = 0 there is no W_UK at all
      self.w_uk = weight(rngs, cfg, (c, h, n), ('kv_lora', 'heads', 'head_dim'), fan_in=c)
    self.w_uv = weight(rngs, cfg, (c, h, v), ('kv_lora', 'heads', 'head_dim'), fan_in=c)
    self.w_o = weight(rngs, cfg, (h, v, d), ('heads', 'head_dim', 'embed'), fan_in=h * v)

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
    cfg.mla_decode picks the path; fused attention prefills (t > 1) through the naive path,
    whose head dims (d_n + d_r, d_v) flash attention takes, where the absorbed path's
    (d_c + d_r) is too wide for it."""
    cfg = self.cfg
    n, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
    positions_bt, whole = resolve_positions(x_btd, positions_bt)
    cos, sin = rope.rope_angles(positions_bt, cfg.rope_block or cfg.qk_rope_head_dim,
                                cfg.rope_theta, cfg.rope_scaling)
    q = self._queries(x_btd)
    q_nope, q_rope = q[..., :n], self._rope(q[..., n:], cos, sin)
    kv = dense(x_btd, self._w(self.w_dkv))  # [b, t, c + r]
    c_kv = self.kv_norm(kv[..., :c]) if cfg.kv_norm else kv[..., :c]
    k_rope = self._rope(kv[..., c:], cos, sin)
    if cache is not None:
      cache = cache.write(c_kv, k_rope, positions_bt)
    scale = ((n + cfg.qk_rope_head_dim)**-0.5 * rope.softmax_mscale(cfg.rope_scaling)**2)
    absorbed = cache is not None and cfg.mla_decode == 'absorbed'
    absorbed_step = absorbed and x_btd.shape[1] == 1  # a decode step: the flash-decoding kernel
    if cfg.fused and absorbed_step and self._kernel_fits():
      o = self._absorbed_kernel(q_nope, q_rope, cache, positions_bt, scale)
    elif cfg.fused and not absorbed_step:
      if cache is not None:  # flash attention takes no scales: dequantize what it reads
        c_kv, k_rope = (quant.dequantize(x, q.dtype) for x in (cache.c_kv, cache.k_rope))
      mask = _fused_mask(positions_bt, whole, cache, c_kv.shape[1])
      o = self._naive_fused(q_nope, q_rope, c_kv, k_rope, mask, scale)
    else:
      latent = (c_kv, None, k_rope, None) if cache is None else cache.read(cfg.compute_dtype)
      # None: a whole sequence without a cache (causal_attention)
      mask = None if whole and cache is None else _mask(positions_bt, cache, latent[0].shape[1])
      path = self._absorbed if absorbed else self._naive
      o = path(q_nope, q_rope, latent, mask, scale)
    return dense(o, self._w(self.w_o), n_in=2), cache

  def _naive(self, q_nope, q_rope, latent, mask, scale):
    """Up-projects per-head keys and values from the latent, then ordinary MHA. latent:
    (c_kv, its scale, k_rope, its scale), as LatentCache.read gives it.

    The nope and rope halves are concatenated into one [n + r] query and key per head, as
    DeepSeek's reference does: one score matmul instead of two [b, h, t, s] products and
    their sum (the step's largest arrays; see experiments/results/cpu_profile.md). An 8-bit
    cache's per-token scales go onto the up-projected keys and values, which this path builds
    in full anyway.
    """
    c_kv, c_kv_scale, k_rope, k_rope_scale = latent
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
    if mask is None:  # a whole sequence: every head its own group of one
      o = whole_sequence_attention(q[:, :, :, None], k, v, scale, self.cfg.cpu_kernel)
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
    probs = weigh(probs, _per_group(c_kv_scale))[:, 0]  # c_kv is the value too
    o_lat = jnp.einsum('bsc,bhts->bthc', c_kv, probs.astype(c_kv.dtype),
                       preferred_element_type=jnp.float32).astype(q_nope.dtype)
    return jnp.einsum('bthc,chv->bthv', o_lat, self._w(self.w_uv))

  def _naive_fused(self, q_nope, q_rope, c_kv, k_rope, mask, scale):
    """The naive path through fused attention: the two query (and key) halves concatenated,
    the one rope key broadcast to every head."""
    v = dense(c_kv, self._w(self.w_uv))
    b, s, h, _ = v.shape
    k_rope_h = jnp.broadcast_to(k_rope[:, :, None], (b, s, h, k_rope.shape[-1]))
    q, k = q_rope, k_rope_h
    if self.cfg.qk_nope_head_dim:
      k = jnp.concatenate([dense(c_kv, self._w(self.w_uk)), k], axis=-1)
      q = jnp.concatenate([q_nope, q], axis=-1)
    return fused_attention(q, k, v, mask, scale).astype(q_nope.dtype)

  def _kernel_fits(self) -> bool:
    """Whether the decode kernel takes this model's latent and rope widths (else the absorbed
    einsum path runs the step: same math, see kernels.fits)."""
    c, r = self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim
    key_dims = (c, r) if self.cfg.qk_nope_head_dim else (r,)
    return kernels.fits(key_dims, c, _interpret())

  def _absorbed_kernel(self, q_nope, q_rope, cache, positions_bt, scale):
    """One decode step of the absorbed path through the Pallas kernel, which reads each
    sequence's latent cache up to its length (an 8-bit one as stored, with its scales). With
    d_n = 0 the scores read k_rope alone: the GQA kernel with one group, keys k_rope and
    values c_kv."""
    c_kv, c_kv_scale, k_rope, k_rope_scale = cache.read()
    lengths = positions_bt[:, 0] + 1
    if self.cfg.qk_nope_head_dim:
      q_lat = jnp.einsum('bthn,chn->bthc', q_nope, self._w(self.w_uk))
      o_lat = kernels.mla_decode(q_lat[:, 0], q_rope[:, 0], c_kv, k_rope, lengths, scale,
                                 c_kv_scale_bs=c_kv_scale, k_rope_scale_bs=k_rope_scale,
                                 interpret=_interpret())
    else:
      o_lat = kernels.gqa_decode(q_rope[:, 0][:, None], k_rope[:, None], c_kv[:, None], lengths,
                                 scale, k_scale_bgs=_per_group(k_rope_scale),
                                 v_scale_bgs=_per_group(c_kv_scale), interpret=_interpret())[:, 0]
    return jnp.einsum('bhc,chv->bhv', o_lat.astype(q_nope.dtype), self._w(self.w_uv))[:, None]
