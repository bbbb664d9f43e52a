"""Capacity vs KV-cache size (DeepSeek-V2 Table 1, with Tables 8 and 9 in miniature).

One config per row; `arg` is the row name, optionally followed by ',paper' or ',125m' (the
other geometries), ',mlp' (MLP widths matched instead of parameter counts) and ',quick':

  python -m mla_jax.train --config=configs/ablations/capacity_vs_cache.py:mla4 --workdir=runs/x
  python -m mla_jax.train --config=configs/ablations/capacity_vs_cache.py:mla4,paper ...
  python -m experiments.capacity_vs_cache --workdir=runs/capacity    # rates, then 3 seeds

Every row has the same d_model (128), layers (4), data, tokens (200 steps of 64 x 128 bytes =
1.6M), optimizer and schedule; only the attention differs. Geometry 'small' (the default) has
8 query heads of d_h = 16:

  mha   G = 8 KV heads        cache 2 n_h d_h l   = 1024 elements per token
  gqa4  G = 4                 cache 2 n_g d_h l   =  512
  gqa2  G = 2                 cache 2 n_g d_h l   =  256
  mqa   G = 1                 cache 2 d_h l       =  128
  mla2  d_c = 2 d_h, d_r = d_h / 2   (d_c + d_r) l = 160
  mla4  d_c = 4 d_h (the paper)      (d_c + d_r) l = 288
  mla8  d_c = 8 d_h                  (d_c + d_r) l = 544
  gta2  2 tied KV heads, d_R = d_h / 2    (G d_h + d_R) l = 160
  gla2  2 latent heads of 2 d_h, d_r = d_h / 2   (d_c + d_r) l = 288
  tpa   R_Q = 6, R_K = R_V = 2           (R_K + R_V)(n_h + d_h) l = 384

Geometry 'paper' has DeepSeek-V2's head shape in miniature: 4 query heads of d_h = 32, so the
rope key has d_r = d_h / 2 = 16 dimensions (8 in 'small') and mla4's d_c = 4 d_h = 128 makes
its cache (d_c + d_r) l = 4.5 d_h l, GQA with 2.25 groups, as in the paper's Table 1. With 4
heads, gqa4 is MHA: that row is left out.

  mha   G = 4     1024      gqa2  G = 2   512      mqa   G = 1   256
  mla2  d_c = 64   320      mla4  d_c = 128   576  mla8  d_c = 256  1088
  gta2  G = 2      320      gla2  d_c = 128   576  tpa   R = 6,2,2   576

Geometry '125m' is GPT-2 small's shape, the scale the published comparisons start at:
d_model 768, 12 layers, 12 query heads of d_h = 64 (d_r = 32; mla4's d_c = 256), MHA's d_ff
2048, a 32,768-token BPE by default (the experiment's --tokenizer sets it): 135M parameters,
85M of them in the layers. 38,000 steps of 64 x 1024 tokens (microbatches of 32) = 2.49B
tokens, warmup 700, lr 6e-4 alone. Its ',quick' keeps the heads on d_model 384, 2 layers.

A row is one ROWS entry: its attention and the fields it sets from the geometry's d_h.
Parameters are matched to the MHA row by the SwiGLU width alone (`matched_d_ff`, rounded to a
multiple of 8: within 0.7%): attention with fewer parameters gets a wider MLP. The learning
rate is the experiment's: every row at the best of its geometry's LEARNING_RATES
(experiments/sweep.py); base.py's 3e-3 when a row is trained on its own.

With ',mlp' every row keeps MHA's SwiGLU width and the parameter counts differ instead: the
control that tells whether a row's loss comes from its attention or from the MLP width the
matching gave it. With ',moe' every layer but the first is DeepSeekMoE (8 routed experts, 2
chosen by V3's grouped sigmoid gate, 1 shared; DeepSeek-V2's Table 9 compared MLA and MHA on
MoE models), and the matching sets the experts' width instead of d_ff.
"""

from ml_collections import ConfigDict

from configs import base
from mla_jax.config import ModelConfig
from mla_jax.model import param_count


def gqa(groups: int) -> tuple:
  """A GQA-family row: `groups` KV heads (the geometry's query heads: MHA; 1: MQA)."""
  return 'gqa', lambda d_h: {'n_kv_heads': groups}


