"""mla_jax: Multi-head Latent Attention and the variants it is measured against, in JAX/Flax."""

from mla_jax.cache import KVCache, LatentCache
from mla_jax.config import ConfigError, Llama3Scaling, ModelConfig, YarnScaling
from mla_jax.decode import decode_step, generate, logits_through_cache, prefill
from mla_jax.errors import Error
from mla_jax.model import Transformer
from mla_jax.variants import Variant, cache_bytes_per_token, cache_elements_per_token

__all__ = [
    'ConfigError', 'Error', 'KVCache', 'LatentCache', 'Llama3Scaling', 'ModelConfig', 'Transformer',
    'Variant', 'YarnScaling',
    'cache_bytes_per_token', 'cache_elements_per_token', 'decode_step', 'generate', 'load_hf',
    'load_tokenizer', 'load_workdir', 'logits_through_cache', 'prefill', 'save_hf', 'to_mla',
]

# Imported on first use: they pull in orbax (checkpoints) and grain (data), which the model code
# does not need.
_LAZY = {'load_workdir': ('mla_jax.workdir', 'load_workdir'), 'load_hf': ('mla_jax.hf', 'load'),
         'load_tokenizer': ('mla_jax.workdir', 'load_tokenizer'),
         'save_hf': ('mla_jax.hf', 'save'), 'to_mla': ('mla_jax.mla_conversion', 'to_mla')}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
