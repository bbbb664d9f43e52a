"""Grouped Latent Attention, GLA-2 (Zadouri, Strauss & Dao 2025): MLA's d_c = 4 d_h = 128 as two
latent heads of 64, d_r = d_h / 2 = 16: cache (128 + 16) x 4 = 576 elements per token, MLA's;
(64 + 16) x 4 = 320 a device when the tensor axis splits the latent heads
(docs/design.md#13-gta-and-gla).

  python -m mla_jax.train --config=configs/gla.py --workdir=runs/gla
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config(arg)
  c.model.attention = 'gla'
  c.model.latent_heads = 2
  c.model.kv_lora_rank = 4 * (c.model.d_model // c.model.n_heads)
  c.model.qk_rope_head_dim = (c.model.d_model // c.model.n_heads) // 2
  return c
