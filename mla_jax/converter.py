"""Hugging Face checkpoints to workdirs and back (mla_jax.hf does the mapping), and MHA / GQA /
MQA runs to MLA runs (mla_jax.to_mla does the math); the command line is
`python -m mla_jax.convert`.

Import writes a workdir (config.json + an orbax checkpoint at step 0) that mla_jax.evaluate
and mla_jax.generate use as they use a trained run. Export writes config.json and
model.safetensors that transformers' from_pretrained loads: MHA / GQA / MQA as
LlamaForCausalLM, MLA as DeepseekV3ForCausalLM. `to_mla_workdir` writes the same kind of
workdir from a run's MLA conversion, keeping the run's data and eval sections (evaluate scores
it on the source corpus) and recording how it was made in a `conversion` section;
`python -m mla_jax.train --init_from=` fine-tunes it. Nothing overwrites anything: the target
must be new or empty, and is written whole (into a temporary sibling renamed at the end, so a
killed conversion leaves nothing that blocks running it again).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import ml_collections
import numpy as np
from flax import nnx

from mla_jax import data, hf
from mla_jax import workdir as wd
from mla_jax.to_mla import ConversionError, to_mla

EVAL_SEQ_LEN = 512  # perplexity windows of a converted run (capped by max_position_embeddings)


def import_hf(hf_dir, workdir, dtype: str = 'float32', param_dtype: str = 'float32',
              mla_decode: str = 'absorbed') -> dict:
  """Converts a Hugging Face folder into a new workdir; -> the workdir's config."""
  workdir = pathlib.Path(workdir)
  hf.must_be_new(workdir, '--workdir')  # before the (long) load; staged checks again
  model, hf_json = hf.load(hf_dir, dtype, param_dtype)
  cfg = model.cfg.to_dict()
  cfg['mla_decode'] = mla_decode
  seq_len = min(EVAL_SEQ_LEN, model.cfg.max_seq_len)
  config = ml_collections.ConfigDict(dict(
      seed=0, model=cfg, mesh=dict(data=-1, fsdp=1, tensor=1),
      eval=dict(seq_len=seq_len, stride=max(seq_len // 2, 1), batch_size=8),
      source=dict(hf_dir=str(pathlib.Path(hf_dir).absolute()),
                  architecture=(hf_json.get('architectures') or ['?'])[0])))
  _write_workdir(workdir, '--workdir', config, model, 'huggingface')
  return config


def _write_workdir(workdir, flag: str, config, model, source: str) -> None:
  """A new workdir: config.json and checkpoint 0, written whole (hf.staged)."""
  with hf.staged(workdir, flag) as tmp:
    wd.write_config(tmp, config)
    mngr = wd.manager(tmp / 'checkpoints')
    wd.save(mngr, 0, nnx.state(model, nnx.Param), meta={'source': source})
    mngr.close()


def export_hf(workdir, out_dir, step: int | None = None, best: bool = False) -> dict:
  """Writes a run's parameters as a new Hugging Face folder; -> its config.json."""
  hf.must_be_new(pathlib.Path(out_dir), '--to_hf')
  model, _ = wd.load_workdir(workdir, step, best)
  return hf.save(model, out_dir)


def calibration_batches(config, n: int) -> Iterator[np.ndarray]:
  """n batches [data.batch_size, data.seq_len] of the run's training split, drawn from
  (seed, i) on a stream of their own (training draws stream 0, these stream 1), made one at a
  time as they are used. n may not exceed the batches the split holds: more only repeats its
  windows and takes time without a word."""
  if config.data is None:
    raise ConversionError('the source run has no corpus (a converted checkpoint?); use '
                          '--calibration_batches=0 (statistics from the weights)')
  tokens, d = data.load_splits(config.data)['train'], config.data
  most = len(tokens) // (d.batch_size * d.seq_len)
  if n > most:
    raise ConversionError(f'--calibration_batches={n} exceeds the {most} batches of '
                          f'{d.batch_size} x {d.seq_len} tokens that the training split '
                          f'({len(tokens):,} tokens) holds; give at most {most}')

  def draw():
    for i in range(n):
      rng = np.random.default_rng([config.seed, i, 1])
      starts = rng.integers(0, len(tokens) - d.seq_len, size=d.batch_size)
      yield tokens[starts[:, None] + np.arange(d.seq_len)].astype(np.int32)

  return draw()


def to_mla_workdir(workdir, out, kv_lora_rank: int | None = None,
                   qk_rope_head_dim: int | None = None, rope_selection: str = '2norm',
                   calibration: int = 0, latent_norm: str = 'calibrated',
                   step: int | None = None, best: bool = False) -> ml_collections.ConfigDict:
  """Converts a run (MHA / GQA / MQA) into a new MLA workdir `out`; -> its config. Without
  kv_lora_rank: the exact embedding; calibration: training batches for the statistics."""
  out = pathlib.Path(out)
  hf.must_be_new(out, '--to_mla')
  if kv_lora_rank is None and (calibration or qk_rope_head_dim is not None):
    raise ConversionError('--calibration_batches and --qk_rope_head_dim apply to the '
                          'compression: give --kv_lora_rank too (without it the conversion is '
                          'the exact embedding)')
  if calibration < 0:
    raise ConversionError(f'--calibration_batches={calibration} must be >= 0')
  source = wd.read_config(workdir)
  batches = calibration_batches(source, calibration) if calibration else None  # checks n now
  model, _ = wd.load_workdir(workdir, step, best)
  mla = to_mla(model, kv_lora_rank, qk_rope_head_dim, rope_selection=rope_selection,
               calibration=batches, latent_norm=latent_norm)
  config = ml_collections.ConfigDict({k: v for k, v in source.to_dict().items()
                                      if k in ('seed', 'data', 'eval', 'mesh')})
  config.model = mla.cfg.to_dict()
  config.conversion = dict(
      source_workdir=str(pathlib.Path(workdir).absolute()), source_attention=model.cfg.attention,
      step=step, best=best, exact=kv_lora_rank is None, kv_lora_rank=mla.cfg.kv_lora_rank,
      qk_rope_head_dim=mla.cfg.qk_rope_head_dim, calibration_batches=calibration,
      rope_selection=None if kv_lora_rank is None else rope_selection,
      latent_norm=None if kv_lora_rank is None else latent_norm)
  _write_workdir(out, '--to_mla', config, mla, 'to_mla')
  return config
