"""mla_jax.attention_op: the kernels resolved for each platform and setting, recorded, and
every kernel computing the same model as the einsum reference for every variant that declares
it: logits, gradients, cached decoding and greedy generation. On a CPU the kernels run as
they do there (XLA's flash attention, the Pallas decode kernels interpreted); each is chosen
explicitly with an AttentionOp, so a kernel that silently fell back would fail the checks on
the op and the lowered program."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import VARIANTS, kernels_op, tiny_model, variant_params
from flax import nnx

import mla_jax
from mla_jax import attention_op, flash, kernels, platform
from mla_jax.attention_op import AttentionOp
from mla_jax.model import with_config

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 20))
FLASH = AttentionOp('cpu', whole='xla', prefill='xla', decode='triton', interpret=True)


def _declared(name, op=FLASH):
  """op, less the kernels the variant does not declare (those calls stay einsum)."""
  declared = kernels_op(name)
  return AttentionOp(op.platform, **{k: getattr(op, k) if getattr(declared, k) != 'einsum'
                                     else 'einsum' for k in ('whole', 'prefill', 'decode')},
                     interpret=op.interpret and declared.decode != 'einsum')


def _pair(name, op=FLASH):
  einsum = tiny_model(seed=1, **VARIANTS[name])
  assert einsum.op == AttentionOp('cpu')
  return einsum, with_config(einsum, op=_declared(name, op))


def _grads(model):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits = nnx.merge(graphdef, params)(TOKENS[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

  return jax.tree.leaves(jax.grad(loss)(params))


# MHA and MQA run GQA's code path with H and 1 groups, so GQA stands for them in the default
# run. Query compression (mla_q) changes no attention code, and mla_naive trains exactly as mla
# (mla_decode only picks the cached path), so mla stands for them in training. GLA's whole
# sequence is MLA's flash call on its own per-head keys, which the cached test below runs
# through flash prefill (and tests/gta_gla_test.py against its equations): --long only.
@pytest.mark.parametrize('name', variant_params(('mha', 'mqa', 'mla_q', 'mla_naive', 'gla'),
                                                'flash_widths'))
def test_flash_equals_einsum_logits_and_gradients(name):
  einsum, fused = _pair(name)
  assert fused.op.whole == 'xla'
  lowered = lambda model: jax.jit(model).lower(TOKENS).as_text(debug_info=True)
  assert 'flash_attention' in lowered(fused) and 'flash_attention' not in lowered(einsum)
  np.testing.assert_allclose(fused(TOKENS), einsum(TOKENS), atol=1e-5, rtol=0)
  for g_fused, g_einsum in zip(_grads(fused), _grads(einsum), strict=True):
    scale = float(jnp.max(jnp.abs(g_einsum)))
    np.testing.assert_allclose(g_fused, g_einsum, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize('name', variant_params(('mha', 'mqa', 'mla_q'), 'flash_widths'))
def test_kernels_equal_einsum_through_the_cache_and_in_generation(name):
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


SPLASH = AttentionOp('cpu', whole='splash', interpret=True)


@pytest.mark.parametrize('g, p, e, v, t', [
    (2, 2, 24, 16, 300),  # GQA groups, values narrower (MLA's), three blocks, 84 rows padded
    (1, 4, 16, 16, 20),  # MQA: splash's MQA form
])
def test_splash_equals_the_einsum_reference(g, p, e, v, t):
  """Splash attention, interpreted, against causal_attention: outputs and the gradients of
  queries, keys and values, float32. A wrong group mapping, scale, padding or slice moves them
  by O(1)."""
  rng = np.random.default_rng(0)
  q, k, vv = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
              ((2, t, g, p, e), (2, t, g, e), (2, t, g, v)))
  weights = jnp.asarray(rng.normal(size=(2, t, g, p, v)), jnp.float32)
  lowered = {op: jax.jit(jax.value_and_grad(
      lambda q, k, v, op=op: jnp.sum(op.causal(q, k, v, e**-0.5) * weights),
      argnums=(0, 1, 2))).lower(q, k, vv) for op in (SPLASH, AttentionOp('cpu'))}
  assert 'splash' in lowered[SPLASH].as_text(debug_info=True)
  splash, einsum = (x.compile()(q, k, vv) for x in lowered.values())
  for got, want in zip(jax.tree.leaves(splash), jax.tree.leaves(einsum), strict=True):
    np.testing.assert_allclose(got, want, atol=2e-6 * float(jnp.max(jnp.abs(want))), rtol=0)


# Interpreted splash compiles slowly on a CPU (~20 s a model here): the kernel's arithmetic is
# checked above, its wiring into every variant by tests/lowering_test.py in the default run.
@pytest.mark.long
@pytest.mark.parametrize('name', variant_params(declares='flash_widths'))
def test_splash_equals_einsum_logits_and_gradients(name):
  einsum, fused = _pair(name, SPLASH)
  assert fused.op.whole == 'splash' and str(fused.op).startswith(
      'attention on cpu: whole sequences splash (interpreted)')

  def logits_and_grads(model):  # under one jit: interpreted kernels run slowly op by op
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
      logits = nnx.merge(graphdef, params)(TOKENS[:, :-1])
      nll = optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()
      return nll, logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, jax.tree.leaves(grads)

  (logits, grads), (want_logits, want_grads) = map(logits_and_grads, (fused, einsum))
  np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=0)
  for g_fused, g_einsum in zip(grads, want_grads, strict=True):
    scale = float(jnp.max(jnp.abs(g_einsum)))
    np.testing.assert_allclose(g_fused, g_einsum, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize('name', ['gqa', 'mla_exact'])
def test_flash_prefill_reads_a_cache_narrower_than_the_compute_dtype(name):
  """cache_dtype='bfloat16' under float32 compute: fused prefill reads the cache in the compute
  dtype (flash attention wants one dtype for q, k and v). The einsum path instead rounds the
  probabilities to the cache's dtype for the value product, so the two differ by bfloat16
  rounding: fused must be no further than the einsum path from the float32-cache logits."""
  einsum = tiny_model(seed=1, **VARIANTS[name])
  through = lambda model, op=None, **fields: mla_jax.logits_through_cache(
      with_config(model, op, **fields), TOKENS[0], prefill_len=7)
  want = through(einsum)
  errors = {impl: np.abs(through(einsum, op, cache_dtype='bfloat16') - want).max()
            for impl, op in (('einsum', None), ('fused', FLASH))}
  assert errors['einsum'] > 1e-4 and errors['fused'] <= errors['einsum'], errors


@pytest.mark.parametrize('name', ['gqa', 'mla', pytest.param('mla_exact', marks=pytest.mark.long)])
def test_a_decode_step_without_a_decode_kernel_runs_the_einsum_path(name, monkeypatch):
  """Flash prefill with einsum decode steps (what resolve gives where the Pallas kernel does
  not take the head widths): the steps read the cache in the layout flash attention chose."""
  def refuse(*args, **kwargs):
    raise AssertionError('a decode kernel was called')

  monkeypatch.setattr(kernels, 'gqa_decode', refuse)
  monkeypatch.setattr(kernels, 'mla_decode', refuse)
  einsum, fused = _pair(name, AttentionOp('cpu', whole='xla', prefill='xla'))
  np.testing.assert_allclose(mla_jax.logits_through_cache(fused, TOKENS[0], prefill_len=7),
                             mla_jax.logits_through_cache(einsum, TOKENS[0], prefill_len=7),
                             atol=1e-5, rtol=0)


@pytest.mark.parametrize('flags, on', [
    ('', False), ('--xla_gpu_deterministic_ops=true', True), ('--xla_gpu_deterministic_ops', True),
    ('--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false', False),
    ('--a=1 --xla_gpu_deterministic_ops=1', True), ('--xla_gpu_deterministic_ops_x=true', False)])
def test_deterministic_ops_are_read_as_xla_reads_its_flags(flags, on, monkeypatch):
  """Under XLA's deterministic GPU ops attention avoids cuDNN (mla_jax/flash.py): the
  flag's last setting counts, bare or with a value."""
  monkeypatch.setenv('XLA_FLAGS', flags)
  assert flash.deterministic_gpu_ops() == on
  assert flash.cudnn_takes('gpu', jnp.dtype(jnp.bfloat16), (64, 64)) == (not on)


