import pytest
from conftest import tiny_model

import mla_jax
from mla_jax.cache import measured_per_token

H, DH, L = 4, 16, 2


@pytest.mark.parametrize('overrides,formula', [
    (dict(attention='mha'), 2 * H * DH * L),
    (dict(attention='gqa', n_kv_heads=2), 2 * 2 * DH * L),
    (dict(attention='mqa'), 2 * DH * L),
    (dict(attention='mla', kv_lora_rank=64, qk_rope_head_dim=8), (64 + 8) * L),
    (dict(attention='mla', kv_lora_rank=32, q_lora_rank=24), (32 + DH // 2) * L),
])
def test_cache_elements_per_token_formula_and_allocation(overrides, formula):
  model = tiny_model(**overrides)
  assert mla_jax.cache_elements_per_token(model.cfg) == formula
  caches = model.init_cache(batch_size=3, max_len=40)
  elements, nbytes = measured_per_token(caches, batch=3, max_len=40)
  assert elements == formula
  assert nbytes == 4 * formula  # float32 compute dtype


def test_bfloat16_cache_halves_the_bytes():
  model = tiny_model(attention='mla', kv_lora_rank=32, dtype='bfloat16')
  elements, nbytes = measured_per_token(model.init_cache(2, 16), batch=2, max_len=16)
  assert nbytes == 2 * elements == 2 * mla_jax.cache_elements_per_token(model.cfg)


def test_paper_ratio_mla_vs_mha():
  """d_model 1024, 16 heads of 64, d_c = 4 d_h, d_r = d_h / 2: 2048 / 288 per layer."""
  mha = mla_jax.ModelConfig(d_model=1024, n_heads=16, n_layers=4)
  mla = mla_jax.ModelConfig(d_model=1024, n_heads=16, n_layers=4, attention='mla',
                            kv_lora_rank=256, qk_rope_head_dim=32)
  assert mla_jax.cache_elements_per_token(mha) == 2048 * 4
  assert mla_jax.cache_elements_per_token(mla) == 288 * 4
