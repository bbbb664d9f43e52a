"""DeepSeekMoE (Dai et al. 2024; DeepSeek-V2 and V3): shared experts every token goes through,
plus routed experts of which a gate picks num_experts_per_tok per token
(docs/design.md#11-deepseekmoe).

Shape letters, beside layers.py's: N tokens (b * t flattened), E routed experts, K experts
chosen per token, J expert groups (n_group), f an expert's SwiGLU width. The gate reproduces
transformers' DeepseekV2TopkRouter / DeepseekV3TopkRouter; the routed experts run dropless
(every token reaches all K of its experts, whatever the load) over the tokens sorted by expert,
as one grouped matmul (jax.lax.ragged_dot: GPUs and TPUs) or in blocks of rows with their
expert's weights (a CPU), or, as the reference, every expert on every token.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import platform, sharding
from mla_jax.config import ModelConfig
from mla_jax.layers import MLP, dense, weight


class RouterBias(nnx.Variable):
  """V3's e_score_correction_bias: shifts which experts are chosen, never the weights, so it
  has no gradient; it is not an nnx.Param, so optimizers over nnx.Param leave it alone (DeepSeek
  adjusts it from the experts' loads, outside the gradient step)."""


# The routing statistics of the MoE layers a forward pass runs, in layer order, while `collect`
# is open; None otherwise. A trace-time list, not nnx state: collecting adds no variable to the
# model, so its graph (and decode, evaluate, checkpoints) is the same whether or not a train
# step collects, and a dense model's step is unchanged.
_COLLECTED: list | None = None


@contextlib.contextmanager
def collect():
  """Within: every MoE call appends its routing statistics (`routing_stats`) to the list this
  yields, as arrays of the computation being traced."""
  global _COLLECTED
  outer, _COLLECTED = _COLLECTED, []
  try:
    yield _COLLECTED
  finally:
    _COLLECTED = outer


def routing_stats(scores_NE, experts_NK, cfg: ModelConfig, seq_len: int) -> dict:
  """What training needs from one MoE layer's gate over N = b * seq_len tokens, all float32:

  counts [E]: (token, expert) assignments per expert (V3's bias update and the load metrics);
  entropy: mean over tokens of the entropy of the token's normalised scores (nats);
  aux: DeepSeek-V2's expert-level balance loss before alpha, E * sum_i f_i P_i with f_i the
    fraction of the N * K assignments that chose expert i and P_i the mean normalised score of
    expert i over the N tokens (V2 eq. 23-25: (E / (K T)) sum_t 1(i chosen) = E f_i);
  seq_aux: V3's sequence-wise balance loss before alpha, the same over each sequence's tokens,
    averaged over the b sequences (V3 eq. 17-20).
  f has no gradient (counts of discrete choices); the loss reaches the router through P.
  """
  n, e = scores_NE.shape
  k = experts_NK.shape[1]
  # softmax scores sum to 1 already (divided anyway, V3's s' = s / sum s for sigmoid scores).
  probs_NE = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
  chosen_NE = jnp.sum(jax.nn.one_hot(experts_NK, e, dtype=jnp.float32), axis=1)
  counts_E = jnp.sum(chosen_NE, axis=0)
  aux = e * jnp.sum(counts_E / (n * k) * jnp.mean(probs_NE, axis=0))
  b = n // seq_len
  f_bE = jnp.sum(chosen_NE.reshape(b, seq_len, e), axis=1) / (seq_len * k)
  seq_aux = e * jnp.mean(jnp.sum(f_bE * jnp.mean(probs_NE.reshape(b, seq_len, e), axis=1),
                                 axis=-1))
  entropy = -jnp.mean(jnp.sum(probs_NE * jnp.log(jnp.maximum(probs_NE, 1e-30)), axis=-1))
  return {'counts': jax.lax.stop_gradient(counts_E), 'entropy': jax.lax.stop_gradient(entropy),
          'aux': aux, 'seq_aux': seq_aux}


def balanced_bias(bias_E, counts_E, speed: float):
  """DeepSeek-V3 §2.1.2's auxiliary-loss-free step: each expert's bias moves by `speed`,
  up if it took fewer assignments than the mean, down if more (0 at the mean)."""
  return bias_E + speed * jnp.sign(jnp.mean(counts_E) - counts_E)


def scores(logits_NE, cfg: ModelConfig):
  """The gate's affinities [N, E] float32: softmax (V2) or sigmoid (V3) of the logits."""
  logits_NE = logits_NE.astype(jnp.float32)
  if cfg.scoring_func == 'softmax':
    return jax.nn.softmax(logits_NE, axis=-1)
  return jax.nn.sigmoid(logits_NE)


def route(logits_NE, bias_E, cfg: ModelConfig):
  """(weights [N, K] float32, experts [N, K] int32): transformers' DeepSeek gates.

  softmax scores with 'greedy' (top-k) or 'group_limited_greedy' (a group scores its best expert;
  the other groups' scores set to 0 before the top-k, as transformers does); sigmoid scores with
  'noaux_tc' (choices by scores + bias, a group by the sum of its top-2, the other groups' set
  to -inf; the weights are the unbiased scores). Then norm_topk_prob: weights / (sum + 1e-20);
  then * routed_scaling_factor. Ties go to the lower expert index (jax.lax.top_k's rule).
  """
  n, e = logits_NE.shape
  j = cfg.n_group
  scores_NE = scores(logits_NE, cfg)
  noaux = cfg.topk_method == 'noaux_tc'
  choice_NE = scores_NE + bias_E.astype(jnp.float32)[None] if noaux else scores_NE
  if cfg.topk_method != 'greedy':
    grouped_NJe = choice_NE.reshape(n, j, e // j)
    if noaux:
      group_NJ = jnp.sum(jax.lax.top_k(grouped_NJe, 2)[0], axis=-1)
    else:
      group_NJ = jnp.max(grouped_NJe, axis=-1)
    kept = jax.lax.top_k(group_NJ, cfg.topk_group)[1]  # [N, topk_group]
    keep_NJ = jnp.any(kept[:, :, None] == jnp.arange(j)[None, None], axis=1)
    keep_NE = jnp.repeat(keep_NJ, e // j, axis=1)
    choice_NE = jnp.where(keep_NE, choice_NE, -jnp.inf if noaux else 0.0)
  _, experts_NK = jax.lax.top_k(choice_NE, cfg.num_experts_per_tok)
  # V2 gathers from its masked scores (equal to the scores wherever top-k can land but on an
  # underflowed 0); V3 from the unbiased scores.
  weights_NK = jnp.take_along_axis(scores_NE if noaux else choice_NE, experts_NK, axis=-1)
  if cfg.norm_topk_prob:
    weights_NK = weights_NK / (jnp.sum(weights_NK, axis=-1, keepdims=True) + 1e-20)
  return weights_NK * cfg.routed_scaling_factor, experts_NK.astype(jnp.int32)


def _sort_rows(experts_NK, e: int):
  """The dropless paths' order: (order_R, the (token, k) row at each place of the N * K rows
  sorted by expert, stably; sizes_E, each expert's rows, an index >= e counted in none)."""
  flat_R = experts_NK.reshape(-1)
  return jnp.argsort(flat_R, stable=True), jnp.bincount(flat_R, length=e)


def _combine_rows(y_Rd, order_R, weights_NK):
  """The expert outputs of the sorted rows put back in (token, k) order and summed with their
  weights, in float32: [N, d]."""
  n, k = weights_NK.shape
  y_NKd = jnp.take(y_Rd, jnp.argsort(order_R), axis=0).reshape(n, k, -1)
  return jnp.einsum('NKd,NK->Nd', y_NKd.astype(jnp.float32), weights_NK)


def experts_ragged(x_Nd, weights_NK, experts_NK, w_gate_Edf, w_up_Edf, w_down_Efd):
  """Dropless: the N * K (token, expert) rows sorted by expert, each expert's SwiGLU over its
  contiguous rows by one ragged_dot per projection, the rows put back in (token, k) order and
  summed with their weights. Rows per expert can be anything from 0 to N."""
  k = experts_NK.shape[1]
  order_R, sizes_E = _sort_rows(experts_NK, w_gate_Edf.shape[0])
  sizes_E = sizes_E.astype(jnp.int32)
  x_Rd = jnp.take(x_Nd, order_R // k, axis=0)  # R = N * K rows, grouped by expert
  gate_Rf = jax.lax.ragged_dot(x_Rd, w_gate_Edf, sizes_E)
  up_Rf = jax.lax.ragged_dot(x_Rd, w_up_Edf, sizes_E)
  y_Rd = jax.lax.ragged_dot(jax.nn.silu(gate_Rf) * up_Rf, w_down_Efd, sizes_E)
  return _combine_rows(y_Rd, order_R, weights_NK)


def block_rows(rows: int, experts: int) -> int:
  """experts_blocked's rows per block: the power of two nearest a quarter of the mean rows per
  expert, within [64, 512], so that padding (under one block an expert) stays near a quarter
  of the rows while each block's matmul stays large. Measured on the 2-core CPU, one MoE layer
  forward and backward at 8192 tokens, E 16, K 4, d 256, f 128: blocks of 64, 128, 256, 512
  and 1024 rows took 1.17, 0.80, 0.69-0.74, 0.66-0.70 and 0.73-0.76 s (every expert on every
  token: 2.75-2.92 s)."""
  target = max(rows / (4 * experts), 1.0)
  return int(min(512, max(64, 2 ** round(math.log2(target)))))


def block_count(rows: int, experts: int, block: int) -> int:
  """experts_blocked's static number of blocks: enough for any split of `rows` rows among
  `experts` experts, each padded to whole blocks (under one block of padding per expert)."""
  return -(-(rows + experts * (block - 1)) // block)


def block_products(x_bmd, expert_b, w_gate_Edf, w_up_Edf, w_down_Efd):
  """Each block's SwiGLU with the weights of its expert (expert_b), as batched products."""
  at = lambda w: jnp.take(w, expert_b, axis=0)
  gate_bmf = jnp.einsum('bmd,bdf->bmf', x_bmd, at(w_gate_Edf))
  up_bmf = jnp.einsum('bmd,bdf->bmf', x_bmd, at(w_up_Edf))
  return jnp.einsum('bmf,bfd->bmd', jax.nn.silu(gate_bmf) * up_bmf, at(w_down_Efd))


def experts_blocked(x_Nd, weights_NK, experts_NK, w_gate_Edf, w_up_Edf, w_down_Efd,
                    block: int | None = None):
  """Dropless, as experts_ragged computes it, for a CPU, where ragged_dot lowers to every row
  against every expert's weights, masked (E times the expert FLOPs, K times the dense
  reference's). Here the rows sorted by expert are laid out in whole blocks of `block` rows
  (default: block_rows), each expert's rows padded to a multiple of it, and each block is one
  matmul with its own expert's weights: each row once, plus under one block an expert of
  padding. The shapes are static: the R = N * K rows need at most
  ceil((R + E (block - 1)) / block) blocks (block_count), and all of them are computed."""
  n, k = experts_NK.shape
  e, r = w_gate_Edf.shape[0], n * k
  block = block or block_rows(r, e)
  order_R, sizes_E = _sort_rows(experts_NK, e)  # rows of an expert >= E (another device's) drop
  expert_R = experts_NK.reshape(r)[order_R]
  padded_E = -(-sizes_E // block) * block
  end_slot_E = jnp.cumsum(padded_E)
  first_slot_E = end_slot_E - padded_E
  blocks = block_count(r, e, block)
  at = jnp.minimum(expert_R, e - 1)  # such rows sort last, so the others' places hold
  slot_R = jnp.where(expert_R < e, first_slot_E[at] + jnp.arange(r)
                     - (jnp.cumsum(sizes_E) - sizes_E)[at], blocks * block)  # past the end
  token_M = jnp.zeros((blocks * block,), jnp.int32).at[slot_R].set(order_R // k, mode='drop')
  used_M = jnp.zeros((blocks * block,), bool).at[slot_R].set(True, mode='drop')
  x_bmd = jnp.where(used_M[:, None], jnp.take(x_Nd, token_M, axis=0), 0).reshape(
      blocks, block, -1)
  # the expert of each block; the blocks past the last expert's are all padding (any expert)
  expert_b = jnp.minimum(jnp.searchsorted(end_slot_E, jnp.arange(blocks) * block, side='right'),
                         e - 1)
  y_bmd = block_products(x_bmd, expert_b, w_gate_Edf, w_up_Edf, w_down_Efd)
  y_Rd = jnp.take(y_bmd.reshape(blocks * block, -1), slot_R, axis=0, mode='fill',
                  fill_value=0)  # sorted order; 0 for the rows of experts >= E
  return _combine_rows(y_Rd, order_R, weights_NK)


def expert_compute(cfg: ModelConfig):
  """The experts' function of cfg.moe_impl; 'auto': blocks on a CPU (where ragged_dot is a
  masked dense product), ragged_dot on GPUs and TPUs (a grouped matmul there)."""
  impl = cfg.moe_impl
  if impl == 'auto':
    impl = 'blocked' if platform.current() == 'cpu' else 'ragged'
  return {'ragged': experts_ragged, 'blocked': experts_blocked, 'dense': experts_dense}[impl]


def experts_dense(x_Nd, weights_NK, experts_NK, w_gate_Edf, w_up_Edf, w_down_Efd):
  """The reference: every expert on every token, summed with the routing weights scattered to
  [N, E] (0 for the experts not chosen)."""
  e = w_gate_Edf.shape[0]
  combine_NE = jnp.einsum('NK,NKE->NE', weights_NK,
                          jax.nn.one_hot(experts_NK, e, dtype=jnp.float32))
  gate_NEf = jnp.einsum('Nd,Edf->NEf', x_Nd, w_gate_Edf)
  up_NEf = jnp.einsum('Nd,Edf->NEf', x_Nd, w_up_Edf)
  y_NEd = jnp.einsum('NEf,Efd->NEd', jax.nn.silu(gate_NEf) * up_NEf, w_down_Efd)
  return jnp.einsum('NEd,NE->Nd', y_NEd.astype(jnp.float32), combine_NE)


def experts_local(run, first, x_Md, weights_MK, experts_MK, w_gate_Edf, w_up_Edf, w_down_Efd):
  """`run` (experts_ragged, experts_blocked or experts_dense) over the experts first .. first +
  E' - 1 only, the E' of the weights given: the other (token, expert) choices weigh 0, and their
  rows (expert index E') fall outside every group (ragged_dot gives them 0), past the last
  block (experts_blocked) or outside the one-hot (the dense path)."""
  e = w_gate_Edf.shape[0]
  local_MK = (experts_MK >= first) & (experts_MK < first + e)
  return run(x_Md, jnp.where(local_MK, weights_MK, 0.0), jnp.where(local_MK, experts_MK - first, e),
             w_gate_Edf, w_up_Edf, w_down_Efd)


def _split_batch(b: int) -> bool:
  """Whether a mesh splits a batch of b sequences (the experts then run in `experts_sharded`):
  not without a mesh, on one device, inside `derived_collectives`, or when b does not divide (a
  decode batch of one: the derived collectives handle it)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or _DERIVED or not set(sharding.RULES['batch']) <= set(mesh.axis_names):
    return False
  ways = math.prod(mesh.shape[a] for a in sharding.RULES['batch'])
  return ways > 1 and b % ways == 0


def experts_sharded(run, x_btd, weights_btK, experts_btK, w_gate_Edf, w_up_Edf,
                    w_down_Efd):
  """The routed experts under a mesh, as shard_map: each device keeps its own tokens (split over
  the batch axes) and the E / n experts of its place on the expert axis (n its size).

  Tokens travel within the expert axis only: each device all-gathers its n neighbours' tokens
  and choices ([n * N', d], not the N' * K rows), runs its E / n experts over the rows that
  chose them, and a reduce-scatter sums each token's K expert outputs back onto the device that
  holds the token (float32). Every row stays: dropless, with static shapes, where an
  all-to-all of the rows would need a buffer per device pair sized for all of them (the ragged
  all-to-all that avoids it has no XLA:CPU lowering). With expert = 1 it is data parallelism:
  no collective on the tokens at all. The weights enter whole along 'embed' and 'mlp' (the
  gather fsdp does for every weight) and their gradients are summed over the batch axes."""
  expert_spec = jax.sharding.PartitionSpec('expert')
  tokens = jax.sharding.PartitionSpec(sharding.RULES['batch'])  # size-1 axes included

  def local(x_btd, weights_btK, experts_btK, w_gate_Edf, w_up_Edf, w_down_Efd):
    d, k = x_btd.shape[-1], weights_btK.shape[-1]
    gather = lambda a, width: jax.lax.all_gather(a.reshape(-1, width), 'expert', tiled=True)
    first = jax.lax.axis_index('expert') * w_gate_Edf.shape[0]
    y_Md = experts_local(run, first, gather(x_btd, d), gather(weights_btK, k),
                         gather(experts_btK, k), w_gate_Edf, w_up_Edf, w_down_Efd)
    y_Nd = jax.lax.psum_scatter(y_Md, 'expert', tiled=True)
    return y_Nd.reshape(x_btd.shape)

  return jax.shard_map(local, in_specs=(tokens,) * 3 + (expert_spec,) * 3, out_specs=tokens)(
      x_btd, weights_btK, experts_btK, w_gate_Edf, w_up_Edf, w_down_Efd)


# True inside `derived_collectives`: the experts run as single-device code under the mesh too,
# their tokens' travel left to the collectives XLA's SPMD partitioner derives (what a benchmark
# compares the shard_map path with).
_DERIVED = False


@contextlib.contextmanager
def derived_collectives():
  """Within (while tracing): MoE layers leave their tokens' travel to XLA, not shard_map."""
  global _DERIVED
  outer, _DERIVED = _DERIVED, True
  try:
    yield
  finally:
    _DERIVED = outer


class MoE(nnx.Module):
  """x [b, t, d] -> shared(x) + sum over the K chosen experts of weight * expert(x)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, e = cfg.d_model, cfg.moe_intermediate_size, cfg.n_routed_experts
    self.cfg = cfg
    self.dtype = cfg.compute_dtype
    # The router is float32 whatever param_dtype is (transformers keeps it so): near-ties
    # between experts decide routing, and bfloat16 logits would tie far more often.
    self.router = nnx.Param(jax.random.normal(rngs.params(), (d, e), jnp.float32) / math.sqrt(d),
                            axes=('embed', 'experts'))
    if cfg.topk_method == 'noaux_tc':
      self.e_score_correction_bias = RouterBias(jnp.zeros((e,), jnp.float32), axes=('experts',))
    self.w_gate = weight(rngs, cfg, (e, d, f), ('experts', 'embed', 'mlp'), fan_in=d)
    self.w_up = weight(rngs, cfg, (e, d, f), ('experts', 'embed', 'mlp'), fan_in=d)
    self.w_down = weight(rngs, cfg, (e, f, d), ('experts', 'mlp', 'embed'), fan_in=f)
    if cfg.n_shared_experts:
      self.shared = MLP(cfg, rngs, d_ff=cfg.n_shared_experts * f)

  def _route(self, x_btd):
    """(router logits [N, E], weights [N, K], experts [N, K]) for the b * t tokens of x."""
    x_Nd = x_btd.reshape(-1, x_btd.shape[-1]).astype(jnp.float32)
    logits_NE = dense(x_Nd, self.router[...], out_dtype=jnp.float32)
    bias_E = (self.e_score_correction_bias[...] if self.cfg.topk_method == 'noaux_tc'
              else jnp.zeros((self.cfg.n_routed_experts,), jnp.float32))
    return logits_NE, *route(logits_NE, bias_E, self.cfg)

  def gate(self, x_btd):
    """(weights [N, K], experts [N, K]) for the b * t tokens of x, row-major."""
    return self._route(x_btd)[1:]

  def __call__(self, x_btd):
    logits_NE, weights_NK, experts_NK = self._route(x_btd)
    if _COLLECTED is not None:  # a train step asks for the statistics of its balancing
      _COLLECTED.append(routing_stats(scores(logits_NE, self.cfg), experts_NK, self.cfg,
                                      x_btd.shape[1]))
    w = lambda p: p[...].astype(self.dtype)
    run = expert_compute(self.cfg)
    weights = (w(self.w_gate), w(self.w_up), w(self.w_down))
    if _split_batch(x_btd.shape[0]):
      b, t, k = (*x_btd.shape[:2], weights_NK.shape[-1])
      y_btd = experts_sharded(run, x_btd, weights_NK.reshape(b, t, k),
                              experts_NK.reshape(b, t, k), *weights).astype(x_btd.dtype)
    else:
      y_Nd = run(x_btd.reshape(-1, x_btd.shape[-1]), weights_NK, experts_NK, *weights)
      y_btd = y_Nd.astype(x_btd.dtype).reshape(x_btd.shape)
    if self.cfg.n_shared_experts:
      y_btd = y_btd + self.shared(x_btd)
    return y_btd
