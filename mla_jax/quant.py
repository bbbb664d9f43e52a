"""8-bit decode caches: values stored as int8 or float8_e4m3fn with one float32 scale per token
(ModelConfig.cache_dtype 'int8' / 'float8_e4m3fn').

Format. A cached vector x (one token's features) is stored as values q and a scale s with
x ~ q * s, quantized on write (symmetric, absmax):
  int8            s = max|x| / 127, q = round(x / s) in [-127, 127]; |x - q s| <= s / 2.
  float8_e4m3fn   s = max|x| / 448 (e4m3's largest finite value), q = fp8(x / s), rounded to
                  nearest; |x - q s| <= 2^-4 |x| for normals (3 mantissa bits) and <= 2^-10 s
                  in e4m3's subnormal range (below 2^-6 s, where its step is 2^-9 s).
An all-zero token gets s = 0 and q = 0: it reads back as zeros, never NaN.

One scale per token per cached array (MLA's c_kv and k_rope each; the GQA family per token
and KV head), applied inside attention, never as a dequantized copy of the cache; why, and
what it costs in bytes: docs/design.md#4-caches. On a CPU the einsum path converts the 8-bit
values to the compute dtype as dot operands (exact: int8 and e4m3 values are representable
in bfloat16), which XLA:CPU writes out as a temporary each step: an 8-bit cache saves memory
there, not decode time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

QUANTIZED_DTYPES = ('int8', 'float8_e4m3fn')
# The largest magnitude each format stores: int8 is kept symmetric (-128 is never used).
_QMAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def is_quantized(dtype) -> bool:
  """Whether a cache of this dtype stores 8-bit values with per-token scales."""
  return jnp.dtype(dtype) in _QMAX


@functools.partial(jax.tree_util.register_dataclass, data_fields=['values', 'scale'],
                   meta_fields=['axis'])
@dataclasses.dataclass(frozen=True)
class QuantArray:
  """An 8-bit array with one float32 scale per vector along `axis`: x ~ values * scale.

  values: int8 / float8_e4m3fn; scale: values' shape without `axis` (the feature axis, which
  each scale covers), float32.
  """

  values: jax.Array
  scale: jax.Array
  axis: int

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape


def quantize(x, dtype, axis: int = -1) -> QuantArray:
  """Symmetric absmax quantization of x, one scale per vector along `axis` (module docstring)."""
  dtype = jnp.dtype(dtype)
  axis = axis % x.ndim
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=axis) / _QMAX[dtype]
  nonzero = scale > 0
  y = x / jnp.expand_dims(jnp.where(nonzero, scale, 1.0), axis)
  y = jnp.clip(jnp.round(y) if dtype == jnp.int8 else y, -_QMAX[dtype], _QMAX[dtype])
  return QuantArray(y.astype(dtype), jnp.where(nonzero, scale, 0.0), axis)


def dequantize(x, dtype=jnp.float32):
  """values * scale in `dtype` (a plain array is returned as it is): for the places that need
  the full-precision array, fused prefill and tests, not the decode steps."""
  if not isinstance(x, QuantArray):
    return x
  return (x.values.astype(jnp.float32) * jnp.expand_dims(x.scale, x.axis)).astype(dtype)


def operand(x, dtype=None):
  """What attention reads of one cache array: (values, per-token scale or None).

  A plain array comes back as stored, with no scale. An 8-bit array gives its values converted
  to `dtype` (exact; None: left 8-bit, for the decode kernels) and its scale, which the caller
  folds into the scores or probabilities.
  """
  if not isinstance(x, QuantArray):
    return x, None
  return (x.values if dtype is None else x.values.astype(dtype)), x.scale
