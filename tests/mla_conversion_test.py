"""MHA / GQA / MQA -> MLA (mla_jax.mla_conversion): the exact embedding reproduces the
source's logits and cache size; the compression is exact wherever the source loses nothing,
has the cache its formula says, and refuses what the source cannot give; converted runs
evaluate, generate, export and fine-tune (--init_from) like any run."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

import mla_jax
from configs import finetune, gqa
from mla_jax import data, hf, mla_conversion, perplexity, rope, training
from mla_jax import workdir as wd
from mla_jax.cache import measured_per_token
from mla_jax.errors import Error
from mla_jax.mla_conversion import ConversionError, _pair_dims, _rope_split, _select, to_mla
from mla_jax.model import Transformer, with_config, with_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOKENS = np.random.default_rng(0).integers(0, 256, 40)
SOURCES = {'mha': dict(attention='mha'), 'gqa2': dict(attention='gqa', n_kv_heads=2),
           'mqa': dict(attention='mqa')}
YARN = dict(factor=4.0, original_max_position_embeddings=16, mscale=0.9, mscale_all_dim=0.7)
# head_dim 16: pair 0 keeps its frequency (wavelength 2 pi < 16 / 2), pairs 1 and 2 (20, 63)
# are blended, pairs 3.. (199 and longer, past 16 / 0.25 = 64) turn 4 times slower
LLAMA3 = dict(type='llama3', factor=4.0, original_max_position_embeddings=16, low_freq_factor=0.25,
              high_freq_factor=2.0)
ROPES = {'plain': None, 'yarn': YARN, 'llama3': LLAMA3}


def source(name, seed=0, **overrides):
  return Transformer(tiny_config(**SOURCES[name], **overrides), rngs=nnx.Rngs(seed))


def logits(model, tokens=TOKENS):
  return np.asarray(model(jnp.asarray(tokens)[None]))[0]


def cache_per_token(model):
  return measured_per_token(model.init_cache(2, 16), 2, 16)[0]


# --- the exact embedding ---------------------------------------------------------------------
CASES = [pytest.param(name, layout, scaling, id=f'{name}-{layout}-{scaling}')
         for name in SOURCES for layout in ('interleaved', 'half') for scaling in ROPES]


@pytest.mark.parametrize('name,layout,scaling', CASES)
def test_exact_embedding_has_the_sources_logits_and_cache_size(name, layout, scaling):
  src = source(name, rope_layout=layout, rope_scaling=ROPES[scaling])
  mla = to_mla(src)
  g, k = src.cfg.n_kv_heads, src.cfg.head_dim
  assert (mla.cfg.attention, mla.cfg.kv_lora_rank, mla.cfg.qk_rope_head_dim, mla.cfg.rope_block,
          mla.cfg.qk_nope_head_dim, mla.cfg.kv_norm) == ('mla', g * k, g * k, k, 0, False)
  expected = logits(src)
  assert np.abs(expected).std() > 0.1  # not a degenerate model
  np.testing.assert_allclose(logits(mla), expected, atol=1e-5, rtol=0)
  assert mla_jax.cache_elements_per_token(mla.cfg) == mla_jax.cache_elements_per_token(src.cfg)
  assert cache_per_token(mla) == cache_per_token(src) == 2 * g * k * src.cfg.n_layers


def test_a_moe_source_keeps_its_experts_and_router_bias():
  """The feed-forward layers pass through untouched, the V3 router bias (a variable that is
  not a parameter) included: the exact embedding keeps the logits."""
  v3 = dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2,
            norm_topk_prob=True, routed_scaling_factor=2.5, moe_intermediate_size=32,
            first_k_dense_replace=1, n_layers=3)
  src = source('gqa2', **v3)
  for block in src.blocks[1:]:  # a bias that changes choices (zero would test nothing)
    block.mlp.e_score_correction_bias[...] = 0.1 * jax.random.normal(jax.random.key(9), (8,))
  for mla in (to_mla(src), to_mla(src, kv_lora_rank=32)):
    for a, b in zip(src.blocks, mla.blocks, strict=True):
      assert jax.tree.all(jax.tree.map(np.array_equal, nnx.state(a.mlp), nnx.state(b.mlp)))
  np.testing.assert_allclose(logits(to_mla(src)), logits(src), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize('name,layout,scaling', CASES)
def test_exact_embedding_decodes_the_sources_logits_through_the_cache(name, layout, scaling):
  """Both mla_decode paths, one prefill chunk then one token per step (past YaRN's and Llama
  3's original window)."""
  src = source(name, rope_layout=layout, rope_scaling=ROPES[scaling])
  mla = to_mla(src)
  for path in ('absorbed', 'naive'):
    through_cache = mla_jax.logits_through_cache(with_config(mla, mla_decode=path), TOKENS)
    np.testing.assert_allclose(through_cache, logits(src), atol=1e-5, rtol=0, err_msg=path)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['gqa2', 'mqa'])
