"""Attention variants against each other and against the equations written out in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, tiny_config, tiny_model
from flax import nnx

from mla_jax.attention import GQAttention, MLAttention
from mla_jax.layers import dense

B, T = 2, 10


def _x_and_positions(seed=0, d=64):
  x = jax.random.normal(jax.random.key(seed), (B, T, d))
  return x, jnp.broadcast_to(jnp.arange(T), (B, T))


def test_gqa_with_all_heads_is_exactly_mha():
  x, pos = _x_and_positions()
  mha = GQAttention(tiny_config(attention='mha'), nnx.Rngs(3))
  gqa = GQAttention(tiny_config(attention='gqa', n_kv_heads=4), nnx.Rngs(3))
  np.testing.assert_array_equal(mha(x, pos)[0], gqa(x, pos)[0])


def test_mqa_is_exactly_gqa_with_one_group():
  x, pos = _x_and_positions()
  mqa = GQAttention(tiny_config(attention='mqa'), nnx.Rngs(3))
  gqa = GQAttention(tiny_config(attention='gqa', n_kv_heads=1), nnx.Rngs(3))
  np.testing.assert_array_equal(mqa(x, pos)[0], gqa(x, pos)[0])


@pytest.mark.parametrize('groups', [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(groups):
  """Query head i reads KV head i // (H / G): MHA with each KV head copied H/G times."""
  x, pos = _x_and_positions(1)
  gqa = GQAttention(tiny_config(attention='gqa', n_kv_heads=groups), nnx.Rngs(5))
  mha = GQAttention(tiny_config(attention='mha'), nnx.Rngs(6))
  for name in ('w_q', 'w_o'):
    getattr(mha, name)[...] = getattr(gqa, name)[...]
  for name in ('w_k', 'w_v'):
    getattr(mha, name)[...] = jnp.repeat(getattr(gqa, name)[...], 4 // groups, axis=1)
  np.testing.assert_allclose(gqa(x, pos)[0], mha(x, pos)[0], atol=1e-6)
  assert not np.allclose(gqa(x, pos)[0], GQAttention(mha.cfg, nnx.Rngs(6))(x, pos)[0],
                         atol=1e-3)


def _np_rope_interleaved(x, positions, theta=10000.0):
  """RoPE as complex multiplication of adjacent pairs (x_2i + i x_2i+1) e^{i p theta_i}."""
  d = x.shape[-1]
  freqs = theta ** (-np.arange(0, d, 2) / d)
  rot = np.exp(1j * positions[..., None] * freqs)  # [b, t, d/2]
  z = x[..., 0::2] + 1j * x[..., 1::2]
  rot = rot.reshape(rot.shape[:2] + (1,) * (x.ndim - 3) + rot.shape[2:])
  z = z * rot
  return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def _np_rmsnorm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize('q_lora_rank', [0, 24])
def test_mla_matches_the_paper_equations(q_lora_rank):
  """DeepSeek-V2 eqs. 37-47 with the latent RMSNorms, in float64 numpy, head by head."""
  cfg = tiny_config(attention='mla', kv_lora_rank=32, q_lora_rank=q_lora_rank,
                    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
  mla = MLAttention(cfg, nnx.Rngs(7))
  x, pos = _x_and_positions(2)
  names = ('w_dq', 'w_uq') if q_lora_rank else ('w_q',)
  p = {name: np.asarray(getattr(mla, name)[...], np.float64)
       for name in (*names, 'w_dkv', 'w_uk', 'w_uv', 'w_o')}
  xs, positions = np.asarray(x, np.float64), np.asarray(pos)
  n, r, c, eps = 16, 8, 32, cfg.norm_eps
  if q_lora_rank:
    c_q = _np_rmsnorm(xs @ p['w_dq'], np.asarray(mla.q_norm.scale[...]), eps)
    q = np.einsum('btq,qhe->bthe', c_q, p['w_uq'])
  else:
    q = np.einsum('btd,dhe->bthe', xs, p['w_q'])
  q_nope, q_rope = q[..., :n], _np_rope_interleaved(q[..., n:], positions)
  kv = xs @ p['w_dkv']
  c_kv = _np_rmsnorm(kv[..., :c], np.asarray(mla.kv_norm.scale[...]), eps)
  k_rope = _np_rope_interleaved(kv[..., c:], positions)  # [b, s, r]: one key for all heads
  out = np.zeros((B, T, 64))
  for h in range(cfg.n_heads):
    k_nope = c_kv @ p['w_uk'][:, h]  # [b, s, n]
    v = c_kv @ p['w_uv'][:, h]
    score = (np.einsum('btn,bsn->bts', q_nope[:, :, h], k_nope)
             + np.einsum('btr,bsr->bts', q_rope[:, :, h], k_rope)) / np.sqrt(n + r)
    score = np.where(np.tril(np.ones((T, T), bool)), score, -np.inf)
    prob = np.exp(score - score.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    out += (prob @ v) @ p['w_o'][h]
  np.testing.assert_allclose(mla(x, pos)[0], out, atol=2e-5)


def _logits_from_embeddings(model, x_btd):
  """The model's forward pass with the token embeddings as the differentiable input, as a
  whole sequence (positions None)."""
  for block in model.blocks:
    x_btd, _ = block(x_btd, None)
  return model.logits(model.final_norm(x_btd))


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_causality_by_gradients(name):
  """On the training path (a whole sequence, causal_attention's query blocks); the masked path
  at explicit positions equals it (the test below)."""
  model = tiny_model(**VARIANTS[name])
  x = model.embed(jax.random.randint(jax.random.key(0), (1, T), 0, 256))
  for t in (0, 4, 5, T - 1):  # 4 and 5: the last of the first query block, the first of the next
    grad = jax.grad(lambda x, t=t: _logits_from_embeddings(model, x)[0, t].sum())(x)
    per_position = np.abs(np.asarray(grad[0])).sum(-1)
    assert np.all(per_position[t + 1:] == 0.0), (t, per_position)
    assert np.all(per_position[:t + 1] > 0.0), (t, per_position)


# GQA's code path covers MHA and MQA (H and 1 groups); mla_exact has no nope part (d_n = 0).
@pytest.mark.slow
@pytest.mark.parametrize('name', ['gqa', 'mla', 'mla_exact'])
def test_whole_sequence_attention_equals_attention_at_explicit_positions(name):
  """A whole sequence (positions None) runs causal_attention: queries in blocks, each reading
  the keys up to its end, in heads-first layout. Explicit positions run the masked reference
  (attention_weights): the same logits and gradients, with T even (two query blocks)."""
  model = tiny_model(seed=3, attention_impl='einsum', **VARIANTS[name])
  tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, 256)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  @jax.grad
  def grads(params, positions):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1], positions)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1).mean()

  np.testing.assert_allclose(model(tokens[:, :-1]), model(tokens[:, :-1], positions),
                             atol=1e-5, rtol=0)
  whole, positioned = grads(params, None), grads(params, positions)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(positioned), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(np.abs(b).max()), rtol=0)


