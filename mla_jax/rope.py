"""Rotary position embeddings (Su et al. 2021) in two layouts, with YaRN scaling.

Pair i of the rotary dims turns by angle p * theta_i at position p, theta_i = base^(-2i/d).
Layout 'interleaved' pairs (x_2i, x_2i+1), as DeepSeek's code does; layout 'half' pairs
(x_i, x_{i+d/2}), as Llama and Hugging Face's rotate_half do. The two are equal up to a fixed
permutation of the projection's output rows (`interleaved_to_half`).

YaRN (Peng et al. 2023; DeepSeek-V2 appendix B) follows Hugging Face transformers' DeepSeek-V3
numerics: frequencies blended by a linear ramp between the correction dims of beta_fast and
beta_slow, cos/sin scaled by get_mscale(f, mscale) / get_mscale(f, mscale_all_dim), and the
softmax scale multiplied by get_mscale(f, mscale_all_dim)^2 (see `softmax_mscale`). An explicit
rope_scaling.attention_factor replaces the cos/sin factor, as in transformers.

Llama 3 (Llama3Scaling) rescales each frequency by its wavelength alone, as transformers'
_compute_llama3_parameters does in float32: no temperature, cos/sin and softmax unscaled.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from mla_jax.config import Llama3Scaling, RopeScaling, YarnScaling  # noqa: F401 (rope.YarnScaling)


def get_mscale(factor: float, mscale: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(n_rotations: float, dim: int, base: float, max_pos: int) -> float:
  """The rotary dim whose wavelength fits n_rotations times into max_pos positions."""
  return dim * math.log(max_pos / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def _llama3(inv_freq: np.ndarray, s: Llama3Scaling) -> np.ndarray:
  """Llama 3.1's rescaling of the frequencies, step for step as transformers (float32).

  torch computes number / tensor as (1 / tensor) * number in float32, which rounds differently
  from a division: so do we, to be bit for bit equal."""
  f32 = np.float32
  low_wavelen = f32(s.original_max_position_embeddings / s.low_freq_factor)
  high_wavelen = f32(s.original_max_position_embeddings / s.high_freq_factor)
  factor = f32(s.factor)
  wavelen = (f32(1) / inv_freq) * f32(2 * math.pi)
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (((f32(1) / wavelen) * f32(s.original_max_position_embeddings) - f32(s.low_freq_factor))
            / f32(s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_frequencies(dim: int, base: float, scaling: RopeScaling | None = None) -> np.ndarray:
  """theta_i for the dim/2 rotary pairs, float32 numpy (computed once, at trace time)."""
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  extrapolation = (1.0 / np.float32(base) ** exponents).astype(np.float32)
  if scaling is None:
    return extrapolation
  if isinstance(scaling, Llama3Scaling):
    return _llama3(extrapolation, scaling)
  interpolation = (1.0 / (np.float32(scaling.factor) * np.float32(base) ** exponents)
                   ).astype(np.float32)
  orig = scaling.original_max_position_embeddings
  low = max(math.floor(_correction_dim(scaling.beta_fast, dim, base, orig)), 0)
  high = min(math.ceil(_correction_dim(scaling.beta_slow, dim, base, orig)), dim - 1)
  if low == high:
    high += 0.001  # avoids 0/0 in the ramp, as the reference does
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = (1.0 - ramp).astype(np.float32)  # 1: high-frequency dims keep their frequency
  return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def cos_sin_mscale(scaling: RopeScaling | None) -> float:
  """Factor on cos and sin (YaRN's attention temperature, split between q and k)."""
  if scaling is None or isinstance(scaling, Llama3Scaling):
    return 1.0
  if scaling.attention_factor is not None:
    return scaling.attention_factor
  return get_mscale(scaling.factor, scaling.mscale) / get_mscale(scaling.factor,
                                                                  scaling.mscale_all_dim)


def softmax_mscale(scaling: RopeScaling | None) -> float:
  """m in score * d^-1/2 * m^2 (docs/design.md#5-rope-and-yarn); 1 without YaRN or
  mscale_all_dim."""
  if scaling is None or isinstance(scaling, Llama3Scaling) or not scaling.mscale_all_dim:
    return 1.0
  return get_mscale(scaling.factor, scaling.mscale_all_dim)


def rope_angles(positions, dim: int, base: float, scaling: RopeScaling | None = None):
  """cos, sin [b, t, dim/2] (float32) for int positions [b, t]."""
  inv_freq = jnp.asarray(inv_frequencies(dim, base, scaling))
  angles = positions[..., None].astype(jnp.float32) * inv_freq.reshape(
      (1,) * positions.ndim + (-1,))
  m = cos_sin_mscale(scaling)
  return jnp.cos(angles) * m, jnp.sin(angles) * m


def apply_rope(x, cos, sin, layout: str):
  """Rotates x [b, t, ..., dim] by the angles cos, sin [b, t, dim/2]; keeps x's dtype.

  The angles broadcast over any head axes between t and dim.
  """
  extra = x.ndim - cos.ndim
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
  sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
  xf = x.astype(jnp.float32)
  if layout == 'interleaved':
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
  elif layout == 'half':
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  else:
    raise ValueError(f'unknown rope layout {layout!r}')
  return out.astype(x.dtype)


def interleaved_to_half(dim: int) -> np.ndarray:
  """Permutation p with half_layout_rows = interleaved_rows[p]: [0, 2, 4, .., 1, 3, 5, ..]."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])
