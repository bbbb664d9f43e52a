"""The registry of attention variants: what each variant IS, as data, one entry per name that
ModelConfig.attention accepts. It imports nothing of the model (the module is named, and
imported when a model is built), so the config can hold it without an import cycle.

  module           the nnx.Module, as 'package.module:Class' (or the class itself):
                   module(cfg, rngs, op)(x_btd, positions_bt, cache) -> (y_btd, cache), and
                   module.init_cache(batch, max_len, dtype) for the decode loop
  configure        its checks and derived defaults for the config fields it reads
  rope_dim         its rotary width (RoPE pairs need it even)
  cache_elements   cached values per token in one layer (DeepSeek-V2 Table 1)
  cache_scales     the float32 scales per token and layer an 8-bit cache adds (None: the
                   variant has no 8-bit cache, and cache_dtype 'int8' is refused)
  decode_flops     attention flops of one query token against s cached keys, one layer
  cache_formula    the cache size as the paper writes it, for reports
  hf_architecture  what mla_jax.hf exports it as (None: exporting it is refused)
  flash_widths     (query/key width, value width) of the attention it runs through
                   op.causal and op.flash (flash attention, the CPU kernel); None: it calls
                   neither, and runs the einsum path whatever attention_impl says
  decode_widths    (the score parts' widths, the value's width) of its Pallas decode kernel
                   calls (op.gqa_decode / op.mla_decode); None, or a function that returns
                   None for a config: no decode kernel
  example          config fields of a small working instance (d_model 64, 4 heads of 16):
                   the tests build every registered variant from it

A variant outside mla_jax registers itself when its module is imported; a config names it as
'package.module:name', and every command imports that module when it reads the name (from
flags or from a workdir's config.json). docs/extending.md walks through one.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from mla_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  module: str | type
  configure: Callable[[Any], dict[str, Any]]
  rope_dim: Callable[[Any], int]
  cache_elements: Callable[[Any], int]
  decode_flops: Callable[[Any, int], float]
  cache_formula: str
  cache_scales: Callable[[Any], int] | None = None
  hf_architecture: str | None = None
  flash_widths: Callable[[Any], tuple[int, int]] | None = None
  decode_widths: Callable[[Any], tuple[tuple[int, ...], int]] | None = None
  example: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def quantized_cache(self) -> bool:
    """Whether the variant has an 8-bit cache (cache_dtype 'int8' / 'float8_e4m3fn')."""
    return self.cache_scales is not None

  def module_class(self) -> type:
    """The attention module, imported on first use."""
    if not isinstance(self.module, str):
      return self.module
    path, _, name = self.module.partition(':')
    return getattr(importlib.import_module(path), name)


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
  """The variant of ModelConfig.attention: a registered name, or 'package.module:name' of a
  variant that registers itself when its module is imported."""
  path, colon, short = name.rpartition(':')
  if colon and short not in _REGISTRY:
    try:
      importlib.import_module(path)
    except ImportError as e:
      raise ConfigError(f'attention={name!r}: cannot import {path!r} ({e}); put its package on '
                        'PYTHONPATH or install it') from None
  key = short if colon else name
  if key not in _REGISTRY:
    where = f' (importing {path!r} did not register it)' if colon else ''
    raise ConfigError(f'attention={name!r} is unknown{where}; use one of {names()}, or '
                      "'package.module:name' of a variant registered in that module")
  return _REGISTRY[key]


def cache_elements_per_token(cfg) -> int:
  """The paper's Table 1 formula: cached elements per token over all layers."""
  return get(cfg.attention).cache_elements(cfg) * cfg.n_layers


def cache_bytes_per_token(cfg) -> int:
  """Bytes per token over all layers of the cache the decode loop allocates: the elements in
  cfg.cache_dtype (default: the compute dtype), plus an 8-bit cache's float32 scales."""
  variant, dtype = get(cfg.attention), jnp.dtype(cfg.cache_dtype or cfg.compute_dtype)
  per_layer = variant.cache_elements(cfg) * dtype.itemsize
  if dtype.itemsize == 1:
    per_layer += variant.cache_scales(cfg) * 4
  return per_layer * cfg.n_layers


# --- the GQA family: MHA (G = H), GQA, MQA (G = 1) ----------------------------------------------
MLA_ONLY = ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim',
            'rope_block')


