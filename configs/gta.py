"""Grouped-Tied Attention (Zadouri, Strauss & Dao 2025), 2 tied KV heads, d_R = d_h / 2 = 16:
cache (2 x 32 + 16) x 4 = 320 elements per token, against GQA-2's 512
(docs/design.md#13-gta-and-gla).

  python -m mla_jax.train --config=configs/gta.py --workdir=runs/gta
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config(arg)
  c.model.attention = 'gta'
  c.model.n_kv_heads = 2
  c.model.qk_rope_head_dim = (c.model.d_model // c.model.n_heads) // 2
  return c
