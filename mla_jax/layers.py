"""Building blocks: parameters with logical axis names, the dense product every projection
uses, RMSNorm, SwiGLU MLP, token embedding.

Shape letters (used in every einsum of the package): b batch, t query position, s key position,
d model width, f MLP width, V vocabulary, h query heads, g KV-head groups, p query heads per
group, k head dim (MHA/GQA), n / r / v MLA nope / rope / value head dims, c KV latent
(kv_lora_rank), q query latent (q_lora_rank), i / j / u TPA's query / key / value ranks,
e a generic contracted feature dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.config import ModelConfig
from mla_jax.sharding import constrain


def weight(rngs: nnx.Rngs, cfg: ModelConfig, shape: tuple[int, ...], axes: tuple[str, ...],
           fan_in: int, scale: float = 1.0) -> nnx.Param:
  """A normal(0, scale / sqrt(fan_in)) parameter tagged with its logical axis names.

  The names (embed, vocab, heads, kv_heads, head_dim, mlp, q_lora, kv_lora) are what the
  sharding rules map onto a device mesh.
  """
  assert len(shape) == len(axes), (shape, axes)
  std = scale / math.sqrt(fan_in)
  value = std * jax.random.normal(rngs.params(), shape, jnp.dtype(cfg.param_dtype))
  return nnx.Param(value, axes=axes)


def dense(x, w, n_in: int = 1, out_dtype=None):
  """x [..., *in] . w [*in, *out] -> [..., *out]: a projection by a weight, contracting the
  last n_in axes of x with the first n_in of w (every linear layer of the model).

  The einsum's product with the token axes flattened into one, [b * t, in] . [in, out], which
  XLA:CPU's dots take without transposing an operand (docs/design.md#7-training); the results
  are the einsum's to float32 rounding, and the SwiGLU MLP's bit for bit.
  """
  k = math.prod(w.shape[:n_in])
  assert x.shape[x.ndim - n_in:] == w.shape[:n_in], (x.shape, w.shape)
  y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=out_dtype)
  return y.reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 (Zhang & Sennrich 2019), over the last axis.

  dim may be a shape, (heads, width) with axis names to match: one norm per head, each with
  its own scale (GLA's latent heads)."""

  def __init__(self, dim: int | tuple[int, ...], cfg: ModelConfig,
               axis: str | tuple[str, ...] = 'embed'):
    self.eps = cfg.norm_eps
    shape, axes = (dim, axis) if isinstance(dim, tuple) else ((dim,), (axis,))
    self.scale = nnx.Param(jnp.ones(shape, jnp.dtype(cfg.param_dtype)), axes=axes)

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    scale = jnp.expand_dims(scale, tuple(range(x.ndim - scale.ndim)))
    return (y * scale).astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU feed-forward (Shazeer 2020): (silu(x W_gate) * x W_up) W_down; d_ff None: the
  config's (MoE's shared experts are one MLP of their own width)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, d_ff: int | None = None):
    d, f = cfg.d_model, cfg.d_ff if d_ff is None else d_ff
    self.dtype = cfg.compute_dtype
    self.w_gate = weight(rngs, cfg, (d, f), ('embed', 'mlp'), fan_in=d)
    self.w_up = weight(rngs, cfg, (d, f), ('embed', 'mlp'), fan_in=d)
    self.w_down = weight(rngs, cfg, (f, d), ('mlp', 'embed'), fan_in=f)

  def __call__(self, x_btd):
    w = lambda p: p[...].astype(self.dtype)
    hidden = ('batch', None, 'mlp')  # split over tensor like the weights' f
    gate = constrain(dense(x_btd, w(self.w_gate)), hidden)
    up = constrain(dense(x_btd, w(self.w_up)), hidden)
    return dense(jax.nn.silu(gate) * up, w(self.w_down))


class Embed(nnx.Module):
  """Token embedding; `attend` reuses the table as the output head when embeddings are tied."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.dtype = cfg.compute_dtype
    self.table = weight(rngs, cfg, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'),
                        fan_in=cfg.d_model)

  def __call__(self, tokens_bt):
    # The lookup reads the whole table: gather it first, so the partitioner does not try to
    # move a gather result from the table's layout to the batch's (a full rematerialization).
    table = constrain(self.table[...], (None, None))
    return jnp.take(table, tokens_bt, axis=0).astype(self.dtype)

  def attend(self, x_btd):
    return dense(x_btd, self.table[...].astype(self.dtype).T, out_dtype=jnp.float32)
