"""Hugging Face conversion against golden fixtures that transformers recorded
(tests/hf_fixtures/make_fixtures.py). Only the last test needs torch; it skips without it."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from experiments.hf_equality import reference_nll
from mla_jax import decode, hf, perplexity, rope, tokenizer
from mla_jax import workdir as wd
from mla_jax.errors import InputError
from mla_jax.model import Transformer, with_config, with_params

FIXTURES = pathlib.Path(__file__).parent / 'hf_fixtures'
# The fixtures recorded over bytes; llama_bpe (golden.json) carries its own tokenizer.
NAMES = sorted(d.name for d in FIXTURES.iterdir() if (d / 'golden.safetensors').is_file())
BPE = FIXTURES / 'llama_bpe'
MLA = [n for n in NAMES if n.startswith('deepseek')]
TOL = 1e-4  # max abs logit error against transformers (float32)


@functools.cache
def golden(name: str) -> dict[str, np.ndarray]:
  return hf.read_safetensors(FIXTURES / name / 'golden.safetensors')


@functools.cache
def imported(name: str) -> Transformer:
  return hf.load(FIXTURES / name)[0]


def logits_of(model: Transformer, tokens) -> np.ndarray:
  return np.asarray(model(jnp.asarray(tokens)[None]))[0]


# --- numerical equality with transformers ----------------------------------------------------
@pytest.mark.parametrize('name', NAMES)
def test_logits_equal_transformers(name):
  g = golden(name)
  err = np.abs(logits_of(imported(name), g['tokens']) - g['logits']).max()
  assert err <= TOL, f'{name}: max |logit error| {err:.2e}'


# MLA fixtures run both decode paths; for the others mla_decode is unused.
PATHS = [pytest.param(n, 'absorbed', id=n if n not in MLA else f'{n}-absorbed') for n in NAMES] + [
    pytest.param(n, 'naive', id=f'{n}-naive') for n in MLA]


@pytest.mark.parametrize('name,path', PATHS)
def test_cached_logits_equal_transformers(name, path):
  g = golden(name)
  model = with_config(imported(name), mla_decode=path)
  err = np.abs(decode.logits_through_cache(model, g['tokens']) - g['logits']).max(axis=-1)
  assert err.shape == (len(g['tokens']),)
  assert err.max() <= TOL, f'{name} ({path}): worst position {err.argmax()}, {err.max():.2e}'


@pytest.mark.parametrize('name,path', PATHS)
def test_greedy_generation_equals_transformers(name, path):
  g = golden(name)
  assert g['margin'] > 10 * TOL  # the recorded choices are not near-ties
  model = with_config(imported(name), mla_decode=path)
  out = decode.generate(model, g['prompt'][None], max_new_tokens=len(g['continuation']))
  np.testing.assert_array_equal(np.asarray(out[0]), g['continuation'])


@pytest.mark.parametrize('name', NAMES)
def test_perplexity_equals_transformers(name):
  """mla_jax.evaluate's perplexity on the fixture text = the NLL of transformers' logits."""
  g = golden(name)
  tokens = g['tokens']
  ours = perplexity.perplexity(imported(name), tokens, seq_len=len(tokens), stride=len(tokens),
                             batch_size=1)
  assert ours['tokens'] == len(tokens) - 1
  assert abs(ours['loss'] - reference_nll(g['logits'], tokens)) <= TOL


# --- the tests would catch a wrong rope layout or YaRN scale ---------------------------------
YARN = ['deepseek_v3_yarn', 'deepseek_v2_yarn']
WINDOW = 16  # their original_max_position_embeddings


def test_yarn_fixtures_run_past_the_original_window():
  for name in YARN:
    cfg = imported(name).cfg
    assert cfg.rope_scaling.original_max_position_embeddings == WINDOW
    assert len(golden(name)['tokens']) >= 2 * WINDOW
    # V3's fixture sets both mscales (both factors differ from 1), V2's leaves transformers'
    # cos/sin rule to differ from DeepSeek's, which the import records explicitly.
    assert rope.cos_sin_mscale(cfg.rope_scaling) != 1 and (
        rope.softmax_mscale(cfg.rope_scaling) != 1 or cfg.rope_scaling.attention_factor)


def test_llama3_fixture_covers_every_band_past_the_original_window():
  """Its pairs keep, blend and divide their frequencies, and it is scored past its window."""
  cfg = imported('llama3_rope').cfg
  s = cfg.rope_scaling
  assert s.type == 'llama3' and s.original_max_position_embeddings == WINDOW
  assert len(golden('llama3_rope')['tokens']) >= 2 * WINDOW
  plain = rope.inv_frequencies(cfg.head_dim, cfg.rope_theta)
  ratio = rope.inv_frequencies(cfg.head_dim, cfg.rope_theta, s) / plain
  assert ratio[0] == 1 and 1 / s.factor < ratio[1] < 1
  np.testing.assert_allclose(ratio[2:], 1 / s.factor, rtol=1e-6)
  assert rope.cos_sin_mscale(s) == rope.softmax_mscale(s) == 1


def test_qwen2_biases_are_imported_and_matter():
  """q/k/v biases (o_proj has none) load into b_q, b_k, b_v; zeroing them moves the logits."""
  model, g = imported('qwen2'), golden('qwen2')
  assert model.cfg.qkv_bias and not model.cfg.tie_embeddings
  _, tensors = hf.read_folder(FIXTURES / 'qwen2')
  assert 'model.layers.0.self_attn.o_proj.bias' not in tensors
  params = _params(model)
  attn = params['blocks'][0]['attn']
  np.testing.assert_array_equal(attn['b_k'].reshape(-1),
                                tensors['model.layers.0.self_attn.k_proj.bias'])
  for block in params['blocks'].values():
    for name in ('b_q', 'b_k', 'b_v'):
      assert np.abs(block['attn'][name]).min() > 0, name
      block['attn'][name] = np.zeros_like(block['attn'][name])
  err = np.abs(logits_of(with_params(model.cfg, params), g['tokens']) - g['logits']).max()
  assert err > 100 * TOL, err


def _flip(layout):
  return 'half' if layout == 'interleaved' else 'interleaved'


def _scaled(name, **changes):
  return dataclasses.replace(imported(name).cfg.rope_scaling, **changes)


MUTATIONS = {  # a plausible mistake -> the config it would produce
    'llama layout': ('llama_gqa', lambda: dict(rope_layout='interleaved')),
    'v3 layout': ('deepseek_v3', lambda: dict(rope_layout='half')),
    'v3 half layout': ('deepseek_v3_no_q_lora_half', lambda: dict(rope_layout='interleaved')),
    'v2 layout': ('deepseek_v2_yarn', lambda: dict(rope_layout='half')),
    'yarn dropped': ('deepseek_v3_yarn', lambda: dict(rope_scaling=None)),
    'no softmax mscale': ('deepseek_v3_yarn', lambda: dict(
        rope_scaling=_scaled('deepseek_v3_yarn', mscale_all_dim=0.0))),
    'cos/sin mscale 1': ('deepseek_v3_yarn', lambda: dict(
        rope_scaling=_scaled('deepseek_v3_yarn', attention_factor=1.0))),
    'factor x2': ('deepseek_v3_yarn', lambda: dict(
        rope_scaling=_scaled('deepseek_v3_yarn', factor=8.0))),
    "DeepSeek's cos/sin rule": ('deepseek_v2_yarn', lambda: dict(
        rope_scaling=_scaled('deepseek_v2_yarn', attention_factor=None))),
    'llama3 dropped': ('llama3_rope', lambda: dict(rope_scaling=None)),
    'llama3 factor x2': ('llama3_rope', lambda: dict(
        rope_scaling=_scaled('llama3_rope', factor=8.0))),
    'llama3 blend band': ('llama3_rope', lambda: dict(
        rope_scaling=_scaled('llama3_rope', high_freq_factor=1.0))),
    'qwen2 layout': ('qwen2', lambda: dict(rope_layout='interleaved')),
}


@pytest.mark.parametrize('mistake', sorted(MUTATIONS))
def test_a_wrong_rope_layout_or_yarn_scale_fails_the_comparison(mistake):
  name, changes = MUTATIONS[mistake]
  g = golden(name)
  err = np.abs(logits_of(with_config(imported(name), **changes()), g['tokens']) - g['logits'])
  past = err[WINDOW:].max()  # positions past the YaRN fixtures' original window
  assert past > 100 * TOL, f'{mistake}: only {past:.2e}'


# --- round trips ---------------------------------------------------------------------------
def _params(model):  # every variable: the parameters and an MoE router's bias
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.parametrize('name', NAMES)
def test_import_export_import_is_identical(name, tmp_path):
  model = imported(name)
  hf.save(model, tmp_path / 'hf')
  _, exported = hf.read_folder(tmp_path / 'hf')
  _, original = hf.read_folder(FIXTURES / name)
  assert sorted(exported) == sorted(original)  # same tensor names, nothing added or lost
  for key, value in original.items():  # bfloat16 values come back exactly, in float32
    np.testing.assert_array_equal(exported[key], np.asarray(value, np.float32), err_msg=key)
  again, _ = hf.load(tmp_path / 'hf')
  assert again.cfg == model.cfg
  chex.assert_trees_all_equal(_params(again), _params(model))


def test_interleaved_models_export_to_llama_by_permuting_q_k_rows():
  """An 'interleaved' model is the Llama checkpoint with q/k rows permuted per head: same
  logits, and exporting it gives back the Llama tensors exactly."""
  name = 'llama_mqa'  # head_dim 8: at 4 the permutation is its own inverse and hides a mix-up
  cfg = dataclasses.replace(imported(name).cfg, rope_layout='interleaved')
  rows = rope.interleaved_to_half(cfg.head_dim)
  assert not np.array_equal(rows[rows], np.arange(cfg.head_dim))
  _, tensors = hf.read_folder(FIXTURES / name)
  params = hf.from_hf_tensors(cfg, tensors)
  w_q = ('blocks', 0, 'attn', 'w_q')
  assert not np.array_equal(params[w_q], _params(imported(name))['blocks'][0]['attn']['w_q'])
  model = with_params(cfg, traverse_util.unflatten_dict(params))
  assert np.abs(logits_of(model, golden(name)['tokens']) - golden(name)['logits']).max() <= TOL
  back = hf.to_hf_tensors(cfg, params)
  for key, value in tensors.items():
    np.testing.assert_array_equal(back[key], np.asarray(value, np.float32), err_msg=key)


@pytest.mark.parametrize('name', ['deepseek_v3_yarn', 'llama3_rope', 'qwen2', 'deepseek_v3_moe'])
def test_cli_import_evaluate_generate_export(name, tmp_path):
  """The commands a researcher runs; evaluate's perplexity matches transformers' logits."""
  g = golden(name)
  text = tmp_path / 'text.txt'
  text.write_bytes(bytes(g['tokens'].astype(np.uint8)))
  # float32 at the precision the comparison claims, in the commands too (conftest sets it for
  # this process only): a GPU's default float32 matmuls round operands to TF32
  env = {**os.environ, 'JAX_DEFAULT_MATMUL_PRECISION': 'highest'}
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], capture_output=True,
                                     text=True, check=True, env=env)
  work = tmp_path / 'run'
  run('mla_jax.convert', f'--hf_dir={FIXTURES / name}', f'--workdir={work}')
  out = run('mla_jax.evaluate', f'--workdir={work}', f'--data={text}', '--tokenizer=byte',
            f'--seq_len={len(g["tokens"])}', f'--stride={len(g["tokens"])}').stdout
  result = json.loads((work / 'eval.json').read_text())
  assert 'bits per byte' in out
  assert abs(result['loss'] - reference_nll(g['logits'], g['tokens'])) <= TOL
  prompt = bytes(g['prompt'].astype(np.uint8)).decode()
  out = run('mla_jax.generate', f'--workdir={work}', f'--prompt={prompt}',
            f'--max_new_tokens={len(g["continuation"])}').stdout
  assert out.startswith(prompt)
  run('mla_jax.convert', f'--workdir={work}', f'--to_hf={tmp_path / "hf"}')
  exported_json, exported = hf.read_folder(tmp_path / 'hf')
  original_json, original = hf.read_folder(FIXTURES / name)
  assert exported_json['architectures'] == original_json['architectures']
  assert sorted(exported) == sorted(original)
  for key, value in original.items():
    np.testing.assert_array_equal(exported[key], np.asarray(value, np.float32), err_msg=key)


# --- DeepSeekMoE ----------------------------------------------------------------------------
MOE = [n for n in NAMES if n.endswith('_moe')]


def test_moe_fixtures_cover_the_three_routers():
  cfgs = {name: imported(name).cfg for name in MOE}
  assert sorted((c.scoring_func, c.topk_method) for c in cfgs.values()) == [
      ('sigmoid', 'noaux_tc'), ('softmax', 'greedy'), ('softmax', 'group_limited_greedy')]
  for name, cfg in cfgs.items():
    assert [cfg.is_moe_layer(i) for i in range(cfg.n_layers)] == [False, True, True], name
    assert cfg.n_routed_experts == 8 and cfg.num_experts_per_tok == 2 and cfg.n_shared_experts
  v3 = cfgs['deepseek_v3_moe']
  assert (v3.n_group, v3.topk_group, v3.norm_topk_prob, v3.routed_scaling_factor) == (
      4, 2, True, 2.5)
  assert (cfgs['deepseek_v2_moe'].n_group, cfgs['deepseek_v2_moe'].topk_group) == (4, 2)
  assert not cfgs['deepseek_v2_lite_moe'].q_lora_rank


def _bias(model, layer):
  return np.asarray(model.blocks[layer].mlp.e_score_correction_bias[...])


def test_v3_router_bias_is_imported_and_changes_the_choices():
  """The non-zero e_score_correction_bias is read (float32, exactly the stored values) and
  matters: without it the experts chosen, and so the logits, differ from transformers'."""
  name = 'deepseek_v3_moe'
  model, g = imported(name), golden(name)
  _, tensors = hf.read_folder(FIXTURES / name)
  for layer in (1, 2):
    stored = tensors[f'model.layers.{layer}.mlp.gate.e_score_correction_bias']
    assert _bias(model, layer).dtype == np.float32 and np.abs(stored).min() > 0
    np.testing.assert_array_equal(_bias(model, layer), np.asarray(stored, np.float32))
    assert model.blocks[layer].mlp.router[...].dtype == jnp.float32
  params = _params(model)
  for layer in (1, 2):
    params['blocks'][layer]['mlp']['e_score_correction_bias'] = np.zeros(8, np.float32)
  unbiased = with_params(model.cfg, params)
  assert np.abs(logits_of(unbiased, g['tokens']) - g['logits']).max() > 100 * TOL


