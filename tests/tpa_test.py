"""Tensor Product Attention (mla_jax/tpa.py) against the paper's equations written out in
numpy, rank by rank; its factor cache and factored decode; its config. The shared tests
(conftest's VARIANTS) also run it at its registry example."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, tiny_config, tiny_model
from flax import nnx

import mla_jax
from mla_jax import hf, rope, variants
from mla_jax.cache import measured_per_token
from mla_jax.model import param_shapes
from mla_jax.tpa import TPACache, TPAttention

B, T = 2, 7
RANKS = dict(tpa_k_rank=2, tpa_v_rank=3)  # R_K != R_V (as in the registry example): a
# swapped rank axis cannot pass


def _np_rope(x, positions, layout, theta=10000.0):
  """RoPE of x [b, t, ..., d] as complex rotations of its pairs: (2i, 2i+1) interleaved, or
  (i, i + d/2) half, by p theta^(-2i/d)."""
  d = x.shape[-1]
  angle = positions[..., None] * theta ** (-np.arange(0, d, 2) / d)  # [b, t, d/2]
  angle = angle.reshape(angle.shape[:2] + (1,) * (x.ndim - 3) + angle.shape[2:])
  re, im = (x[..., 0::2], x[..., 1::2]) if layout == 'interleaved' else np.split(x, 2, -1)
  z = (re + 1j * im) * np.exp(1j * angle)
  if layout == 'interleaved':
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)
  return np.concatenate([z.real, z.imag], axis=-1)


def _np(p):
  return np.asarray(p[...], np.float64)


def _np_tpa_layer(module, x, layout):
  """The layer as the paper writes it, float64: Q_t = 1/R_Q sum_r a^Q_r(x_t) (x) b^Q_r(x_t),
  a^Q_r(x_t) = W_aQ_r x_t in R^h, b^Q_r(x_t) = W_bQ_r x_t in R^d_h, and K, V alike (eq. 3.1),
  one outer product per rank; RoPE on the expanded queries and keys (eq. 3.4); per head
  softmax(Q K^T / sqrt(d_h)) V, causal (eq. 3.2); concatenated heads times W_O (eq. 3.3).
  KV-only (tpa_q_rank 0): Q_t = x_t W_Q."""
  b, t, _ = x.shape
  positions = np.broadcast_to(np.arange(t), (b, t))

  def factorised(wa, wb):
    a, bb, r = _np(wa), _np(wb), wa.shape[-1]
    out = np.zeros((b, t, a.shape[1], bb.shape[2]))
    for i in range(b):
      for s in range(t):
        for j in range(r):
          out[i, s] += np.outer(x[i, s] @ a[:, :, j], x[i, s] @ bb[:, j, :])
    return out / r

  q = (factorised(module.w_aq, module.w_bq) if module.cfg.tpa_q_rank
       else np.einsum('btd,dhk->bthk', x, _np(module.w_q)))
  k, v = factorised(module.w_ak, module.w_bk), factorised(module.w_av, module.w_bv)
  q, k = _np_rope(q, positions, layout), _np_rope(k, positions, layout)
  scores = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  o = np.einsum('bhts,bshk->bthk', p / p.sum(-1, keepdims=True), v)
  return np.einsum('bthk,hkd->btd', o, _np(module.w_o))


@pytest.mark.parametrize('q_rank, layout', [(2, 'interleaved'), (3, 'half'), (0, 'half')])
def test_layer_equals_the_papers_equations_rank_by_rank(q_rank, layout):
  """The module rotates the token factors b^Q, b^K and expands with one einsum; the reference
  rotates the expanded queries and keys: equal, so RoPE commutes with the heads' contraction
  (Theorem 3.1), and each 1/R is on its own tensor (R_Q, R_K, R_V all differ here)."""
  cfg = tiny_config(attention='tpa', tpa_q_rank=q_rank, rope_layout=layout, **RANKS)
  module = TPAttention(cfg, nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(0), (B, T, cfg.d_model))
  want = _np_tpa_layer(module, np.asarray(x, np.float64), layout)
  for positions in (None, jnp.broadcast_to(jnp.arange(T), (B, T))):  # causal kernel / masked
    np.testing.assert_allclose(module(x, positions)[0], want, atol=1e-5, rtol=1e-5)


def test_rope_on_the_token_factors_equals_rope_on_the_expanded_keys():
  cfg = tiny_config(attention='tpa', tpa_q_rank=2, **RANKS)
  module = TPAttention(cfg, nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(1), (B, T, cfg.d_model))
  positions = jnp.broadcast_to(jnp.arange(3, 3 + T), (B, T))  # not from 0
  _, (a_k, b_k, _, _) = module.factors(x, positions)
  _, (_, b_k_unrotated, _, _) = module.factors(x, jnp.zeros_like(positions))  # angle 0
  cos, sin = rope.rope_angles(positions, cfg.head_dim, cfg.rope_theta)
  keys = rope.apply_rope(jnp.einsum('bthj,btjk->bthk', a_k, b_k_unrotated), cos, sin,
                         cfg.rope_layout)
  np.testing.assert_allclose(jnp.einsum('bthj,btjk->bthk', a_k, b_k), keys, atol=1e-5)
  assert not np.allclose(b_k, b_k_unrotated, atol=1e-2)


@pytest.mark.parametrize('q_rank', [6, 0])
def test_factored_decode_equals_the_full_forward_at_every_position(q_rank):
  """Decode steps contract the cached factors; the full forward expands them into keys and
  values. The shared decode tests run the registry example, whose scores go through the
  query's factors (R_Q 2); here they go through the expanded query (R_Q 6, where that is
  cheaper, and KV-only). One prefill chunk of 3, then one token per step."""
  assert variants.tpa_factored_queries(tiny_config(**VARIANTS['tpa']))
  cfg = tiny_config(attention='tpa', tpa_q_rank=q_rank, **RANKS)
  assert not variants.tpa_factored_queries(cfg)
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(4))
  tokens = np.random.default_rng(q_rank).integers(0, 256, 12)
  full = np.asarray(model(tokens[None])[0])
  np.testing.assert_allclose(mla_jax.logits_through_cache(model, tokens, prefill_len=3), full,
                             atol=1e-5, rtol=1e-5)


def test_the_cache_holds_the_rotated_factors_and_measures_the_formula():
  """(R_K + R_V)(H + d_h) elements per token and layer: a^K, RoPE(b^K), a^V, b^V, as the
  projections give them at each position; nothing per head and token dimension."""
  cfg = tiny_config(attention='tpa', tpa_q_rank=2, **RANKS)
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  h, k = cfg.n_heads, cfg.head_dim
  caches = model.init_cache(B, 16)
  assert isinstance(caches[0], TPACache)
  assert [x.shape for x in jax.tree.leaves(caches[0])] == [(B, 16, h, 2), (B, 16, 2, k),
                                                           (B, 16, h, 3), (B, 16, 3, k)]
  elements, nbytes = measured_per_token(caches, B, 16)
  assert elements == mla_jax.cache_elements_per_token(cfg) == (2 + 3) * (4 + 16) * 2
  assert nbytes == 4 * elements
  # one layer's cache after writing T tokens at positions 5 .. 5 + T - 1
  attn = model.blocks[0].attn
  x = jax.random.normal(jax.random.key(2), (B, T, cfg.d_model))
  positions = jnp.broadcast_to(jnp.arange(5, 5 + T), (B, T))
  _, cache = attn(x, positions, attn.init_cache(B, 16, jnp.float32))
  _, want = attn.factors(x, positions)
  for got, factor in zip((cache.a_k, cache.b_k, cache.a_v, cache.b_v), want, strict=True):
    np.testing.assert_array_equal(got[:, 5:5 + T], factor)
    assert not np.any(got[:, :5]) and not np.any(got[:, 5 + T:])


def test_parameters_and_decode_flops_follow_the_papers_table_1():
  """Attention parameters per layer (Table 1): d (R_Q + R_K + R_V)(H + d_h) + d H d_h, and
  for KV-only d (R_K + R_V)(H + d_h) + 2 d H d_h; decode flops per cached token count the
  cheaper score contraction."""
  d, h, k = 64, 4, 16
  for q_rank, want in ((2, d * 7 * (h + k) + d * h * k), (0, d * 5 * (h + k) + 2 * d * h * k)):
    shapes = param_shapes(tiny_config(attention='tpa', tpa_q_rank=q_rank, **RANKS))
    attn = [v for p, v in shapes.items() if p[:3] == ('blocks', 0, 'attn')]
    assert sum(np.prod(s) for s in attn) == want
  flops = lambda q_rank: variants.get('tpa').decode_flops(
      tiny_config(attention='tpa', tpa_q_rank=q_rank, **RANKS), 1)
  value = h * 3 + 2 * h * 3 * k  # p a^V, then sum_s (p a^V) b^V
  assert flops(2) == 2 * 2 * 2 * (k + h) + 2 * h * 2 + value  # b^Q.b^K, a^Q, a^K
  assert flops(0) == flops(6) == 2 * h * 2 * k + 2 * h * 2 + value  # q.b^K, a^K


def test_config_refuses_fields_of_other_variants_and_tpa_fields_elsewhere():
  for other in ('mha', 'mqa', 'mla'):
    extra = dict(kv_lora_rank=32) if other == 'mla' else {}
    for name in variants.TPA_ONLY:
      with pytest.raises(mla_jax.ConfigError,
                         match=f"^{name} applies only to attention='tpa', not '{other}'"):
        tiny_config(attention=other, **extra, **{name: 2})
  with pytest.raises(mla_jax.ConfigError, match="tpa_q_rank applies only to attention='tpa'"):
    tiny_config(attention='gqa', n_kv_heads=2, tpa_q_rank=2)
  tpa = dict(attention='tpa', **RANKS)
  for field, value, message in (
      ('kv_lora_rank', 32, "kv_lora_rank applies only to attention='mla', not 'tpa'"),
      ('q_lora_rank', 8, "q_lora_rank applies only to attention='mla'"),
      ('rope_block', 8, "rope_block applies only to attention='mla'"),
      ('kv_norm', False, "kv_norm=False applies only to attention='mla'"),
      ('qkv_bias', True, "qkv_bias applies only to .* not 'tpa'"),
      ('n_kv_heads', 2, "attention='tpa' has one key and value per head"),
      ('tpa_k_rank', 0, "attention='tpa' needs tpa_k_rank >= 1 and tpa_v_rank >= 1, got 0"),
      ('tpa_v_rank', 0, 'got 2 and 0'),
      ('tpa_q_rank', -1, 'tpa_q_rank=-1 must be >= 0'),
      ('cache_dtype', 'int8', "attention='tpa' has no 8-bit cache")):
    with pytest.raises(mla_jax.ConfigError, match=message):
      tiny_config(**{**tpa, field: value})
  assert tiny_config(**tpa).n_kv_heads == 4 == tiny_config(**tpa, n_kv_heads=4).n_kv_heads


def test_export_to_hugging_face_is_refused_in_one_line(tmp_path):
  model = tiny_model(attention='tpa', **RANKS)
  with pytest.raises(hf.HFError, match=r"^attention='tpa' has no Hugging Face architecture: "
                     r'transformers has no model class for it[^\n]*$'):
    hf.save(model, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