def mla(k: int) -> tuple:
  """An MLA row: latent d_c = k d_h, decoupled rope key d_r = d_h / 2 (DeepSeek-V2's ratio)."""
  return 'mla', lambda d_h: {'kv_lora_rank': k * d_h, 'qk_rope_head_dim': d_h // 2}


# name -> (attention, the model fields that make the row, from the geometry's head width d_h).
# A row of another variant is one entry here, e.g. 'xyz2': ('xyz', lambda d_h: {...}): every
# geometry but 'paper' (whose gqa4 is MHA) runs every row, the recall experiment too, and the
# reports place it by its cache (mla_jax.variants) with no other change.
ROWS = {
    'mha': ('mha', lambda d_h: {}), 'gqa4': gqa(4), 'gqa2': gqa(2), 'mqa': ('mqa', lambda d_h: {}),
    'mla2': mla(2), 'mla4': mla(4), 'mla8': mla(8),
    # Zadouri, Strauss & Dao 2025: 2 tied KV heads with a d_h / 2 rope key, half of GQA-2's
    # cache; GLA-2 splits mla4's latent in two heads (MLA's cache, half a device's under TP)
    'gta2': ('gta', lambda d_h: {'n_kv_heads': 2, 'qk_rope_head_dim': d_h // 2}),
    'gla2': ('gla', lambda d_h: {'kv_lora_rank': 4 * d_h, 'qk_rope_head_dim': d_h // 2,
                                 'latent_heads': 2}),
    # Zhang et al. 2025: the paper's ranks R_Q = 6, R_K = R_V = 2
    'tpa': ('tpa', lambda d_h: {'tpa_q_rank': 6, 'tpa_k_rank': 2, 'tpa_v_rank': 2}),
}
# The 125m geometry's vocabulary when the experiment is not given a tokenizer (its runs take
# the tokenizer's), and its steps: 38,000 of 64 x 1024 tokens = 2.49B tokens, about 20 per
# parameter (Chinchilla's ratio) at ~125M parameters.
VOCAB_125M, STEPS_125M = 32768, 38_000
REFERENCE = 'mha'  # the row whose parameter count every other row matches
D_FF_MULTIPLE = 8
# geometry -> query heads (d_h = 128 / heads at d_model 128; 125m: 768 / 12 = 64), and its rows.
GEOMETRIES = {'small': (8, tuple(ROWS)),
              'paper': (4, tuple(row for row in ROWS if row != 'gqa4')),
              '125m': (12, tuple(ROWS))}
# geometry -> the rates seed 0 of every row is trained at, log-spaced by 2. The paper geometry
# ran first, from base.py's 3e-3 down (marin #7381 found MLA's best rate a little below GQA's
# at this kind of scale), and every row chose the highest, 6e-3; 1.2e-2 was added and is worse
# for every row. The small geometry has the same width, tokens and schedule, so its three
# rates are centred on 6e-3: a row choosing an end rate is flagged in the report (not bracketed).
# 125m: GPT-2 small's 6e-4 (and the TPA paper's at 124M), with a factor of 2 either side.
LEARNING_RATES = {'small': (3e-3, 6e-3, 1.2e-2), 'paper': (1.5e-3, 3e-3, 6e-3, 1.2e-2),
                  '125m': (3e-4, 6e-4, 1.2e-3)}
QUICK_LEARNING_RATES = (3e-3, 1e-2)


def width_field(model: ConfigDict) -> str:
  """The SwiGLU width the matching sets: d_ff, or with MoE layers the experts' width."""
  return 'moe_intermediate_size' if model.n_routed_experts else 'd_ff'


def matched_d_ff(model: ConfigDict, target_params: int) -> int:
  """The SwiGLU width (width_field) that brings the model closest to target_params (a
  multiple of 8; an expert's, of 2).

  Parameters are affine in it (three d_model x width matrices per layer or expert), so two
  counts give the slope; nothing here assumes how the attention is built.
  """
  field = width_field(model)
  # An expert's width counts (E + shared) times per layer: a finer step keeps the match close.
  step = D_FF_MULTIPLE if field == 'd_ff' else 2
  count = lambda w: param_count(ModelConfig.from_dict({**model.to_dict(), field: w}))
  lo, hi = step, 2 * step
  slope = (count(hi) - count(lo)) / (hi - lo)
  d_ff = lo + (target_params - count(lo)) / slope
  return max(step, step * round(d_ff / step))


def _shared(quick: bool, geometry: str = 'small', moe: bool = False) -> ConfigDict:
  c = base.get_config()
  heads = GEOMETRIES[geometry][0]
  c.model.update(d_model=128, n_layers=4, n_heads=heads, head_dim=128 // heads, max_seq_len=256)
  c.data.update(seq_len=128, batch_size=64)
  c.train.update(steps=200, log_every=10, checkpoint_every=50, eval_every=10**9)
  c.eval.update(seq_len=128, stride=64, batch_size=64)
  if quick:  # the whole pipeline in seconds per row; the numbers mean nothing
    c.model.update(d_model=64, n_layers=2, head_dim=64 // heads, max_seq_len=128)
    c.data.update(seq_len=64, batch_size=16)
    c.opt.update(warmup_steps=4)
    c.train.update(steps=20, log_every=5, checkpoint_every=10)
    c.eval.update(seq_len=64, stride=64, batch_size=256)
  if geometry == '125m':
    _at_125m(c, quick)
  c.train.keep_checkpoints = 1
  if moe:  # DeepSeekMoE feed-forward layers after the first, as DeepSeek-V2's Table 9 models
    c.model.update(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                   moe_intermediate_size=c.model.d_model // 2, first_k_dense_replace=1,
                   scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2,
                   norm_topk_prob=True, bias_update_speed=1e-3, seq_aux_loss_alpha=1e-4)
  return c


def _at_125m(c: ConfigDict, quick: bool) -> None:
  """GPT-2 small's shape on config c (in place); quick: its heads on a narrow 2-layer model."""
  c.model.update(d_model=768, n_layers=12, n_heads=12, head_dim=64, max_seq_len=1024,
                 vocab_size=VOCAB_125M, d_ff=None)
  c.data.update(seq_len=1024, batch_size=64, tokenizer=f'train:{VOCAB_125M}')
  c.opt.update(lr=6e-4, warmup_steps=700, grad_accum_steps=2)  # 32 x 1024 tokens at a time
  c.train.update(steps=STEPS_125M, log_every=100, checkpoint_every=1000)
  c.eval.update(seq_len=1024, stride=512, batch_size=16)
  if quick:  # the pipeline at the real head shape (d_c, d_r, G as at 125M); numbers mean nothing
    c.model.update(d_model=384, n_layers=2, max_seq_len=128, vocab_size=256)
    c.data.update(seq_len=64, batch_size=16, tokenizer='byte')
    c.opt.update(warmup_steps=4, grad_accum_steps=1)
    c.train.update(steps=20, log_every=5, checkpoint_every=10)
    c.eval.update(seq_len=64, stride=64, batch_size=256)


def apply_row(c: ConfigDict, name: str) -> ConfigDict:
  """The row's attention and its fields (ROWS) on config c, in place."""
  attention, fields = ROWS[name]
  m = c.model
  m.attention = attention
  m.update(fields(m.head_dim or m.d_model // m.n_heads))
  return c


def get_config(arg: str = 'mla4') -> ConfigDict:
  name, *options = arg.split(',')
  geometries = [o for o in options if o in GEOMETRIES and o != 'small']
  geometry = geometries[0] if len(geometries) == 1 else 'small'
  if (name not in GEOMETRIES[geometry][1] or len(set(options)) != len(options)
      or len(geometries) > 1 or not set(options) <= {'paper', '125m', 'mlp', 'quick', 'moe'}):
    raise ValueError(f'unknown row {arg!r}: use ROW[,paper|,125m][,mlp][,quick][,moe] with ROW '
                     f'one of {sorted(ROWS)} (not gqa4 with paper: 4 heads make it MHA)')
  shared = lambda: _shared('quick' in options, geometry, 'moe' in options)
  if 'mlp' in options:
    c = apply_row(shared(), name)
    field = width_field(c.model)
    c.model[field] = matched_row(shared, REFERENCE).model[field]
    return c
  return matched_row(shared, name)


def matched_row(shared, name: str) -> ConfigDict:
  """Row `name` on the config shared() makes, its SwiGLU width matching REFERENCE's count."""
  target = param_count(ModelConfig.from_dict(apply_row(shared(), REFERENCE).model))
  c = apply_row(shared(), name)
  c.model[width_field(c.model)] = matched_d_ff(c.model, target)
  return c
