"""Pallas flash-decoding kernels: absorbed MLA and MHA / GQA / MQA, split-KV (split_kv.py).

cpu_attention is the C++ causal attention for whole sequences on a CPU (mla_jax.attention_op)."""

from __future__ import annotations

from mla_jax.kernels.gqa_decode import gqa_decode
from mla_jax.kernels.mla_decode import mla_decode
from mla_jax.kernels.split_kv import fits

__all__ = ['fits', 'gqa_decode', 'mla_decode']
