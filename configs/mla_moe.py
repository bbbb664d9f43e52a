"""MLA with DeepSeekMoE feed-forward layers (DeepSeek-V3's routing) at this CPU's scale.

  python -m mla_jax.train --config=configs/mla_moe.py --workdir=runs/mla_moe

configs/mla.py's model and data, with every layer but the first a mixture of experts: 16
routed SwiGLU experts of width d_model / 2, 4 chosen per token by a sigmoid gate over 4 groups
keeping 2 (the correction bias moved by the loss-free balancing, DeepSeek-V3 §2.1.2, and the
small sequence-wise balance loss), plus 1 shared expert. A token passes through 5 experts of
width 128: 640 values, about the dense model's d_ff of 704, while the layer stores 17 experts.
The trainer prints the total and active parameters; docs/design.md §11 has the math.
"""

from configs import mla


def get_config(arg: str = ''):
  c = mla.get_config(arg)
  m = c.model
  m.update(n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
           moe_intermediate_size=m.d_model // 2, first_k_dense_replace=1,
           scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2,
           norm_topk_prob=True, routed_scaling_factor=1.0, bias_update_speed=1e-3,
           seq_aux_loss_alpha=1e-4)
  return c
