"""GTA and GLA (Zadouri, Strauss & Dao 2025): each against its equations written out here,
GLA with one latent head against MLA, the absorbed decode against the naive forward, the
caches against their formulas, the decode kernels against the einsum path (interpreted), and
their configs' and exports' refusals. The shared tests (conftest.VARIANTS) run both variants
through decoding, generation, causality, flash attention and the kernels too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config, tiny_model
from flax import nnx

import mla_jax
from mla_jax import hf, rope, sharding
from mla_jax.attention import MLAttention
from mla_jax.attention_op import AttentionOp, attention_weights
from mla_jax.cache import measured_per_token
from mla_jax.gla import GLAttention
from mla_jax.gta import GTAttention
from mla_jax.kernels import gla_decode, gqa_decode, mla_decode

B, T = 2, 9
GTA = dict(attention='gta', n_kv_heads=2, qk_rope_head_dim=8)
GLA = dict(attention='gla', kv_lora_rank=32, qk_rope_head_dim=8, latent_heads=2)


def _x(seed=0, b=B, t=T, d=64):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, t, d)), jnp.float32)


def _p(module, name):
  return getattr(module, name)[...]


def _softmax_attend(q_bthe, k_bshe, v_bshv, scale):
  """Causal softmax(q k^T scale) v over one sequence's own keys: [b, t, h, v]."""
  scores = jnp.einsum('bthe,bshe->bhts', q_bthe, k_bshe) * scale
  t = q_bthe.shape[1]
  scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
  return jnp.einsum('bhts,bshv->bthv', jax.nn.softmax(scores, axis=-1), v_bshv)


def _rope(cfg, x, t):
  cos, sin = rope.rope_angles(jnp.arange(t)[None], x.shape[-1], cfg.rope_theta)
  return rope.apply_rope(x, cos, sin, cfg.rope_layout)


@nnx.jit
def _call(attn, x, positions=None, cache=None):
  return attn(x, positions, cache)


def _through_cache(attn, x, prefill: int):
  """The layer's outputs at every position, computed as decoding does: a prefill chunk, then
  one token per step against the cache."""
  cache, out = attn.init_cache(x.shape[0], x.shape[1], jnp.float32), []
  for lo, hi in zip([0, *range(prefill, x.shape[1])], range(prefill, x.shape[1] + 1),
                    strict=True):
    positions = jnp.broadcast_to(jnp.arange(lo, hi), (x.shape[0], hi - lo))
    y, cache = _call(attn, x[:, lo:hi], positions, cache)
    out.append(y)
  return jnp.concatenate(out, axis=1)


