"""How attention runs: the one place that picks the kernel of every attention call, and the
einsum reference that every kernel is tested against.

A model's attention calls are of three kinds, each with its own choice of kernel:

  whole    a whole sequence at positions 0 .. t - 1 without a cache (the training and
           evaluation forward): 'einsum' (causal_attention), 'cpu_kernel' (the C++ kernel of
           mla_jax.kernels.cpu_attention), 'cudnn' (cuDNN's flash attention), 'splash'
           (TPU's splash attention, `interpret`ed on a CPU) or 'xla' (XLA's
           jax.nn.dot_product_attention)
  prefill  queries against a cache, masked by position (chunked prefill, and MLA's naive
           decode): 'einsum', 'cudnn' or 'xla'
  decode   one query token per sequence against its cache: 'einsum', or the split-KV Pallas
           kernels of mla_jax.kernels on 'triton' (GPU) or 'mosaic' (TPU), `interpret`ed on a
           CPU (tests)

`resolve(cfg, mesh)` makes the choice once, when a model is built (Transformer.op), from the
platform, the compute dtype, the head widths, the variant's declared kernels and
ModelConfig.attention_impl ('einsum', 'kernels' or 'auto'), and nothing decides it later: the
modules read the record, the trainer prints it and writes it into config.json, and the tests
assert it. An AttentionOp can also be given to a model directly, which is how the tests run
each kernel against the einsum reference.

The einsum reference, in the grouped shape language of every module (layers.py has the
letters): queries [b, t, g, p, e] read the keys [b, g, s, e] of their group g. MHA is g = H,
p = 1; MQA is g = 1, p = H; MLA's absorbed decode is MQA over the latent (docs/design.md#3-mla).
In every probs-times-values einsum the cached array is the first operand and is contracted
along the axis it stores contiguously: written the other way, XLA's CPU dot copies the whole
cache on every decode step (cache.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mla_jax import flash, kernels, platform, variants
from mla_jax.kernels import cpu_attention
from mla_jax.kernels.split_kv import fits

WHOLE = ('einsum', 'cpu_kernel', 'cudnn', 'splash', 'xla')
PREFILL = ('einsum', 'cudnn', 'xla')
DECODE = ('einsum', 'triton', 'mosaic')
_MASKED = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked row gives no NaN
# Query blocks of a whole-sequence einsum forward (causal_attention). Two measured best on a
# 2-core CPU: four cut more masked work but make the dots too small to run efficiently.
QUERY_BLOCKS = 2


# --- the einsum reference ---------------------------------------------------------------------
def causal_mask(q_positions_bt, k_positions_bs):
  """[b, t, s] True where key s may be read by query t: causal on positions."""
  return k_positions_bs[:, None, :] <= q_positions_bt[:, :, None]


def cache_mask(positions_bt, k_len: int):
  """causal_mask of queries at positions [b, t] over cache slots 0 .. k_len - 1 (slot =
  position)."""
  slots = jnp.broadcast_to(jnp.arange(k_len), (positions_bt.shape[0], k_len))
  return causal_mask(positions_bt, slots)


def scale_tokens(x_bgpts, scale_bgs):
  """x * an 8-bit cache array's per-token scale [b, g, s] (None: x unchanged): on scores,
  q . (k s) = (q . k) s; on probabilities before the value product, p . (v s) = (p s) . v."""
  return x_bgpts if scale_bgs is None else x_bgpts * scale_bgs[:, :, None, None, :]


def attention_weights(q_parts, k_parts, mask_bts, scale: float, k_scales=None):
  """softmax(sum_i q_i k_i^T * scale), masked -> probabilities [b, g, p, t, s], float32.

  q_parts: query pieces [b, t, g, p, e_i]; k_parts: the matching key pieces [b, g, s, e_i].
  Their dot products add, so MLA's nope and rope halves (and the latent cache's two arrays)
  are never concatenated. k_scales: per part, None or an 8-bit key's per-token scale [b, g, s]
  (g may be 1), applied to that part's scores. Each module applies the probabilities to its
  values itself, in the layout its cache keeps (through `scale_tokens` for 8-bit values).
  """
  k_scales = (None,) * len(k_parts) if k_scales is None else k_scales
  scores = sum(scale_tokens(jnp.einsum('btgpe,bgse->bgpts', q, k,
                                       preferred_element_type=jnp.float32), k_scale)
               for q, k, k_scale in zip(q_parts, k_parts, k_scales, strict=True))
  return masked_softmax(scores, mask_bts, scale)


def masked_softmax(scores_bgpts, mask_bts, scale: float):
  """softmax(scores * scale) over s where mask [b, t, s] allows, float32 [b, g, p, t, s]: for
  a variant whose scores are not one q . k product (TPA's factored decode)."""
  scores = jnp.where(mask_bts[:, None, None], scores_bgpts * scale, _MASKED)
  return jax.nn.softmax(scores, axis=-1)


def causal_attention(q_bgpte, k_bgse, v_bgsv, scale: float):
  """softmax(q k^T * scale, causal) v -> [b, g, p, t, v] float32, for a whole sequence at
  positions 0 .. t - 1 without a cache: the 'einsum' whole-sequence kernel.

  The same arithmetic as attention_weights plus the value product, arranged for speed where
  attention is not fused: the queries go in QUERY_BLOCKS blocks along t, and a block reads
  only the keys up to its last position, so the masked upper-right part of the scores is never
  computed; and the heads lead, [b, g, p, t, .], so both dots produce their outputs in the
  layout the next op reads. A masked score adds exactly 0 to the softmax (exp of _MASKED
  underflows), so the skipped keys change nothing. The softmax's division comes after the
  value product, on [t, v] instead of [t, s], with the row maximum held constant for the
  gradient: a softmax does not depend on it.
  """
  t = q_bgpte.shape[3]
  blocks = QUERY_BLOCKS if t % QUERY_BLOCKS == 0 else 1
  out = []
  for lo, hi in ((i * t // blocks, (i + 1) * t // blocks) for i in range(blocks)):
    scores = jnp.einsum('bgpte,bgse->bgpts', q_bgpte[:, :, :, lo:hi], k_bgse[:, :, :hi],
                        preferred_element_type=jnp.float32)
    mask_ts = causal_mask(jnp.arange(lo, hi)[None], jnp.arange(hi)[None])[0]
    scores = jnp.where(mask_ts, scores * scale, _MASKED)
    unnormalized = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    o = jnp.einsum('bgpts,bgsv->bgptv', unnormalized.astype(v_bgsv.dtype), v_bgsv[:, :, :hi],
                   preferred_element_type=jnp.float32)
    out.append(o / jnp.sum(unnormalized, axis=-1, keepdims=True))
  return out[0] if blocks == 1 else jnp.concatenate(out, axis=3)


# --- the choice -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AttentionOp:
  """The kernel of each kind of attention call (module docstring), resolved once."""

  platform: str = 'cpu'
  whole: str = 'einsum'
  prefill: str = 'einsum'
  decode: str = 'einsum'
  interpret: bool = False  # the Pallas kernels (decode, splash) run in interpret mode (a CPU)

  def __post_init__(self):
    for name, allowed in (('platform', platform.PLATFORMS), ('whole', WHOLE),
                          ('prefill', PREFILL), ('decode', DECODE)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'AttentionOp.{name}={getattr(self, name)!r}; use one of {allowed}')
    # Kernels that cannot run where the record says they do: refused here, not at run time.
    cpu = self.platform == 'cpu'
    if (self.whole == 'cpu_kernel' and not cpu) or (
        'cudnn' in (self.whole, self.prefill) and self.platform != 'gpu') or (
        self.whole == 'splash' and self.platform == 'gpu'):
      raise ValueError(f'{self}: cpu_kernel runs on a CPU only, cudnn on an NVIDIA GPU only, '
                       'splash on a TPU only (or interpreted on a CPU)')
    if self.pallas and cpu != self.interpret:
      raise ValueError(f'{self}: the Pallas kernels run interpreted on a CPU, and only there '
                       '(interpret=True on a CPU, False elsewhere)')

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def pallas(self) -> bool:
    """Whether any call runs a Pallas kernel (the decode kernels, splash attention)."""
    return self.decode != 'einsum' or self.whole == 'splash'

  def __str__(self) -> str:
    shown = lambda kernel: kernel + (' (interpreted)' if self.interpret and kernel in (
        'splash', *DECODE[1:]) else '')
    return (f'attention on {self.platform}: whole sequences {shown(self.whole)}, prefill '
            f'{self.prefill}, decode steps {shown(self.decode)}')

  @property
  def einsum_cache_layout(self) -> bool:
    """Whether every read of a cache is an einsum (so a cache may keep the layout those read
    fastest: cache.KVCache's transposed MHA values)."""
    return self.prefill == 'einsum' and self.decode == 'einsum'

  # --- the calls ---------------------------------------------------------------------------
  def causal(self, q_btgpe, k_btge, v_btgv, scale: float):
    """softmax(q k^T * scale, causal) v -> [b, t, g, p, v] for a whole sequence at positions
    0 .. t - 1 without a cache, in the projections' token-major layout (float32 from the
    einsum and CPU kernels, the compute dtype from flash and splash attention)."""
    if self.whole == 'cpu_kernel':
      _one_device_float32(q_btgpe)
      return cpu_attention.causal_attention(q_btgpe, k_btge, v_btgv, scale)
    if self.whole == 'einsum':
      o = causal_attention(q_btgpe.transpose(0, 2, 3, 1, 4), k_btge.transpose(0, 2, 1, 3),
                           v_btgv.transpose(0, 2, 1, 3), scale)
      return o.transpose(0, 3, 1, 2, 4)
    b, t, g, p, _ = q_btgpe.shape
    q_bthe = q_btgpe.reshape(b, t, g * p, -1)
    if self.whole == 'splash':
      o = flash.splash_attention(q_bthe, k_btge, v_btgv, scale, interpret=self.interpret)
    else:
      o = flash.flash_attention(q_bthe, k_btge, v_btgv, None, scale, self.whole)
    return o.reshape(b, t, g, p, -1)

  def flash(self, q_bthe, k_bsge, v_bsgv, mask_bts, scale: float):
    """Flash attention of queries against keys and values by position mask ([b, t, s]), for
    a prefill (self.prefill must not be 'einsum')."""
    return flash.flash_attention(q_bthe, k_bsge, v_bsgv, mask_bts, scale, self.prefill)

  def gqa_decode(self, q_bgpk, k_bgsk, v_bgsk, lengths_b, scale: float, **scales):
    """One decode step of grouped attention through the Pallas kernel: o [b, g, p, k].
    scales: an 8-bit cache's, or GTA's rope part (kernels.gqa_decode)."""
    return kernels.gqa_decode(q_bgpk, k_bgsk, v_bgsk, lengths_b, scale,
                              interpret=self.interpret, backend=self.decode, **scales)

  def mla_decode(self, q_lat_bhc, q_rope_bhr, c_kv_bsc, k_rope_bsr, lengths_b, scale: float,
                 **scales):
    """One absorbed MLA decode step through the Pallas kernel: o_lat [b, h, c]."""
    return kernels.mla_decode(q_lat_bhc, q_rope_bhr, c_kv_bsc, k_rope_bsr, lengths_b, scale,
                              interpret=self.interpret, backend=self.decode, **scales)

  def gla_decode(self, q_lat_bgpc, q_rope_bgpr, c_kv_bgsc, k_rope_bsr, lengths_b,
                 scale: float):
    """One absorbed GLA decode step, the MLA kernel per latent head: o_lat [b, g, p, c]."""
    return kernels.gla_decode(q_lat_bgpc, q_rope_bgpr, c_kv_bgsc, k_rope_bsr, lengths_b, scale,
                              interpret=self.interpret, backend=self.decode)


def _one_device_float32(q):
  """The C++ kernel's preconditions at trace time: a model resolved for one device but traced
  under a mesh of several would run the kernel whole on every device (XLA gathers a custom
  call's inputs), which resolve() exists to prevent."""
  devices = platform.devices()
  if devices > 1 or q.dtype != jnp.float32:
    raise ValueError(f'the C++ CPU kernel takes float32 on one device; this trace has {q.dtype} '
                     f'under {devices} devices: build the model with the mesh it runs under '
                     '(Transformer(..., mesh=mesh), attention_op.resolve(cfg, mesh))')


def resolve(cfg, mesh=None) -> AttentionOp:
  """The kernels a model of cfg runs on the platform of `mesh` (None: the mesh set with
  jax.set_mesh, else jax's default backend and one device; inside platform.lowering_for, the
  platform it names).

  'einsum': the reference everywhere. 'kernels': the platform's kernels for the calls the
  variant declares (variants.Variant.flash_widths, decode_widths) at widths they take: on a
  CPU the C++ kernel for whole sequences (float32 on one device, where it builds; else XLA's
  attention), XLA's attention for prefill and the Pallas decode kernels interpreted; on a GPU
  cuDNN's flash attention (bfloat16 / float16, widths a multiple of 8 up to 256; else XLA's)
  and Triton; on a TPU splash attention for whole sequences (any dtype and widths), XLA's
  attention for prefill, and Mosaic. 'auto': 'kernels' on an accelerator; on a
  CPU the C++ kernel for whole sequences where it takes them, and einsum everywhere else
  (interpreted Pallas kernels are slow): docs/design.md#21-how-attention-runs has the
  measurement behind it.
  """
  plat = platform.current(mesh)
  if cfg.attention_impl == 'einsum':
    return AttentionOp(plat)
  cpu_auto = cfg.attention_impl == 'auto' and plat == 'cpu'
  variant = variants.get(cfg.attention)
  whole = prefill = decode = 'einsum'
  if variant.flash_widths is not None:
    widths, dtype = variant.flash_widths(cfg), cfg.compute_dtype
    flash_kernel = 'cudnn' if flash.cudnn_takes(plat, dtype, widths) else 'xla'
    prefill = 'einsum' if cpu_auto else flash_kernel
    whole = 'splash' if plat == 'tpu' else flash_kernel
    if plat == 'cpu':
      whole = ('cpu_kernel' if _cpu_kernel_takes(dtype, mesh)
               else 'einsum' if cpu_auto else 'xla')
  interpret = plat == 'cpu'
  widths = None if variant.decode_widths is None else variant.decode_widths(cfg)
  if widths is not None and not cpu_auto:
    backend = 'mosaic' if plat == 'tpu' else 'triton'
    if fits(*widths, interpret=interpret, backend=backend):
      decode = backend
  return AttentionOp(platform=plat, whole=whole, prefill=prefill, decode=decode,
                     interpret=interpret and decode != 'einsum')


def _cpu_kernel_takes(dtype, mesh) -> bool:
  """Whether the C++ kernel runs a whole sequence: float32, one device (XLA runs a custom call
  of a sharded step whole on every device; the einsum path shards), and it builds (here, once,
  before anything is traced: mla_jax.kernels.cpu_attention, which says once if it cannot)."""
  return (dtype == jnp.float32 and platform.devices(mesh) == 1
          and cpu_attention.available())
