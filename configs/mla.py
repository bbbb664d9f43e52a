"""Multi-head Latent Attention at the paper's ratios: d_c = 4 d_h = 128, d_r = d_h / 2 = 16.

  python -m mla_jax.train --config=configs/mla.py --workdir=runs/mla

Cache (128 + 16) x 4 = 576 elements per token: 3.6x smaller than MHA's 2048 (DeepSeek-V2
Table 1: (d_c + d_r) l = 4.5 d_h l). No query compression at this size.
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config(arg)
  c.model.attention = 'mla'
  c.model.kv_lora_rank = 4 * (c.model.d_model // c.model.n_heads)
  c.model.qk_rope_head_dim = (c.model.d_model // c.model.n_heads) // 2
  return c