def no_mla_fields(cfg) -> None:
  for name in MLA_ONLY:
    if getattr(cfg, name):
      raise ConfigError(f"{name} applies only to attention='mla', not {cfg.attention!r}; "
                        'leave it unset (0 for the ranks)')
  no_latent_heads(cfg)
  if not cfg.kv_norm:
    raise ConfigError(f"kv_norm=False applies only to attention='mla', not {cfg.attention!r}; "
                      'leave it true')


def _configure_mha(cfg):
  no_mla_fields(cfg)
  no_tpa_fields(cfg)
  g = cfg.n_heads if cfg.n_kv_heads is None else cfg.n_kv_heads
  if g != cfg.n_heads:
    raise ConfigError(f"attention='mha' needs n_kv_heads == n_heads ({cfg.n_heads}), got {g}; "
                      "use attention='gqa' for grouped heads")
  return {'n_kv_heads': g}


def _configure_gqa(cfg):
  no_mla_fields(cfg)
  no_tpa_fields(cfg)
  g = cfg.n_kv_heads
  if g is None:
    raise ConfigError("attention='gqa' needs n_kv_heads (a divisor of n_heads)")
  if cfg.n_heads % g:
    raise ConfigError(f'n_heads={cfg.n_heads} is not divisible by n_kv_heads={g}; '
                      'pick n_kv_heads among the divisors of n_heads')
  return {}


def _configure_mqa(cfg):
  no_mla_fields(cfg)
  no_tpa_fields(cfg)
  g = 1 if cfg.n_kv_heads is None else cfg.n_kv_heads
  if g != 1:
    raise ConfigError(f"attention='mqa' needs n_kv_heads == 1, got {g}")
  return {'n_kv_heads': 1}


def _gqa_flops(cfg, s):
  return 2 * cfg.n_heads * s * 2 * cfg.head_dim  # q.k and p.v


# Keys and values, one float32 scale each per token and KV head (mla_jax.quant).
_GQA_FAMILY = dict(module='mla_jax.attention:GQAttention', rope_dim=lambda cfg: cfg.head_dim,
                   cache_elements=lambda cfg: 2 * cfg.n_kv_heads * cfg.head_dim,
                   cache_scales=lambda cfg: 2 * cfg.n_kv_heads, decode_flops=_gqa_flops,
                   hf_architecture='LlamaForCausalLM',
                   flash_widths=lambda cfg: (cfg.head_dim, cfg.head_dim),
                   decode_widths=lambda cfg: ((cfg.head_dim,), cfg.head_dim))
register(Variant('mha', configure=_configure_mha, cache_formula='2·n_h·d_h·l', **_GQA_FAMILY))
register(Variant('gqa', configure=_configure_gqa, cache_formula='2·n_g·d_h·l',
                 example={'n_kv_heads': 2}, **_GQA_FAMILY))
register(Variant('mqa', configure=_configure_mqa, cache_formula='2·d_h·l', **_GQA_FAMILY))


# --- MLA (DeepSeek-V2 appendix C) ---------------------------------------------------------------
def _configure_mla(cfg):
  no_tpa_fields(cfg)
  if cfg.qkv_bias:
    raise ConfigError("qkv_bias applies only to attention='mha' / 'gqa' / 'mqa', not 'mla'; "
                      'leave it false')
  no_latent_heads(cfg)
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


def _mla_flash_widths(cfg):  # the naive path: per-head keys [d_n + d_r], values [d_v]
  return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim


def _mla_decode_widths(cfg):  # the absorbed path: scores on c_kv and k_rope, values c_kv
  if cfg.mla_decode == 'naive':  # its decode steps are prefill-kind calls (op.flash)
    return None
  c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
  return ((c, r) if cfg.qk_nope_head_dim else (r,)), c


# c_kv and k_rope each get their own float32 scale per token (mla_jax.quant).
register(Variant('mla', module='mla_jax.attention:MLAttention', configure=_configure_mla,
                 rope_dim=lambda cfg: cfg.qk_rope_head_dim,
                 cache_elements=lambda cfg: cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                 cache_scales=lambda cfg: 2, decode_flops=_mla_flops,
                 cache_formula='(d_c + d_r)·l', hf_architecture='DeepseekV3ForCausalLM',
                 flash_widths=_mla_flash_widths, decode_widths=_mla_decode_widths,
                 example={'kv_lora_rank': 32, 'qk_rope_head_dim': 8}))


