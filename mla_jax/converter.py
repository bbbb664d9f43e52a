"""Hugging Face checkpoints to workdirs and back (mla_jax.hf does the mapping); the command
line is `python -m mla_jax.convert`.

Import writes a workdir (config.json + an orbax checkpoint at step 0) that mla_jax.evaluate
and mla_jax.generate use as they use a trained run. Export writes config.json and
model.safetensors that transformers' from_pretrained loads: MHA / GQA / MQA as
LlamaForCausalLM, MLA as DeepseekV3ForCausalLM. Neither direction overwrites anything: the
target must be new or empty.
"""

from __future__ import annotations

import pathlib

import ml_collections
from flax import nnx

from mla_jax import hf
from mla_jax import workdir as wd

EVAL_SEQ_LEN = 512  # perplexity windows of a converted run (capped by max_position_embeddings)


def import_hf(hf_dir, workdir, dtype: str = 'float32', param_dtype: str = 'float32',
              mla_decode: str = 'absorbed') -> dict:
  """Converts a Hugging Face folder into a new workdir; -> the workdir's config."""
  workdir = pathlib.Path(workdir)
  hf.must_be_new(workdir, '--workdir')
  model, hf_json = hf.load(hf_dir, dtype, param_dtype)
  cfg = model.cfg.to_dict()
  cfg['mla_decode'] = mla_decode
  seq_len = min(EVAL_SEQ_LEN, model.cfg.max_seq_len)
  config = ml_collections.ConfigDict(dict(
      seed=0, model=cfg, mesh=dict(data=-1, fsdp=1, tensor=1),
      eval=dict(seq_len=seq_len, stride=max(seq_len // 2, 1), batch_size=8),
      source=dict(hf_dir=str(pathlib.Path(hf_dir).absolute()),
                  architecture=(hf_json.get('architectures') or ['?'])[0])))
  wd.write_config(workdir, config)
  wd.save(wd.manager(workdir / 'checkpoints'), 0, nnx.state(model, nnx.Param),
          meta={'source': 'huggingface'})
  return config


def export_hf(workdir, out_dir, step: int | None = None, best: bool = False) -> dict:
  """Writes a run's parameters as a new Hugging Face folder; -> its config.json."""
  hf.must_be_new(pathlib.Path(out_dir), '--to_hf')
  model, _ = wd.load_workdir(workdir, step, best)
  return hf.save(model, out_dir)