def test_v3_router_bias_survives_a_workdir(tmp_path):
  """import_workdir saves every variable, not only the parameters: load_workdir gives back
  the router bias and transformers' logits."""
  name = 'deepseek_v3_moe'
  hf.import_workdir(FIXTURES / name, tmp_path / 'run')
  model, cfg = wd.load_workdir(tmp_path / 'run')
  assert cfg == imported(name).cfg
  for layer in (1, 2):
    np.testing.assert_array_equal(_bias(model, layer), _bias(imported(name), layer))
    assert np.abs(_bias(model, layer)).min() > 0
  g = golden(name)
  assert np.abs(logits_of(model, g['tokens']) - g['logits']).max() <= TOL


def test_moe_routing_paths_agree_on_the_fixtures():
  """The dropless paths (ragged_dot's grouped matmul, the CPU's blocks; 'auto', the default,
  takes one of them) and the every-expert reference give transformers' logits alike."""
  for name in MOE:
    g = golden(name)
    assert imported(name).cfg.moe_impl == 'auto'
    for impl in ('ragged', 'blocked', 'dense'):
      model = with_config(imported(name), moe_impl=impl)
      assert np.abs(logits_of(model, g['tokens']) - g['logits']).max() <= TOL, (name, impl)


# --- a checkpoint with its tokenizer ---------------------------------------------------------
def _cli(*args):
  env = {**os.environ, 'JAX_DEFAULT_MATMUL_PRECISION': 'highest'}  # as in the test above
  return subprocess.run([sys.executable, '-m', *args], capture_output=True, text=True, env=env)


