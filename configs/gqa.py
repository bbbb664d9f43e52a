"""Grouped-query attention, 2 KV groups: cache 2 x 2 x 32 x 4 = 512 elements per token.

  python -m mla_jax.train --config=configs/gqa.py --workdir=runs/gqa
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config(arg)
  c.model.attention = 'gqa'
  c.model.n_kv_heads = 2
  return c