# --- TPA (Zhang et al. 2025, "Tensor Product Attention Is All You Need") ------------------------
TPA_ONLY = ('tpa_q_rank', 'tpa_k_rank', 'tpa_v_rank')


def no_tpa_fields(cfg) -> None:
  for name in TPA_ONLY:
    if getattr(cfg, name):
      raise ConfigError(f"{name} applies only to attention='tpa', not {cfg.attention!r}; "
                        'leave it 0')


def _configure_tpa(cfg):
  no_mla_fields(cfg)
  if cfg.qkv_bias:
    raise ConfigError("qkv_bias applies only to attention='mha' / 'gqa' / 'mqa', not 'tpa'; "
                      'leave it false')
  if not (cfg.tpa_k_rank and cfg.tpa_v_rank):
    raise ConfigError(f"attention='tpa' needs tpa_k_rank >= 1 and tpa_v_rank >= 1, got "
                      f'{cfg.tpa_k_rank} and {cfg.tpa_v_rank} (the paper uses 2 and 2)')
  # Every head has its own keys and values, built from the shared token factors (there are no
  # groups), so n_kv_heads is n_heads, as MLA writes it.
  if cfg.n_kv_heads not in (None, cfg.n_heads):
    raise ConfigError(f"attention='tpa' has one key and value per head: n_kv_heads must be "
                      f'n_heads ({cfg.n_heads}) or unset, got {cfg.n_kv_heads}')
  return {'n_kv_heads': cfg.n_heads}


def tpa_factored_queries(cfg) -> bool:
  """Whether a TPA decode step scores the cached keys from the query's factors, b^Q·b^K then
  a^Q and a^K (R_Q·R_K·(d_h + H) multiply-adds per cached token and key rank), rather than
  from the expanded query, q·b^K then a^K (H·d_h per cached token and key rank): the cheaper
  one. KV-only TPA has no query factors."""
  return 0 < cfg.tpa_q_rank * (cfg.head_dim + cfg.n_heads) < cfg.n_heads * cfg.head_dim


def _tpa_flops(cfg, s):
  """What mla_jax.tpa's decode step computes against the cached factors (docs/design.md#12-tpa):
  the scores' contraction with b^K (from the query's factors or the expanded query), then
  with a^K; p·a^V, then the weighted sum of the b^V."""
  h, k, rq, rk, rv = cfg.n_heads, cfg.head_dim, cfg.tpa_q_rank, cfg.tpa_k_rank, cfg.tpa_v_rank
  b_k = 2 * s * rq * rk * (k + h) if tpa_factored_queries(cfg) else 2 * s * h * rk * k
  return b_k + 2 * s * h * rk + s * h * rv + 2 * s * h * rv * k


register(Variant('tpa', module='mla_jax.tpa:TPAttention', configure=_configure_tpa,
                 rope_dim=lambda cfg: cfg.head_dim,
                 cache_elements=lambda cfg: (cfg.tpa_k_rank + cfg.tpa_v_rank) * (
                     cfg.n_heads + cfg.head_dim),
                 decode_flops=_tpa_flops, cache_formula='(R_K + R_V)·(n_h + d_h)·l',
                 example={'tpa_q_rank': 2, 'tpa_k_rank': 2, 'tpa_v_rank': 3}))
# --- GTA and GLA (Zadouri, Strauss & Dao 2025, arXiv 2505.21487; docs/design.md#13) ---------
def no_latent_heads(cfg) -> None:
  if cfg.latent_heads is not None:
    raise ConfigError(f"latent_heads applies only to attention='gla', not {cfg.attention!r}; "
                      'leave it unset')


