"""Cached generation: prefill, decode_step and generate (docs/design.md#6-decode-loop).

The hot functions are pure functions of (graphdef, state) under jax.jit (nnx.jit costs ~1 ms
of Python per call per layer on a CPU). `generate` runs prefill and the whole token loop
(lax.while_loop) inside ONE jit: no Python runs per generated token.

Prompts of different lengths are right-padded. Every sequence writes its cache at its own
positions and a query at position p reads cache slots <= p, so whatever the padding wrote
past a prompt's end is overwritten before any query can see it. Long prompts are prefilled in
chunks: each chunk attends to the cache so far plus itself, so the score matrix is at most
[chunk, cache length], never [prompt, prompt].
"""

from __future__ import annotations

import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.errors import InputError, check_token_ids

DEFAULT_CHUNK = 512


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _prefill(model, caches, prompts_bt, lengths_b, chunk: int):
  """Runs the prompt through the model chunk by chunk; returns last real logits [b, V]."""
  b, t = prompts_bt.shape
  chex.assert_shape(lengths_b, (b,))
  chex.assert_type([prompts_bt, lengths_b], int)
  chunk = min(chunk, t)
  t_pad = _round_up(t, chunk)
  tokens = jnp.pad(prompts_bt, ((0, 0), (0, t_pad - t)))
  tokens_nbc = tokens.reshape(b, t_pad // chunk, chunk).transpose(1, 0, 2)
  last_b = lengths_b - 1

  def step(carry, xs):
    caches, h_last = carry
    i, chunk_tokens = xs
    positions = jnp.broadcast_to(i * chunk + jnp.arange(chunk), (b, chunk))
    h, caches = model.forward(chunk_tokens, positions, caches)
    here = (last_b >= i * chunk) & (last_b < (i + 1) * chunk)
    picked = jnp.take_along_axis(h, (last_b - i * chunk)[:, None, None] % chunk, axis=1)[:, 0]
    return (caches, jnp.where(here[:, None], picked, h_last)), None

  h0 = jnp.zeros((b, model.cfg.d_model), model.cfg.compute_dtype)
  (caches, h_last), _ = jax.lax.scan(step, (caches, h0),
                                     (jnp.arange(t_pad // chunk), tokens_nbc))
  return model.logits(h_last[:, None])[:, 0], caches


def _decode_step(model, caches, tokens_b, positions_b):
  chex.assert_rank(tokens_b, 1)
  chex.assert_equal_shape([tokens_b, positions_b])
  chex.assert_type([tokens_b, positions_b], int)
  h, caches = model.forward(tokens_b[:, None], positions_b[:, None], caches)
  return model.logits(h)[:, 0], caches


@functools.partial(jax.jit, static_argnames=('graphdef', 'chunk'), donate_argnames=('caches',))
def prefill(graphdef, state, caches, prompts_bt, lengths_b, chunk: int = DEFAULT_CHUNK):
  """Fills `caches` from right-padded prompts; -> (logits at each prompt's last token, caches)."""
  return _prefill(nnx.merge(graphdef, state), caches, prompts_bt, lengths_b, chunk)


@functools.partial(jax.jit, static_argnames=('graphdef',), donate_argnames=('caches',))
def decode_step(graphdef, state, caches, tokens_b, positions_b):
  """Appends one token per sequence at its own position; -> (next-token logits [b, V], caches)."""
  return _decode_step(nnx.merge(graphdef, state), caches, tokens_b, positions_b)


@functools.partial(jax.jit, static_argnames=('graphdef',), donate_argnames=('caches',))
def _forward_with_cache(graphdef, state, caches, tokens_bt, positions_bt):
  model = nnx.merge(graphdef, state)
  h, caches = model.forward(tokens_bt, positions_bt, caches)
  return model.logits(h), caches


def logits_through_cache(model, tokens, prefill_len: int = 8) -> np.ndarray:
  """Float32 logits [t, V] at every position of one sequence, computed the way decoding
  computes them: one prefill chunk of prefill_len tokens, then one token per step, each
  reading the cache (through cfg.mla_decode's path). For checking a decode path against a
  full forward or a reference implementation position by position."""
  tokens = np.asarray(tokens)
  check_token_ids(tokens, model.cfg.vocab_size, shape='[time]')
  graphdef, state = nnx.split(model)
  caches = model.init_cache(1, len(tokens))
  out = []
  for start, end in itertools.pairwise([0, *range(min(prefill_len, len(tokens)),
                                                   len(tokens) + 1)]):
    logits, caches = _forward_with_cache(graphdef, state, caches,
                                         jnp.asarray(tokens[None, start:end], jnp.int32),
                                         jnp.arange(start, end)[None])
    out.append(np.asarray(logits[0]))
  return np.concatenate(out)


def sample(logits_bv, key, temperature: float, top_k: int, top_p: float):
  """Greedy at temperature 0; otherwise temperature, then top-k, then nucleus (top-p)."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # the top token is always kept
    cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_desc, jnp.inf), axis=-1,
                     keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=(
    'graphdef', 'max_new_tokens', 'max_len', 'temperature', 'top_k', 'top_p', 'eos_id',
    'pad_id', 'chunk'))
def _generate(graphdef, state, prompts_bt, lengths_b, key, *, max_new_tokens, max_len,
              temperature, top_k, top_p, eos_id, pad_id, chunk):
  model = nnx.merge(graphdef, state)
  b = prompts_bt.shape[0]
  caches = model.init_cache(b, max_len)
  logits, caches = _prefill(model, caches, prompts_bt, lengths_b, chunk)
  pick = functools.partial(sample, temperature=temperature, top_k=top_k, top_p=top_p)
  is_eos = (lambda tok: tok == eos_id) if eos_id is not None else (lambda tok: tok < 0)

  token = pick(logits, jax.random.fold_in(key, 0))
  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)

  def cond(carry):
    i, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, done, caches, out = carry
    logits, caches = _decode_step(model, caches, token, lengths_b + i - 1)
    nxt = jnp.where(done, pad_id, pick(logits, jax.random.fold_in(key, i)))
    return i + 1, nxt, done | is_eos(nxt), caches, out.at[:, i].set(nxt)

  carry = (jnp.int32(1), token, is_eos(token), caches, out)
  return jax.lax.while_loop(cond, body, carry)[-1]


def generate(model, prompts, prompt_lengths=None, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, pad_id: int = 0, chunk: int = DEFAULT_CHUNK):
  """Generates max_new_tokens per prompt -> int32 [b, max_new_tokens].

  prompts: int [b, t], right-padded; prompt_lengths: int [b] (default: all t). Greedy at
  temperature 0. After a sequence emits eos_id its remaining outputs are pad_id.
  """
  cfg = model.cfg
  prompts = np.asarray(prompts)
  if prompts.ndim != 2 or not np.issubdtype(prompts.dtype, np.integer) or not prompts.size:
    raise InputError(f'prompts must be a non-empty int array [batch, length], got '
                     f'{prompts.dtype} {prompts.shape}')
  b, t = prompts.shape
  lengths = np.full((b,), t) if prompt_lengths is None else np.asarray(prompt_lengths)
  if (lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer)
      or lengths.min() < 1 or lengths.max() > t):
    raise InputError(f'prompt_lengths must be {b} integers in [1, {t}], got '
                     f'{lengths.tolist()}')
  check_token_ids(prompts, cfg.vocab_size, 'prompt token')
  for name, value in (('max_new_tokens', max_new_tokens), ('top_k', top_k), ('seed', seed),
                      ('chunk', chunk), ('pad_id', pad_id)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
      raise InputError(f'{name} must be an integer, got {value!r}')
  if max_new_tokens < 1:
    raise InputError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if chunk < 1:
    raise InputError(f'chunk (prefill tokens per step) must be >= 1, got {chunk}')
  if top_k > cfg.vocab_size:
    raise InputError(f'top_k={top_k} exceeds the vocabulary ({cfg.vocab_size} tokens); give '
                     f'top_k <= {cfg.vocab_size} (0 = all)')
  for name, value in (('eos_id', eos_id), ('pad_id', pad_id)):
    if value is not None and not (isinstance(value, (int, np.integer))
                                  and not isinstance(value, bool) and 0 <= value < cfg.vocab_size):
      raise InputError(f'{name}={value!r} must be a token id in [0, {cfg.vocab_size})')
  needed = int(lengths.max()) + max_new_tokens
  if needed > cfg.max_seq_len:
    raise InputError(f'prompt ({int(lengths.max())} tokens) + max_new_tokens '
                     f'({max_new_tokens}) = {needed} exceeds the cache (max_seq_len='
                     f'{cfg.max_seq_len}); shorten the prompt, lower max_new_tokens or '
                     'raise max_seq_len')
  # Written as "not (valid)" so that NaN, which fails every comparison, is refused too.
  if not (math.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1 and top_k >= 0):
    raise InputError(f'need a finite temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got '
                     f'temperature={temperature}, top_p={top_p}, top_k={top_k}')
  chunk = min(chunk, t)
  # The cache also holds the padded tail of the last prefill chunk.
  max_len = max(needed, _round_up(t, chunk))
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompts, jnp.int32),
                   jnp.asarray(lengths, jnp.int32), jax.random.key(seed),
                   max_new_tokens=max_new_tokens, max_len=max_len,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   eos_id=eos_id, pad_id=pad_id, chunk=chunk)
