"""Decode caches as pytrees, with their size accounting beside them (DeepSeek-V2 Table 1).

Elements per token, all l layers: MHA 2 H d_h l, GQA 2 G d_h l, MQA 2 d_h l, MLA (d_c + d_r) l.

KVCache stores keys and values heads-major, [b, g, s, k], not [b, s, g, k]: a decode step reads
each head's keys as one contiguous [s, k] block, which on this project's CPU reads the cache
10x faster (1.9 -> 18 GB/s for an 8 x 16k x 16 x 64 cache; see README, decode benchmark).
LatentCache stores MLA's compressed c_kv and the ONE rope key shared by all heads: nothing
per head is cached.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mla_jax.config import ModelConfig


def _batch_index(positions_bt):
  return jnp.arange(positions_bt.shape[0])[:, None]


@functools.partial(jax.tree_util.register_dataclass, data_fields=['k', 'v'], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
  """One layer's keys and values for MHA / GQA / MQA: k, v [b, g, s, k]."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  @staticmethod
  def elements_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.n_kv_heads * cfg.head_dim

  def write(self, k_btgk, v_btgk, positions_bt) -> KVCache:
    """Stores new keys/values at each sequence's own positions [b, t]."""
    b = _batch_index(positions_bt)
    return KVCache(self.k.at[b, :, positions_bt].set(k_btgk.astype(self.k.dtype)),
                   self.v.at[b, :, positions_bt].set(v_btgk.astype(self.v.dtype)))


@functools.partial(jax.tree_util.register_dataclass, data_fields=['c_kv', 'k_rope'],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LatentCache:
  """One layer's MLA cache: c_kv [b, s, c] (after the latent RMSNorm), k_rope [b, s, r]."""

  c_kv: jax.Array
  k_rope: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> LatentCache:
    return cls(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
               jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype))

  @staticmethod
  def elements_per_token(cfg: ModelConfig) -> int:
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim

  def write(self, c_bsc, k_rope_bsr, positions_bt) -> LatentCache:
    b = _batch_index(positions_bt)
    return LatentCache(self.c_kv.at[b, positions_bt].set(c_bsc.astype(self.c_kv.dtype)),
                       self.k_rope.at[b, positions_bt].set(k_rope_bsr.astype(self.k_rope.dtype)))


def cache_class(cfg: ModelConfig):
  return LatentCache if cfg.attention == 'mla' else KVCache


def cache_elements_per_token(cfg: ModelConfig) -> int:
  """The paper's Table 1 formula: cached elements per token over all layers."""
  return cache_class(cfg).elements_per_token(cfg) * cfg.n_layers


def measured_per_token(caches, batch: int, max_len: int) -> tuple[int, int]:
  """(elements, bytes) per token actually allocated by a list of layer caches."""
  leaves = jax.tree.leaves(caches)
  elements = sum(x.size for x in leaves)
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
  tokens = batch * max_len
  assert elements % tokens == 0 and nbytes % tokens == 0, 'cache not per-token shaped'
  return elements // tokens, nbytes // tokens
