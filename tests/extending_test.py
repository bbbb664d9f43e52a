"""docs/extending.md is true: its code, run as written, adds a working attention variant that
the whole package picks up through the registry."""

import pathlib
import re

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

import mla_jax
from experiments.timing import decode_step_cost
from mla_jax import hf, variants
from mla_jax.cache import measured_per_token
from mla_jax.model import param_count

DOC = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'extending.md'


@pytest.fixture(scope='module')
def shared_kv():
  """The doc's python blocks, executed in order; the variant is unregistered afterwards."""
  namespace = {}
  for block in re.findall(r'```python\n(.*?)```', DOC.read_text(), flags=re.S):
    exec(compile(block, str(DOC), 'exec'), namespace)
  yield namespace
  variants.unregister('shared_kv')


def test_unknown_variant_is_a_config_error_naming_the_known_ones():
  with pytest.raises(mla_jax.ConfigError, match=r"attention='tpa' is unknown; use one of "
                     r"\('mha', 'gqa', 'mqa', 'mla'"):
    mla_jax.ModelConfig(attention='tpa')


def test_the_doc_variant_builds_and_decodes_like_its_full_forward(shared_kv):
  cfg = tiny_config(attention='shared_kv')
  assert cfg.n_kv_heads == 1
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  assert isinstance(model.blocks[0].attn, shared_kv['SharedKVAttention'])
  tokens = np.random.default_rng(0).integers(0, 256, 24)
  full = np.asarray(model(tokens[None])[0])
  np.testing.assert_allclose(mla_jax.logits_through_cache(model, tokens), full, atol=1e-5)
  out = mla_jax.generate(model, tokens[None, :5], max_new_tokens=6)
  assert out.shape == (1, 6)


def test_the_doc_variant_cache_is_measured_and_half_of_mqa(shared_kv):
  cfg = tiny_config(attention='shared_kv')
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  elements, _ = measured_per_token(model.init_cache(2, 16), batch=2, max_len=16)
  assert elements == mla_jax.cache_elements_per_token(cfg) == cfg.head_dim * cfg.n_layers
  assert 2 * elements == mla_jax.cache_elements_per_token(tiny_config(attention='mqa'))


@pytest.mark.long
def test_the_doc_variant_is_causal(shared_kv):
  model = mla_jax.Transformer(tiny_config(attention='shared_kv'), rngs=nnx.Rngs(1))
  x = model.embed(jax.random.randint(jax.random.key(0), (1, 8), 0, 256))
  positions = np.arange(8)[None]

  def logits_at(x, t):
    for block in model.blocks:
      x, _ = block(x, positions)
    return model.logits(model.final_norm(x))[0, t].sum()

  per_position = np.abs(np.asarray(jax.grad(logits_at)(x, 3)[0])).sum(-1)
  assert np.all(per_position[4:] == 0) and np.all(per_position[:4] > 0)


def test_the_doc_variant_reaches_the_benchmark_and_the_export(shared_kv, tmp_path):
  cfg = tiny_config(attention='shared_kv')
  n_params = param_count(cfg)
  read, flops = decode_step_cost(cfg, n_params, batch=1, context=100,
                                 cache_bytes_per_token=4 * cfg.head_dim * cfg.n_layers)
  weights = n_params - 256 * 64  # the untied embedding table is gathered, not multiplied
  assert read == 4 * weights + 100 * 4 * 16 * 2
  assert flops == 2 * weights + cfg.n_layers * (2 * 4 * 100 * 2 * 16 + 3 * 100 * 16)
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match="attention='shared_kv' has no Hugging Face"):
    hf.save(model, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()
