"""Multi-query attention, one KV head: cache 2 x 32 x 4 = 256 elements per token.

  python -m mla_jax.train --config=configs/mqa.py --workdir=runs/mqa
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config(arg)
  c.model.attention = 'mqa'
  return c
