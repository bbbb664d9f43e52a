"""mla_jax: Multi-head Latent Attention and the variants it is measured against, in JAX/Flax."""

from mla_jax.cache import KVCache, LatentCache, cache_elements_per_token
from mla_jax.config import ConfigError, ModelConfig, YarnScaling
from mla_jax.decode import decode_step, generate, prefill
from mla_jax.model import Transformer

__all__ = [
    'ConfigError', 'KVCache', 'LatentCache', 'ModelConfig', 'Transformer', 'YarnScaling',
    'cache_elements_per_token', 'decode_step', 'generate', 'prefill',
]
