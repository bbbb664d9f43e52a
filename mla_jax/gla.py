"""Grouped Latent Attention (GLA-g): Zadouri, Strauss & Dao, "Hardware-Efficient Attention for
Fast Decoding", 2025 (arXiv 2505.21487); docs/design.md#13-gta-and-gla has the equations.

MLA (mla_jax.attention.MLAttention) whose latent is g latent heads of d_c / g, each with its
own RMSNorm: the query heads form g groups of n_heads / g, and group j's keys and values are
up-projected from latent head j alone (W_UK, W_UV per latent head). One decoupled rope key of
d_R is shared by every head, as in MLA. The cache holds the g latents and the rope key, d_c +
d_R per token and layer, as MLA's; under a mesh whose tensor axis splits the latent heads
(logical axis 'kv_heads'), a device holds d_c / g + d_R of it (the rope key is replicated),
where MLA's latent, read by every head, is whole on every device. Absorbed decode is MLA's per
latent head: W_UK folds into each group's queries, W_UV into its output.

Followed as the authors' modeling_llama_GLA.py computes it (GLA-2 there; g here), except:
the code caches the latent before its RMSNorms and normalises what it reads; this module
caches it normalised, as MLA's LatentCache does (the same values, normalised once per token
instead of every step, which absorbed decode needs). The code's projections (torch's
nn.Linear) have biases; the paper's equations have none, and neither has this module.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.attention import MLAttention
from mla_jax.attention_op import AttentionOp, attention_weights, resolve
from mla_jax.cache import store, zeros
from mla_jax.config import ModelConfig
from mla_jax.layers import RMSNorm, dense, weight


@functools.partial(jax.tree_util.register_dataclass, data_fields=['c_kv', 'k_rope'],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class GroupedLatentCache:
  """One layer's GLA cache: c_kv [b, g, s, c] (g latent heads of d_c / g, after their
  RMSNorms), heads-major so that a decode step reads each latent head's [s, c] block whole
  (and a tensor-parallel device holds its own heads' blocks); k_rope [b, s, r]."""

  c_kv: jax.Array
  k_rope: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> GroupedLatentCache:
    g = cfg.latent_heads
    return cls(zeros((batch, g, max_len, cfg.kv_lora_rank // g), dtype,
                     ('batch', 'kv_heads', 'seq', 'kv_lora'), feature_axis=3),
               zeros((batch, max_len, cfg.qk_rope_head_dim), dtype,
                     ('batch', 'seq', 'head_dim'), feature_axis=2))

  def write(self, c_kv_bgtc, k_rope_btr, positions_bt) -> GroupedLatentCache:
    """Stores new latents [b, g, t, c] and rope keys at each sequence's own positions."""
    return GroupedLatentCache(
        store(self.c_kv, c_kv_bgtc.transpose(0, 2, 1, 3), positions_bt, seq_axis=2),
        store(self.k_rope, k_rope_btr, positions_bt, seq_axis=1))

  def read(self, dtype=None):
    """(c_kv, None, k_rope, None), as LatentCache.read gives a float cache (no scales)."""
    del dtype  # a float cache is read as stored
    return self.c_kv, None, self.k_rope, None


class GLAttention(MLAttention):
  """MLA with g latent heads. Everything but the latent and what reads it is MLAttention's:
  the queries, the RoPE, the call paths. The latent is heads-major here, c_kv [b, g, s, c]
  (MLA's [b, s, c]); the naive path up-projects it per group (_heads), the absorbed path and
  its kernel attend per latent head (_absorbed, _absorbed_kernel)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, op: AttentionOp | None = None):
    self.cfg, self.op = cfg, resolve(cfg) if op is None else op
    d, h, g = cfg.d_model, cfg.n_heads, cfg.latent_heads
    c, p = cfg.kv_lora_rank // g, h // g
    n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    self._init_queries(cfg, rngs)
    self.w_dkv = weight(rngs, cfg, (d, g, c), ('embed', 'kv_heads', 'kv_lora'), fan_in=d)
    self.w_kr = weight(rngs, cfg, (d, r), ('embed', 'head_dim'), fan_in=d)
    self.kv_norm = RMSNorm((g, c), cfg, axis=('kv_heads', 'kv_lora'))
    latent_axes = ('kv_heads', 'kv_lora', None, 'head_dim')  # p: split with its latent head
    self.w_uk = weight(rngs, cfg, (g, c, p, n), latent_axes, fan_in=c)
    self.w_uv = weight(rngs, cfg, (g, c, p, v), latent_axes, fan_in=c)
    self.w_o = weight(rngs, cfg, (h, v, d), ('heads', 'head_dim', 'embed'), fan_in=h * v)

  def init_cache(self, batch: int, max_len: int, dtype) -> GroupedLatentCache:
    return GroupedLatentCache.init(self.cfg, batch, max_len, dtype)

  def _latent(self, x_btd, cos, sin):
    """(c_kv [b, g, t, c], each latent head RMS-normalised by its own norm; k_rope [b, t, r])."""
    c_kv = self.kv_norm(dense(x_btd, self._w(self.w_dkv)))  # [b, t, g, c]
    return c_kv.transpose(0, 2, 1, 3), self._rope(dense(x_btd, self._w(self.w_kr)), cos, sin)

  def _grouped(self, x_bthe):
    """[b, t, h, e] -> [b, t, g, p, e]: query head i is member i % p of group i // p."""
    b, t, h, e = x_bthe.shape
    return x_bthe.reshape(b, t, self.cfg.latent_heads, h // self.cfg.latent_heads, e)

  def _heads(self, q_nope, q_rope, c_kv, k_rope, c_kv_scale=None, k_rope_scale=None):
    """The naive path's per-head (queries, keys, values) [b, ., h, .], as MLAttention._heads:
    group j's keys and values up-projected from latent head j."""
    assert c_kv_scale is None and k_rope_scale is None, 'GLA has no 8-bit cache'
    b, _, s, _ = c_kv.shape
    h = self.cfg.n_heads
    k_nope = jnp.einsum('bgsc,gcpn->bsgpn', c_kv, self._w(self.w_uk)).reshape(b, s, h, -1)
    v = jnp.einsum('bgsc,gcpv->bsgpv', c_kv, self._w(self.w_uv)).reshape(b, s, h, -1)
    k_rope_h = jnp.broadcast_to(k_rope[:, :, None], (b, s, h, k_rope.shape[-1]))
    q = jnp.concatenate([q_nope, q_rope], axis=-1)
    return q, jnp.concatenate([k_nope, k_rope_h.astype(k_nope.dtype)], axis=-1), v

  def _absorbed(self, q_nope, q_rope, latent, mask, scale):
    """MLAttention._absorbed per latent head: group j's queries folded with its W_UK score
    against latent head j and the shared rope key; W_UV folds into the output."""
    c_kv, _, k_rope, _ = latent
    b, g, s, _ = c_kv.shape
    q_lat = jnp.einsum('btgpn,gcpn->btgpc', self._grouped(q_nope), self._w(self.w_uk))
    k_rope_bgsr = jnp.broadcast_to(k_rope[:, None], (b, g, s, k_rope.shape[-1]))
    probs = attention_weights((q_lat, self._grouped(q_rope)), (c_kv, k_rope_bgsr), mask, scale)
    o_lat = jnp.einsum('bgsc,bgpts->btgpc', c_kv, probs.astype(c_kv.dtype),
                       preferred_element_type=jnp.float32).astype(q_nope.dtype)
    o = jnp.einsum('btgpc,gcpv->btgpv', o_lat, self._w(self.w_uv))
    return o.reshape(*q_nope.shape[:3], -1)

  def _absorbed_kernel(self, q_nope, q_rope, cache, positions_bt, scale):
    """One absorbed decode step through the MLA kernel, one program per (sequence, latent
    head): each reads its latent head's c_kv once, for the scores and the values."""
    c_kv, _, k_rope, _ = cache.read()
    q_lat = jnp.einsum('btgpn,gcpn->btgpc', self._grouped(q_nope), self._w(self.w_uk))[:, 0]
    o_lat = self.op.gla_decode(q_lat, self._grouped(q_rope)[:, 0], c_kv, k_rope,
                               positions_bt[:, 0] + 1, scale)
    o = jnp.einsum('bgpc,gcpv->bgpv', o_lat.astype(q_nope.dtype), self._w(self.w_uv))
    return o.reshape(q_nope.shape[0], 1, q_nope.shape[2], -1)