def test_bpe_checkpoint_evaluates_and_generates_as_transformers(tmp_path):
  """Imported with its tokenizer files, a Llama over a BPE gives transformers' perplexity on
  a text (encoded by the run's tokenizer) and its greedy text for a prompt; exported, the
  folder carries the same tokenizer."""
  g = json.loads((BPE / 'golden.json').read_text())
  assert g['margin'] > 10 * TOL and len(g['ids']) > 100
  work = tmp_path / 'run'
  r = _cli('mla_jax.convert', f'--hf_dir={BPE}', f'--workdir={work}')
  assert r.returncode == 0, r.stderr
  copied = [name for name in tokenizer.FILES if (BPE / name).is_file()]
  assert copied == ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json']
  for name in copied:
    assert (work / name).read_bytes() == (BPE / name).read_bytes(), name
  text = tmp_path / 'text.txt'
  text.write_text(g['text'])
  n = len(g['ids'])
  r = _cli('mla_jax.evaluate', f'--workdir={work}', f'--data={text}', f'--seq_len={n}',
           f'--stride={n}')
  assert r.returncode == 0, r.stderr
  result = json.loads((work / 'eval.json').read_text())
  assert result['tokens'] == n - 1
  assert abs(result['loss'] - g['nll']) <= TOL
  assert abs(math.log(result['perplexity']) - math.log(g['perplexity'])) <= TOL
  tok = wd.load_tokenizer(work)
  assert result['bytes'] == len(g['text'].encode()) - len(tok.token_bytes(g['ids'][0]))
  assert result['bits_per_byte'] == pytest.approx(
      result['loss'] * (n - 1) / (math.log(2) * result['bytes']), rel=1e-12)
  r = _cli('mla_jax.generate', f'--workdir={work}', f'--prompt={g["prompt"]}',
           '--temperature=0', f'--max_new_tokens={NEW_BPE}')
  assert r.returncode == 0, r.stderr
  assert r.stdout == g['generated'] + '\n'
  out = tmp_path / 'hf'
  r = _cli('mla_jax.convert', f'--workdir={work}', f'--to_hf={out}')
  assert r.returncode == 0, r.stderr
  for name in copied:
    assert (out / name).read_bytes() == (BPE / name).read_bytes(), name
  exported = json.loads((out / 'config.json').read_text())
  assert exported['eos_token_id'] == tok.eos_id == 0


