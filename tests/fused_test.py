"""attention_impl='fused' (flash attention for training and prefill, mla_jax.fused) computes the
same model as the einsum reference path, for every variant: logits, gradients, cached decoding
and greedy generation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import VARIANTS, tiny_model, variant_params
from flax import nnx

import mla_jax
from mla_jax import kernels
from mla_jax.model import with_config

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 20))


def _pair(name):
  einsum = tiny_model(seed=1, attention_impl='einsum', **VARIANTS[name])
  return einsum, with_config(einsum, attention_impl='fused')


def _grads(model):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(TOKENS[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

  return jax.tree.leaves(jax.grad(loss)(params))


# MHA and MQA run GQA's code path with H and 1 groups, so GQA stands for them in the default
# run. Query compression (mla_q) changes no attention code, and mla_naive trains exactly as mla
# (mla_decode only picks the cached path), so mla stands for them in training.
@pytest.mark.parametrize('name', variant_params(('mha', 'mqa', 'mla_q', 'mla_naive')))
def test_fused_equals_einsum_logits_and_gradients(name):
  einsum, fused = _pair(name)
  assert fused.cfg.fused and not einsum.cfg.fused
  np.testing.assert_allclose(fused(TOKENS), einsum(TOKENS), atol=1e-5, rtol=0)
  for g_fused, g_einsum in zip(_grads(fused), _grads(einsum), strict=True):
    scale = float(jnp.max(jnp.abs(g_einsum)))
    np.testing.assert_allclose(g_fused, g_einsum, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize('name', variant_params(('mha', 'mqa', 'mla_q')))
def test_fused_equals_einsum_through_the_cache_and_in_generation(name):
  einsum, fused = _pair(name)
  tokens = TOKENS[0]
  np.testing.assert_allclose(mla_jax.logits_through_cache(fused, tokens, prefill_len=7),
                             mla_jax.logits_through_cache(einsum, tokens, prefill_len=7),
                             atol=1e-5, rtol=0)
  prompts, lengths = TOKENS[:, :9], np.array([9, 5])
  np.testing.assert_array_equal(
      mla_jax.generate(fused, prompts, lengths, max_new_tokens=12, chunk=4),
      mla_jax.generate(einsum, prompts, lengths, max_new_tokens=12, chunk=4))


def test_narrower_values_are_padded_not_dropped():
  """MLA's d_v (16) < d_n + d_r (24): the fused call pads v and slices the output; a wrong
  slice or an unpadded width would change the logits."""
  einsum, fused = _pair('mla')
  assert einsum.cfg.v_head_dim < einsum.cfg.qk_nope_head_dim + einsum.cfg.qk_rope_head_dim
  np.testing.assert_allclose(fused(TOKENS), einsum(TOKENS), atol=1e-5, rtol=0)


@pytest.mark.parametrize('name', ['gqa', 'mla_exact'])
def test_fused_prefill_reads_a_cache_narrower_than_the_compute_dtype(name):
  """cache_dtype='bfloat16' under float32 compute: fused prefill reads the cache in the compute
  dtype (flash attention wants one dtype for q, k and v). The einsum path instead rounds the
  probabilities to the cache's dtype for the value product, so the two differ by bfloat16
  rounding: fused must be no further than the einsum path from the float32-cache logits."""
  einsum = tiny_model(seed=1, attention_impl='einsum', **VARIANTS[name])
  through = lambda model, **fields: mla_jax.logits_through_cache(
      with_config(model, **fields), TOKENS[0], prefill_len=7)
  want = through(einsum)
  errors = {impl: np.abs(through(einsum, attention_impl=impl, cache_dtype='bfloat16') - want).max()
            for impl in ('einsum', 'fused')}
  assert errors['einsum'] > 1e-4 and errors['fused'] <= errors['einsum'], errors


@pytest.mark.parametrize('name', ['gqa', 'mla', pytest.param('mla_exact', marks=pytest.mark.long)])
def test_a_decode_step_the_kernel_cannot_take_runs_the_einsum_path(name, monkeypatch):
  """Where kernels.fits says no (a GPU and head widths Triton does not take), the fused
  model's decode steps run the einsum path, whatever cache layout the fused path chose."""
  def refuse(*args, **kwargs):
    raise AssertionError('a decode kernel was called')

  monkeypatch.setattr(kernels, 'fits', lambda *args, **kwargs: False)
  monkeypatch.setattr(kernels, 'gqa_decode', refuse)
  monkeypatch.setattr(kernels, 'mla_decode', refuse)
  einsum, fused = _pair(name)
  np.testing.assert_allclose(mla_jax.logits_through_cache(fused, TOKENS[0], prefill_len=7),
                             mla_jax.logits_through_cache(einsum, TOKENS[0], prefill_len=7),
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize('flags, on', [
    ('', False), ('--xla_gpu_deterministic_ops=true', True), ('--xla_gpu_deterministic_ops', True),
    ('--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false', False),
    ('--a=1 --xla_gpu_deterministic_ops=1', True), ('--xla_gpu_deterministic_ops_x=true', False)])
def test_deterministic_ops_are_read_as_xla_reads_its_flags(flags, on, monkeypatch):
  """Under XLA's deterministic GPU ops the fused path avoids cuDNN (mla_jax/fused.py): the
  flag's last setting counts, bare or with a value."""
  monkeypatch.setenv('XLA_FLAGS', flags)
  assert mla_jax.fused.deterministic_gpu_ops() == on