def _configure_gta(cfg):
  no_latent_heads(cfg)
  no_tpa_fields(cfg)
  for name in ('q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim', 'v_head_dim', 'rope_block'):
    if getattr(cfg, name):
      raise ConfigError(f"{name} does not apply to attention='gta' (its widths are head_dim "
                        'and qk_rope_head_dim); leave it unset (0 for the ranks)')
  if cfg.qkv_bias or not cfg.kv_norm:
    raise ConfigError("qkv_bias and kv_norm=False do not apply to attention='gta'; leave them "
                      'at their defaults')
  g, h, k = cfg.n_kv_heads, cfg.n_heads, cfg.head_dim
  if g is None or h % g:
    raise ConfigError(f"attention='gta' needs n_kv_heads (its tied KV heads) dividing "
                      f'n_heads={h}, got {g}; pick one of the divisors of n_heads')
  r = k // 2 if cfg.qk_rope_head_dim is None else cfg.qk_rope_head_dim
  if r % 2 or r >= k:
    raise ConfigError(f'qk_rope_head_dim={r} (GTA\'s d_R) must be even and < head_dim={k}; '
                      'the paper uses head_dim / 2')
  return {'qk_rope_head_dim': r}


def _configure_gla(cfg):
  no_tpa_fields(cfg)
  if cfg.qkv_bias or cfg.rope_block is not None or not cfg.kv_norm:
    raise ConfigError("qkv_bias, rope_block and kv_norm=False do not apply to attention='gla';"
                      ' leave them at their defaults')
  g, h, c = 2 if cfg.latent_heads is None else cfg.latent_heads, cfg.n_heads, cfg.kv_lora_rank
  if c == 0:
    raise ConfigError("attention='gla' needs kv_lora_rank > 0 (d_c, split over its latent "
                      'heads; the paper uses 4 * head_dim)')
  if h % g or c % g:
    raise ConfigError(f'latent_heads={g} must divide n_heads={h} and kv_lora_rank={c}; pick a '
                      'common divisor (the paper uses 2)')
  if cfg.n_kv_heads not in (None, g):
    raise ConfigError(f"attention='gla' has latent_heads={g} KV groups: leave n_kv_heads unset, "
                      f'got {cfg.n_kv_heads}')
  if cfg.qk_nope_head_dim == 0:
    raise ConfigError("qk_nope_head_dim=0 leaves GLA's latent out of its scores; use > 0")
  defaults = {'qk_nope_head_dim': cfg.head_dim, 'qk_rope_head_dim': cfg.head_dim // 2,
              'v_head_dim': cfg.head_dim, 'n_kv_heads': g, 'latent_heads': g}
  return {name: value for name, value in defaults.items() if getattr(cfg, name) is None}


def _gla_flops(cfg, s):
  h, c = cfg.n_heads, cfg.kv_lora_rank // cfg.latent_heads
  n, r, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
  if cfg.mla_decode == 'absorbed':  # each head against its latent head's c_kv, and k_rope
    return 2 * h * s * (2 * c + r)
  return 2 * s * c * h * (n + v) + 2 * h * s * (n + r + v)


def _gla_decode_widths(cfg):  # the absorbed path, per latent head: c_kv / g and k_rope
  if cfg.mla_decode == 'naive':
    return None
  c = cfg.kv_lora_rank // cfg.latent_heads
  return (c, cfg.qk_rope_head_dim), c


# No 8-bit cache for either (cache_scales None: cache_dtype 'int8' is refused), and no
# Hugging Face export: transformers has no architecture for them.
register(Variant('gta', module='mla_jax.gta:GTAttention', configure=_configure_gta,
                 rope_dim=lambda cfg: cfg.qk_rope_head_dim,
                 cache_elements=lambda cfg: cfg.n_kv_heads * cfg.head_dim + cfg.qk_rope_head_dim,
                 decode_flops=_gqa_flops, cache_formula='(n_g·d_h + d_R)·l',
                 flash_widths=lambda cfg: (cfg.head_dim, cfg.head_dim),
                 decode_widths=lambda cfg: ((cfg.head_dim, cfg.qk_rope_head_dim), cfg.head_dim),
                 example={'n_kv_heads': 2, 'qk_rope_head_dim': 8}))
register(Variant('gla', module='mla_jax.gla:GLAttention', configure=_configure_gla,
                 rope_dim=lambda cfg: cfg.qk_rope_head_dim,
                 cache_elements=lambda cfg: cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                 decode_flops=_gla_flops, cache_formula='(d_c + d_R)·l',
                 flash_widths=_mla_flash_widths, decode_widths=_gla_decode_widths,
                 example={'kv_lora_rank': 32, 'qk_rope_head_dim': 8, 'latent_heads': 2}))
