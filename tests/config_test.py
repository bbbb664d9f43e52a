import dataclasses
import json

import pytest

from mla_jax import ConfigError, Llama3Scaling, ModelConfig

BAD = [
    (dict(attention='gqa', n_heads=8, n_kv_heads=3), 'not divisible by n_kv_heads'),
    (dict(attention='gqa'), 'needs n_kv_heads'),
    (dict(attention='mha', n_kv_heads=2), "needs n_kv_heads == n_heads"),
    (dict(attention='mqa', n_kv_heads=2), 'needs n_kv_heads == 1'),
    (dict(attention='mla'), 'needs kv_lora_rank > 0'),
    (dict(attention='mla', kv_lora_rank=32, qk_rope_head_dim=7), 'must be even'),
    (dict(head_dim=15), 'must be even'),
    (dict(attention='bogus'), "attention='bogus' is unknown"),
    (dict(rope_layout='spiral'), "rope_layout='spiral' is unknown"),
    (dict(mla_decode='fast', attention='mla', kv_lora_rank=8), "mla_decode='fast' is unknown"),
    (dict(dtype='float8'), "dtype='float8' is unknown"),
    (dict(d_model=-4), 'd_model=-4 must be >= 1'),
    (dict(n_layers=0), 'n_layers=0 must be >= 1'),
    (dict(kv_lora_rank=-1, attention='mla'), 'kv_lora_rank=-1 must be >= 0'),
    (dict(n_heads=2.5), 'n_heads=2.5 must be an integer'),
    (dict(d_model=100, n_heads=3), 'not divisible by n_heads'),
    (dict(kv_lora_rank=16), "kv_lora_rank applies only to attention='mla'"),
    (dict(qk_rope_head_dim=8), "qk_rope_head_dim applies only to attention='mla'"),
    (dict(norm_eps=float('nan')), 'norm_eps=nan must be a finite number'),
    (dict(rope_theta=float('inf')), 'rope_theta=inf must be a finite number'),
    (dict(tie_embeddings='no'), "tie_embeddings='no' must be true or false"),
    (dict(dtype=32), 'dtype=32 must be a string'),
    (dict(rope_scaling=dict(factor=float('nan'), original_max_position_embeddings=64)),
     'factor=nan must be a finite number'),
    (dict(norm_eps=0.0), 'norm_eps must be > 0'),
    (dict(rope_scaling=dict(factor=4.0)), 'original_max_position_embeddings'),
    (dict(rope_scaling=dict(factor=0.5, original_max_position_embeddings=64)), 'factor=0.5'),
    (dict(rope_scaling=dict(type='ntk', factor=2.0, original_max_position_embeddings=64)),
     "type='ntk' is not supported"),
    (dict(rope_scaling=dict(type='llama3', factor=8.0, original_max_position_embeddings=64,
                            low_freq_factor=4.0, high_freq_factor=1.0)), 'need 0 < low < high'),
    (dict(rope_scaling=dict(type='llama3', factor=8.0, original_max_position_embeddings=64,
                            beta_fast=32.0)), "allowed keys for 'llama3'"),
    (dict(rope_scaling=dict(type='llama3', factor=0.5, original_max_position_embeddings=64)),
     'factor=0.5 must be >= 1'),
    (dict(attention='mla', kv_lora_rank=32, qkv_bias=True),
     "qkv_bias applies only to attention='mha' / 'gqa' / 'mqa'"),
    (dict(qkv_bias=1), 'qkv_bias=1 must be true or false'),
]


@pytest.mark.parametrize('overrides,message', BAD)
def test_bad_config_names_the_problem(overrides, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
    ModelConfig(**overrides)


def test_defaults_are_derived():
  cfg = ModelConfig(d_model=256, n_heads=8, attention='mla', kv_lora_rank=128)
  assert (cfg.head_dim, cfg.n_kv_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
          cfg.v_head_dim, cfg.d_ff) == (32, 8, 32, 16, 32, 704)
  assert ModelConfig(attention='mqa').n_kv_heads == 1


def test_round_trip_through_dict_keeps_yarn():
  cfg = ModelConfig(attention='mla', kv_lora_rank=32, rope_scaling=dict(
      factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=0.707))
  again = ModelConfig.from_dict(cfg.to_dict())
  assert again == cfg and hash(again) == hash(cfg)
  assert dataclasses.asdict(again)['rope_scaling']['factor'] == 4.0


def test_round_trip_through_dict_keeps_llama3_rope_and_qkv_bias():
  cfg = ModelConfig(attention='gqa', n_kv_heads=2, qkv_bias=True, rope_scaling=dict(
      type='llama3', factor=8.0, original_max_position_embeddings=64, low_freq_factor=1.0,
      high_freq_factor=4.0))
  d = json.loads(json.dumps(cfg.to_dict()))  # as config.json stores it
  assert d['rope_scaling']['type'] == 'llama3' and d['qkv_bias'] is True
  again = ModelConfig.from_dict(d)
  assert again == cfg and isinstance(again.rope_scaling, Llama3Scaling)
  assert ModelConfig().qkv_bias is False  # every existing config keeps its numbers


def test_unknown_key_is_an_error():
  with pytest.raises(ConfigError, match=r"unknown model config keys \['n_head'\]"):
    ModelConfig.from_dict(dict(n_head=4))
