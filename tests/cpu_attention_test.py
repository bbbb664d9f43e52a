"""The C++ CPU attention kernel (mla_jax.kernels.cpu_attention, AttentionOp.whole='cpu_kernel')
against the einsum path: attention alone at awkward shapes, then every variant's model, logits
and gradients, with attention_impl='kernels' on a CPU against 'einsum'."""

import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, tiny_model, variant_params
from flax import nnx

import mla_jax
from mla_jax import attention_op
from mla_jax.attention_op import AttentionOp
from mla_jax.kernels import cpu_attention
from mla_jax.model import with_config

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU kernel')
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 40))


def _built():
  if not cpu_attention.available():
    pytest.skip('the CPU attention kernel did not build here (no C++ compiler?)')


def test_the_kernel_builds_where_there_is_a_compiler():
  if shutil.which('g++') is None and shutil.which('c++') is None and 'CXX' not in os.environ:
    pytest.skip('no C++ compiler on PATH')
  assert cpu_attention.available()


# (b, g, p, t, e, v): MHA at the default model's widths; queries sharing a key head (GQA,
# MQA); MLA's naive path (e = d_n + d_r wider than v); widths and lengths that are neither
# vector (16) nor tile (32) multiples; one token; more than two tiles past 512.
SHAPES = [(2, 4, 1, 256, 32, 32), (2, 1, 8, 64, 16, 16), (2, 2, 3, 37, 20, 7),
          (3, 2, 1, 100, 48, 32), (1, 1, 1, 1, 8, 8), (1, 2, 1, 545, 64, 64)]


@pytest.mark.parametrize('shape', SHAPES, ids=['x'.join(map(str, s)) for s in SHAPES])
def test_kernel_equals_the_einsum_path(shape):
  _built()
  b, g, p, t, e, v = shape
  rng = np.random.default_rng(t)
  q, k = (jnp.asarray(2 * rng.standard_normal(s), jnp.float32)
          for s in ((b, t, g, p, e), (b, t, g, e)))
  values = jnp.asarray(rng.standard_normal((b, t, g, v)), jnp.float32)
  do = jnp.asarray(rng.standard_normal((b, t, g, p, v)), jnp.float32)
  scale = e**-0.5

  def run(kernel):
    op = AttentionOp('cpu', whole='cpu_kernel' if kernel else 'einsum')
    attend = lambda *x: op.causal(*x, scale)
    grads = jax.grad(lambda *x: jnp.sum(attend(*x) * do), argnums=(0, 1, 2))
    return jax.jit(attend)(q, k, values), jax.jit(grads)(q, k, values)

  (o_kernel, g_kernel), (o_einsum, g_einsum) = run(True), run(False)
  np.testing.assert_allclose(o_kernel, o_einsum, atol=1e-5, rtol=0)
  for got, want in zip(g_kernel, g_einsum, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=0)


def test_kernel_is_deterministic_and_leaves_other_rows_alone():
  """Twice the same bits; and a query row's output and gradients depend on keys up to its own
  position only (a later key's change moves nothing before it)."""
  _built()
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((2, 70, 2, 1, 16), (2, 70, 2, 16), (2, 70, 2, 16)))
  loss = lambda *x: jnp.sum(cpu_attention.causal_attention(*x, 0.25)[:, :50])
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  first, second = grad(q, k, v), grad(q, k, v)
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a, b)
  moved = grad(q, k.at[:, 50:].add(1.0), v.at[:, 50:].add(1.0))
  for a, b in zip(first, moved, strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(first[1][:, 50:], 0.0)


def _logits_and_grads(model):
  """A jitted (logits, gradients of a loss on them) of model, and its lowered text."""
  graphdef, params = nnx.split(model, nnx.Param)

  def run(params):
    logits = nnx.merge(graphdef, params)(TOKENS)
    return logits, jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(TOKENS) ** 2))(params)

  logits, grads = jax.jit(run)(params)
  return logits, jax.tree.leaves(grads), jax.jit(run).lower(params).as_text()


# GQA's code path stands for MHA and MQA (H and 1 groups), and mla for mla_q and mla_naive,
# which train exactly as it does; the others run with --long.
@pytest.mark.parametrize('name', variant_params(('mha', 'mqa', 'mla_q', 'mla_naive'),
                                                'flash_widths'))
def test_kernels_take_the_cpu_kernel_and_equal_einsum(name):
  """For every variant: attention_impl='kernels' on a CPU lowers to the kernel's call, and its
  logits and gradients are the einsum path's (float32, atol 1e-5; gradients 1e-5 of their
  largest)."""
  _built()
  einsum = tiny_model(seed=1, **VARIANTS[name])
  auto = with_config(einsum, attention_impl='kernels')
  assert (auto.op.whole, einsum.op.whole) == ('cpu_kernel', 'einsum')
  logits, grads, lowered = _logits_and_grads(auto)
  want_logits, want_grads, einsum_lowered = _logits_and_grads(einsum)
  assert 'mla_causal_attention' in lowered and 'mla_causal_attention' not in einsum_lowered
  np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
  for got, want in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-5 * float(jnp.max(jnp.abs(want))), rtol=0)


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
  """A compiler that fails raises, and leaves no library (whole or half-written) to load."""
  monkeypatch.setenv('CXX', '/bin/false')
  target = cpu_attention.library_path(str(tmp_path))
  with pytest.raises(subprocess.CalledProcessError):
    cpu_attention.build(target)
  assert list(pathlib.Path(tmp_path).iterdir()) == []


def test_without_a_kernel_the_model_takes_the_einsum_path(tmp_path, monkeypatch, caplog):
  """A compiler that fails: available() is False (no crash), the model is built on another
  kernel and says so once, when it is built. bfloat16 and a mesh of several devices, which the
  kernel does not take, resolve to another kernel even where it is built ('auto': einsum)."""
  _built()
  assert tiny_model(attention_impl='auto', dtype='bfloat16').op.whole == 'einsum'
  assert tiny_model(attention_impl='kernels', dtype='bfloat16').op.whole == 'xla'
  mesh = jax.sharding.AbstractMesh((2,), ('data',))
  assert attention_op.resolve(mla_jax.ModelConfig(attention_impl='auto'), mesh).whole == 'einsum'
  monkeypatch.setenv('CXX', '/bin/false')
  monkeypatch.setenv('MLA_JAX_KERNEL_CACHE', str(tmp_path))
  cpu_attention.available.cache_clear()
  try:
    model = tiny_model(seed=1, attention_impl='auto', **VARIANTS['gqa'])
    assert not cpu_attention.available() and model.op.whole == 'einsum'
    assert caplog.text.count('C++ CPU attention kernel is unavailable') == 1
    assert 'mla_causal_attention' not in _logits_and_grads(model)[2]
  finally:
    cpu_attention.available.cache_clear()  # the next caller builds or loads the real one
