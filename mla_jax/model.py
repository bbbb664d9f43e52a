"""Decoder-only, pre-RMSNorm transformer over any attention variant.

block(x) = x + Attn(RMSNorm(x)); then x + SwiGLU(RMSNorm(x)), or x + MoE(RMSNorm(x)) in the
layers a DeepSeekMoE config makes MoE (ModelConfig.is_moe_layer, mla_jax.moe). Final RMSNorm,
then the LM head (or the tied embedding). Logits are float32 whatever the compute dtype. The
attention kernels are chosen once, when the model is built (Transformer.op, mla_jax.attention_op).
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from mla_jax import attention_op, variants
from mla_jax.cache import check_dtype, storage_dtype
from mla_jax.config import ModelConfig
from mla_jax.errors import check_token_ids
from mla_jax.layers import MLP, Embed, RMSNorm, dense, weight
from mla_jax.moe import MoE
from mla_jax.sharding import constrain

# Between blocks the residual stream is split by batch and whole along d_model (under fsdp the
# weights are gathered, not the activations scattered).
RESIDUAL = ('batch', None, None)


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, op: attention_op.AttentionOp, rngs: nnx.Rngs,
               layer: int = 0):
    self.attn_norm = RMSNorm(cfg.d_model, cfg)
    self.attn = variants.get(cfg.attention).module_class()(cfg, rngs, op)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg)
    self.mlp = MoE(cfg, rngs) if cfg.is_moe_layer(layer) else MLP(cfg, rngs)

  def __call__(self, x_btd, positions_bt, cache=None):
    with jax.named_scope('attention'):
      a, cache = self.attn(self.attn_norm(x_btd), positions_bt, cache)
    x_btd = x_btd + a
    with jax.named_scope('mlp'):
      return x_btd + self.mlp(self.mlp_norm(x_btd)), cache


class Transformer(nnx.Module):
  """`model(tokens)` -> float32 logits [b, t, V]; `forward` + `logits` for cached decoding.

  op: the attention kernels (attention_op.AttentionOp); None resolves cfg.attention_impl for
  the platform of `mesh` (None: the mesh set with jax.set_mesh, else one default device).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
               op: attention_op.AttentionOp | None = None, mesh=None):
    self.cfg = cfg
    self.op = attention_op.resolve(cfg, mesh) if op is None else op
    self.embed = Embed(cfg, rngs)
    self.blocks = nnx.List([Block(cfg, self.op, rngs, i) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg)
    if not cfg.tie_embeddings:
      self.lm_head = weight(rngs, cfg, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'),
                            fan_in=cfg.d_model)

  def __call__(self, tokens_bt, positions_bt=None):
    """positions_bt None: each row is a whole sequence at positions 0 .. t - 1."""
    if not isinstance(tokens_bt, jax.core.Tracer):  # eager call: check the ids (under jit the
      # caller's edge does it on the host)
      check_token_ids(tokens_bt, self.cfg.vocab_size, shape='[batch, time]')
    h, _ = self.forward(tokens_bt, positions_bt)
    return self.logits(h)

  def forward(self, tokens_bt, positions_bt=None, caches=None):
    """Final normed hidden states [b, t, d] and the updated layer caches (if given)."""
    chex.assert_rank(tokens_bt, 2)
    if positions_bt is not None:
      chex.assert_equal_shape([tokens_bt, positions_bt])
    x = constrain(self.embed(tokens_bt), RESIDUAL)
    new_caches = []
    for i, block in enumerate(self.blocks):
      with jax.named_scope(f'block{i}'):
        x, cache = block(x, positions_bt, None if caches is None else caches[i])
      x = constrain(x, RESIDUAL)
      new_caches.append(cache)
    return self.final_norm(x), (None if caches is None else new_caches)

  @jax.named_scope('logits')
  def logits(self, h_btd):
    if self.cfg.tie_embeddings:
      return self.embed.attend(h_btd)
    return dense(h_btd, self.lm_head[...].astype(h_btd.dtype), out_dtype=jnp.float32)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> list:
    """Per-layer caches as the decode loop allocates them: in cfg.cache_dtype (default: the
    compute dtype; 'int8' / 'float8_e4m3fn' give 8-bit caches with per-token scales), or in
    the float `dtype` given. An 8-bit dtype given here is refused: it would have no scales."""
    if dtype is None:
      dtype = storage_dtype(self.cfg)
    else:
      check_dtype(dtype)
    return [block.attn.init_cache(batch_size, max_len, dtype) for block in self.blocks]


def abstract(cfg: ModelConfig, op: attention_op.AttentionOp | None = None):
  """(graphdef, abstract state) of a Transformer: shapes and dtypes, nothing allocated."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), op=op)))


def param_shapes(cfg: ModelConfig) -> dict[tuple, tuple[int, ...]]:
  """{parameter path: shape}, e.g. ('blocks', 0, 'attn', 'w_uk'): (c, h, n)."""
  return {path: tuple(x.shape) for path, x in
          traverse_util.flatten_dict(nnx.to_pure_dict(abstract(cfg)[1])).items()}


def param_count(cfg: ModelConfig) -> int:
  """Number of parameters, from shapes alone (nothing is allocated)."""
  return sum(math.prod(shape) for shape in param_shapes(cfg).values())


def active_param_count(cfg: ModelConfig) -> int:
  """Parameters a token passes through: a MoE layer's routed experts (stacked [E, ...]) count
  K / E of theirs; everything else whole (= param_count for a dense model)."""
  total = 0
  for path, shape in param_shapes(cfg).items():
    routed = path[-1] in ('w_gate', 'w_up', 'w_down') and len(shape) == 3
    n = math.prod(shape)
    total += n * cfg.num_experts_per_tok // cfg.n_routed_experts if routed else n
  return total


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """A train step's flops per token, what MFU counts: 6 N + 12 L T d, the matmuls of forward
  and backward (N: the parameters a token passes through, active_param_count, less the
  embedding table, a lookup) and attention's scores and values over seq_len keys."""
  embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  return 6 * (active_param_count(cfg) - embedding) + 12 * cfg.n_layers * seq_len * cfg.d_model


def with_params(cfg: ModelConfig, params: dict,
                op: attention_op.AttentionOp | None = None) -> Transformer:
  """A Transformer of cfg holding `params`, a nested dict as nnx.to_pure_dict gives (of every
  variable: an MoE's router bias too)."""
  graphdef, state = abstract(cfg, op)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def with_config(model: Transformer, op: attention_op.AttentionOp | None = None,
                **changes) -> Transformer:
  """The same parameters under a changed config: another mla_decode path, compute dtype,
  attention_impl or rope layout (the parameter shapes must not change); its kernels resolved
  anew, or `op`."""
  return with_params(dataclasses.replace(model.cfg, **changes),
                     nnx.to_pure_dict(nnx.state(model)), op)