NEW_BPE = 24  # make_fixtures.NEW: the greedy steps it recorded


def test_a_checkpoint_imported_without_its_tokenizer_is_not_fed_bytes(tmp_path):
  """A 384-token model imported without tokenizer files: generate and evaluate of text are
  refused in one line (bytes would be noise, silently); ids still score, and export works."""
  folder = tmp_path / 'hf'
  shutil.copytree(BPE, folder)
  for name in tokenizer.FILES:
    (folder / name).unlink(missing_ok=True)
  work = tmp_path / 'run'
  assert _cli('mla_jax.convert', f'--hf_dir={folder}', f'--workdir={work}').returncode == 0
  text = tmp_path / 'text.txt'
  text.write_text('Once upon a time')
  for args in (['mla_jax.generate', f'--workdir={work}', '--prompt=Once'],
               ['mla_jax.evaluate', f'--workdir={work}', f'--data={text}']):
    r = _cli(*args)
    assert r.returncode == 1 and r.stderr.strip().count('\n') == 0, r.stderr
    assert 'without its tokenizer; copy its tokenizer.json' in r.stderr
  ids = tmp_path / 'ids.npy'
  np.save(ids, np.array(json.loads((BPE / 'golden.json').read_text())['ids']))
  r = _cli('mla_jax.evaluate', f'--workdir={work}', f'--data={ids}', '--tokenizer=ids')
  assert r.returncode == 0, r.stderr
  assert _cli('mla_jax.convert', f'--workdir={work}', f'--to_hf={tmp_path / "out"}'
              ).returncode == 0
  assert not (tmp_path / 'out' / 'tokenizer.json').exists()