# Each einsum that layers.dense replaced, as (einsum, n_in, dense's output -> the einsum's axes).
REPLACED = [('btd,df->btf', 1, None), ('btf,fd->btd', 1, None), ('btd,dhk->bthk', 1, None),
            ('bthk,hkd->btd', 2, None), ('btd,de->bte', 1, None), ('btq,qhe->bthe', 1, None),
            ('bsc,chv->bhsv', 1, (0, 2, 1, 3)), ('bsc,chv->bshv', 1, None),
            ('btd,dV->btV', 1, None)]


@pytest.mark.parametrize('spec,n_in,axes', REPLACED, ids=[r[0] for r in REPLACED])
def test_dense_is_the_einsum_it_replaced(spec, n_in, axes):
  """layers.dense, with the output transposed where its caller transposes it, gives the
  einsum's value and gradients to float32 rounding; the SwiGLU MLP's (the first two) bit for
  bit on a CPU, where the flattening is for XLA's dots."""
  sizes = dict(b=2, t=10, s=10, d=64, f=96, h=4, k=16, e=24, q=32, c=32, v=16, V=256)
  (x_axes, w_axes), out_axes = spec.split('->')[0].split(','), spec.split('->')[1]
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, [sizes[a] for a in x_axes])
  w = jax.random.normal(kw, [sizes[a] for a in w_axes])
  dy = jax.random.normal(kg, [sizes[a] for a in out_axes])
  ours = lambda x, w: dense(x, w, n_in) if axes is None else dense(x, w, n_in).transpose(axes)
  reference = lambda x, w: jnp.einsum(spec, x, w)
  value_and_grads = lambda f: jax.jit(lambda x, w: (f(x, w), *jax.grad(
      lambda x, w: jnp.sum(f(x, w) * dy), argnums=(0, 1))(x, w)))(x, w)
  for a, b in zip(value_and_grads(ours), value_and_grads(reference), strict=True):
    if spec in ('btd,df->btf', 'btf,fd->btd') and jax.default_backend() == 'cpu':
      np.testing.assert_array_equal(a, b)
    else:
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6 * float(jnp.max(jnp.abs(b))))
