"""Recall vs KV-cache size: multi-query associative recall (MQAR, Zoology) on the seven rows of
the capacity ablation (configs/ablations/capacity_vs_cache.py), parameter-matched the same way.

`arg` is ROW,kvN (N key-value pairs), optionally followed by ',quick':

  python -m mla_jax.train --config=configs/ablations/recall_vs_cache.py:mla4,kv8 --workdir=runs/x
  python -m experiments.recall_vs_cache --workdir=runs/recall    # every row, N, rate and seed

Every row: d_model 64, 2 layers (MQAR needs two: one to pair each value with the key before
it, one to look the queried key up), 8 query heads of d_h = 16 (so MLA's decoupled rope key
has d_r = 8), vocabulary 256 (keys 0-127, values 128-255: chance 1/128), sequences of 64
tokens, 32 per step. Only the attention and the SwiGLU width differ:

  mha   G = 8 KV heads        cache 2 n_h d_h l   = 512 elements per token
  gqa4  G = 4                 cache 2 n_g d_h l   = 256
  gqa2  G = 2                 cache 2 n_g d_h l   = 128
  mqa   G = 1                 cache 2 d_h l       =  64
  mla2  d_c = 2 d_h = 32      (d_c + d_r) l       =  80
  mla4  d_c = 4 d_h = 64      (d_c + d_r) l       = 144
  mla8  d_c = 8 d_h = 128     (d_c + d_r) l       = 272

d_model (64) is below n_h d_h (128), as in most released models (DeepSeek-V2: 5120 vs
128 x 128): MHA's keys and values have rank at most d_model per layer.
The learning rate is set by the experiment (the best of LEARNING_RATES per row and N).
"""

from ml_collections import ConfigDict

from configs import base
from configs.ablations import capacity_vs_cache as capacity

KV_PAIRS = (4, 8, 16)  # difficulties at seq_len 64 (Zoology: 4-16 pairs at 64 tokens)
LEARNING_RATES = (1e-3, 2.2e-3, 4.6e-3, 1e-2)  # log-spaced, as Zoology sweeps 4 rates
QUICK_KV_PAIRS = (4,)
QUICK_LEARNING_RATES = (3e-3, 1e-2)
TEST_SEED = 1  # the held-out set that results are reported on (val_seed 0 picks the rate)


def _shared(kv_pairs: int, quick: bool) -> ConfigDict:
  c = base.get_config()
  c.model.update(vocab_size=256, d_model=64, n_layers=2, n_heads=8, head_dim=16, max_seq_len=64)
  c.data.update(task='mqar', seq_len=64, batch_size=32)
  c.data.mqar.update(num_kv_pairs=kv_pairs, power_a=0.01, val_examples=1024, val_seed=0)
  c.opt.update(warmup_steps=60)
  c.train.update(steps=600, log_every=50, checkpoint_every=200, eval_every=10**9)
  c.eval.update(seq_len=64, stride=64, batch_size=256)
  if quick:  # the whole pipeline in seconds per run; the numbers mean nothing
    c.model.update(vocab_size=64, d_model=32, head_dim=8, max_seq_len=32)
    c.data.update(seq_len=32, batch_size=16)
    c.data.mqar.update(val_examples=128)
    c.opt.update(warmup_steps=4)
    c.train.update(steps=20, log_every=5, checkpoint_every=20)
    c.eval.update(seq_len=32, stride=32, batch_size=128)
  c.train.keep_checkpoints = 1
  return c


def get_config(arg: str = 'mla4,kv8') -> ConfigDict:
  name, _, rest = arg.partition(',')
  kv, _, mode = rest.partition(',')
  ok = name in capacity.ROWS and kv.startswith('kv') and kv[2:].isdigit() and mode in ('',
                                                                                        'quick')
  if not ok:
    raise ValueError(f'unknown row {arg!r}: use ROW,kvN[,quick] with ROW one of '
                     f'{sorted(capacity.ROWS)}, e.g. mla4,kv8')
  return capacity.matched_row(lambda: _shared(int(kv[2:]), mode == 'quick'), name)
