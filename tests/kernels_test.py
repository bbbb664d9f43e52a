"""Pallas decode kernels (interpret mode on CPU) against attention.py's einsum path.

Shapes are small and reused so that each kernel configuration compiles once: the lengths are
traced, so ragged batches, a context of 1 and poisoned slots share one compile per config.
Allocated contexts (37, 300) are not multiples of the blocks (16, 128).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.attention_op import attention_weights
from mla_jax.kernels import fits, gqa_decode, mla_decode

B, H, C, R, S = 8, 4, 32, 16, 37  # MLA: batch, heads, d_c, d_r, allocated context
G, K = 2, 16  # GQA: KV groups, head dim
BLOCK = 16  # Triton key block in these tests: S = 2 * 16 + 5, a partial last block
# context 1, block multiples (16, 32) and one past them (17, 33), the whole allocation (37)
LENGTHS = np.array([37, 1, 16, 17, 5, 32, 33, 20])
SCALE = (C + R)**-0.5
# Mosaic: blocks are whole (8, 128) tiles, so its tests use 300 = 2 * 128 + 44 slots
MOSAIC_S, MOSAIC_BLOCK = 300, 128
MOSAIC_LENGTHS = np.array([300, 1, 128, 129, 44, 256, 257, 200])
# Compiling the interpreted kernels dominates these tests; XLA:CPU at -O0 halves it (2.1 ->
# 1.0 s of CPU a kernel), and float32 arithmetic is IEEE at any optimization level.
FAST_COMPILE = {'xla_backend_optimization_level': 0}
KERNEL_STATIC = ('scale', 'block_s', 'num_splits', 'block_h', 'num_warps', 'num_stages',
                 'interpret', 'backend')
_fast_jit = lambda fn, **kw: jax.jit(fn, compiler_options=FAST_COMPILE, **kw)


def _normal(seed, *shapes, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes]


def _mask(lengths, s):
  """[b, t = 1, s] visibility of cache slots [0, length)."""
  return (jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None])[:, None, :]


@_fast_jit
def mla_reference(q_lat, q_rope, c_kv, k_rope, lengths, scale=SCALE):
  """attention.py's absorbed einsum path, computed in the inputs' dtype as the model does."""
  with jax.default_matmul_precision('highest'):
    probs = attention_weights((q_lat[:, None, None], q_rope[:, None, None]),
                              (c_kv[:, None], k_rope[:, None]), _mask(lengths, c_kv.shape[1]),
                              scale)[:, 0]
    return jnp.einsum('bsc,bhts->bthc', c_kv, probs.astype(c_kv.dtype),
                      preferred_element_type=jnp.float32)[:, 0]


@_fast_jit
def gqa_reference(q, k, v, lengths, scale=SCALE):
  with jax.default_matmul_precision('highest'):
    probs = attention_weights((q[:, None],), (k,), _mask(lengths, k.shape[2]), scale)
    return jnp.einsum('bgsk,bgpts->btgpk', v, probs.astype(v.dtype),
                      preferred_element_type=jnp.float32)[:, 0]


def _mla_inputs(seed, b=B, s=S, dtype=jnp.float32):
  return _normal(seed, (b, H, C), (b, H, R), (b, s, C), (b, s, R), dtype=dtype)


def _poison_past(x, lengths, value=jnp.nan):
  """x [b, s, ...] with every slot at or past its row's length set to `value`."""
  keep = jnp.arange(x.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
  keep = keep.reshape(keep.shape + (1,) * (x.ndim - 2))
  return jnp.where(keep, x, jnp.asarray(value, x.dtype))


def _quantize(x, dtype):
  """Per-token symmetric quantization over the last axis: (stored, float32 scale)."""
  top = 127.0 if dtype == jnp.int8 else float(jnp.finfo(dtype).max)
  scale = jnp.max(jnp.abs(x), axis=-1) / top
  y = x / scale[..., None]
  stored = jnp.round(y).astype(dtype) if dtype == jnp.int8 else y.astype(dtype)
  return stored, scale


def _dequantize(stored, scale):
  return stored.astype(jnp.float32) * scale[..., None]


_mla_decode = _fast_jit(mla_decode, static_argnames=KERNEL_STATIC)
_gqa_decode = _fast_jit(gqa_decode, static_argnames=KERNEL_STATIC)


def _mla(*args, **kw):
  return _mla_decode(*args, **(dict(block_s=BLOCK, interpret=True, backend='triton') | kw))


def _gqa(*args, **kw):
  return _gqa_decode(*args, **(dict(block_s=BLOCK, interpret=True, backend='triton') | kw))


# ------------------------------------------------------------------------------ MLA, Triton


@pytest.mark.parametrize('num_splits', [1, 3])
def test_mla_equals_einsum_path_on_a_ragged_batch(num_splits):
  """Batch 8, lengths 1..37 in a 37-slot cache (3 splits leave short rows' later splits
  empty). NaN fills every slot at or past a row's length, the partial last block's tail
  included: the output stays finite and equal, so those slots never reach a sum."""
  q_lat, q_rope, c_kv, k_rope = _mla_inputs(0)
  poisoned = _poison_past(c_kv, LENGTHS), _poison_past(k_rope, LENGTHS)
  out = _mla(q_lat, q_rope, *poisoned, jnp.asarray(LENGTHS), SCALE, num_splits=num_splits)
  assert out.dtype == jnp.float32 and out.shape == (B, H, C)
  np.testing.assert_allclose(out, mla_reference(q_lat, q_rope, c_kv, k_rope, LENGTHS),
                             atol=1e-5, rtol=0)


def test_mla_batch_of_one_with_a_context_of_one():
  """Batch 1, a 1-slot cache: the allocation is smaller than one key block."""
  inputs = _mla_inputs(2, b=1, s=1)
  lengths = np.array([1])
  out = _mla(*inputs, jnp.asarray(lengths), SCALE, num_splits=2)
  np.testing.assert_allclose(out, mla_reference(*inputs, lengths), atol=1e-5, rtol=0)


def _bf16_errors(kernel_out, reference_fn, inputs_bf16, lengths):
  """(kernel error, einsum-path error), both max |. - float32 path| on the same bf16 inputs."""
  exact = reference_fn(*(x.astype(jnp.float32) for x in inputs_bf16), lengths)
  einsum_bf16 = reference_fn(*inputs_bf16, lengths)
  return (float(jnp.max(jnp.abs(kernel_out - exact))),
          float(jnp.max(jnp.abs(einsum_bf16 - exact))))


# A bfloat16 cache's error is the rounding of the probabilities to bfloat16 before the
# p @ values product (scores accumulate in float32 from exact bf16 products in both paths).
# The einsum path rounds each normalized probability once; the kernel rounds each exp(s - m)
# once (then divides in float32), with the same 2^-9 relative bound per weight, and its row
# maximum exp(0) = 1 is exact. So its error should not exceed the einsum path's: over 36
# seeded trials (MLA and GQA, fixed and random lengths) the ratio was 0.31-1.03. 1.5 leaves
# room for which roundings land where, no more.
BF16_ERROR_FACTOR = 1.5


def test_mla_bf16_cache_error_is_the_einsum_paths():
  inputs = _mla_inputs(3, dtype=jnp.bfloat16)
  out = _mla(*inputs, jnp.asarray(LENGTHS), SCALE, num_splits=2)
  kernel_err, einsum_err = _bf16_errors(out, mla_reference, inputs, LENGTHS)
  assert 0 < kernel_err <= BF16_ERROR_FACTOR * einsum_err, (kernel_err, einsum_err)


@pytest.mark.parametrize('dtype', [jnp.int8, jnp.float8_e4m3fn], ids=['int8', 'fp8'])
def test_mla_8bit_cache_with_scales_equals_the_dequantized_cache(dtype):
  """Scales are applied as the kernel reads; scales past the length are NaN and never read."""
  q_lat, q_rope, c_kv, k_rope = _mla_inputs(4)
  (c_q, c_s), (r_q, r_s) = _quantize(c_kv, dtype), _quantize(k_rope * 3.0, dtype)
  expected = mla_reference(q_lat, q_rope, _dequantize(c_q, c_s), _dequantize(r_q, r_s), LENGTHS)
  out = _mla(q_lat, q_rope, c_q, r_q, jnp.asarray(LENGTHS), SCALE, num_splits=2,
             c_kv_scale_bs=_poison_past(c_s, LENGTHS), k_rope_scale_bs=_poison_past(r_s, LENGTHS))
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
  # the scales matter: ignoring one changes the result
  assert not np.allclose(out, mla_reference(q_lat, q_rope, _dequantize(c_q, c_s),
                                            r_q.astype(jnp.float32), LENGTHS), atol=1e-3)


# ------------------------------------------------------------------------------ GQA, Triton

GQA_SHAPES = {'mha': (4, 1), 'gqa': (G, 2), 'mqa': (1, 4)}  # (g, p)


def _gqa_inputs(seed, name, dtype=jnp.float32):
  g, p = GQA_SHAPES[name]
  return _normal(seed, (B, g, p, K), (B, g, S, K), (B, g, S, K), dtype=dtype)


@pytest.mark.parametrize('name', ['mha', 'mqa'])
def test_gqa_family_equals_einsum_path(name):
  """MHA (p = 1) and MQA (g = 1); the GQA shape runs in the int8 and bf16 tests. Ragged
  batch, NaN past each length (never read)."""
  q, k, v = _gqa_inputs(5, name)
  poison = lambda x: _poison_past(x.transpose(0, 2, 1, 3), LENGTHS).transpose(0, 2, 1, 3)
  out = _gqa(q, poison(k), poison(v), jnp.asarray(LENGTHS), SCALE, num_splits=2)
  assert out.dtype == jnp.float32 and out.shape == q.shape
  np.testing.assert_allclose(out, gqa_reference(q, k, v, LENGTHS), atol=1e-5, rtol=0)


def test_gqa_bf16_cache_error_is_the_einsum_paths():
  inputs = _gqa_inputs(6, 'gqa', dtype=jnp.bfloat16)
  out = _gqa(*inputs, jnp.asarray(LENGTHS), SCALE, num_splits=3)
  kernel_err, einsum_err = _bf16_errors(out, gqa_reference, inputs, LENGTHS)
  assert 0 < kernel_err <= BF16_ERROR_FACTOR * einsum_err, (kernel_err, einsum_err)


def test_gqa_int8_cache_with_scales_equals_the_dequantized_cache():
  """Separate key and value scales (MLA's value shares c_kv's scale); fp8 is tested on MLA."""
  q, k, v = _gqa_inputs(7, 'gqa')
  (k_q, k_s), (v_q, v_s) = _quantize(k, jnp.int8), _quantize(v * 2.0, jnp.int8)
  out = _gqa(q, k_q, v_q, jnp.asarray(LENGTHS), SCALE, k_scale_bgs=k_s, v_scale_bgs=v_s,
             num_splits=2)
  expected = gqa_reference(q, _dequantize(k_q, k_s), _dequantize(v_q, v_s), LENGTHS)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ Mosaic (TPU)


def _mosaic(fn, *args, **kw):
  fn = {mla_decode: _mla_decode, gqa_decode: _gqa_decode}[fn]
  return fn(*args, block_s=MOSAIC_BLOCK, interpret=True, backend='mosaic', **kw)


@pytest.mark.slow
def test_mosaic_mla_equals_einsum_path():
  """TPU interpret mode (NaN-initialized VMEM): ragged batch, NaN past each length, 2 splits,
  a partial last block; then an int8 cache with scales."""
  q_lat, q_rope, c_kv, k_rope = _mla_inputs(8, s=MOSAIC_S)
  lengths = jnp.asarray(MOSAIC_LENGTHS)
  poisoned = _poison_past(c_kv, lengths), _poison_past(k_rope, lengths)
  out = _mosaic(mla_decode, q_lat, q_rope, *poisoned, lengths, SCALE, num_splits=2)
  expected = mla_reference(q_lat, q_rope, c_kv, k_rope, MOSAIC_LENGTHS)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)

  (c_q, c_s), (r_q, r_s) = _quantize(c_kv, jnp.int8), _quantize(k_rope, jnp.int8)
  out = _mosaic(mla_decode, q_lat, q_rope, c_q, r_q, lengths, SCALE, num_splits=2,
                c_kv_scale_bs=c_s, k_rope_scale_bs=r_s)
  expected = mla_reference(q_lat, q_rope, _dequantize(c_q, c_s), _dequantize(r_q, r_s),
                           MOSAIC_LENGTHS)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_mosaic_gqa_equals_einsum_path():
  g, p = GQA_SHAPES['gqa']
  q, k, v = _normal(9, (B, g, p, K), (B, g, MOSAIC_S, K), (B, g, MOSAIC_S, K))
  out = _mosaic(gqa_decode, q, k, v, jnp.asarray(MOSAIC_LENGTHS), SCALE, num_splits=1)
  np.testing.assert_allclose(out, gqa_reference(q, k, v, MOSAIC_LENGTHS), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ lowering


def _lowered_text(fn, platform, *shapes_dtypes, **kw):
  args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes_dtypes]
  return jax.jit(lambda *a: fn(*a, **kw)).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize('backend,platform,target', [('triton', 'cuda', 'triton'),
                                                     ('mosaic', 'tpu', 'tpu_custom_call')])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float8_e4m3fn, jnp.int8],
                         ids=['bf16', 'fp8', 'int8'])
