"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology", arXiv 2312.04927, sec. 3).

A sequence of seq_len tokens over a vocabulary of vocab_size (V):

  k_1 v_1 k_2 v_2 ... k_N v_N | x x k_3 x k_1 x x x k_N x ...
  <- 2 N tokens of context -> | <- queries at even offsets, random fillers elsewhere ->

  keys      N = num_kv_pairs distinct tokens of the first half of the vocabulary, [0, V/2)
  values    N distinct tokens of the second half, [V/2, V), in random order
  queries   every key once, at position 2 N + 2 g, where the gap g in [0, S),
            S = (seq_len - 2 N) // 2, is drawn without replacement with P(g) ∝ (g + 1)^(power_a
            - 1): a small power_a puts most queries close to the context (Zoology's "power law
            of gaps between repeated bigrams"); power_a = 1 is uniform
  answers   at a query's own position the target is its key's value: the model reads k_i and
            must say v_i, which it saw only in the context
  fillers   every other position holds a token drawn uniformly from the vocabulary minus this
            example's keys (values may repeat there); the target there is 0, weight 0

`batch(...)` returns int32 inputs [b, T], int32 targets [b, T] and float32 weights [b, T],
1 exactly at the N answer positions of each example. The loss is the weighted mean of the
cross-entropy; recall accuracy is exact match (argmax) at the answer positions. Chance for a
model that cannot see the context is 2 / V (the values are a random draw from V / 2 tokens).

The batch is a pure function of (seed, step, stream): a numpy Generator seeded with that
triple, so training data can be drawn at any step in any order (resumption, prefetching), and
the held-out stream (HELDOUT) never yields a training batch.

Differences from Zoology's `multiquery_ar` (same distribution otherwise):
  - Zoology reserves token 0 as a placeholder (keys from [1, V/2)); here keys use all of
    [0, V/2).
  - Zoology's fillers are uniform over the whole vocabulary, so a filler can repeat one of the
    example's keys without a target; here fillers never do, so each key occurs exactly twice
    (context and query), which the tests check.
  - The gaps are a Gumbel top-N draw (the ordered sample has the law of numpy's sequential
    draw without replacement that Zoology uses, and needs no per-example loop); as in Zoology,
    the i-th draw goes to the i-th context pair.
  - No num_passes (JRT repetition of the context) and no -100 labels: weights mark the answers.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mla_jax import sharding
from mla_jax.errors import InputError

TRAIN, HELDOUT = 1, 2  # stream ids (the text sampler's stream is 0)


class MQARError(InputError):
  """MQAR parameters that cannot make an example; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class MQAR:
  """One MQAR task: vocab_size, seq_len, num_kv_pairs and power_a, as in the module docstring."""

  vocab_size: int
  seq_len: int
  num_kv_pairs: int
  power_a: float = 0.01

  def __post_init__(self):
    v, t, n = self.vocab_size, self.seq_len, self.num_kv_pairs
    if n < 1 or 4 * n > t:
      raise MQARError(f'num_kv_pairs={n} needs 1 <= 4 * num_kv_pairs <= seq_len={t} (context '
                      'and one query slot per key); lower num_kv_pairs or raise seq_len')
    if v // 2 < n:
      raise MQARError(f'vocab_size={v} has {v // 2} keys, fewer than num_kv_pairs={n}; raise '
                      'model.vocab_size')
    if not self.power_a > 0:
      raise MQARError(f'power_a={self.power_a} must be > 0 (1 = uniform query gaps)')

  @property
  def gap_slots(self) -> int:
    return (self.seq_len - 2 * self.num_kv_pairs) // 2

  @functools.cached_property
  def _log_gap_weights(self) -> np.ndarray:
    return (self.power_a - 1) * np.log(np.arange(1, self.gap_slots + 1))

  def batch(self, seed: int, step: int, batch_size: int, stream: int = TRAIN) -> dict:
    """{'inputs', 'targets', 'weights'}, each [batch_size, seq_len], for (seed, step, stream)."""
    rng = np.random.default_rng([seed, int(step), stream])
    b, t, n, half = batch_size, self.seq_len, self.num_kv_pairs, self.vocab_size // 2
    keys_bn = _distinct(rng, b, half, n)
    values_bn = half + _distinct(rng, b, self.vocab_size - half, n)
    # Gumbel top-n: the ordered n largest of log p + Gumbel noise are a draw without
    # replacement from p, first draw first.
    gumbel = self._log_gap_weights + rng.gumbel(size=(b, self.gap_slots))
    gaps_bn = np.argsort(-gumbel, axis=1, kind='stable')[:, :n]
    queries_bn = 2 * n + 2 * gaps_bn
    rows = np.arange(b)[:, None]
    inputs = _fillers(rng, np.sort(keys_bn, axis=1), (b, t), self.vocab_size)
    inputs[:, 0:2 * n:2] = keys_bn
    inputs[:, 1:2 * n:2] = values_bn
    inputs[rows, queries_bn] = keys_bn
    targets = np.zeros((b, t), np.int32)
    targets[rows, queries_bn] = values_bn
    weights = np.zeros((b, t), np.float32)
    weights[rows, queries_bn] = 1.0
    return {'inputs': inputs, 'targets': targets, 'weights': weights}

  def heldout(self, examples: int, batch_size: int, seed: int = 0) -> list[dict]:
    """A fixed evaluation set: ceil(examples / batch_size) batches of the HELDOUT stream, the
    last one cut to `examples` in all."""
    out, left, step = [], examples, 0
    while left > 0:
      b = self.batch(seed, step, batch_size, HELDOUT)
      out.append({k: x[:left] for k, x in b.items()})
      left, step = left - batch_size, step + 1
    return out


def _distinct(rng: np.random.Generator, b: int, pool: int, n: int) -> np.ndarray:
  """[b, n] int32: per row, n distinct tokens of [0, pool) in uniformly random order.

  The n smallest of `pool` uniforms are a uniform n-subset (a partition, not a sort, of the
  pool); a second draw shuffles them.
  """
  subset_bn = np.argpartition(rng.random((b, pool)), n - 1, axis=1)[:, :n]
  order_bn = np.argsort(rng.random((b, n)), axis=1)
  return np.take_along_axis(subset_bn, order_bn, axis=1).astype(np.int32)


def _fillers(rng, sorted_keys_bn, shape, vocab_size: int) -> np.ndarray:
  """int32 tokens uniform over [0, vocab_size) minus each row's keys.

  r in [0, V - n) is mapped to the r-th token that is not a key: r + #{j : key_j - j <= r}
  (key_j - j counts the non-keys below key_j).
  """
  n = sorted_keys_bn.shape[1]
  r_bt = rng.integers(0, vocab_size - n, size=shape)
  below_bn = sorted_keys_bn - np.arange(n)
  return (r_bt + (below_bn[:, None, :] <= r_bt[:, :, None]).sum(-1)).astype(np.int32)


class Sampler:
  """Training batch for step k: one global draw of `batch` examples from (seed, k), split into
  `accum` microbatches, of which a process keeps its `rows` (as data.WindowSampler does)."""

  def __init__(self, task: MQAR, batch: int, seed: int, accum: int = 1,
               rows: slice = slice(None)):
    self.task, self.batch, self.seed, self.accum, self.rows = task, batch, seed, accum, rows

  def __len__(self):
    return 2**62

  def __getitem__(self, step: int) -> dict:
    """{'inputs', 'targets', 'weights'}, each [accum, this process's rows, seq_len]."""
    whole = self.task.batch(self.seed, step, self.batch, TRAIN)
    return {k: x.reshape(self.accum, -1, x.shape[-1])[:, self.rows] for k, x in whole.items()}


def scores(logits_btV, targets_bt, weights_bt) -> dict:
  """Sums over a batch: weighted cross-entropy, weighted exact matches, and the weight."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits_btV, targets_bt)
  hit = (jnp.argmax(logits_btV, -1) == targets_bt).astype(jnp.float32)
  return {'nll': jnp.sum(nll * weights_bt), 'hits': jnp.sum(hit * weights_bt),
          'answers': jnp.sum(weights_bt)}


# As perplexity.eval_step: parameters and batches arrive placed, the sums leave replicated.
@functools.partial(jax.jit, static_argnames=('graphdef',),
                   out_shardings=jax.sharding.PartitionSpec())
def _eval_step(graphdef, state, batch):
  logits = nnx.merge(graphdef, state)(batch['inputs'])
  return scores(logits, batch['targets'], batch['weights'])


def evaluate(model, batches: list[dict], mesh: jax.sharding.Mesh | None = None) -> dict:
  """Recall accuracy (exact match at the answer positions) and loss (mean NLL there) of a
  model over held-out batches, summed in float64 on the host.

  Batches are split over the mesh's batch axes (default: data parallel over every device);
  each process feeds its rows. A short last batch is padded with weight-0 rows, so one
  program serves every batch.
  """
  mesh = mesh or sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  shape = batches[0]['inputs'].shape
  layout = sharding.named_sharding(mesh, ('batch', None), shape)
  rows = sharding.local_rows(layout, shape, axis=0)
  total = {'nll': 0.0, 'hits': 0.0, 'answers': 0.0}
  with jax.set_mesh(mesh):
    for batch in batches:
      pad = shape[0] - len(batch['inputs'])
      placed = {k: sharding.global_batch(np.pad(x, ((0, pad), (0, 0)))[rows], layout, shape)
                for k, x in batch.items()}
      for key, value in jax.device_get(_eval_step(graphdef, state, placed)).items():
        total[key] += float(value)
  answers = total['answers']
  return {'loss': total['nll'] / answers, 'accuracy': total['hits'] / answers,
          'answers': int(answers)}
