"""MQAR: every property of the definition, determinism in (seed, step), and that it measures
recall (an attention model learns it; a model that cannot see the context stays at chance)."""

import itertools

import numpy as np
import pytest
from flax import nnx

from configs import base
from mla_jax import attention, attention_op, mqar, training
from mla_jax.config import ModelConfig
from mla_jax.model import Transformer

V, T, N = 64, 48, 8


def _batch(b=256, task=None, seed=0, step=0, stream=mqar.TRAIN):
  task = task or mqar.MQAR(V, T, N)
  return task.batch(seed, step, b, stream)


def _context(batch):
  """Keys [b, N] and values [b, N] as laid out in the first 2 N tokens."""
  return batch['inputs'][:, 0:2 * N:2], batch['inputs'][:, 1:2 * N:2]


def test_shapes_and_dtypes():
  b = _batch(b=5)
  assert {k: (x.shape, x.dtype) for k, x in b.items()} == {
      'inputs': ((5, T), np.int32), 'targets': ((5, T), np.int32),
      'weights': ((5, T), np.float32)}


def test_keys_and_values_come_from_their_halves_without_repeats():
  keys, values = _context(_batch())
  assert keys.min() >= 0 and keys.max() < V // 2
  assert values.min() >= V // 2 and values.max() < V
  for row in itertools.chain(keys, values):
    assert len(set(row.tolist())) == N
  # Over many examples the whole of each half is used.
  assert set(keys.ravel().tolist()) == set(range(V // 2))
  assert set(values.ravel().tolist()) == set(range(V // 2, V))


def test_every_key_is_queried_exactly_once_after_the_context():
  b = _batch()
  keys, _ = _context(b)
  for row in range(len(keys)):
    answers = np.flatnonzero(b['weights'][row])
    assert len(answers) == N
    assert answers.min() >= 2 * N and np.all((answers - 2 * N) % 2 == 0)
    assert sorted(b['inputs'][row, answers].tolist()) == sorted(keys[row].tolist())
    # Each key occurs exactly twice: in its pair and at its query (fillers are never keys).
    counts = np.bincount(b['inputs'][row], minlength=V)
    assert np.all(counts[keys[row]] == 2)


def test_answers_are_the_values_paired_with_the_queried_keys():
  b = _batch()
  keys, values = _context(b)
  for row in range(len(keys)):
    pairs = dict(zip(keys[row].tolist(), values[row].tolist(), strict=True))
    answers = np.flatnonzero(b['weights'][row])
    assert b['targets'][row, answers].tolist() == [pairs[k] for k in
                                                   b['inputs'][row, answers].tolist()]


def test_loss_weights_are_one_at_the_answers_only():
  b = _batch()
  np.testing.assert_array_equal(np.unique(b['weights']), [0.0, 1.0])
  np.testing.assert_array_equal(b['weights'].sum(1), N)
  assert np.all(b['targets'][b['weights'] == 0] == 0)
  assert np.all(b['targets'][b['weights'] == 1] >= V // 2)


def test_fillers_are_uniform_over_the_non_keys():
  task, rows = mqar.MQAR(32, 64, 4), 40_000
  b = task.batch(0, 0, rows)
  keys = b['inputs'][:, 0:8:2]
  filler = np.ones_like(b['weights'], bool)
  filler[:, :8] = False
  filler[b['weights'] == 1] = False
  per_row = filler.sum(1)
  assert np.all(per_row == 64 - 8 - 4)
  is_key = (np.arange(32)[None, :, None] == keys[:, None, :]).any(-1)  # [b, V]
  assert not np.any(is_key[np.arange(rows)[:, None], b['inputs']] & filler)
  counts = np.bincount(b['inputs'][filler], minlength=32)
  expected = ((~is_key) * (per_row / (32 - 4))[:, None]).sum(0)  # ~74k each: 1 sd ~ 0.4%
  np.testing.assert_allclose(counts / expected, 1, atol=0.02)


def test_query_gaps_follow_the_power_law_drawn_without_replacement():
  """Ordered pairs of gaps (first and second key) against the exact law of a sequential draw
  without replacement: P(g0 = i, g1 = j) = p_i p_j / (1 - p_i), p_g ∝ (g + 1)^(a - 1)."""
  a, slots = 0.3, 4
  task = mqar.MQAR(64, 2 * 2 + 2 * slots, 2, power_a=a)
  b = task.batch(0, 0, 40_000)
  gap = lambda key: (np.argmax(b['inputs'][:, 4:] == key[:, None], axis=1)) // 2
  g0, g1 = gap(b['inputs'][:, 0]), gap(b['inputs'][:, 2])
  p = np.arange(1, slots + 1) ** (a - 1.0)
  p /= p.sum()
  for i, j in itertools.permutations(range(slots), 2):
    exact = p[i] * p[j] / (1 - p[i])
    assert abs(np.mean((g0 == i) & (g1 == j)) - exact) < 0.01, (i, j)
  # power_a = 1: every slot equally likely.
  uniform = mqar.MQAR(64, 40, 4, power_a=1.0).batch(0, 0, 20_000)
  positions = np.flatnonzero(uniform['weights'].sum(0))
  np.testing.assert_array_equal(positions, np.arange(8, 40, 2))
  np.testing.assert_allclose(uniform['weights'].sum(0)[positions] / 20_000, 4 / 16, atol=0.015)


def test_small_power_a_puts_queries_near_the_context():
  b = mqar.MQAR(256, 256, 16, power_a=0.01).batch(0, 0, 500)
  positions = np.flatnonzero(b['weights'].ravel()) % 256
  assert np.median(positions) < 2 * 16 + 0.25 * (256 - 2 * 16)


def test_a_function_of_seed_step_and_stream():
  same = lambda x, y: all(np.array_equal(x[k], y[k]) for k in x)
  assert same(_batch(seed=3, step=7), _batch(seed=3, step=7))
  assert not same(_batch(seed=3, step=7), _batch(seed=3, step=8))
  assert not same(_batch(seed=3, step=7), _batch(seed=4, step=7))
  assert not same(_batch(seed=3, step=7), _batch(seed=3, step=7, stream=mqar.HELDOUT))
  held = mqar.MQAR(V, T, N).heldout(100, 64)
  assert [len(h['inputs']) for h in held] == [64, 36]
  train_rows = {r.tobytes() for step in range(4) for r in _batch(64, step=step)['inputs']}
  assert not any(r.tobytes() in train_rows for h in held for r in h['inputs'])


def test_sampler_splits_one_global_batch_into_microbatches_and_rows():
  task = mqar.MQAR(V, T, N)
  whole = task.batch(5, 9, 8)
  micro = mqar.Sampler(task, 8, seed=5, accum=2)[9]
  halves = [mqar.Sampler(task, 8, 5, accum=2, rows=slice(2 * p, 2 * p + 2))[9] for p in (0, 1)]
  for k, x in whole.items():
    assert micro[k].shape == (2, 4, T)
    np.testing.assert_array_equal(micro[k].reshape(8, T), x)
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves], axis=1), micro[k])


@pytest.mark.parametrize('args, message', [
    (dict(vocab_size=64, seq_len=31, num_kv_pairs=8), 'seq_len=31'),
    (dict(vocab_size=8, seq_len=64, num_kv_pairs=8), 'raise model.vocab_size'),
    (dict(vocab_size=64, seq_len=64, num_kv_pairs=4, power_a=0.0), 'power_a'),
])
def test_impossible_tasks_are_clear_errors(args, message):
  with pytest.raises(mqar.MQARError, match=message):
    mqar.MQAR(**args)


# Learnability: vocabulary 16 (8 keys, 8 values: chance 1/8), 4 pairs in 16 tokens. With these
# settings seeds 0-4 passed 0.9 held-out recall after 125-225 steps (phase transition).
LEARN = mqar.MQAR(vocab_size=16, seq_len=16, num_kv_pairs=4)
LEARN_STEPS, LEARN_BATCH = 250, 64


def _train_and_score(steps=LEARN_STEPS) -> dict:
  """A 2-layer, d_model 64 MHA model trained with the trainer's optimizer; held-out recall.
  The einsum path on every platform: its mask is attention_op.causal_mask, which the no-context
  control below replaces (fused attention masks inside its kernel)."""
  cfg = ModelConfig(vocab_size=LEARN.vocab_size, d_model=64, n_layers=2, n_heads=4,
                    max_seq_len=LEARN.seq_len, attention_impl='einsum')
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  opt_cfg = base.get_config().opt
  opt_cfg.update(lr=5e-3, warmup_steps=50)
  opt = nnx.Optimizer(model, training.optimizer(opt_cfg, steps), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    def loss(m):
      s = mqar.scores(m(batch['inputs']), batch['targets'], batch['weights'])
      return s['nll'] / s['answers']
    opt.update(model, nnx.grad(loss)(model))

  for i in range(steps):
    step(model, opt, LEARN.batch(0, i, LEARN_BATCH))
  return mqar.evaluate(model, LEARN.heldout(1024, 1024))


@pytest.mark.slow
def test_attention_learns_mqar():
  result = _train_and_score()
  assert result['answers'] == 4 * 1024
  assert result['accuracy'] > 0.9, result


@pytest.mark.slow
def test_a_model_that_cannot_see_the_context_stays_at_chance(monkeypatch):
  """The same model and training with attention masked to the diagonal (each token sees only
  itself): the value of a key is then unknowable, and recall stays near 2 / V."""
  diagonal = lambda q_bt, k_bs: k_bs[:, None, :] == q_bt[:, :, None]
  monkeypatch.setattr(attention_op, 'causal_mask', diagonal)  # the einsum path's mask
  monkeypatch.setattr(attention, 'causal_mask', diagonal)
  result = _train_and_score()
  chance = 2 / LEARN.vocab_size
  assert result['accuracy'] < 1.5 * chance, result
  assert result['loss'] > 0.9 * np.log(LEARN.vocab_size / 2), result