def test_exact_embedding_through_fused_attention_and_the_decode_kernel(name):
  """attention_impl='fused': flash attention for the forward and prefill, the Pallas kernel
  (interpreted on CPU) for absorbed decode steps."""
  src = source(name, rope_layout='half', rope_scaling=YARN)
  mla = with_config(to_mla(src), attention_impl='fused')
  expected = logits(src)
  np.testing.assert_allclose(logits(mla), expected, atol=1e-5, rtol=0)
  for path in ('absorbed', 'naive'):
    through_cache = mla_jax.logits_through_cache(with_config(mla, mla_decode=path), TOKENS[:16])
    np.testing.assert_allclose(through_cache, expected[:16], atol=1e-5, rtol=0, err_msg=path)


def test_exact_embedding_is_not_exported_to_hugging_face(tmp_path):
  mla = to_mla(source('gqa2'))
  with pytest.raises(hf.HFError) as e:
    hf.save(mla, tmp_path / 'hf')
  assert 'no Hugging Face equivalent' in str(e.value) and '\n' not in str(e.value)
  assert not (tmp_path / 'hf').exists()


def test_rope_block_rotates_each_block_with_the_narrow_frequencies():
  """With rope_block, block b of the rope key turns like a rope_block-wide key; without it
  the d_r-wide ladder would give different scores."""
  cfg = tiny_config(attention='mla', kv_lora_rank=32, qk_nope_head_dim=0, qk_rope_head_dim=32,
                    rope_block=16, kv_norm=False)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  wide = with_params(dataclasses.replace(cfg, rope_block=None),
                     nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert np.abs(logits(model) - logits(wide)).max() > 1e-3
  bad = dict(attention='mla', kv_lora_rank=32, qk_rope_head_dim=32)
  for overrides, message in ((dict(bad, rope_block=12), 'rope_block=12 must be even and divide'),
                             (dict(bad, rope_block=7), 'rope_block=7 must be even'),
                             (dict(rope_block=16), "rope_block applies only to attention='mla'"),
                             (dict(kv_norm=False), "kv_norm=False applies only to")):
    with pytest.raises(mla_jax.ConfigError, match=message):
      tiny_config(**overrides)


# --- the compression -------------------------------------------------------------------------
def lossless_source(name, layout, **overrides):
  """A source the compression at full rank with d_r = d_h / 2 loses nothing of: the odd RoPE
  pairs of q and k are zero (so removing their rotation changes nothing), and every group's
  key pair is a complex multiple of group 0's (so one shared key carries them all)."""
  src = source(name, rope_layout=layout, seed=3, **overrides)
  k = src.cfg.head_dim
  re, im = _pair_dims(k, layout)
  odd = np.arange(1, k // 2, 2)
  rng = np.random.default_rng(0)
  for block in src.blocks:
    w_k, w_q = np.array(block.attn.w_k[...]), np.array(block.attn.w_q[...])
    z0 = w_k[:, 0, re] + 1j * w_k[:, 0, im]
    for j in range(w_k.shape[1]):
      z = z0 * (rng.normal(size=k // 2) + 1j * rng.normal(size=k // 2))
      w_k[:, j, re], w_k[:, j, im] = z.real, z.imag
    for w in (w_k, w_q):
      w[..., re[odd]], w[..., im[odd]] = 0.0, 0.0
    block.attn.w_k[...], block.attn.w_q[...] = jnp.asarray(w_k), jnp.asarray(w_q)
  return src


def without_latent_norm(model):
  """The same model with its (unit-scale) latent RMSNorm removed."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for block in params['blocks'].values():
    np.testing.assert_array_equal(block['attn'].pop('kv_norm')['scale'], 1.0)
  return with_params(dataclasses.replace(model.cfg, kv_norm=False), params)


@pytest.mark.parametrize('selection', ['2norm', 'uniform'])
@pytest.mark.parametrize('layout', ['interleaved', 'half'])
@pytest.mark.parametrize('name', sorted(SOURCES))
def test_compression_is_exact_where_the_source_loses_nothing(name, layout, selection):
  """Steps b-f and h of the module docstring, checked together: with the latent RMSNorm
  aside (latent_norm='unit', then removed), the standard-architecture model equals the source.
  Both selections keep the even pairs, whose frequencies are the d_r-wide ladder's."""
  src = lossless_source(name, layout)
  g, k = src.cfg.n_kv_heads, src.cfg.head_dim
  rank = min(2 * g * k, src.cfg.d_model)
  mla = to_mla(src, rank, k // 2, rope_selection=selection, latent_norm='unit',
               calibration=[TOKENS[None]])
  assert mla.cfg.rope_theta == src.cfg.rope_theta and mla.cfg.rope_block is None
  assert mla.cfg.kv_norm and mla.cfg.qk_nope_head_dim == k
  np.testing.assert_allclose(logits(without_latent_norm(mla)), logits(src), atol=1e-5, rtol=0)
  assert np.abs(logits(mla) - logits(src)).max() > 1e-3  # the norm is what is lost


def test_compression_keeps_llama3_rope_exactly_on_the_ladder():
  """Llama 3 maps each frequency by its wavelength alone, so the kept even pairs, recomputed
  on the d_r-wide ladder, turn exactly as the source's do: the compression stays exact."""
  src = lossless_source('gqa2', 'half', rope_scaling=LLAMA3)
  k = src.cfg.head_dim
  src_freq = rope.inv_frequencies(k, src.cfg.rope_theta, src.cfg.rope_scaling)
  plain = rope.inv_frequencies(k, src.cfg.rope_theta)
  assert (src_freq == plain).any() and (src_freq < plain).all(where=np.arange(k // 2) > 0)
  mla = to_mla(src, 2 * 2 * k, k // 2, rope_selection='uniform', latent_norm='unit',
               calibration=[TOKENS[None]])
  assert mla.cfg.rope_scaling == src.cfg.rope_scaling
  np.testing.assert_array_equal(
      rope.inv_frequencies(k // 2, mla.cfg.rope_theta, mla.cfg.rope_scaling),
      src_freq[::2])
  np.testing.assert_allclose(logits(without_latent_norm(mla)), logits(src), atol=1e-5, rtol=0)


def test_compression_loses_what_the_shared_key_cannot_carry():
  """The same, but group 1's keys are no longer a multiple of group 0's: one shared rope key
  cannot hold both, and the logits differ."""
  src = lossless_source('gqa2', 'interleaved')
  block = src.blocks[0].attn
  block.w_k[..., 1, :] = block.w_k[..., 1, :] + 0.5 * jnp.asarray(
      np.random.default_rng(1).normal(size=block.w_k[..., 1, :].shape), jnp.float32)
  mla = to_mla(src, 64, 8, rope_selection='uniform', latent_norm='unit')
  assert np.abs(logits(without_latent_norm(mla)) - logits(src)).max() > 1e-3


def emphasise(src, pairs, layers=None, factor=10.0):
  """Multiplies the RoPE pairs `pairs` of q and k by factor in the given layers (default all)."""
  re, im = _pair_dims(src.cfg.head_dim, src.cfg.rope_layout)
  for i in range(src.cfg.n_layers) if layers is None else layers:
    attn = src.blocks[i].attn
    for w in (attn.w_q, attn.w_k):
      value = np.array(w[...])
      value[..., re[pairs]] *= factor
      value[..., im[pairs]] *= factor
      w[...] = jnp.asarray(value)
  return src


def test_2norm_keeps_the_pairs_that_carry_the_scores():
  strong = np.array([1, 4, 6])
  src = emphasise(source('gqa2', seed=4), strong, layers=[0])
  attn = src.blocks[0].attn
  split = _rope_split(np.asarray(attn.w_q[...], np.float64),
                      np.asarray(attn.w_k[...], np.float64), np.eye(64), 'interleaved')
  np.testing.assert_array_equal(_select(split, 3, '2norm'), strong)
  np.testing.assert_array_equal(_select(split, 4, 'uniform'), [0, 2, 4, 6])
  mla = to_mla(src, 32, 6)
  assert mla.cfg.rope_theta != src.cfg.rope_theta  # layer 0 keeps pairs off the plain ladder


def test_calibrated_latent_norm_scale_is_the_latents_rms():
  src = source('mha', seed=5)
  batches = [np.random.default_rng(i).integers(0, 256, (2, 24)) for i in range(2)]
  mla = to_mla(src, 24, 8, calibration=batches)
  x = src.embed(jnp.asarray(np.concatenate(batches)))
  x = src.blocks[0].attn_norm(x)
  latent = np.asarray(x @ mla.blocks[0].attn.w_dkv[...][:, :24], np.float64)
  scale = np.asarray(mla.blocks[0].attn.kv_norm.scale[...])
  np.testing.assert_allclose(scale, np.sqrt(np.mean(latent**2) + src.cfg.norm_eps), rtol=1e-4)
  unit = to_mla(src, 24, 8, calibration=batches, latent_norm='unit')
  np.testing.assert_array_equal(unit.blocks[0].attn.kv_norm.scale[...], 1.0)


@pytest.mark.parametrize('rank,rope', [(8, 2), (24, 8), (56, 16), (64, 4)])
def test_compressed_cache_equals_the_formula(rank, rope):
  src = source('mha')
  mla = to_mla(src, rank, rope)
  assert (mla.cfg.kv_lora_rank, mla.cfg.qk_rope_head_dim) == (rank, rope)
  assert mla_jax.cache_elements_per_token(mla.cfg) == (rank + rope) * src.cfg.n_layers
  assert cache_per_token(mla) == (rank + rope) * src.cfg.n_layers


BAD = [  # (source, kwargs, message)
    ('gqa2', dict(kv_lora_rank=65, qk_rope_head_dim=8), 'kv_lora_rank=65 is not in [1, 64]'),
    ('mqa', dict(kv_lora_rank=33, qk_rope_head_dim=8), 'kv_lora_rank=33 is not in [1, 32]'),
    ('mha', dict(kv_lora_rank=65, qk_rope_head_dim=8), 'd_model = 64'),
    ('mha', dict(kv_lora_rank=0, qk_rope_head_dim=8), 'kv_lora_rank=0 is not in'),
    ('mha', dict(kv_lora_rank=32, qk_rope_head_dim=7), 'qk_rope_head_dim=7 must be even'),
    ('mha', dict(kv_lora_rank=32, qk_rope_head_dim=18), 'in [2, head_dim=16]'),
    ('mha', dict(qk_rope_head_dim=8), 'qk_rope_head_dim=8 needs kv_lora_rank'),
    ('mha', dict(kv_lora_rank=32, rope_selection='low'), "rope_selection='low'"),
]


@pytest.mark.parametrize('name,kwargs,message', BAD)
def test_what_the_source_cannot_give_is_one_clear_line(name, kwargs, message):
  with pytest.raises(ConversionError) as e:
    to_mla(source(name), **kwargs)
  assert message in str(e.value) and '\n' not in str(e.value)
  assert isinstance(e.value, Error)


def test_a_biased_source_is_refused():
  with pytest.raises(ConversionError) as e:
    to_mla(source('gqa2', qkv_bias=True))
  assert 'qkv_bias=True (Qwen2) is not converted' in str(e.value) and '\n' not in str(e.value)


def test_an_mla_source_is_refused():
  mla = Transformer(tiny_config(attention='mla', kv_lora_rank=32), rngs=nnx.Rngs(0))
  with pytest.raises(ConversionError, match="this one is attention='mla'"):
    to_mla(mla)


# --- round trip through transformers --------------------------------------------------------
@pytest.mark.parametrize('layout', ['interleaved', 'half'])
def test_compressed_model_loads_in_transformers_with_the_same_logits(layout, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  src = source('gqa2', rope_layout=layout)
  mla = to_mla(src, 40, 8, rope_selection='uniform', calibration=[TOKENS[None]])
  # 2norm keeps pairs 2 and 3 (off the plain ladder): a fitted rope_theta
  other = to_mla(emphasise(src, [2, 3], factor=3.0), 24, 4)
  assert mla.cfg.rope_theta == src.cfg.rope_theta != other.cfg.rope_theta
  for model, folder in ((mla, tmp_path / 'a'), (other, tmp_path / 'b')):
    hf_json = hf.save(model, folder)
    assert hf_json['architectures'] == ['DeepseekV3ForCausalLM']
    hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation='eager')
    with torch.no_grad():
      theirs = hf_model(torch.tensor(TOKENS)[None]).logits[0].numpy()
    assert np.abs(logits(model) - theirs).max() <= 1e-4


@pytest.mark.parametrize('layout', ['interleaved', 'half'])
def test_a_compressed_llama3_model_exports_with_its_rope(layout, tmp_path):
  """Llama 3 RoPE survives compression on the ladder, and DeepseekV3 rescales its d_r-wide
  rope key as we do: scored at 40 positions, past original_max_position_embeddings=16, with
  the kept pairs in all three of Llama 3's bands (wavelengths 6.3, 63 and 628, 6283 against
  8 and 64)."""
  src = source('gqa2', rope_scaling=LLAMA3, rope_layout=layout)
  mla = to_mla(src, 40, 8, rope_selection='uniform', calibration=[TOKENS[None]])
  hf_json = hf.save(mla, tmp_path / 'out')
  assert hf_json['rope_parameters']['rope_type'] == 'llama3'
  back = hf.load(tmp_path / 'out')[0]
  assert back.cfg.rope_scaling == mla.cfg.rope_scaling
  np.testing.assert_allclose(logits(back), logits(mla), atol=1e-5, rtol=0)
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  hf_model = transformers.DeepseekV3ForCausalLM.from_pretrained(
      tmp_path / 'out', dtype=torch.float32, attn_implementation='eager')
  with torch.no_grad():
    theirs = hf_model(torch.tensor(TOKENS)[None]).logits[0].numpy()
  assert np.abs(logits(mla) - theirs).max() <= 1e-4


# --- workdirs: convert, evaluate, generate, export, fine-tune ---------------------------------
@pytest.fixture(scope='module')
def trained(corpus, tmp_path_factory):
  """A tiny GQA run (10 steps) and its compression (2 calibration batches)."""
  root = tmp_path_factory.mktemp('to_mla')
  config = gqa.get_config('tiny')
  config.data.files = corpus
  training.train_and_evaluate(config, str(root / 'gqa'), final_eval=False)
  mla_conversion.to_mla_workdir(root / 'gqa', root / 'mla', kv_lora_rank=12, qk_rope_head_dim=4,
                           calibration=2)
  return root


def cli(module, *args):
  return subprocess.run([sys.executable, '-m', f'mla_jax.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.long
def test_cli_convert_then_evaluate_generate_export(trained, tmp_path):
  """The commands on a converted run; the exact conversion scores what the source scores."""
  run = cli('convert', f'--workdir={trained / "gqa"}', f'--to_mla={tmp_path / "exact"}')
  assert run.returncode == 0, run.stderr
  assert 'cache 64 -> 64 elements per token' in run.stdout
  scores = {}
  for name, folder in (('source', trained / 'gqa'), ('exact', tmp_path / 'exact'),
                       ('compressed', trained / 'mla')):
    run = cli('evaluate', f'--workdir={folder}')
    assert run.returncode == 0, run.stderr
    scores[name] = json.loads((folder / 'eval.json').read_text())['loss']
  assert abs(scores['exact'] - scores['source']) < 1e-5
  assert scores['compressed'] != scores['source']
  config = wd.read_config(trained / 'mla')
  assert config.conversion.kv_lora_rank == 12 and config.data.files  # the source's corpus
  run = cli('generate', f'--workdir={trained / "mla"}', '--prompt=the king',
            '--max_new_tokens=8')
  assert run.returncode == 0 and run.stdout.startswith('the king'), run.stderr
  run = cli('convert', f'--workdir={trained / "mla"}', f'--to_hf={tmp_path / "hf"}')
  assert run.returncode == 0 and 'DeepseekV3ForCausalLM' in run.stdout, run.stderr
  run = cli('convert', f'--workdir={tmp_path / "exact"}', f'--to_hf={tmp_path / "hf2"}')
  assert run.returncode == 1 and run.stderr.strip().count('\n') == 0
  assert 'no Hugging Face equivalent' in run.stderr and not (tmp_path / 'hf2').exists()


@pytest.mark.parametrize('args,message', [
    (['--kv_lora_rank=200'], 'kv_lora_rank=200 is not in [1, 32]'),
    (['--calibration_batches=2'], 'give --kv_lora_rank too'),
    (['--kv_lora_rank=8', '--qk_rope_head_dim=3'], 'qk_rope_head_dim=3 must be even'),
])
def test_cli_refuses_bad_conversions_without_writing(trained, tmp_path, args, message):
  run = cli('convert', f'--workdir={trained / "gqa"}', f'--to_mla={tmp_path / "out"}', *args)
  assert run.returncode == 1 and run.stderr.strip().count('\n') == 0, run.stderr
  assert message in run.stderr and not (tmp_path / 'out').exists()


def finetune_config(source: pathlib.Path, **train):
  config = finetune.get_config(str(source))
  config.train.update(steps=4, checkpoint_every=2, eval_every=100, **train)
  return config


def val_losses(workdir):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]
  return [r for r in rows if 'val_loss' in r], [r['loss'] for r in rows if 'loss' in r]


@pytest.mark.slow
@pytest.mark.long
def test_finetuning_starts_from_the_converted_parameters_and_resumes(trained, tmp_path):
  converted, _ = wd.load_workdir(trained / 'mla')
  config = wd.read_config(trained / 'mla')
  val = data.load_splits(config.data)['val']
  e = config.eval
  expected = perplexity.perplexity(converted, val, e.seq_len, e.stride, e.batch_size)
  whole = tmp_path / 'whole'
  training.train_and_evaluate(finetune_config(trained / 'mla'), str(whole),
                             init_from=str(trained / 'mla'))
  evals, whole_losses = val_losses(whole)
  assert evals[0]['step'] == 0 and evals[0]['val_loss'] == expected['loss']
  assert json.loads((whole / 'config.json').read_text())['init_from'] == str(trained / 'mla')
  split = tmp_path / 'split'
  training.train_and_evaluate(finetune_config(trained / 'mla', stop_after_steps=2), str(split),
                             init_from=str(trained / 'mla'))
  training.train_and_evaluate(finetune_config(trained / 'mla'), str(split))  # resumes
  _, split_losses = val_losses(split)
  assert split_losses == whole_losses and len(whole_losses) == 4
  assert json.loads((split / 'config.json').read_text())['init_from'] == str(trained / 'mla')


def test_init_from_refuses_another_model_without_writing(trained, tmp_path):
  config = finetune_config(trained / 'mla')
  config.model.kv_lora_rank = 16
  config.model.qk_rope_head_dim = 8
  with pytest.raises(mla_jax.ConfigError) as e:
    training.train_and_evaluate(config, str(tmp_path / 'ft'), init_from=str(trained / 'mla'))
  message = str(e.value)
  assert 'kv_lora_rank (12 there, 16 here)' in message
  assert 'qk_rope_head_dim (4 there, 8 here)' in message
  assert '\n' not in message and not (tmp_path / 'ft').exists()
  run = subprocess.run([sys.executable, '-m', 'mla_jax.train', '--config=configs/gqa.py:tiny',
                        f'--workdir={tmp_path / "ft2"}', f'--init_from={trained / "mla"}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert run.returncode == 1 and "attention ('mla' there, 'gqa' here)" in run.stderr
  assert not (tmp_path / 'ft2').exists()


# --- the experiment --------------------------------------------------------------------------
def experiment(workdir, *args):
  return subprocess.run([sys.executable, '-m', 'experiments.to_mla', f'--workdir={workdir}',
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=3000)


@pytest.mark.slow
@pytest.mark.long
def test_quick_experiment_end_to_end_and_resumed(corpus, tmp_path):
  """One source and one cache size: every task's cache is its formula, the exact embedding
  scores the source's perplexity, the report lands in the workdir (never in the committed
  results), and a task removed is redone alone, to the same numbers."""
  committed = ROOT / 'experiments' / 'results' / 'to_mla' / 'to_mla.json'
  before = committed.stat().st_mtime_ns if committed.exists() else None
  args = ('--quick', '--sources=gqa', '--fractions=4', f'--data_files={corpus}')
  run = experiment(tmp_path, *args)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads((tmp_path / 'to_mla.json').read_text())
  assert (tmp_path / 'to_mla.png').stat().st_size > 10_000 and (tmp_path / 'to_mla.md').exists()
  assert (committed.stat().st_mtime_ns if committed.exists() else None) == before
  results = {r['kind']: r for r in report['results']}
  assert set(results) == {'source', 'exact', 'scratch', '2norm', 'uniform', 'weights', 'unit'}
  for kind, r in results.items():
    assert r['cache_elements_measured'] == r['cache_elements_formula'], kind
  assert results['2norm']['cache_elements_measured'] == 64 // 4  # 2 groups of 8, 2 layers
  assert abs(results['exact']['before']['loss'] - results['source']['after']['loss']) < 1e-5
  assert results['scratch']['train_tokens'] == 42 * 8 * 32  # the source's 40 steps + 2
  for kind in ('2norm', 'uniform'):
    assert results[kind]['finetune_tokens'] == 2 * 8 * 32 and 'after' in results[kind]
  redo = tmp_path / 'gqa-c4-uniform' / 'result.json'
  old = json.loads(redo.read_text())
  redo.unlink()
  run = experiment(tmp_path, *args)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '6 of 7 tasks already finished' in run.stdout
  new = json.loads(redo.read_text())
  assert new['before'] == old['before'] and new['after']['loss'] == old['after']['loss']


def test_fractions_apply_to_every_source_or_to_one():
  code = ("from absl import flags; from experiments import to_mla; "
          "flags.FLAGS(['x', '--workdir=w', '--fractions=2,gqa:8,mha:2']); print(to_mla.grid())")
  run = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert run.stdout.strip() == "[('mha', 2), ('gqa', 2), ('gqa', 8)]"


@pytest.mark.parametrize('args', [['--fractions=1'], ['--fractions=gqa:x'],
                                  ['--sources=mha', '--fractions=gqa:2']])
def test_bad_fractions_are_one_line_and_write_nothing(args, tmp_path):
  run = experiment(tmp_path, *args)
  assert run.returncode != 0
  assert run.stderr.strip().splitlines()[-1].startswith('error: --fractions='), run.stderr
  assert not any(tmp_path.iterdir())


def test_report_only_reports_what_has_finished_and_trains_nothing(tmp_path):
  run = experiment(tmp_path, '--quick', '--sources=gqa', '--fractions=4', '--report_only')
  assert run.returncode == 0, run.stderr[-3000:]
  assert '0 of 7 tasks already finished' in run.stdout
  report = json.loads((tmp_path / 'to_mla.json').read_text())
  assert report['results'] == [] and report['setup']['tasks_total'] == 7
  assert '**Partial report**: 0 of 7 tasks' in (tmp_path / 'to_mla.md').read_text()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['to_mla.json', 'to_mla.md', 'to_mla.png']
