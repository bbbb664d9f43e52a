"""ModelConfig: the one validated description of a model (docs/design.md#10-public-contract).

Every module reads its sizes from here. Configs from files or flags (ml_collections ConfigDicts)
are converted once, at the edge, with `ModelConfig.from_dict`; a bad combination fails at
construction with one line naming the field and the fix. What each attention variant needs of
the config (its defaults and checks) lives with the variant, in mla_jax.variants, which is
pure data; how attention runs is decided when a model is built (mla_jax.attention_op).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from mla_jax import platform, variants
from mla_jax.errors import ConfigError

ROPE_LAYOUTS = ('interleaved', 'half')
MLA_DECODE_PATHS = ('absorbed', 'naive')
ATTENTION_IMPLS = ('auto', 'einsum', 'kernels')
DTYPES = ('float32', 'bfloat16', 'float16')
COMPUTE_DTYPES = ('auto', *DTYPES)  # auto: bfloat16 on an accelerator, float32 on a CPU
CACHE_DTYPES = (*DTYPES, 'int8', 'float8_e4m3fn')
MOE_IMPLS = ('auto', 'ragged', 'blocked', 'dense')
SCORING_FUNCS = ('softmax', 'sigmoid')  # DeepSeek-V2's router, DeepSeek-V3's
# Which experts a token goes to: V2's 'greedy' (top-k of the scores) or 'group_limited_greedy'
# (top-k within the topk_group groups of highest max score); V3's 'noaux_tc' (groups by the sum
# of their top-2 biased scores, experts by biased scores, weights from the unbiased ones).
TOPK_METHODS = {'greedy': 'softmax', 'group_limited_greedy': 'softmax', 'noaux_tc': 'sigmoid'}


__all__ = ['ConfigError', 'Llama3Scaling', 'ModelConfig', 'RopeScaling', 'YarnScaling']


def _check_types(obj) -> None:
  """Integers are integers, floats finite numbers, flags booleans: a NaN eps or a
  tie_embeddings='no' (truthy) would otherwise build a silently wrong model."""
  for f in dataclasses.fields(obj):
    value, kind = getattr(obj, f.name), f.type.split(' |')[0]
    if value is None:
      continue
    if kind == 'int' and (not isinstance(value, int) or isinstance(value, bool)):
      raise ConfigError(f'{f.name}={value!r} must be an integer')
    if kind == 'float' and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not math.isfinite(value)):
      raise ConfigError(f'{f.name}={value!r} must be a finite number')
    if kind == 'bool' and not isinstance(value, bool):
      raise ConfigError(f'{f.name}={value!r} must be true or false')
    if kind == 'str' and not isinstance(value, str):
      raise ConfigError(f'{f.name}={value!r} must be a string')



def _check_window(scaling) -> None:
  """What every rope_scaling kind needs: a factor >= 1 over a positive original window."""
  if scaling.factor < 1:
    raise ConfigError(f'rope_scaling.factor={scaling.factor} must be >= 1')
  if scaling.original_max_position_embeddings <= 0:
    raise ConfigError('rope_scaling.original_max_position_embeddings must be > 0')


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """YaRN context extension (Peng et al. 2023) as DeepSeek-V2/V3 configure it."""

  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 0.0
  # The factor on cos and sin; None: get_mscale(factor, mscale) / get_mscale(factor,
  # mscale_all_dim), DeepSeek's rule. Set for checkpoints whose reference code differs
  # (transformers uses get_mscale(factor) unless both mscales are non-zero).
  attention_factor: float | None = None
  type: str = 'yarn'

  def __post_init__(self):
    _check_types(self)
    if self.type != 'yarn':
      raise ConfigError(f"rope_scaling.type={self.type!r} is not supported; use 'yarn' or None")
    _check_window(self)
    if self.beta_fast <= self.beta_slow:
      raise ConfigError('rope_scaling.beta_fast must exceed rope_scaling.beta_slow')
    if self.attention_factor is not None and self.attention_factor <= 0:
      raise ConfigError(f'rope_scaling.attention_factor={self.attention_factor} must be > 0')


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  """Llama 3.1's frequency rescaling (transformers' _compute_llama3_parameters): pairs whose
  wavelength exceeds original_max_position_embeddings / low_freq_factor turn factor times
  slower, those shorter than original / high_freq_factor keep their frequency, and the band
  between blends the two linearly in original / wavelength. No attention temperature."""

  factor: float
  original_max_position_embeddings: int
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  type: str = 'llama3'

  def __post_init__(self):
    _check_types(self)
    if self.type != 'llama3':
      raise ConfigError(f"Llama3Scaling.type={self.type!r} must be 'llama3'")
    _check_window(self)
    if not 0 < self.low_freq_factor < self.high_freq_factor:
      raise ConfigError(f'rope_scaling.low_freq_factor={self.low_freq_factor} and '
                        f'high_freq_factor={self.high_freq_factor} need 0 < low < high')


RopeScaling = YarnScaling | Llama3Scaling
# rope_scaling's 'type' -> its class; a dict without 'type' is YaRN (config.json files written
# before Llama 3 RoPE existed here).
ROPE_SCALINGS = {'yarn': YarnScaling, 'llama3': Llama3Scaling}


def _rope_scaling(d: Mapping) -> RopeScaling:
  kind = d.get('type', 'yarn')
  if kind not in ROPE_SCALINGS:
    raise ConfigError(f'rope_scaling.type={kind!r} is not supported; use one of '
                      f'{sorted(ROPE_SCALINGS)} or None')
  cls = ROPE_SCALINGS[kind]
  try:
    return cls(**d)
  except TypeError as e:
    raise ConfigError(f'rope_scaling: {e}; allowed keys for {kind!r}: '
                      f'{[f.name for f in dataclasses.fields(cls)]}') from None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Sizes and choices of a decoder-only transformer. Fields left None get derived defaults."""

  vocab_size: int = 256
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 8
  n_kv_heads: int | None = None  # mha: n_heads; mqa: 1; gqa: required, divides n_heads
  head_dim: int | None = None  # mha/gqa/mqa head size; default d_model // n_heads
  d_ff: int | None = None  # SwiGLU width; default 8/3 d_model rounded up to a multiple of 64
  # a name in mla_jax.variants: 'mha' | 'gqa' | 'mqa' | 'mla' | 'tpa' | 'gta' | 'gla'
  attention: str = 'mha'
  # MLA (DeepSeek-V2 appendix C), and GLA below. Defaults follow the paper's ratios for
  # d_h = head_dim:
  q_lora_rank: int = 0  # d'_c; 0 = no query compression
  kv_lora_rank: int = 0  # d_c, required for mla (the paper: 4 d_h)
  qk_nope_head_dim: int | None = None  # d_n; default head_dim
  qk_rope_head_dim: int | None = None  # d_r; default head_dim // 2
  v_head_dim: int | None = None  # d_v; default head_dim
  mla_decode: str = 'absorbed'  # decode path over the latent cache: 'absorbed' | 'naive'
  # MLA generalised so that MHA / GQA / MQA embed in it exactly (mla_jax.to_mla): rope_block
  # rotates the d_r-wide rope key in blocks of rope_block dims, each with the frequencies of a
  # rope_block-wide rotation ('half' pairs within each block); None: one d_r-wide rotation.
  # kv_norm=False drops the RMSNorm on the latent c_kv. Neither has a Hugging Face equivalent.
  rope_block: int | None = None
  kv_norm: bool = True
  # TPA only (Zhang et al. 2025, mla_jax.tpa): the ranks R_Q, R_K, R_V of the factorised
  # queries, keys and values; tpa_k_rank and tpa_v_rank are required (>= 1) for tpa.
  # tpa_q_rank=0: queries from a standard per-head projection (the paper's TPA-KVonly).
  tpa_q_rank: int = 0
  tpa_k_rank: int = 0
  tpa_v_rank: int = 0
  # GLA only (Zadouri, Strauss & Dao 2025, mla_jax.gla): g latent heads of kv_lora_rank / g,
  # each read by n_heads / g query heads; default 2 (GLA-2). GTA reuses n_kv_heads (its tied
  # KV heads) and qk_rope_head_dim (d_R, its one rope key's width; default head_dim / 2).
  latent_heads: int | None = None
  # 'einsum': the explicit reference path everywhere; 'kernels': the platform's kernels (flash
  # attention or the C++ CPU kernel for whole sequences, flash attention for prefill, Pallas for
  # decode steps); 'auto': the platform's default. mla_jax.attention_op resolves it once, when a
  # model is built, and records what runs (Transformer.op; config.json's "kernels").
  attention_impl: str = 'auto'
  rope_theta: float = 10000.0
  rope_layout: str = 'interleaved'  # 'interleaved' pairs (2i, 2i+1); 'half' pairs (i, i + d/2)
  rope_scaling: RopeScaling | None = None  # YaRN or Llama 3; a dict is converted by its 'type'
  max_seq_len: int = 2048  # longest prompt + generation the decode loop accepts
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  # Biases on the q, k and v projections (Qwen2), added before RoPE; MHA / GQA / MQA only.
  qkv_bias: bool = False
  dtype: str = 'float32'  # compute dtype ('auto': bfloat16 on GPU / TPU, float32 on a CPU);
  # logits and softmax stay float32 whatever it is
  param_dtype: str = 'float32'
  # The decode cache's storage: None = the compute dtype; a float dtype; or 'int8' /
  # 'float8_e4m3fn', 8-bit values with one float32 scale per token and cached array (MLA:
  # c_kv and k_rope each [b, s]; MHA/GQA/MQA: per token AND KV head [b, g, s], as heads'
  # ranges differ), dequantized inside attention. mla_jax.quant has the formats and bounds.
  cache_dtype: str | None = None
  # DeepSeekMoE (mla_jax.moe, docs/design.md#11-deepseekmoe), named as DeepSeek-V2/V3's
  # config.json names them. n_routed_experts=0: the dense SwiGLU MLP in every layer (the rest
  # is then unused). Otherwise layer i is MoE where i >= first_k_dense_replace and
  # i % moe_layer_freq == 0: num_experts_per_tok of n_routed_experts SwiGLU experts of width
  # moe_intermediate_size (default d_ff), plus one shared SwiGLU of width n_shared_experts *
  # moe_intermediate_size that every token goes through.
  n_routed_experts: int = 0
  n_shared_experts: int = 0
  num_experts_per_tok: int = 1
  moe_intermediate_size: int | None = None
  first_k_dense_replace: int = 0
  moe_layer_freq: int = 1
  scoring_func: str = 'softmax'  # 'softmax' (V2) | 'sigmoid' (V3)
  topk_method: str = 'greedy'  # 'greedy' | 'group_limited_greedy' (V2) | 'noaux_tc' (V3)
  n_group: int = 1  # expert groups (the devices of DeepSeek's node-limited routing)
  topk_group: int = 1  # groups each token may choose experts from
  norm_topk_prob: bool = False  # chosen weights divided by their sum (+ 1e-20)
  routed_scaling_factor: float = 1.0  # chosen weights multiplied by it, after any norm
  # How the routed experts run, dropless: 'ragged' (tokens sorted by expert, one grouped matmul,
  # jax.lax.ragged_dot), 'blocked' (the sorted tokens in blocks of 64-512 rows, one matmul per
  # block with its expert's weights), 'auto' (blocked on a CPU, where ragged_dot lowers to a
  # masked product with every expert; ragged elsewhere), or 'dense' (every expert on every
  # token, weighted by the routing: the reference the others are tested against; E / k times
  # the FLOPs).
  moe_impl: str = 'auto'
  # Load balancing while training (docs/design.md#11-deepseekmoe; 0 = off): the coefficient of
  # DeepSeek-V2's expert-level auxiliary loss over each microbatch, of V3's sequence-wise one,
  # and V3's auxiliary-loss-free bias step (noaux_tc only: after each train step every expert's
  # e_score_correction_bias moves by it towards the mean load).
  aux_loss_alpha: float = 0.0
  seq_aux_loss_alpha: float = 0.0
  bias_update_speed: float = 0.0

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    if isinstance(self.rope_scaling, Mapping):
      set_('rope_scaling', _rope_scaling(self.rope_scaling))
    _check_types(self)
    self._check_choices()
    self._check_sizes()
    if self.head_dim is None:
      set_('head_dim', self.d_model // self.n_heads)
    if self.d_ff is None:
      set_('d_ff', 64 * math.ceil(8 * self.d_model / 3 / 64))
    if self.n_routed_experts:
      self._check_moe()
      if self.moe_intermediate_size is None:
        set_('moe_intermediate_size', self.d_ff)
    variant = variants.get(self.attention)
    for name, value in variant.configure(self).items():
      set_(name, value)
    if self.cache_dtype in ('int8', 'float8_e4m3fn') and not variant.quantized_cache:
      raise ConfigError(f'cache_dtype={self.cache_dtype!r}: attention={self.attention!r} has no '
                        '8-bit cache; use a float cache_dtype')
    rot = variant.rope_dim(self)
    if rot % 2:
      raise ConfigError(f'the rotary dimension ({rot}) must be even for RoPE pairs; '
                        'change head_dim or qk_rope_head_dim')

  def _check_choices(self):
    if self.attention_impl == 'fused':  # its name before 2026-12-07, in older config.json files
      object.__setattr__(self, 'attention_impl', 'kernels')
    for name, allowed in (('rope_layout', ROPE_LAYOUTS), ('mla_decode', MLA_DECODE_PATHS),
                          ('attention_impl', ATTENTION_IMPLS), ('dtype', COMPUTE_DTYPES),
                          ('param_dtype', DTYPES), ('cache_dtype', (None, *CACHE_DTYPES)),
                          ('scoring_func', SCORING_FUNCS), ('topk_method', tuple(TOPK_METHODS)),
                          ('moe_impl', MOE_IMPLS)):
      if getattr(self, name) not in allowed:
        raise ConfigError(f'{name}={getattr(self, name)!r} is unknown; use one of {allowed}')

  def _check_sizes(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.type.startswith('int') and value is not None:
        least = 0 if f.name in ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim',
                                'n_routed_experts', 'n_shared_experts',
                                'first_k_dense_replace', *variants.TPA_ONLY) else 1
        if value < least:
          raise ConfigError(f'{f.name}={value} must be >= {least}')
    if self.norm_eps <= 0 or self.rope_theta <= 1:
      raise ConfigError('norm_eps must be > 0 and rope_theta > 1')
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ConfigError(f'd_model={self.d_model} is not divisible by n_heads={self.n_heads}; '
                        'set head_dim explicitly or change n_heads')

  def _check_moe(self):
    e, k, groups = self.n_routed_experts, self.num_experts_per_tok, self.n_group
    if TOPK_METHODS[self.topk_method] != self.scoring_func:
      raise ConfigError(f'topk_method={self.topk_method!r} routes {TOPK_METHODS[self.topk_method]}'
                        f' scores, not scoring_func={self.scoring_func!r}; set scoring_func='
                        f'{TOPK_METHODS[self.topk_method]!r}')
    if k > e:
      raise ConfigError(f'num_experts_per_tok={k} exceeds n_routed_experts={e}')
    if e % groups:
      raise ConfigError(f'n_routed_experts={e} is not divisible by n_group={groups}')
    if self.topk_group > groups:
      raise ConfigError(f'topk_group={self.topk_group} exceeds n_group={groups}')
    if self.topk_method != 'greedy' and k > self.topk_group * (e // groups):
      raise ConfigError(f'num_experts_per_tok={k} exceeds the {self.topk_group * (e // groups)} '
                        'experts of the topk_group groups a token may use; raise topk_group')
    if self.topk_method == 'noaux_tc' and e // groups < 2:
      raise ConfigError(f'noaux_tc scores a group by its top-2 experts: n_routed_experts={e} / '
                        f'n_group={groups} must be >= 2')
    if self.routed_scaling_factor <= 0:
      raise ConfigError(f'routed_scaling_factor={self.routed_scaling_factor} must be > 0')
    for name in ('aux_loss_alpha', 'seq_aux_loss_alpha', 'bias_update_speed'):
      if getattr(self, name) < 0:
        raise ConfigError(f'{name}={getattr(self, name)} must be >= 0 (0: off)')
    if self.bias_update_speed and self.topk_method != 'noaux_tc':
      raise ConfigError(f'bias_update_speed={self.bias_update_speed} moves the noaux_tc bias; '
                        f'topk_method={self.topk_method!r} has none: set it to 0')
    if not any(self.is_moe_layer(i) for i in range(self.n_layers)):
      raise ConfigError(f'first_k_dense_replace={self.first_k_dense_replace} and moe_layer_freq='
                        f'{self.moe_layer_freq} leave no MoE layer of n_layers={self.n_layers}; '
                        'set n_routed_experts=0 for a dense model')

  def is_moe_layer(self, i: int) -> bool:
    """Whether layer i's feed-forward is MoE (DeepSeek's rule; transformers' too, which has
    moe_layer_freq 1)."""
    return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0)

  # --- derived quantities -------------------------------------------------------------
  @property
  def compute_dtype(self) -> jnp.dtype:
    """dtype as a jnp dtype ('auto': bfloat16 on an accelerator, float32 on a CPU)."""
    if self.dtype == 'auto':
      return jnp.dtype(jnp.bfloat16 if platform.is_accelerator(platform.current())
                       else jnp.float32)
    return jnp.dtype(self.dtype)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
    """Builds a config from a mapping (ConfigDict, json); unknown keys are an error."""
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f'unknown model config keys {unknown}; known keys: {sorted(known)}')
    return cls(**d)
