"""Flash attention for whole sequences and prefill: the 'cudnn', 'xla' and 'splash' kernels
of mla_jax.attention_op, which decides between them when a model is built (`cudnn_takes`).

`flash_attention` computes softmax(q k^T * scale + mask) v through cuDNN's flash attention on
NVIDIA GPUs (bfloat16 / float16 inputs, head dims a multiple of 8 up to 256) or XLA's
jax.nn.dot_product_attention (on a CPU the same einsum-softmax-einsum as the reference path,
which is what makes the two comparable in tests).

Two things the public jax.nn.dot_product_attention does not do, handled here:
- MLA's value heads are narrower than its query/key heads (d_v < d_n + d_r). cuDNN >= 9.10 on
  Hopper accepts that directly (through jax's cuDNN module: the public wrapper checks equal
  widths); otherwise the narrower side is zero-padded (zeros add nothing to a dot product)
  and the padding sliced off the output.
- Deterministic GPU ops (XLA_FLAGS --xla_gpu_deterministic_ops=true, which train.deterministic
  sets): with that flag XLA asks cuDNN for its deterministic flash-attention backward, and on
  jax 0.11.2 the train step then fails to compile (an IndexError from XLA). Under the flag
  attention takes XLA's own kernel, which is deterministic.
- Masks are by position. `is_causal` aligns the query block with the top-left of the key block,
  which is right only for a whole sequence from position 0 (training): there cuDNN skips the
  masked blocks. Chunked prefill (queries at p0 .. p0 + t - 1 reading cache slots 0 .. s - 1)
  passes the explicit [b, t, s] mask instead.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from mla_jax import sharding

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
DETERMINISTIC_FLAG = '--xla_gpu_deterministic_ops=true'


def deterministic_gpu_ops() -> bool:
  """Whether XLA was asked for deterministic GPU ops (it reads XLA_FLAGS once, at start): the
  flag's last setting, bare or =true / =1 / =false / =0, as XLA parses it."""
  name = DETERMINISTIC_FLAG.split('=')[0]
  values = [f.partition('=')[2] for f in os.environ.get('XLA_FLAGS', '').split()
            if f.partition('=')[0] == name]
  return bool(values) and values[-1].lower() in ('', 'true', '1')


def cudnn_takes(platform: str, dtype, widths: tuple[int, int]) -> bool:
  """Whether cuDNN's flash attention runs queries/keys and values of these widths."""
  return (platform == 'gpu' and not deterministic_gpu_ops() and dtype in _CUDNN_DTYPES
          and all(w % 8 == 0 for w in widths) and max(widths) <= 256)