def test_exported_tokenizer_loads_in_transformers(tmp_path):
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  g = json.loads((BPE / 'golden.json').read_text())
  model, _ = hf.load(BPE)
  hf.save(model, tmp_path / 'out', tokenizer.HFTokenizer.from_path(BPE))
  auto = transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')
  assert auto(g['text']).input_ids == g['ids'] and auto.eos_token_id == 0


def test_a_bad_or_too_large_tokenizer_is_refused_before_the_import_writes(tmp_path):
  cases = {'broken': (lambda f: (f / 'tokenizer.json').write_text('{"model":'),
                      'is not a tokenizer.json the tokenizers library reads'),
           'too large': (_edit_config(vocab_size=300),
                         "the tokenizer's 384 tokens exceed the model's vocab_size=300")}
  for case, (breakage, message) in cases.items():
    folder = tmp_path / case
    shutil.copytree(BPE, folder)
    breakage(folder)
    if case == 'too large':  # a model of 300 tokens: its tensors cut to match
      _edit_tensors(lambda t: t.update({k: t[k][:300] for k in
                                        ('model.embed_tokens.weight', 'lm_head.weight')}))(folder)
    r = _cli('mla_jax.convert', f'--hf_dir={folder}', f'--workdir={tmp_path / "run"}')
    assert r.returncode == 1 and r.stderr.strip().count('\n') == 0, r.stderr
    assert message in r.stderr and not (tmp_path / 'run').exists(), r.stderr


# --- bad inputs ------------------------------------------------------------------------------
def _edit_config(**changes):
  def edit(folder):
    path = folder / 'config.json'
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
  return edit


def _edit_tensors(change):
  def edit(folder):
    tensors = {k: np.array(v) for k, v in hf.read_safetensors(folder / 'model.safetensors')
               .items()}
    change(tensors)
    hf.write_safetensors(folder / 'model.safetensors', tensors)
  return edit


def _fp8(folder):
  """Marks one tensor as float8 (what DeepSeek-V3's released weights are)."""
  path = folder / 'model.safetensors'
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], 'little')
  header = json.loads(raw[8:8 + n])
  header['model.norm.weight']['dtype'] = 'F8_E4M3'
  blob = json.dumps(header).encode()
  blob += b' ' * (-len(blob) % 8)
  path.write_bytes(len(blob).to_bytes(8, 'little') + blob + raw[8 + n:])


