"""Multi-head attention: 8 KV heads, cache 2 x 8 x 32 x 4 = 2048 elements per token.

  python -m mla_jax.train --config=configs/mha.py --workdir=runs/mha
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config(arg)
  c.model.attention = 'mha'
  return c
