"""docs/extending.md is true: its code, loaded as the module shared_kv_doc (conftest), adds a
working attention variant from outside the package in one spec, one module and one
registration. The shared tests run it as the VARIANTS case 'shared_kv'; these check what is
particular to a variant from outside: its name, its declarations, and the commands."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import DOC_VARIANT, tiny_config, variant_of
from flax import nnx

import mla_jax
from experiments.timing import decode_step_cost
from mla_jax import hf, variants
from mla_jax.cache import measured_per_token
from mla_jax.model import param_count

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_unknown_variant_is_a_config_error_naming_the_known_ones():
  with pytest.raises(mla_jax.ConfigError, match=r"attention='no_such' is unknown; use one of "
                     r"\('mha', 'gqa', 'mqa', 'mla'"):
    mla_jax.ModelConfig(attention='no_such')
  with pytest.raises(mla_jax.ConfigError, match=r"cannot import 'no_such_pkg\.mod'"):
    mla_jax.ModelConfig(attention='no_such_pkg.mod:no_such_variant')
  with pytest.raises(mla_jax.ConfigError, match='did not register it'):
    mla_jax.ModelConfig(attention='json:no_such_variant')  # importable, registers nothing


def test_the_doc_variant_is_named_by_its_module_and_declares_no_extras():
  variant = variant_of('shared_kv')
  assert DOC_VARIANT == 'shared_kv_doc:shared_kv' and variant.name == 'shared_kv'
  assert 'shared_kv' in variants.names()
  assert not variant.quantized_cache and variant.hf_architecture is None
  assert variant.flash_widths is None and variant.decode_widths is None
  model = mla_jax.Transformer(tiny_config(attention=DOC_VARIANT, attention_impl='kernels'),
                              rngs=nnx.Rngs(0))
  assert model.op.whole == model.op.prefill == model.op.decode == 'einsum'


def test_the_doc_variant_cache_is_measured_and_half_of_mqa():
  cfg = tiny_config(attention=DOC_VARIANT)
  assert cfg.n_kv_heads == 1
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  elements, _ = measured_per_token(model.init_cache(2, 16), batch=2, max_len=16)
  assert elements == mla_jax.cache_elements_per_token(cfg) == cfg.head_dim * cfg.n_layers
  assert 2 * elements == mla_jax.cache_elements_per_token(tiny_config(attention='mqa'))


def test_the_doc_variant_reaches_the_benchmark_and_the_export(tmp_path):
  cfg = tiny_config(attention=DOC_VARIANT)
  n_params = param_count(cfg)
  read, flops = decode_step_cost(cfg, n_params, batch=1, context=100,
                                 cache_bytes_per_token=4 * cfg.head_dim * cfg.n_layers)
  weights = n_params - 256 * 64  # the untied embedding table is gathered, not multiplied
  assert read == 4 * weights + 100 * 4 * 16 * 2
  assert flops == 2 * weights + cfg.n_layers * (2 * 4 * 100 * 2 * 16 + 3 * 100 * 16)
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  with pytest.raises(hf.HFError, match='has no Hugging Face'):
    hf.save(model, tmp_path / 'out')
  assert not (tmp_path / 'out').exists()


def _command(module, *args):
  """A command in a new process, which knows the variant only by the name in its flags or in
  the workdir's config.json (conftest put shared_kv_doc on PYTHONPATH)."""
  return subprocess.run([sys.executable, '-m', f'mla_jax.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_commands_train_evaluate_and_generate_the_doc_variant(corpus, tmp_path):
  workdir = tmp_path / 'run'
  trained = _command('train', '--config=configs/mha.py:tiny', f'--workdir={workdir}',
                     f'--config.data.files={corpus}', f'--config.model.attention={DOC_VARIANT}',
                     '--config.model.n_kv_heads=1', '--config.train.steps=4',
                     '--config.train.eval_every=4', '--config.train.checkpoint_every=4')
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert json.loads((workdir / 'config.json').read_text())['model']['attention'] == DOC_VARIANT
  evaluated = _command('evaluate', f'--workdir={workdir}')
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  assert np.isfinite(json.loads((workdir / 'eval.json').read_text())['perplexity'])
  generated = _command('generate', f'--workdir={workdir}', '--prompt=thou art',
                       '--max_new_tokens=8')
  assert generated.returncode == 0, generated.stderr[-2000:]