# --- the choice -------------------------------------------------------------------------------
def _resolved(plat, monkeypatch, **fields):
  monkeypatch.setattr(platform, 'current', lambda mesh=None: plat)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  return attention_op.resolve(mla_jax.ModelConfig(**fields))


MLA = dict(attention='mla', kv_lora_rank=64, qk_rope_head_dim=16, d_model=128, n_heads=4)


@pytest.mark.parametrize('plat, fields, want', [
    ('cpu', dict(dtype='bfloat16'), AttentionOp('cpu')),  # 'auto' on a CPU, not float32
    ('cpu', dict(attention_impl='einsum', dtype='bfloat16'), AttentionOp('cpu')),
    ('cpu', dict(attention_impl='kernels', dtype='bfloat16'),  # the C++ kernel is float32 only
     AttentionOp('cpu', 'xla', 'xla', 'triton', interpret=True)),
    ('cpu', dict(MLA, attention_impl='kernels', dtype='bfloat16', mla_decode='naive'),
     AttentionOp('cpu', 'xla', 'xla')),  # naive decode steps are prefill-kind calls
    ('gpu', dict(dtype='auto'), AttentionOp('gpu', 'cudnn', 'cudnn', 'triton')),
    ('gpu', dict(dtype='float32'), AttentionOp('gpu', 'xla', 'xla', 'triton')),
    ('gpu', dict(dtype='auto', attention_impl='einsum'), AttentionOp('gpu')),
    ('gpu', dict(MLA, dtype='auto'), AttentionOp('gpu', 'cudnn', 'cudnn', 'triton')),
    # Triton takes powers of two >= 16: a rope width of 8 leaves MLA's decode steps on einsum
    ('gpu', dict(MLA, dtype='auto', qk_rope_head_dim=8), AttentionOp('gpu', 'cudnn', 'cudnn')),
    # splash for whole sequences in any dtype and at any widths (MLA's unequal ones too)
    ('tpu', dict(dtype='auto'), AttentionOp('tpu', 'splash', 'xla', 'mosaic')),
    ('tpu', dict(dtype='float32'), AttentionOp('tpu', 'splash', 'xla', 'mosaic')),
    ('tpu', dict(MLA, dtype='auto', qk_rope_head_dim=8), AttentionOp('tpu', 'splash', 'xla',
                                                                     'mosaic')),
    ('tpu', dict(dtype='auto', attention_impl='einsum'), AttentionOp('tpu')),
])
def test_the_kernels_are_resolved_from_platform_dtype_and_widths(plat, fields, want,
                                                                  monkeypatch):
  assert _resolved(plat, monkeypatch, **fields) == want