def test_mla_lowers_for_the_accelerator_at_the_target_shape(backend, platform, target, dtype):
  """Pallas -> Triton IR / Mosaic IR lowering (no compile: that needs the device) at the
  H200 target's head count and widths: 16 heads, d_c = 256, d_r = 32, default blocks."""
  b, s, bf16 = 4, 1000, jnp.bfloat16
  args = [((b, 16, 256), bf16), ((b, 16, 32), bf16), ((b, s, 256), dtype), ((b, s, 32), dtype),
          ((b,), jnp.int32)]
  if dtype == jnp.bfloat16:
    fn = lambda q, qr, c, r, n: mla_decode(q, qr, c, r, n, 0.1, backend=backend)
  else:
    args += [((b, s), jnp.float32)] * 2
    fn = lambda q, qr, c, r, n, cs, rs: mla_decode(q, qr, c, r, n, 0.1, c_kv_scale_bs=cs,
                                                   k_rope_scale_bs=rs, backend=backend)
  text = _lowered_text(fn, platform, *args)
  assert target in text


@pytest.mark.parametrize('backend,platform,target', [('triton', 'cuda', 'triton'),
                                                     ('mosaic', 'tpu', 'tpu_custom_call')])
def test_gqa_lowers_for_the_accelerator(backend, platform, target):
  """MHA (p = 1, padded to 16 rows on Triton) with head dim 128 and an int8 cache."""
  b, g, s, k = 2, 8, 1000, 128
  text = _lowered_text(
      lambda q, kk, v, n, ks, vs: gqa_decode(q, kk, v, n, 0.1, k_scale_bgs=ks, v_scale_bgs=vs,
                                             backend=backend),
      platform, ((b, g, 1, k), jnp.bfloat16), ((b, g, s, k), jnp.int8),
      ((b, g, s, k), jnp.int8), ((b,), jnp.int32), ((b, g, s), jnp.float32),
      ((b, g, s), jnp.float32))
  assert target in text


