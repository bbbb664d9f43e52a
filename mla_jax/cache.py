"""Decode caches as pytrees, with their size accounting beside them (DeepSeek-V2 Table 1).

Elements per token, all l layers: MHA 2 H d_h l, GQA 2 G d_h l, MQA 2 d_h l, MLA (d_c + d_r) l.

KVCache stores keys heads-major, k [b, g, s, k], not token-major [b, s, g, k]: a decode step
reads each head's keys as one contiguous [s, k] block (on this project's CPU, q.k over an
8 x 16k x 16 x 64 cache streamed at 1.9 GB/s with [b, s, g, k] keys and 25 GB/s with
[b, g, s, k]). Values are stored [b, g, s, k] too, except for MHA (one query head per KV head),
where they are stored transposed, [b, g, k, s]: p.v is then a matrix-vector product contracted
along the contiguous axis (35 -> 17 ms for that cache). With several query heads per KV head
(GQA, MQA) p.v is a matrix product, which XLA's CPU dot wants as [s, k] and would otherwise
transpose, copying the whole cache every step. README, decode benchmark, has the numbers.
LatentCache stores MLA's compressed c_kv and the ONE rope key shared by all heads: nothing
per head is cached.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp

from mla_jax.config import ModelConfig
from mla_jax.sharding import constrain


def values_transposed(cfg: ModelConfig) -> bool:
  """Whether a KVCache stores values [b, g, k, s]: for MHA on the einsum path, see the module
  docstring (fused attention and the decode kernels read [b, g, s, k])."""
  return cfg.n_kv_heads == cfg.n_heads and not cfg.fused


def write_at(buf, new_bt, positions_bt, seq_axis: int):
  """buf with new_bt [b, t, ...] stored at each row's positions [b, t] along seq_axis.

  Indexing (batch, :, ..., positions) selects a [b, t, <the other axes in order>] block
  (advanced indices separated by slices go first), so new values need no transposing.
  Positions are in bounds by construction: generate checks prompt + new tokens <= the cache.
  """
  chex.assert_equal_shape_prefix([new_bt, positions_bt], 2)
  rows = jnp.arange(positions_bt.shape[0])[:, None]
  index = (rows,) + (slice(None),) * (seq_axis - 1) + (positions_bt,)
  return buf.at[index].set(new_bt.astype(buf.dtype), mode='promise_in_bounds',
                           unique_indices=True)


@functools.partial(jax.tree_util.register_dataclass, data_fields=['k', 'v'],
                   meta_fields=['v_transposed'])
@dataclasses.dataclass(frozen=True)
class KVCache:
  """One layer's keys and values for MHA / GQA / MQA.

  k [b, g, s, k]; v [b, g, s, k], or [b, g, k, s] when v_transposed (MHA).
  """

  k: jax.Array
  v: jax.Array
  v_transposed: bool = False

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> KVCache:
    g, k = cfg.n_kv_heads, cfg.head_dim
    transposed = values_transposed(cfg)
    k_axes = ('batch', 'kv_heads', 'seq', 'head_dim')  # sharded like the keys' heads
    v_axes = ('batch', 'kv_heads', 'head_dim', 'seq') if transposed else k_axes
    v_shape = (batch, g, k, max_len) if transposed else (batch, g, max_len, k)
    return cls(constrain(jnp.zeros((batch, g, max_len, k), dtype), k_axes),
               constrain(jnp.zeros(v_shape, dtype), v_axes), transposed)

  @staticmethod
  def elements_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.n_kv_heads * cfg.head_dim

  def write(self, k_btgk, v_btgk, positions_bt) -> KVCache:
    """Stores new keys/values at each sequence's own positions [b, t]."""
    v = write_at(self.v, v_btgk, positions_bt, seq_axis=3 if self.v_transposed else 2)
    return KVCache(write_at(self.k, k_btgk, positions_bt, seq_axis=2), v, self.v_transposed)


@functools.partial(jax.tree_util.register_dataclass, data_fields=['c_kv', 'k_rope'],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LatentCache:
  """One layer's MLA cache: c_kv [b, s, c] (after the latent RMSNorm), k_rope [b, s, r]."""

  c_kv: jax.Array
  k_rope: jax.Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> LatentCache:
    return cls(constrain(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype),
                         ('batch', 'seq', 'kv_lora')),
               constrain(jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype),
                         ('batch', 'seq', 'head_dim')))

  @staticmethod
  def elements_per_token(cfg: ModelConfig) -> int:
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim

  def write(self, c_kv_btc, k_rope_btr, positions_bt) -> LatentCache:
    """Stores new latents and rope keys at each sequence's own positions [b, t]."""
    return LatentCache(write_at(self.c_kv, c_kv_btc, positions_bt, seq_axis=1),
                       write_at(self.k_rope, k_rope_btr, positions_bt, seq_axis=1))


def measured_per_token(caches, batch: int, max_len: int) -> tuple[int, int]:
  """(elements, bytes) per token actually allocated by a list of layer caches."""
  leaves = jax.tree.leaves(caches)
  elements = sum(x.size for x in leaves)
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
  tokens = batch * max_len
  assert elements % tokens == 0 and nbytes % tokens == 0, 'cache not per-token shaped'
  return elements // tokens, nbytes // tokens
