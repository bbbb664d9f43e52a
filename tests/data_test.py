import math

import jax
import numpy as np
import pytest
from conftest import tiny_model

from mla_jax import data, perplexity


@pytest.mark.parametrize('n,seq_len,stride', [(1000, 64, 32), (65, 64, 64), (30, 64, 16),
                                              (1001, 50, 7), (2, 8, 8)])
def test_eval_windows_score_every_target_once(n, seq_len, stride):
  tokens = np.arange(n) % 251
  seen = np.zeros(n - 1, int)
  for window, start, first, end in data.eval_windows(tokens, seq_len, stride):
    assert first >= 0 and end <= seq_len
    seen[start + first:start + end] += 1
    np.testing.assert_array_equal(window[first + 1:end + 1],
                                  tokens[start + first + 1:start + end + 1])
    if start + first >= seq_len - stride:  # enough text: context of at least seq_len - stride
      assert first >= seq_len - stride
  assert np.all(seen == 1)


def test_window_sampler_is_a_function_of_seed_and_step():
  tokens = np.arange(5000).astype(np.uint8)
  sampler = data.WindowSampler(tokens, seq_len=16, batch=4, seed=3)
  np.testing.assert_array_equal(sampler[7], data.WindowSampler(tokens, 16, 4, seed=3)[7])
  assert not np.array_equal(sampler[7], sampler[8])
  assert not np.array_equal(sampler[7], data.WindowSampler(tokens, 16, 4, seed=4)[7])
  assert sampler[7].shape == (1, 4, 17) and sampler[7].dtype == np.int32
  resumed = data.train_batches(tokens, 16, 4, seed=3, start_step=7)
  np.testing.assert_array_equal(next(resumed), sampler[7])
  np.testing.assert_array_equal(next(resumed), sampler[8])


def test_processes_gather_their_rows_of_one_global_batch():
  """Two processes' rows of each microbatch, put together, are the one-process batch."""
  tokens = np.arange(5000).astype(np.uint8)
  whole = data.WindowSampler(tokens, 16, batch=8, seed=3, accum=2)[5]
  halves = [data.WindowSampler(tokens, 16, 8, 3, accum=2, rows=slice(2 * p, 2 * p + 2))[5]
            for p in range(2)]
  assert whole.shape == (2, 4, 17)
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)


def test_text_files_hold_out_whole_files(tmp_path):
  for i, size in enumerate([500, 400, 100, 60]):
    (tmp_path / f'{i}.txt').write_bytes(bytes([65 + i]) * size)
  splits = data.text_file_splits(str(tmp_path / '*.txt'), val_fraction=0.1)
  assert set(splits['val'].tobytes()) == {ord('C'), ord('D')}  # 160 bytes >= 10% of 1060
  assert len(splits['train']) == 900
  single = data.text_file_splits(str(tmp_path / '0.txt'), val_fraction=0.2)
  assert (len(single['train']), len(single['val'])) == (400, 100)


def test_empty_glob_is_a_clear_error(tmp_path):
  with pytest.raises(data.DataError, match=r'no files match data\.files'):
    data.text_file_splits(str(tmp_path / 'none*.txt'), 0.1)


def test_byte_codec_round_trips():
  text = 'Wherefore art thou — Romeo?'
  assert data.decode(data.encode(text)) == text


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
  model = tiny_model()
  model.lm_head[...] = jax.numpy.zeros_like(model.lm_head[...])  # all logits 0
  result = perplexity.perplexity(model, np.arange(300) % 256, seq_len=32, stride=16,
                               batch_size=4)
  assert result['tokens'] == 299
  assert result['perplexity'] == pytest.approx(256.0, rel=1e-5)
  assert result['bits_per_byte'] == pytest.approx(8.0, rel=1e-5)


def test_perplexity_does_not_depend_on_batching_and_matches_a_direct_sum():
  model = tiny_model(attention='mla', kv_lora_rank=32)
  tokens = (np.arange(200) * 7) % 256
  a = perplexity.perplexity(model, tokens, seq_len=200, stride=200, batch_size=1)
  b = perplexity.perplexity(model, tokens, seq_len=64, stride=64, batch_size=3)
  logits = np.asarray(model(jax.numpy.asarray(tokens[None, :-1])))[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  direct = -logp[np.arange(199), tokens[1:]].mean()
  assert a['loss'] == pytest.approx(direct, rel=1e-5)
  assert a['perplexity'] == pytest.approx(math.exp(direct), rel=1e-5)
  assert b['tokens'] == a['tokens'] == 199
  assert b['loss'] > a['loss']  # less context per token: a real difference, not a bug


class _CountingTokens(np.ndarray):
  """An array that records the furthest token a slice of it has read."""

  def __getitem__(self, index):
    if isinstance(index, slice):
      _CountingTokens.furthest = max(_CountingTokens.furthest, min(index.stop, len(self)))
    return np.asarray(super().__getitem__(index))


def test_perplexity_builds_its_windows_as_it_scores_them():
  """A split is scored batch by batch: the windows of a batch are read when it is scored, so
  a validation split the size of the host's memory is never held twice (windows + masks)."""
  tokens = ((np.arange(10_000) * 7) % 256).view(_CountingTokens)
  _CountingTokens.furthest = 0
  batches = perplexity._batches(tokens, seq_len=64, stride=32, batch_size=5)
  windows, masks = next(batches)
  assert windows.shape == (5, 65) and masks.shape == (5, 64)
  assert _CountingTokens.furthest == 4 * 32 + 65  # five windows read, not 312
  rest = list(batches)
  assert _CountingTokens.furthest == 10_000
  assert sum(int(m.sum()) for _, m in rest) + int(masks.sum()) == 9_999
  assert [bool(m.any()) for m in rest[-1][1]] == [True] * 2 + [False] * 3  # 312 = 62 x 5 + 2