def test_the_cpu_kernel_is_taken_where_it_builds_and_one_device_runs(monkeypatch):
  monkeypatch.setattr(attention_op.cpu_attention, 'available', lambda: True)
  assert _resolved('cpu', monkeypatch) == AttentionOp('cpu', whole='cpu_kernel')  # 'auto'
  assert _resolved('cpu', monkeypatch, attention_impl='kernels') == AttentionOp(
      'cpu', 'cpu_kernel', 'xla', 'triton', interpret=True)
  monkeypatch.setattr(platform, 'devices', lambda mesh=None: 2)
  assert _resolved('cpu', monkeypatch, attention_impl='kernels').whole == 'xla'
  assert _resolved('cpu', monkeypatch).whole == 'einsum'
  monkeypatch.setattr(attention_op.cpu_attention, 'available', lambda: False)
  monkeypatch.setattr(platform, 'devices', lambda mesh=None: 1)
  assert _resolved('cpu', monkeypatch) == AttentionOp('cpu')


def test_the_choice_is_recorded_and_printed():
  model = tiny_model(attention_impl='einsum')
  assert model.op.to_dict() == dict(platform='cpu', whole='einsum', prefill='einsum',
                                    decode='einsum', interpret=False)
  assert str(model.op) == ('attention on cpu: whole sequences einsum, prefill einsum, decode '
                           'steps einsum')
  with pytest.raises(ValueError, match=r"AttentionOp\.whole='flash'"):
    AttentionOp('tpu', whole='flash')
  for impossible in (dict(platform='gpu', whole='cpu_kernel'), dict(prefill='cudnn'),
                     dict(decode='triton'), dict(platform='gpu', decode='triton',
                                                 interpret=True),
                     dict(platform='gpu', whole='splash'), dict(whole='splash'),
                     dict(platform='tpu', whole='splash', interpret=True)):
    with pytest.raises(ValueError, match='only'):
      AttentionOp(**impossible)


def test_the_cpu_kernel_refuses_a_trace_under_several_devices():
  """A model resolved for one device but traced under a mesh of several would run the kernel
  whole on every device: one clear error instead."""
  op = AttentionOp('cpu', whole='cpu_kernel')
  x = jnp.zeros((1, 4, 1, 1, 8), jnp.float32)
  with (jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ('data',))),
        pytest.raises(ValueError, match='build the model with the mesh it runs under')):
    jax.eval_shape(lambda x: op.causal(x, x[:, :, :, 0], x[:, :, :, 0], 1.0), x)


def test_the_old_name_of_kernels_still_loads():
  assert mla_jax.ModelConfig(attention_impl='fused').attention_impl == 'kernels'