def _cudnn_unequal_widths(q, k, v, mask, scale):
  """cuDNN's attention with d_v != d_qk (its 'MLA' mode); None where it refuses (at trace time:
  an older cuDNN or a pre-Hopper GPU)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn
    mask_type = cudnn.MaskType.CAUSAL if mask is None else cudnn.MaskType.NO_MASK
    return cudnn.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None],
                                       scale=scale, mask_type=mask_type)
  except (ImportError, AttributeError, ValueError, NotImplementedError, RuntimeError):
    return None


def _pad_last(x, width: int):
  extra = width - x.shape[-1]
  return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


@jax.named_scope('flash_attention')  # what the tests find in a lowered program that runs it
def flash_attention(q_bthe, k_bsge, v_bsgv, mask_bts, scale: float, implementation: str):
  """[b, t, h, v]: heads [b, t, h, e] reading the KV groups [b, s, g, e] / [b, s, g, v] of their
  group (h a multiple of g; query head i reads group i // (h / g)). mask_bts None: causal
  over a whole sequence from position 0; else a [b, t, s] attention_op.causal_mask.
  implementation: 'cudnn' (falls back to 'xla' where cuDNN refuses the shapes at trace time)
  or 'xla'."""
  e, ev = q_bthe.shape[-1], v_bsgv.shape[-1]
  # A cache stored narrower than the compute dtype (cache_dtype='bfloat16' under float32) is
  # read in the compute dtype, as the einsum path reads it: the attention calls want one dtype.
  k_bsge, v_bsgv = k_bsge.astype(q_bthe.dtype), v_bsgv.astype(q_bthe.dtype)
  cudnn = implementation == 'cudnn'
  if cudnn and e != ev:
    out = _cudnn_unequal_widths(q_bthe, k_bsge, v_bsgv, mask_bts, scale)
    if out is not None:
      return out
  width = max(e, ev)
  q, k, v = (_pad_last(q_bthe, width), _pad_last(k_bsge, width), _pad_last(v_bsgv, width))
  mask = None if mask_bts is None else mask_bts[:, None]
  out = None
  if cudnn:
    try:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None,
                                         scale=scale, implementation='cudnn')
    except (ValueError, NotImplementedError, RuntimeError):  # shapes cuDNN refuses
      out = None
  if out is None:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None, scale=scale,
                                       implementation='xla')
  return out[..., :ev]


# Splash's blocks are whole multiples of a TPU vector register's 128 lanes along the sequence;
# the largest of these that divides the (padded) length is taken: bigger blocks amortize the
# per-grid-step cost, as MaxText's defaults (512) do.
SPLASH_BLOCKS = (512, 256, 128)


def _splash_kernel(heads: int, groups: int, t: int, interpret: bool):
  """Splash attention of one sequence ([heads, t, e] queries, [groups, t, .] keys and values,
  causal from position 0), forward and backward kernels."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  block = next(b for b in SPLASH_BLOCKS if t % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * heads)
  make = (splash.make_splash_mqa_single_device if groups == 1
          else splash.make_splash_mha_single_device)
  return make(mask, block_sizes=sizes, interpret=interpret)


@jax.named_scope('splash_attention')
def splash_attention(q_bthe, k_btge, v_btgv, scale: float, interpret: bool = False):
  """[b, t, h, v] causal attention of a whole sequence from position 0 through splash
  attention (jax.experimental.pallas.ops.tpu.splash_attention), TPU's flash attention for
  training: heads [b, t, h, e] reading the KV groups [b, t, g, e] / [b, t, g, v] of their
  group (query head i reads group i // (h / g); g = 1 takes splash's MQA form).

  Splash takes values narrower than the queries and keys (MLA's d_v < d_n + d_r) as they
  are. It has no scale argument (the queries are scaled first, as MaxText does), runs one
  sequence at a time (vmapped over the batch), and wants the length a multiple of 128: the
  sequence is zero-padded at its end, which the causal mask keeps out of every real query's
  row, and the padded rows are sliced off. Under a mesh of several devices the kernel runs in a
  shard_map over the batch and head axes that sharding.RULES gives them (a custom call is not
  split by XLA's partitioner, which would gather its inputs and run it whole everywhere).
  interpret: run it on a CPU (tests).
  """
  t = q_bthe.shape[1]
  padded = -(-t // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
  heads_first = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(
      0, 2, 1, 3)
  q, k, v = (heads_first(x) for x in ((q_bthe * scale).astype(q_bthe.dtype),
                                      k_btge.astype(q_bthe.dtype), v_btgv.astype(q_bthe.dtype)))

  def attend(q_bhte, k_bgte, v_bgtv):  # on one device's share of the batch and heads
    kernel = _splash_kernel(q_bhte.shape[1], k_bgte.shape[1], padded, interpret)
    if k_bgte.shape[1] == 1:
      k_bgte, v_bgtv = k_bgte[:, 0], v_bgtv[:, 0]
    return jax.vmap(kernel)(q_bhte, k_bgte, v_bgtv)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:
    spec = lambda heads, x, what: sharding.logical_to_spec(('batch', heads, None, None),
                                                            x.shape, dict(mesh.shape), what)
    kv_spec = spec('kv_heads', k, 'splash keys')
    attend = jax.shard_map(attend, in_specs=(spec('heads', q, 'splash queries'), kv_spec,
                                             kv_spec),
                           out_specs=spec('heads', q, 'splash queries'), check_vma=False)
  return attend(q, k, v).transpose(0, 2, 1, 3)[:, :t]
