"""Cached decoding equals the full forward pass; generate's sampling and error handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, tiny_model
from flax import nnx

import mla_jax

LENGTHS = [9, 4, 6]  # prompts of different lengths in one batch


def _prompts(seed=0, width=9):
  return np.asarray(jax.random.randint(jax.random.key(seed), (len(LENGTHS), width), 1, 256))


def _greedy_by_full_forward(model, prompts, lengths, n):
  """The reference: a full forward pass over each whole sequence for every new token.

  Sequences sit right-padded in one fixed-width array so one jitted forward serves every
  step; causality (tested in attention_test) keeps the padding from reaching them.
  """
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  rows = np.arange(len(lengths))
  seqs = np.zeros((len(lengths), prompts.shape[1] + n), np.int32)
  seqs[:, :prompts.shape[1]] = prompts
  ends = np.asarray(lengths).copy()
  for _ in range(n):
    logits = np.asarray(forward(state, jnp.asarray(seqs)))
    seqs[rows, ends] = logits[rows, ends - 1].argmax(-1)
    ends += 1
  return np.stack([seqs[i, length:length + n] for i, length in enumerate(lengths)])


@pytest.mark.parametrize('chunk', [512, 4])
def test_greedy_generate_equals_argmax_of_full_forward(variant, chunk):
  model = tiny_model(**variant)
  prompts = _prompts()
  got = mla_jax.generate(model, prompts, LENGTHS, max_new_tokens=6, chunk=chunk)
  np.testing.assert_array_equal(got, _greedy_by_full_forward(model, prompts, LENGTHS, 6))


@pytest.mark.parametrize('chunk', [512, 3])
def test_decode_logits_equal_full_forward_logits(variant, chunk):
  """prefill + decode_step, step by step, against one forward pass over the whole text."""
  model = tiny_model(**variant)
  text = _prompts(1, width=14)
  graphdef, state = nnx.split(model)
  full = np.asarray(model(jnp.asarray(text)))  # [b, 14, V]
  lengths = jnp.asarray(LENGTHS)
  caches = model.init_cache(len(LENGTHS), 32)
  logits, caches = mla_jax.prefill(graphdef, state, caches, jnp.asarray(text[:, :9]), lengths,
                                   chunk=chunk)
  want = full[np.arange(3), np.asarray(LENGTHS) - 1]
  np.testing.assert_allclose(logits, want, atol=1e-5)
  for step in range(5):  # feed the text's own next tokens at each sequence's position
    positions = lengths + step
    tokens = jnp.asarray(text[np.arange(3), positions])
    logits, caches = mla_jax.decode_step(graphdef, state, caches, tokens, positions)
    np.testing.assert_allclose(logits, full[np.arange(3), positions], atol=1e-5)


@pytest.mark.parametrize('q_lora_rank', [0, 24])
def test_mla_absorbed_equals_naive(q_lora_rank):
  overrides = dict(attention='mla', kv_lora_rank=32, q_lora_rank=q_lora_rank)
  text = jnp.asarray(_prompts(2, width=12))
  lengths = jnp.asarray(LENGTHS)
  results = {}
  for path in ('absorbed', 'naive'):
    model = tiny_model(seed=4, mla_decode=path, **overrides)
    graphdef, state = nnx.split(model)
    caches = model.init_cache(3, 24)
    first, caches = mla_jax.prefill(graphdef, state, caches, text[:, :9], lengths, chunk=4)
    steps = []
    for step in range(3):
      logits, caches = mla_jax.decode_step(graphdef, state, caches, text[:, 9 + step],
                                           lengths + step)
      steps.append(logits)
    results[path] = np.stack([first, *steps])
  np.testing.assert_allclose(results['absorbed'], results['naive'], atol=1e-5)
  assert np.abs(results['naive']).max() > 0.1  # not trivially equal


def test_eos_pads_the_rest_of_that_sequence_only():
  model = tiny_model()
  prompts = _prompts()
  free = np.asarray(mla_jax.generate(model, prompts, LENGTHS, max_new_tokens=8))
  eos = int(free[0, 2])
  assert eos not in free[1] and eos not in free[0, :2], 'pick another prompt seed'
  got = np.asarray(mla_jax.generate(model, prompts, LENGTHS, max_new_tokens=8, eos_id=eos,
                                    pad_id=0))
  np.testing.assert_array_equal(got[0], [*free[0, :3], 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(got[1], free[1])


def test_sampling_is_seeded():
  model = tiny_model(attention='mla', kv_lora_rank=32)
  prompts = _prompts()
  kw = dict(max_new_tokens=16, temperature=1.0)
  a = mla_jax.generate(model, prompts, LENGTHS, seed=1, **kw)
  b = mla_jax.generate(model, prompts, LENGTHS, seed=1, **kw)
  c = mla_jax.generate(model, prompts, LENGTHS, seed=2, **kw)
  np.testing.assert_array_equal(a, b)
  assert np.mean(np.asarray(a) != np.asarray(c)) > 0.5
  greedy = mla_jax.generate(model, prompts, LENGTHS, max_new_tokens=16)
  np.testing.assert_array_equal(
      mla_jax.generate(model, prompts, LENGTHS, seed=3, top_k=1, **kw), greedy)
  np.testing.assert_array_equal(
      mla_jax.generate(model, prompts, LENGTHS, seed=3, top_p=1e-6, **kw), greedy)


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1]]))
  draw = lambda **kw: np.asarray([
      mla_jax.decode.sample(logits, jax.random.key(i), 1.0, **kw)[0] for i in range(300)])
  assert set(draw(top_k=2, top_p=1.0)) == {0, 1}
  assert set(draw(top_k=0, top_p=0.7)) == {0, 1}  # 0.5 + 0.25 reaches 0.7
  assert set(draw(top_k=0, top_p=0.8)) == {0, 1, 2}
  assert set(draw(top_k=0, top_p=1.0)) == {0, 1, 2, 3}


@pytest.mark.parametrize('kwargs,message', [
    (dict(max_new_tokens=125), r'prompt \(9 tokens\) \+ max_new_tokens \(125\) = 134 exceeds'),
    (dict(prompt_lengths=[9, 0, 3]), 'prompt_lengths must be 3 integers in'),
    (dict(max_new_tokens=0), 'max_new_tokens must be >= 1'),
    (dict(top_p=0.0), 'top_p'),
])
def test_bad_generate_arguments(kwargs, message):
  kwargs = {'prompt_lengths': LENGTHS, **kwargs}
  with pytest.raises(ValueError, match=message):
    mla_jax.generate(tiny_model(), _prompts(), **kwargs)


def test_out_of_vocabulary_prompt():
  with pytest.raises(ValueError, match=r'token ids must lie in \[0, 256\)'):
    mla_jax.generate(tiny_model(), np.full((1, 3), 300), max_new_tokens=2)


# The unjitted path is slow: MLA in the default run, GQA with --long.
@pytest.mark.long  # every decode test above runs jitted; this one re-traces eagerly (minutes)
@pytest.mark.parametrize('name', ['gqa', 'mla'])
def test_jit_and_no_jit_agree(name):
  model = tiny_model(**VARIANTS[name])
  tokens = jnp.asarray(_prompts())
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tokens)
  np.testing.assert_allclose(jitted, model(tokens), atol=1e-5)
  with jax.disable_jit():
    eager = mla_jax.generate(model, _prompts(), LENGTHS, max_new_tokens=2)
  np.testing.assert_array_equal(eager, mla_jax.generate(model, _prompts(), LENGTHS,
                                                        max_new_tokens=2))
