"""Perplexity: exp(mean NLL over every scored token), never clipped, on one device or a mesh.

Windows of seq_len advance by stride: every token but the first is scored exactly once, with at
least seq_len - stride tokens of context once the text is that long. Bits per byte = summed NLL
/ (ln 2 x UTF-8 bytes of the scored text), so models with different tokenizers compare on the
same text (for bytes it is mean NLL / ln 2). The trainer validates with `perplexity`; `python -m
mla_jax.evaluate` is its command line.
"""

from __future__ import annotations

import functools
import itertools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mla_jax import data, sharding, shards
from mla_jax.errors import InputError, check_token_ids
from mla_jax.tokenizer import ByteTokenizer


# Inputs arrive placed (parameters by the rules, batches split over the batch axes); the sum
# leaves replicated over the mesh set by the caller (jax.set_mesh).
@functools.partial(jax.jit, static_argnames=('graphdef',),
                   out_shardings=jax.sharding.PartitionSpec())
def eval_step(graphdef, state, windows_bt, scored_bt):
  """Sum of NLL over the scored targets of a batch of windows [b, seq_len + 1]."""
  logits = nnx.merge(graphdef, state)(windows_bt[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows_bt[:, 1:])
  return jnp.sum(jnp.where(scored_bt, nll, 0.0))


def _batches(tokens, seq_len: int, stride: int, batch_size: int):
  """data.eval_windows in batches ([batch_size, seq_len + 1] windows, [batch_size, seq_len]
  scored masks), built as they are scored: a split is never held twice in memory. The last
  batch is padded with unscored windows (whole batches: one compiled shape)."""
  windows = data.eval_windows(tokens, seq_len, stride)
  positions = np.arange(seq_len)
  while batch := list(itertools.islice(windows, batch_size)):
    batch += [(np.zeros(seq_len + 1, np.int32), 0, 0, 0)] * (batch_size - len(batch))
    yield (np.stack([window for window, *_ in batch]),
           np.stack([(positions >= first) & (positions < end) for _, _, first, end in batch]))


def perplexity(model, tokens: np.ndarray, seq_len: int, stride: int, batch_size: int,
               mesh: jax.sharding.Mesh | None = None, scored_bytes: int | None = None) -> dict:
  """Exact exp(mean NLL) over tokens[1:], each predicted from what precedes it.

  bits_per_byte = summed NLL / (ln 2 x scored_bytes), the UTF-8 bytes of the text tokens[1:]
  spell; without scored_bytes the tokens are taken for bytes (then it is mean NLL / ln 2).

  Every process enumerates the same windows and feeds its rows of each batch; the batch is
  split over the mesh's batch axes (default mesh: data parallel over every device).
  """
  if not 0 < stride <= seq_len:
    raise InputError(f'eval stride {stride} must be in [1, seq_len={seq_len}]: a larger stride '
                     'would skip tokens')
  if batch_size < 1 or len(tokens) < 2:
    raise InputError(f'need batch_size >= 1 and at least two tokens; got batch_size='
                     f'{batch_size} and {len(tokens)} tokens')
  if isinstance(tokens, shards.ShardedTokens):  # its manifest bounds its ids: no full pass
    tokens.check_vocab(model.cfg.vocab_size)
  else:
    check_token_ids(tokens, model.cfg.vocab_size)
  mesh = mesh or sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  shape, mask_shape = (batch_size, seq_len + 1), (batch_size, seq_len)
  windows_sharding = sharding.named_sharding(mesh, ('batch', None), shape)
  mask_sharding = sharding.named_sharding(mesh, ('batch', None), mask_shape)
  rows = sharding.local_rows(windows_sharding, shape, axis=0)
  total, count = 0.0, 0  # float64 on the host: exact over millions of tokens
  with jax.set_mesh(mesh):
    for windows, masks in _batches(tokens, seq_len, stride, batch_size):
      window_batch = sharding.global_batch(windows[rows], windows_sharding, shape)
      mask_batch = sharding.global_batch(masks[rows], mask_sharding, mask_shape)
      total += float(eval_step(graphdef, state, window_batch, mask_batch))
      count += int(masks.sum())
  assert count == len(tokens) - 1, (count, len(tokens))
  loss = total / count
  scored_bytes = count if scored_bytes is None else scored_bytes
  # (count / scored_bytes) is exactly 1 for bytes: their bits per byte keep every bit
  return {'loss': loss, 'perplexity': math.exp(loss),
          'bits_per_byte': loss / math.log(2) * (count / scored_bytes), 'tokens': count,
          'bytes': scored_bytes}


def read_tokens(path: str, tokenizer: str, vocab_size: int, tok=None
                ) -> tuple[np.ndarray, int | None]:
  """(token ids, UTF-8 bytes of the scored text) of --data: a text file encoded with tok (the
  run's tokenizer; tokenizer='run'), its raw bytes (tokenizer='byte'), or a 1-D integer .npy
  (tokenizer='ids', never pickled; no text, so no byte count)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise data.DataError(f'--data={path} is not a file; give a file to score')
  n_bytes = None
  if tokenizer in ('byte', 'run'):
    tok = tok if tokenizer == 'run' and tok is not None else ByteTokenizer()
    if tok.kind == 'byte' and vocab_size < 256:
      raise data.DataError(f'the model has {vocab_size} tokens, too few for bytes; tokenize '
                           '--data with its tokenizer and pass --tokenizer=ids')
    raw = file.read_bytes()
    if tok.kind == 'byte':
      tokens = np.frombuffer(raw, np.uint8)
    else:
      try:
        tokens = tok.encode(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        raise data.DataError(f'--data={path} is not UTF-8 text (byte {e.start}: {e.reason}); '
                             'convert it to UTF-8') from None
      if tokens.size and tokens.max() >= vocab_size:
        raise data.DataError(f'the tokenizer gives id {tokens.max()} but the model has '
                             f'{vocab_size} tokens; use the tokenizer the model was trained with')
    if len(tokens):
      n_bytes = len(raw) - len(tok.token_bytes(tokens[0]))
  else:
    try:
      tokens = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise data.DataError(f'--data={path} is not a .npy array ({e}); with --tokenizer=ids '
                           'give np.save(path, ids)') from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise data.DataError(f'--data={path} holds {tokens.dtype} {list(tokens.shape)}; give a '
                           '1-D integer array of token ids')
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
      raise data.DataError(f'--data={path} has ids outside [0, {vocab_size}); tokenize with '
                           "the checkpoint's own tokenizer")
  if len(tokens) < 2:
    raise data.DataError(f'--data={path} has {len(tokens)} tokens; perplexity needs two')
  return tokens.astype(np.int32), n_bytes