# --- the equations ---------------------------------------------------------------------------
def test_gta_is_its_equations_with_the_key_nope_part_read_from_the_tied_state():
  """Keys [kv[:d_h - d_R], RoPE(x W_KR)] and values kv, built explicitly per query head and run
  through plain causal attention, give the module's output (whole sequence, and every position
  through the cache); scoring the state's LAST d_h - d_R dims instead would not."""
  cfg = tiny_config(**GTA)
  attn = GTAttention(cfg, nnx.Rngs(0), AttentionOp())
  x, (h, g, k, r) = _x(), (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.qk_rope_head_dim)
  n = k - r

  @jax.jit
  def reference(nope_dims):
    nope = lambda kv: kv[..., nope_dims]
    q = jnp.einsum('btd,dhk->bthk', x, _p(attn, 'w_q'))
    q = jnp.concatenate([q[..., :n], _rope(cfg, q[..., n:], T)], axis=-1)
    kv = jnp.einsum('btd,dgk->btgk', x, _p(attn, 'w_kv'))
    k_rope = _rope(cfg, jnp.einsum('btd,dr->btr', x, _p(attn, 'w_kr')), T)
    keys = jnp.concatenate([nope(kv), jnp.broadcast_to(k_rope[:, :, None], (B, T, g, r))], -1)
    per_head = lambda y: jnp.repeat(y, h // g, axis=2)  # head i reads group i // (h / g)
    o = _softmax_attend(q, per_head(keys), per_head(kv), k**-0.5)
    return jnp.einsum('bthk,hkd->btd', o, _p(attn, 'w_o'))

  want = reference(np.arange(n))
  y, _ = _call(attn, x)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(_through_cache(attn, x, prefill=3), want, atol=1e-5, rtol=0)
  assert np.max(np.abs(reference(np.arange(r, k)) - want)) > 1e-2


@nnx.jit
def _gla_reference(attn, x):
  """GLA-g from its equations: latent head j = RMSNorm_j(x W_DKV^j); head i of group j reads
  k_i = [latent_j W_UK^i, RoPE(x W_KR)], v_i = latent_j W_UV^i."""
  cfg = attn.cfg
  h, g, c = cfg.n_heads, cfg.latent_heads, cfg.kv_lora_rank // cfg.latent_heads
  n, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  q = jnp.einsum('btd,dhe->bthe', x, _p(attn, 'w_q'))
  q = jnp.concatenate([q[..., :n], _rope(cfg, q[..., n:], T)], axis=-1)
  k_rope = _rope(cfg, jnp.einsum('btd,dr->btr', x, _p(attn, 'w_kr')), T)
  keys, values = [], []
  for i in range(h):
    j, member = divmod(i, h // g)
    z = jnp.einsum('btd,dc->btc', x, _p(attn, 'w_dkv')[:, j])
    latent = z / jnp.sqrt(jnp.mean(z * z, -1, keepdims=True) + cfg.norm_eps)
    latent = latent * _p(attn.kv_norm, 'scale')[j][None, None]
    keys.append(jnp.concatenate([latent @ _p(attn, 'w_uk')[j, :, member], k_rope], -1))
    values.append(latent @ _p(attn, 'w_uv')[j, :, member])
  assert c == _p(attn, 'w_dkv').shape[2]
  o = _softmax_attend(q, jnp.stack(keys, 2), jnp.stack(values, 2), (n + r)**-0.5)
  return jnp.einsum('bthv,hvd->btd', o, _p(attn, 'w_o'))


@pytest.mark.parametrize('latent_heads', [2, 4])
def test_gla_is_its_equations_and_absorbed_decode_is_the_naive_forward(latent_heads):
  """The naive whole-sequence forward equals the equations; the absorbed decode (every
  position a decode step against the cache) and the naive one equal it at every position."""
  cfg = tiny_config(**{**GLA, 'latent_heads': latent_heads})
  attn = GLAttention(cfg, nnx.Rngs(1), AttentionOp())
  x = _x(1)
  want = _gla_reference(attn, x)
  y, _ = _call(attn, x)
  np.testing.assert_allclose(y, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(_through_cache(attn, x, prefill=1), want, atol=1e-5, rtol=0)
  naive = GLAttention(tiny_config(**GLA, mla_decode='naive') if latent_heads == 2 else
                      tiny_config(**{**GLA, 'latent_heads': 4}, mla_decode='naive'),
                      nnx.Rngs(1), AttentionOp())
  np.testing.assert_allclose(_through_cache(naive, x, prefill=1), want, atol=1e-5, rtol=0)


def test_gla_with_one_latent_head_is_mla_given_the_same_weights():
  """MLA's weights laid out as GLA-1's (the latent's columns as one latent head, its rope
  columns as W_KR): MLA's outputs, whole and through the absorbed cache (MLA's own cached
  decode equals its whole forward in the shared decode tests)."""
  fields = dict(kv_lora_rank=32, qk_rope_head_dim=8, q_lora_rank=24)
  mla = MLAttention(tiny_config(attention='mla', **fields), nnx.Rngs(2), AttentionOp())
  gla = GLAttention(tiny_config(attention='gla', latent_heads=1, **fields), nnx.Rngs(3),
                    AttentionOp())
  c = 32
  for name in ('w_dq', 'w_uq', 'w_o'):
    getattr(gla, name)[...] = _p(mla, name)
  gla.q_norm.scale[...] = _p(mla.q_norm, 'scale')
  gla.w_dkv[...] = _p(mla, 'w_dkv')[:, None, :c]
  gla.w_kr[...] = _p(mla, 'w_dkv')[:, c:]
  gla.kv_norm.scale[...] = (1.0 + _p(mla.kv_norm, 'scale') * 0.5)[None]  # not all ones
  mla.kv_norm.scale[...] = gla.kv_norm.scale[0]
  gla.w_uk[...] = _p(mla, 'w_uk')[None]
  gla.w_uv[...] = _p(mla, 'w_uv')[None]
  x = _x(2)
  want, _ = _call(mla, x)
  np.testing.assert_allclose(_call(gla, x)[0], want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(_through_cache(gla, x, prefill=4), want, atol=1e-5, rtol=0)


# --- caches ----------------------------------------------------------------------------------
@pytest.mark.parametrize('overrides,per_layer,shapes', [
    (GTA, 2 * 16 + 8, [(3, 2, 40, 16), (3, 40, 8)]),  # n_g d_h + d_R: kv, k_rope
    (GLA, 32 + 8, [(3, 2, 40, 16), (3, 40, 8)]),  # d_c + d_R: 2 latent heads of 16, k_rope
    ({**GLA, 'kv_lora_rank': 64, 'latent_heads': 4}, 64 + 8, [(3, 4, 40, 16), (3, 40, 8)]),
])
def test_the_allocated_cache_is_the_formula(overrides, per_layer, shapes):
  model = tiny_model(**overrides)
  assert mla_jax.cache_elements_per_token(model.cfg) == per_layer * model.cfg.n_layers
  caches = model.init_cache(batch_size=3, max_len=40)
  assert [x.shape for x in jax.tree.leaves(caches[0])] == shapes
  assert measured_per_token(caches, batch=3, max_len=40) == (per_layer * 2, 4 * per_layer * 2)
  gqa = tiny_config(attention='gqa', n_kv_heads=2)
  if overrides is GTA:  # the tied state halves GQA's keys and values, plus one rope key
    assert mla_jax.cache_elements_per_token(gqa) == 2 * (per_layer - 8) * 2


# --- kernels, interpreted --------------------------------------------------------------------
S, LENGTHS = 37, np.array([37, 1, 16, 17])
KERNEL = dict(block_s=16, interpret=True, backend='triton')
# Mosaic (TPU, interpreted) with one block spanning the 37 slots, its last rows masked
MOSAIC = dict(interpret=True, backend='mosaic')


def _normal(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]


def _poison(x_bs, lengths):
  """NaN at every slot at or past a row's length (axis 1 or 2 is the sequence)."""
  axis = 2 if x_bs.ndim == 4 else 1
  keep = np.arange(x_bs.shape[axis])[None] < lengths[:, None]
  keep = keep.reshape(keep.shape[0], *([1] * (axis - 1)), keep.shape[1],
                      *([1] * (x_bs.ndim - axis - 1)))
  return jnp.where(keep, x_bs, jnp.nan)


def _mask(lengths, s):
  return (jnp.arange(s)[None] < jnp.asarray(lengths)[:, None])[:, None]  # [b, t = 1, s]


@pytest.mark.parametrize('options', [dict(KERNEL, num_splits=1), dict(KERNEL, num_splits=3),
                                     MOSAIC], ids=['triton', 'triton-3-splits', 'mosaic'])
def test_the_gta_kernel_reads_the_tied_state_for_keys_and_values(options):
  """gqa_decode with the value tied to the key array and a shared rope key equals the
  einsum path (nope scores on kv's first d_h - d_R dims, values all of kv) on a ragged
  batch whose slots past each length are NaN."""
  b, g, p, k, r = 4, 2, 2, 16, 8
  q, kv, q_rope, k_rope = _normal(4, (b, g, p, k - r), (b, g, S, k), (b, g, p, r), (b, S, r))
  probs = attention_weights((q[:, None], q_rope[:, None]),
                            (kv[..., :k - r], jnp.broadcast_to(k_rope[:, None], (b, g, S, r))),
                            _mask(LENGTHS, S), k**-0.5)
  want = jnp.einsum('bgsk,bgpts->bgpk', kv, probs)
  q_tied = jnp.concatenate([q, jnp.zeros_like(q_rope)], axis=-1)
  out = gqa_decode(q_tied, _poison(kv, LENGTHS), None, jnp.asarray(LENGTHS), k**-0.5,
                   q_rope_bgpr=q_rope, k_rope_bsr=_poison(k_rope, LENGTHS), **options)
  assert out.shape == (b, g, p, k)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)


def test_the_gla_kernel_is_the_mla_kernel_per_latent_head(options=KERNEL):
  """gla_decode over g latent heads equals mla_decode run on each latent head with its
  group's queries, and the einsum path. (Mosaic's shared rope key: the GTA kernel's test.)"""
  b, g, p, c, r = 4, 2, 2, 16, 8
  q_lat, q_rope, c_kv, k_rope = _normal(5, (b, g, p, c), (b, g, p, r), (b, g, S, c), (b, S, r))
  lengths, scale = jnp.asarray(LENGTHS), (16 + r)**-0.5
  out = gla_decode(q_lat, q_rope, _poison(c_kv, LENGTHS), _poison(k_rope, LENGTHS), lengths,
                   scale, **options)
  for j in range(g):
    np.testing.assert_allclose(
        out[:, j], mla_decode(q_lat[:, j], q_rope[:, j], c_kv[:, j], k_rope, lengths, scale,
                              **options), atol=1e-5, rtol=0)
  probs = attention_weights((q_lat[:, None], q_rope[:, None]),
                            (c_kv, jnp.broadcast_to(k_rope[:, None], (b, g, S, r))),
                            _mask(LENGTHS, S), scale)
  np.testing.assert_allclose(out, jnp.einsum('bgsc,bgpts->bgpc', c_kv, probs), atol=1e-5,
                             rtol=0)


# --- refusals and sharding -------------------------------------------------------------------
@pytest.mark.parametrize('overrides,message', [
    ({**GTA, 'qk_rope_head_dim': 6, 'head_dim': 6}, r'qk_rope_head_dim=6 \(GTA.s d_R\) must be '
     r'even and < head_dim=6'),
    ({**GTA, 'qk_rope_head_dim': 16}, 'must be even and < head_dim=16'),
    ({**GTA, 'n_kv_heads': 3}, 'needs n_kv_heads .* dividing n_heads=4, got 3'),
    ({**GTA, 'n_kv_heads': None}, 'needs n_kv_heads'),
    ({**GTA, 'kv_lora_rank': 32}, "kv_lora_rank does not apply to attention='gta'"),
    ({**GTA, 'cache_dtype': 'int8'}, "attention='gta' has no 8-bit cache"),
    ({**GLA, 'latent_heads': 3}, 'latent_heads=3 must divide n_heads=4 and kv_lora_rank=32'),
    ({**GLA, 'kv_lora_rank': 0}, "attention='gla' needs kv_lora_rank > 0"),
    ({**GLA, 'n_kv_heads': 4}, 'has latent_heads=2 KV groups: leave n_kv_heads unset'),
    ({**GLA, 'cache_dtype': 'int8'}, "attention='gla' has no 8-bit cache"),
    (dict(attention='mla', kv_lora_rank=32, latent_heads=2), "latent_heads applies only to "
     "attention='gla', not 'mla'"),
    (dict(attention='gqa', n_kv_heads=2, latent_heads=2), 'latent_heads applies only'),
])
def test_bad_configs_are_refused_in_one_line(overrides, message):
  with pytest.raises(mla_jax.ConfigError, match=message) as e:
    tiny_config(**overrides)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('overrides', [GTA, GLA], ids=['gta', 'gla'])
def test_export_is_refused_because_transformers_has_no_architecture(overrides, tmp_path):
  model = tiny_model(**overrides)
  with pytest.raises(hf.HFError, match='transformers has no model class for it') as e:
    hf.save(model, tmp_path / 'out')
  assert '\n' not in str(e.value) and not (tmp_path / 'out').exists()


def test_gla_latent_heads_split_over_the_tensor_axis():
  """Each latent head's down-projection, norm and up-projections go to one tensor shard (the
  rope key's W_KR is replicated), so a device computes and caches d_c / g + d_R a token."""
  attn = GLAttention(tiny_config(**GLA), nnx.Rngs(0), AttentionOp())
  spec = lambda p: sharding.logical_to_spec(p.get_metadata()['axes'], p[...].shape,
                                            {'tensor': 2})
  assert spec(attn.w_dkv) == jax.sharding.PartitionSpec(None, 'tensor', None)
  assert spec(attn.kv_norm.scale) == jax.sharding.PartitionSpec('tensor', None)
  assert spec(attn.w_uk) == spec(attn.w_uv) == jax.sharding.PartitionSpec('tensor', None, None,
                                                                          None)
  assert spec(attn.w_kr) == jax.sharding.PartitionSpec(None, None)
