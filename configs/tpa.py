"""Tensor Product Attention (Zhang et al. 2025) at the paper's ranks R_Q = 6, R_K = R_V = 2:
cache (2 + 2) x (8 heads + 32) x 4 = 640 elements per token, against MHA's 2048
(docs/design.md#12-tpa).

  python -m mla_jax.train --config=configs/tpa.py --workdir=runs/tpa
"""

from configs import base


def get_config(arg: str = ''):
  c = base.get_config(arg)
  c.model.attention = 'tpa'
  c.model.tpa_q_rank, c.model.tpa_k_rank, c.model.tpa_v_rank = 6, 2, 2
  return c