def _pickle_only(folder):
  (folder / 'model.safetensors').rename(folder / 'pytorch_model.bin')


def _truncate(folder):
  path = folder / 'model.safetensors'
  path.write_bytes(path.read_bytes()[:-100])


def _missing_shard(folder):
  (folder / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {'model.norm.weight': 'model-00002-of-00002.safetensors'}}))


KV_B = 'model.layers.1.self_attn.kv_b_proj.weight'
EXPERT = 'model.layers.2.mlp.experts.5.up_proj.weight'
BAD = {  # name: (fixture, how to break it, what the message must say)
    'unknown architecture': ('llama_mha', _edit_config(architectures=['GPT2LMHeadModel']),
                             "architecture 'GPT2LMHeadModel' is not supported"),
    'missing expert tensor': ('deepseek_v3_moe', _edit_tensors(lambda t: t.pop(EXPERT)),
                              f'tensor {EXPERT} is missing'),
    'dense config over moe tensors': ('deepseek_v3', _edit_config(first_k_dense_replace=1),
                                      'e.g. model.layers.1.mlp.down_proj.weight'),
    'v2 noaux_tc': ('deepseek_v2_moe', _edit_config(topk_method='noaux_tc'),
                    "topk_method='noaux_tc' is not supported for DeepseekV2ForCausalLM"),
    'v2 norm_topk_prob': ('deepseek_v2_lite_moe', _edit_config(norm_topk_prob=True),
                          'norm_topk_prob=true is not supported'),
    'moe_layer_freq': ('deepseek_v3_moe', _edit_config(moe_layer_freq=2),
                       'moe_layer_freq=2 is not supported'),
    'missing tensor': ('deepseek_v3', _edit_tensors(lambda t: t.pop(KV_B)),
                       f'tensor {KV_B} is missing'),
    'misshapen tensor': ('deepseek_v3', _edit_tensors(lambda t: t.update({KV_B: t[KV_B][:-1]})),
                         f'tensor {KV_B} has shape [43, 12] but config.json implies [44, 12]'),
    'extra tensor': ('llama_mha', _edit_tensors(lambda t: t.update(
        {'model.layers.0.self_attn.q_proj.bias': np.zeros(16, np.float32)})),
                     'no place in a mha model'),
    'float8 tensor': ('deepseek_v3', _fp8, 'F8_E4M3, which mla_jax does not read'),
    'quantized config': ('deepseek_v3', _edit_config(quantization_config={'quant_method': 'fp8'}),
                         'quantized'),
    'pickle only': ('llama_mha', _pickle_only, 'pickle checkpoints are never loaded'),
    'truncated file': ('llama_mha', _truncate, 'not a readable safetensors file'),
    'missing shard': ('llama_mha', _missing_shard, 'model-00002-of-00002.safetensors, which is '
                      'not in'),
    'no config': ('llama_mha', lambda f: (f / 'config.json').unlink(), 'has no config.json'),
    'broken config': ('llama_mha', lambda f: (f / 'config.json').write_text('{'),
                      'is not valid JSON'),
    'llama3 rope keys': ('llama_mha', _edit_config(rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 8.0}),
                         "rope type llama3 needs ['low_freq_factor', 'high_freq_factor', "
                         "'original_max_position_embeddings']"),
    'llama3 bands': ('llama3_rope', _edit_config(rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 8.0, 'low_freq_factor': 4.0,
        'high_freq_factor': 1.0, 'original_max_position_embeddings': 16}), 'need 0 < low < high'),
    'deepseek llama3': ('deepseek_v3', _edit_config(rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 8.0}), 'rope type llama3 needs'),
    'qwen2 sliding window': ('qwen2', _edit_config(use_sliding_window=True, sliding_window=8),
                             'use_sliding_window=true is not supported'),
    'qwen2 missing bias': ('qwen2', _edit_tensors(
        lambda t: t.pop('model.layers.1.self_attn.v_proj.bias')),
                           'tensor model.layers.1.self_attn.v_proj.bias is missing'),
    'attention bias': ('llama_mha', _edit_config(attention_bias=True),
                       'attention_bias=True is not supported'),
    'gelu': ('deepseek_v3', _edit_config(hidden_act='gelu'), "hidden_act='gelu'"),
    'latent norm eps': ('deepseek_v3', _edit_config(rms_norm_eps=1e-5), 'rms_norm_eps=1e-05'),
    'bad sizes': ('llama_gqa', _edit_config(num_key_value_heads=3),
                  'n_heads=4 is not divisible by n_kv_heads=3'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_checkpoints_give_one_clear_message(case, tmp_path):
  name, breakage, message = BAD[case]
  folder = tmp_path / 'hf'
  shutil.copytree(FIXTURES / name, folder)
  breakage(folder)
  with pytest.raises(hf.HFError) as e:
    hf.import_workdir(folder, tmp_path / 'run')
  assert message in str(e.value) and '\n' not in str(e.value)
  assert not (tmp_path / 'run').exists()


def test_cli_refuses_bad_input_without_writing(tmp_path):
  folder = tmp_path / 'hf'
  shutil.copytree(FIXTURES / 'deepseek_v3', folder)
  _edit_config(first_k_dense_replace=0)(folder)
  r = subprocess.run([sys.executable, '-m', 'mla_jax.convert', f'--hf_dir={folder}',
                      f'--workdir={tmp_path / "run"}'], capture_output=True, text=True)
  assert r.returncode == 1 and r.stderr.strip().count('\n') == 0, r.stderr
  assert 'no place in a mla model, e.g. model.layers.0.mlp.down_proj' in r.stderr
  assert not (tmp_path / 'run').exists()


def test_export_refuses_what_has_no_hugging_face_equivalent(tmp_path):
  gqa = with_config(imported('llama_gqa'), rope_scaling=rope.YarnScaling(4.0, 16))
  with pytest.raises(hf.HFError, match='no softmax mscale'):
    hf.save(gqa, tmp_path / 'a')
  mla = with_config(imported('deepseek_v3'), norm_eps=1e-5)
  with pytest.raises(hf.HFError, match='latent norms'):
    hf.save(mla, tmp_path / 'b')
  assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'keep.txt').write_text('mine')
  with pytest.raises(InputError, match='already exists and is not empty'):
    hf.export_workdir(tmp_path / 'nowhere', tmp_path / 'full')
  assert (tmp_path / 'full' / 'keep.txt').read_text() == 'mine'


