"""Decode caches as pytrees: one per layer, written at each sequence's own positions and read
by attention through one method, `read`. Their sizes per token are the variants' formulas
(mla_jax.variants, DeepSeek-V2 Table 1), which the tests measure against what is allocated.

KVCache stores keys heads-major, k [b, g, s, k], not token-major [b, s, g, k]: a decode step
then reads each head's keys as one contiguous [s, k] block. Values are stored [b, g, s, k] too,
except for MHA when every read of the cache is an einsum (attention_op.AttentionOp
.einsum_cache_layout): one query head per KV head makes p.v a matrix-vector product, which
XLA's CPU dot runs fastest contracted along the contiguous axis, so the values are stored
transposed, [b, g, k, s]. With several query heads per KV head (GQA, MQA) p.v is a matrix
product, which XLA's CPU dot wants as [s, k] and would otherwise transpose, copying the whole
cache every step (docs/benchmarks.md has the measurements). LatentCache stores MLA's
compressed c_kv and the ONE rope key shared by all heads: nothing per head is cached.

Either cache stores its arrays in the compute dtype, another float dtype, or 8-bit with
per-token scales (mla_jax.quant: int8 / float8_e4m3fn, a QuantArray per array), quantized on
write (`store`).
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp

from mla_jax import quant
from mla_jax.config import ModelConfig
from mla_jax.errors import Error
from mla_jax.quant import QuantArray
from mla_jax.sharding import constrain


class CacheDtypeError(Error, ValueError):
  """A cache dtype the decode loop cannot store."""


def check_dtype(dtype) -> None:
  """A dtype passed for a plain cache must be a float: an 8-bit one would be cast to without
  the scales that make it mean anything."""
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize == 1:
    raise CacheDtypeError(
        f"init_cache(dtype={dtype.name}) would store {dtype.name} without scales; set "
        f"ModelConfig.cache_dtype={dtype.name!r} for an 8-bit cache with per-token scales "
        f"({', '.join(quant.QUANTIZED_DTYPES)}), or pass a float dtype")


def storage_dtype(cfg: ModelConfig) -> jnp.dtype:
  """The dtype the decode loop allocates caches in: cfg.cache_dtype, else the compute dtype."""
  return cfg.compute_dtype if cfg.cache_dtype is None else jnp.dtype(cfg.cache_dtype)


def values_transposed(cfg: ModelConfig, einsum_reads: bool) -> bool:
  """Whether a KVCache stores values [b, g, k, s]: MHA whose cache only einsums read (the
  module docstring; flash attention and the decode kernels read [b, g, s, k])."""
  return cfg.n_kv_heads == cfg.n_heads and einsum_reads


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


def zeros(shape, dtype, axes, feature_axis: int):
  """An empty cache array: plain, or a QuantArray (8-bit values, float32 scales without the
  feature axis) for an 8-bit dtype; sharded by the logical `axes`."""
  values = constrain(jnp.zeros(shape, dtype), axes)
  if not quant.is_quantized(dtype):
    return values
  drop = lambda xs: tuple(x for i, x in enumerate(xs) if i != feature_axis)
  return QuantArray(values, constrain(jnp.zeros(drop(shape), jnp.float32), drop(axes)),
                    feature_axis)


def store(buf, new_bt, positions_bt, seq_axis: int):
  """write_at for a plain or an 8-bit cache array: new_bt [b, t, ..., features] is quantized
  (one scale per token and leading axis) before it is written with its scales."""
  if not isinstance(buf, QuantArray):
    return write_at(buf, new_bt, positions_bt, seq_axis)
  new = quant.quantize(new_bt, buf.values.dtype)
  scale_seq_axis = seq_axis - (buf.axis < seq_axis)  # the scale has no feature axis
  return QuantArray(write_at(buf.values, new.values, positions_bt, seq_axis),
                    write_at(buf.scale, new.scale, positions_bt, scale_seq_axis), buf.axis)


@functools.partial(jax.tree_util.register_dataclass, data_fields=['k', 'v'],
                   meta_fields=['v_transposed'])
@dataclasses.dataclass(frozen=True)
class KVCache:
  """One layer's keys and values for MHA / GQA / MQA.

  k [b, g, s, k]; v [b, g, s, k], or [b, g, k, s] when v_transposed (MHA). An 8-bit cache
  holds QuantArrays with one scale per token and KV head, [b, g, s], for k and for v.
  """

  k: jax.Array | QuantArray
  v: jax.Array | QuantArray
  v_transposed: bool = False

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype, *,
           einsum_reads: bool) -> KVCache:
    """An empty cache; einsum_reads: whether only einsums read it (values_transposed)."""
    g, k = cfg.n_kv_heads, cfg.head_dim
    transposed = values_transposed(cfg, einsum_reads)
    k_axes = ('batch', 'kv_heads', 'seq', 'head_dim')  # sharded like the keys' heads
    v_axes = ('batch', 'kv_heads', 'head_dim', 'seq') if transposed else k_axes
    v_shape = (batch, g, k, max_len) if transposed else (batch, g, max_len, k)
    return cls(zeros((batch, g, max_len, k), dtype, k_axes, feature_axis=3),
               zeros(v_shape, dtype, v_axes, feature_axis=2 if transposed else 3), transposed)

  def write(self, k_btgk, v_btgk, positions_bt) -> KVCache:
    """Stores new keys/values at each sequence's own positions [b, t]."""
    v = store(self.v, v_btgk, positions_bt, seq_axis=3 if self.v_transposed else 2)
    return KVCache(store(self.k, k_btgk, positions_bt, seq_axis=2), v, self.v_transposed)

  def read(self, dtype=None):
    """(k, k_scale [b, g, s] or None, v, v_scale or None) as attention reads them: an 8-bit
    cache's values in `dtype` (None: as stored, for the decode kernel), a float cache as
    stored with no scales (mla_jax.quant.operand)."""
    return (*quant.operand(self.k, dtype), *quant.operand(self.v, dtype))