# ------------------------------------------------------------------------------ errors


def test_errors_name_the_problem():
  q_lat, q_rope, c_kv, k_rope = _mla_inputs(0)
  lengths = jnp.asarray(LENGTHS)
  with pytest.raises(ValueError, match='k_rope_scale_bs has shape'):
    _mla(q_lat, q_rope, c_kv, k_rope, lengths, SCALE, k_rope_scale_bs=jnp.ones((B, S + 1)))
  with pytest.raises(ValueError, match=r'q_lat_bhc must have shape \[b, h, c\]'):
    _mla(q_lat[0], q_rope, c_kv, k_rope, lengths, SCALE)
  with pytest.raises(ValueError, match='backend'):
    _mla(q_lat, q_rope, c_kv, k_rope, lengths, SCALE, backend='cuda')
  # d_r = 16 is fine for Triton, d_c = 24 is not a power of two
  with pytest.raises(ValueError, match='power of two'):
    _mla(q_lat[..., :24], q_rope, c_kv[..., :24], k_rope, lengths, SCALE, interpret=False)
  if jax.default_backend() == 'cpu':
    with pytest.raises(ValueError, match='einsum decode path'):
      mla_decode(q_lat, q_rope, c_kv, k_rope, lengths, SCALE)  # not interpreted


def test_fits_says_which_widths_the_compiled_kernels_take():
  """attention_op.resolve asks kernels.fits when a model is built (else its decode steps
  take the einsum path): it must agree with the Triton checks above, and accept anything
  interpreted or on Mosaic."""
  assert fits((512, 64), 512, backend='triton')  # DeepSeek-V2's d_c, d_r
  assert fits((16,), 16, backend='triton')
  for key_dims, value_dim in [((8,), 16), ((12,), 16), ((32, 8), 32), ((24, 16), 24)]:
    assert not fits(key_dims, value_dim, backend='triton')
    assert fits(key_dims, value_dim, backend='mosaic')
    assert fits(key_dims, value_dim, interpret=True)