# --- models trained here, loaded by transformers (needs the dev extra) ----------------------
MOE_FIELDS = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                  n_shared_experts=1, first_k_dense_replace=1)
NATIVE = {
    'gqa interleaved': dict(attention='gqa', n_kv_heads=2),
    'mqa tied half': dict(attention='mqa', tie_embeddings=True, rope_layout='half'),
    'mla q_lora interleaved': dict(attention='mla', kv_lora_rank=12, q_lora_rank=8,
                                   qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
    'mla half tied': dict(attention='mla', kv_lora_rank=12, rope_layout='half',
                          tie_embeddings=True),
    'mla yarn': dict(attention='mla', kv_lora_rank=12, q_lora_rank=8, rope_scaling=dict(
        factor=4.0, original_max_position_embeddings=16, mscale=0.9, mscale_all_dim=0.7)),
    'gqa llama3 interleaved': dict(attention='gqa', n_kv_heads=2, rope_scaling=dict(
        type='llama3', factor=4.0, original_max_position_embeddings=16, low_freq_factor=0.25,
        high_freq_factor=2.0)),
    'gqa qwen2 biases interleaved': dict(attention='gqa', n_kv_heads=2, qkv_bias=True),
    'mha qwen2 biases half tied': dict(attention='mha', qkv_bias=True, rope_layout='half',
                                       tie_embeddings=True),
    'mla moe v3 noaux_tc': dict(attention='mla', kv_lora_rank=12, q_lora_rank=8, **MOE_FIELDS,
                                scoring_func='sigmoid', topk_method='noaux_tc', n_group=4,
                                topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
    'mla moe v2 group_limited_greedy': dict(attention='mla', kv_lora_rank=12, **MOE_FIELDS,
                                            topk_method='group_limited_greedy', n_group=4,
                                            topk_group=2, routed_scaling_factor=1.5),
}


@pytest.mark.parametrize('variant', sorted(NATIVE))
def test_exported_models_give_the_same_logits_in_transformers(variant, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from mla_jax.config import ModelConfig
  cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64,
                    **NATIVE[variant])
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  if cfg.qkv_bias:  # zero at init: draw them, so that a misplaced bias row shows
    params = _params(model)
    rng = np.random.default_rng(0)
    for block in params['blocks'].values():
      for name in ('b_q', 'b_k', 'b_v'):
        block['attn'][name] = rng.normal(size=block['attn'][name].shape).astype(np.float32)
    model = with_params(cfg, params)
  if cfg.topk_method == 'noaux_tc':  # zero at init: draw it, so that it changes the choices
    params = _params(model)
    params['blocks'][1]['mlp']['e_score_correction_bias'] = np.random.default_rng(1).normal(
        0, 0.2, 8).astype(np.float32)
    model = with_params(cfg, params)
  hf_json = hf.save(model, tmp_path)
  if cfg.n_routed_experts:
    assert hf_json['architectures'][0] == hf.DEEPSEEK[cfg.scoring_func == 'sigmoid']
  hf_model = getattr(transformers, hf_json['architectures'][0]).from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation='eager')
  tokens = np.arange(48) * 7 % 256
  with torch.no_grad():
    theirs = hf_model(torch.tensor(tokens)[None]).logits[0].numpy()
  assert np.abs(theirs).std() > 0.1  # not a degenerate model
  assert np.abs(logits_of(model, tokens) - theirs).max() <= TOL


def test_evaluate_reads_text_as_bytes_or_a_npy_of_ids(tmp_path):
  ids = np.array([5, 300, 7], np.int64)
  np.save(tmp_path / 'ids.npy', ids)
  np.testing.assert_array_equal(
      perplexity.read_tokens(str(tmp_path / 'ids.npy'), 'ids', 512)[0], ids)
  (tmp_path / 'text.txt').write_bytes(b'\x00\xffab')
  tokens, n_bytes = perplexity.read_tokens(str(tmp_path / 'text.txt'), 'byte', 256)
  np.testing.assert_array_equal(tokens, [0, 255, 97, 98])
  assert n_bytes == 3  # the bytes scored: all but the first
  np.save(tmp_path / 'floats.npy', np.ones(4))
  np.save(tmp_path / 'objects.npy', np.array([{}, {}], dtype=object), allow_pickle=True)
  bad = {('ids.npy', 'ids', 256): 'ids outside [0, 256)',
         ('floats.npy', 'ids', 256): '1-D integer array',
         ('objects.npy', 'ids', 256): 'is not a .npy array',  # pickled: never loaded
         ('text.txt', 'byte', 100): 'too few for bytes',
         ('nowhere.txt', 'byte', 256): 'is not a file'}
  for (file, kind, vocab), message in bad.items():
    with pytest.raises(perplexity.data.DataError) as e:
      perplexity.read_tokens(str(tmp_path / file), kind, vocab)
    assert message in str(e.value), (file, str(e.value))


def test_sharded_bfloat16_checkpoints_convert_exactly(tmp_path):
  """Shards listed in model.safetensors.index.json load; bfloat16 parameters export bit for
  bit (the fixtures are stored in bfloat16)."""
  name = 'deepseek_v3'
  _, tensors = hf.read_folder(FIXTURES / name)
  folder = tmp_path / 'sharded'
  folder.mkdir()
  shutil.copy(FIXTURES / name / 'config.json', folder)
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[::2],
            'model-00002-of-00002.safetensors': names[1::2]}
  for shard, keys in shards.items():
    hf.write_safetensors(folder / shard, {k: tensors[k] for k in keys})
  (folder / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {k: shard for shard, keys in shards.items() for k in keys}}))
  model, _ = hf.load(folder, param_dtype='bfloat16')
  assert model.blocks[0].attn.w_uk[...].dtype == jnp.bfloat16
  hf.save(model, tmp_path / 'out')
  _, exported = hf.read_folder(tmp_path / 'out')
  for key, value in tensors.items():
    assert exported[key].dtype == value.dtype == np.dtype('bfloat16'), key
    np.testing.assert_array_equal(exported[key].view(np.uint16), value.view(np.uint16),
                                  err_msg=key)
  g = golden(name)
  assert np.abs(logits_of(with_config(model, param_dtype='float32'), g['tokens']) -
                g['logits']).max() <= TOL


@pytest.mark.parametrize('name', [*YARN, 'llama_gqa', 'llama3_rope', 'qwen2'])
def test_transformers_4_config_format_converts_alike(name):
  """Released checkpoints (and transformers 4) write rope_theta and rope_scaling with 'type'
  where transformers 5 writes rope_parameters."""
  hf_json, _ = hf.read_folder(FIXTURES / name)
  params = dict(hf_json.pop('rope_parameters'))
  old = dict(hf_json, rope_theta=params.pop('rope_theta'))
  kind = params.pop('rope_type')
  old['rope_scaling'] = None if kind == 'default' else dict(params, type=kind)
  assert hf.config_from_hf(old) == imported(name).cfg