@functools.partial(jax.tree_util.register_dataclass, data_fields=['c_kv', 'k_rope'],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class LatentCache:
  """One layer's MLA cache: c_kv [b, s, c] (after the latent RMSNorm), k_rope [b, s, r].

  An 8-bit cache holds QuantArrays, each with its own per-token scale [b, s].
  """

  c_kv: jax.Array | QuantArray
  k_rope: jax.Array | QuantArray

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype) -> LatentCache:
    return cls(zeros((batch, max_len, cfg.kv_lora_rank), dtype, ('batch', 'seq', 'kv_lora'),
                     feature_axis=2),
               zeros((batch, max_len, cfg.qk_rope_head_dim), dtype,
                     ('batch', 'seq', 'head_dim'), feature_axis=2))

  def write(self, c_kv_btc, k_rope_btr, positions_bt) -> LatentCache:
    """Stores new latents and rope keys at each sequence's own positions [b, t]."""
    return LatentCache(store(self.c_kv, c_kv_btc, positions_bt, seq_axis=1),
                       store(self.k_rope, k_rope_btr, positions_bt, seq_axis=1))

  def read(self, dtype=None):
    """(c_kv, c_kv_scale [b, s] or None, k_rope, k_rope_scale or None), as KVCache.read."""
    return (*quant.operand(self.c_kv, dtype), *quant.operand(self.k_rope, dtype))


def measured_per_token(caches, batch: int, max_len: int) -> tuple[int, int]:
  """(elements, bytes) per token actually allocated by a list of layer caches: elements count
  the cached values (the paper's count), bytes everything stored, an 8-bit cache's scales too."""
  arrays = jax.tree.leaves(caches, is_leaf=lambda x: isinstance(x, QuantArray))
  elements = sum(x.values.size if isinstance(x, QuantArray) else x.size for x in arrays)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(caches))
  tokens = batch * max_len
  assert elements % tokens == 0 and nbytes % tokens == 0, 'cache not per-token shaped'
  return elements // tokens, nbytes // tokens
