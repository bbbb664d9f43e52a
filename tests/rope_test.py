import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax import Llama3Scaling, YarnScaling, rope


def _rotate(x, positions, layout, scaling=None, base=10000.0):
  cos, sin = rope.rope_angles(jnp.asarray(positions)[None], x.shape[-1], base, scaling)
  return rope.apply_rope(x[None], cos, sin, layout)[0]


@pytest.mark.parametrize('layout', ['interleaved', 'half'])
def test_dot_product_depends_only_on_offset(layout):
  q, k = jax.random.normal(jax.random.key(0), (2, 16))
  dots = []
  for start in (0, 7, 1000, 3000):  # float32 angles: ~p * 6e-8 rad of rounding at p
    pos = jnp.array([start + 5, start])
    rq = _rotate(jnp.stack([q, q]), pos, layout)[0]
    rk = _rotate(jnp.stack([k, k]), pos, layout)[1]
    dots.append(float(rq @ rk))
  np.testing.assert_allclose(dots, dots[0], rtol=2e-4)
  # ...and does depend on the offset.
  rk0 = _rotate(jnp.stack([k, k]), jnp.array([5, 5]), layout)[1]
  assert abs(float(_rotate(jnp.stack([q, q]), jnp.array([5, 5]), layout)[0] @ rk0) - dots[0]) > 1e-3


def test_interleaved_equals_half_after_row_permutation():
  x = jax.random.normal(jax.random.key(1), (6, 3, 16))  # [t, heads, d]
  pos = jnp.arange(6) * 37
  perm = rope.interleaved_to_half(16)
  inter = _rotate(x, pos, 'interleaved')
  half = _rotate(x[..., perm], pos, 'half')
  np.testing.assert_allclose(half, inter[..., perm], atol=1e-6)
  assert not np.allclose(_rotate(x, pos, 'half'), inter, atol=1e-2)


def test_plain_rope_by_hand():
  x = jnp.arange(4.0)
  out = _rotate(x[None], jnp.array([3]), 'interleaved')[0]
  th = [3 * 1.0, 3 * 10000.0**-0.5]
  want = [0 * math.cos(th[0]) - 1 * math.sin(th[0]), 0 * math.sin(th[0]) + 1 * math.cos(th[0]),
          2 * math.cos(th[1]) - 3 * math.sin(th[1]), 2 * math.sin(th[1]) + 3 * math.cos(th[1])]
  np.testing.assert_allclose(out, want, rtol=1e-5)


YARN = YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32,
                   beta_slow=1, mscale=1.0, mscale_all_dim=1.0)


def test_yarn_frequencies_by_hand():
  dim, base = 64, 10000.0
  # Correction dims: d * ln(L / (2 pi beta)) / (2 ln base), floored / ceiled.
  low = math.floor(dim * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(base)))
  high = math.ceil(dim * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(base)))
  assert (low, high) == (10, 23)
  got = rope.inv_frequencies(dim, base, YARN)
  for i in range(dim // 2):
    theta = base ** (-2 * i / dim)
    ramp = min(max((i - low) / (high - low), 0.0), 1.0)
    want = theta / 40.0 * ramp + theta * (1 - ramp)  # interpolate long wavelengths only
    assert got[i] == pytest.approx(want, rel=1e-5), i
  assert got[0] == pytest.approx(1.0) and got[-1] == pytest.approx(base ** (-62 / 64) / 40)


def test_yarn_scales_by_hand():
  m = 0.1 * 1.0 * math.log(40.0) + 1.0
  assert rope.softmax_mscale(YARN) == pytest.approx(m)
  assert rope.cos_sin_mscale(YARN) == pytest.approx(1.0)
  half = YarnScaling(factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
                     mscale_all_dim=0.0)
  assert rope.cos_sin_mscale(half) == pytest.approx(0.1 * 0.707 * math.log(40.0) + 1.0)
  assert rope.softmax_mscale(half) == 1.0
  assert rope.softmax_mscale(None) == 1.0


def test_yarn_rotation_past_the_original_window():
  """At position 10_000 > 4096 the rotation uses the blended frequencies and the cos/sin mscale."""
  scaling = YarnScaling(factor=8.0, original_max_position_embeddings=4096, mscale=1.0,
                        mscale_all_dim=0.5)
  x = jnp.ones((1, 8))
  out = np.asarray(_rotate(x, jnp.array([10_000]), 'half', scaling))[0]
  inv = rope.inv_frequencies(8, 10000.0, scaling)
  m = (0.1 * math.log(8) + 1) / (0.05 * math.log(8) + 1)
  ang = 10_000 * inv.astype(np.float64)
  want = np.concatenate([np.cos(ang) - np.sin(ang), np.sin(ang) + np.cos(ang)]) * m
  np.testing.assert_allclose(out, want, atol=2e-3)  # float32 angles near 1e4 rad
  assert not np.allclose(out, np.asarray(_rotate(x, jnp.array([10_000]), 'half'))[0], atol=0.1)


LLAMA3 = Llama3Scaling(factor=8.0, original_max_position_embeddings=8192, low_freq_factor=1.0,
                       high_freq_factor=4.0)  # Llama 3.1's


def test_llama3_frequencies_by_hand():
  """Wavelengths under 8192 / 4 keep their frequency, over 8192 / 1 divide it by 8, and the band
  between blends the two by s = (8192 / wavelength - 1) / (4 - 1)."""
  dim, base = 128, 500000.0
  got = rope.inv_frequencies(dim, base, LLAMA3)
  bands = set()
  for i in range(dim // 2):
    theta = base ** (-2 * i / dim)
    wavelen = 2 * math.pi / theta
    if wavelen < 8192 / 4:
      want, band = theta, 'kept'
    elif wavelen > 8192 / 1:
      want, band = theta / 8, 'divided'
    else:
      s = (8192 / wavelen - 1) / 3
      want, band = (1 - s) * theta / 8 + s * theta, 'blended'
    bands.add(band)
    assert got[i] == pytest.approx(want, rel=1e-5), i
  assert bands == {'kept', 'blended', 'divided'}
  assert rope.cos_sin_mscale(LLAMA3) == rope.softmax_mscale(LLAMA3) == 1.0


@pytest.mark.parametrize('dim,base', [(128, 500000.0), (8, 10000.0), (64, 10000.0)])
def test_llama3_frequencies_equal_transformers(dim, base):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  config = transformers.LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, head_dim=dim,
                                    rope_parameters=dict(
                                        rope_type='llama3', rope_theta=base, factor=8.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8192))
  theirs, attention_factor = ROPE_INIT_FUNCTIONS['llama3'](config, torch.device('cpu'))
  assert attention_factor == 1.0
  # The rescaling step is bit for bit transformers' from the same plain ladder; the ladders
  # themselves (float32 pow in numpy and in torch) differ by a few ulps.
  ladder = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
  np.testing.assert_array_equal(rope._llama3(ladder.numpy(), LLAMA3), theirs.numpy())
  np.testing.assert_allclose(rope.inv_frequencies(dim, base, LLAMA3), theirs.numpy(), rtol=1e-6,
                             atol=0)
