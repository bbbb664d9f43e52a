"""Pallas flash-decoding kernels: absorbed MLA (and GLA, per latent head), MHA / GQA / MQA (and
GTA, its tied state read once), split-KV (split_kv.py).

cpu_attention is the C++ causal attention for whole sequences on a CPU (mla_jax.attention_op)."""

from __future__ import annotations

from mla_jax.kernels.gqa_decode import gqa_decode
from mla_jax.kernels.mla_decode import gla_decode, mla_decode
from mla_jax.kernels.split_kv import fits

__all__ = ['fits', 'gla_decode', 'gqa_decode', 'mla_decode']
