"""The registry of attention variants: all that the package asks about an attention, in one
entry per name that ModelConfig.attention accepts.

  module           the nnx.Module: module(cfg, rngs)(x_btd, positions_bt, cache) -> (y_btd, cache)
  cache            its decode cache: cache.init(cfg, batch, max_len, dtype),
                   cache.elements_per_token(cfg) for one layer (DeepSeek-V2 Table 1), and
                   cache.scales_per_token(cfg), the float32 scales an 8-bit cache adds
  configure        its checks and derived defaults for the config fields it reads
  rope_dim         its rotary width (RoPE pairs need it even)
  decode_flops     attention flops of one query token against s cached keys, one layer
  cache_formula    the cache size as the paper writes it, for reports
  hf_architecture  what mla_jax.hf exports it as (None: exporting it is refused)
  example          config fields of a small working instance (d_model 64, 4 heads of 16):
                   the tests build every registered variant from it

The model, the config checks, the decode benchmark, the experiments and the Hugging Face export
all ask here, so a new variant is one module, one `register` call and one config file
(docs/extending.md walks through it). An unknown name is a ConfigError everywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mla_jax.attention import GQAttention, MLAttention
from mla_jax.cache import KVCache, LatentCache
from mla_jax.config import ConfigError, ModelConfig
from mla_jax.quant import is_quantized


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  module: Callable[..., Any]
  cache: type
  configure: Callable[[ModelConfig], dict[str, Any]]
  rope_dim: Callable[[ModelConfig], int]
  decode_flops: Callable[[ModelConfig, int], float]
  cache_formula: str
  hf_architecture: str | None = None
  example: dict[str, Any] = dataclasses.field(default_factory=dict)


_REGISTRY: dict[str, Variant] = {}


def register(variant: Variant, replace: bool = False) -> Variant:
  """Adds a variant (replace=True to redefine one, e.g. in a test)."""
  if variant.name in _REGISTRY and not replace:
    raise ValueError(f'attention variant {variant.name!r} is already registered')
  _REGISTRY[variant.name] = variant
  return variant


def unregister(name: str) -> None:
  _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> Variant:
  if name not in _REGISTRY:
    raise ConfigError(f'attention={name!r} is unknown; use one of {names()}')
  return _REGISTRY[name]


def cache_elements_per_token(cfg: ModelConfig) -> int:
  """The paper's Table 1 formula: cached elements per token over all layers."""
  return get(cfg.attention).cache.elements_per_token(cfg) * cfg.n_layers


def cache_bytes_per_token(cfg: ModelConfig) -> int:
  """Bytes per token over all layers of the cache the decode loop allocates: the elements in
  cfg.cache_dtype (default: the compute dtype), plus an 8-bit cache's float32 scales."""
  cache, dtype = get(cfg.attention).cache, cfg.cache_storage_dtype
  per_layer = cache.elements_per_token(cfg) * dtype.itemsize
  if is_quantized(dtype):
    per_layer += cache.scales_per_token(cfg) * 4
  return per_layer * cfg.n_layers


# --- the GQA family: MHA (G = H), GQA, MQA (G = 1) ----------------------------------------------
MLA_ONLY = ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim',
            'rope_block')


def no_mla_fields(cfg: ModelConfig) -> None:
  for name in MLA_ONLY:
    if getattr(cfg, name):
      raise ConfigError(f"{name} applies only to attention='mla', not {cfg.attention!r}; "
                        'leave it unset (0 for the ranks)')
  if not cfg.kv_norm:
    raise ConfigError(f"kv_norm=False applies only to attention='mla', not {cfg.attention!r}; "
                      'leave it true')


def _configure_mha(cfg):
  no_mla_fields(cfg)
  g = cfg.n_heads if cfg.n_kv_heads is None else cfg.n_kv_heads
  if g != cfg.n_heads:
    raise ConfigError(f"attention='mha' needs n_kv_heads == n_heads ({cfg.n_heads}), got {g}; "
                      "use attention='gqa' for grouped heads")
  return {'n_kv_heads': g}


def _configure_gqa(cfg):
  no_mla_fields(cfg)
  g = cfg.n_kv_heads
  if g is None:
    raise ConfigError("attention='gqa' needs n_kv_heads (a divisor of n_heads)")
  if cfg.n_heads % g:
    raise ConfigError(f'n_heads={cfg.n_heads} is not divisible by n_kv_heads={g}; '
                      'pick n_kv_heads among the divisors of n_heads')
  return {}


def _configure_mqa(cfg):
  no_mla_fields(cfg)
  g = 1 if cfg.n_kv_heads is None else cfg.n_kv_heads
  if g != 1:
    raise ConfigError(f"attention='mqa' needs n_kv_heads == 1, got {g}")
  return {'n_kv_heads': 1}


def _gqa_flops(cfg, s):
  return 2 * cfg.n_heads * s * 2 * cfg.head_dim  # q.k and p.v


_GQA_FAMILY = dict(module=GQAttention, cache=KVCache, rope_dim=lambda cfg: cfg.head_dim,
                   decode_flops=_gqa_flops, hf_architecture='LlamaForCausalLM')
register(Variant('mha', configure=_configure_mha, cache_formula='2·n_h·d_h·l', **_GQA_FAMILY))
register(Variant('gqa', configure=_configure_gqa, cache_formula='2·n_g·d_h·l',
                 example={'n_kv_heads': 2}, **_GQA_FAMILY))
register(Variant('mqa', configure=_configure_mqa, cache_formula='2·d_h·l', **_GQA_FAMILY))


# --- MLA (DeepSeek-V2 appendix C) ---------------------------------------------------------------
def _configure_mla(cfg):
  if cfg.kv_lora_rank == 0:
    raise ConfigError("attention='mla' needs kv_lora_rank > 0 (the paper uses 4 * head_dim)")
  # The paper's ratios for d_h = head_dim; n_kv_heads has no meaning here (every head reads
  # the one latent), so it is n_heads, as DeepSeek's config files write it.
  defaults = {'qk_nope_head_dim': cfg.head_dim, 'qk_rope_head_dim': cfg.head_dim // 2,
              'v_head_dim': cfg.head_dim, 'n_kv_heads': cfg.n_heads}
  derived = {name: value for name, value in defaults.items() if getattr(cfg, name) is None}
  r, block = derived.get('qk_rope_head_dim', cfg.qk_rope_head_dim), cfg.rope_block
  if block is not None and (block % 2 or r % block):
    raise ConfigError(f'rope_block={block} must be even and divide qk_rope_head_dim={r} (each '
                      'block is one rotation of rope_block / 2 pairs)')
  return derived


def _mla_flops(cfg, s):
  h, c = cfg.n_heads, cfg.kv_lora_rank
  n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  if cfg.mla_decode == 'absorbed':  # scores against c_kv and k_rope, then p.c_kv
    return 2 * h * s * (2 * c + r)
  # naive: up-project every cached latent to keys and values, then ordinary attention
  return 2 * s * c * h * (n + v) + 2 * h * s * (n + r + v)


register(Variant('mla', module=MLAttention, cache=LatentCache, configure=_configure_mla,
                 rope_dim=lambda cfg: cfg.qk_rope_head_dim, decode_flops=_mla_flops,
                 cache_formula='(d_c + d_r)·l', hf_architecture='DeepseekV3ForCausalLM',
                 example={'kv_lora_rank': 32, 'qk_rope_head_dim': 8}))
