r"""Hugging Face checkpoints to workdirs and back (mla_jax.hf does the mapping).

  python -m mla_jax.convert --hf_dir=path/to/hf_model --workdir=runs/imported
  python -m mla_jax.convert --workdir=runs/mla --to_hf=exported/mla [--step=N | --best]

Import writes a workdir (config.json + an orbax checkpoint at step 0) that mla_jax.evaluate
and mla_jax.generate use as they use a trained run. Export writes config.json and
model.safetensors that transformers' from_pretrained loads: MHA / GQA / MQA as
LlamaForCausalLM, MLA as DeepseekV3ForCausalLM. Neither direction overwrites anything: the
target must be new or empty.
"""

from __future__ import annotations

import pathlib

import ml_collections
from absl import app, flags
from flax import nnx

from mla_jax import cli, hf
from mla_jax import workdir as wd
from mla_jax.config import DTYPES, MLA_DECODE_PATHS

EVAL_SEQ_LEN = 512  # perplexity windows of a converted run (capped by max_position_embeddings)


def _must_be_new(path: pathlib.Path, what: str) -> None:
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise hf.HFError(f'{what} {path} already exists and is not empty; give a new folder '
                     '(nothing is overwritten)')


def import_hf(hf_dir, workdir, dtype: str = 'float32', param_dtype: str = 'float32',
              mla_decode: str = 'absorbed') -> dict:
  """Converts a Hugging Face folder into a new workdir; -> the workdir's config."""
  workdir = pathlib.Path(workdir)
  _must_be_new(workdir, '--workdir')
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
  out = pathlib.Path(out_dir)
  _must_be_new(out, '--to_hf')
  model, _ = wd.load_workdir(workdir, step, best)
  return hf.save(model, out)


FLAGS = flags.FLAGS


def _define_flags():  # only for the CLI: tests import this module beside other entry points
  flags.DEFINE_string('hf_dir', None, 'import: a Hugging Face model folder')
  flags.DEFINE_string('workdir', None, 'import: the new workdir; export: the run to export')
  flags.DEFINE_string('to_hf', None, 'export: the new Hugging Face folder')
  flags.DEFINE_enum('dtype', 'float32', DTYPES, 'import: compute dtype of the converted model')
  flags.DEFINE_enum('param_dtype', 'float32', DTYPES, 'import: dtype its parameters are kept in '
                    '(bfloat16 halves the memory of a float32 copy of a bfloat16 checkpoint)')
  flags.DEFINE_enum('mla_decode', 'absorbed', MLA_DECODE_PATHS, 'import: MLA decode path')
  flags.DEFINE_integer('step', None, 'export: checkpoint step (default: the latest)')
  flags.DEFINE_bool('best', False, 'export: the best checkpoint by validation loss')
  flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  cli.quiet_logging()
  try:
    if bool(FLAGS.hf_dir) == bool(FLAGS.to_hf):
      raise hf.HFError('give --hf_dir (import into --workdir) or --to_hf (export --workdir), '
                       'not both or neither')
    if FLAGS.hf_dir:
      config = import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.dtype, FLAGS.param_dtype,
                         FLAGS.mla_decode)
      m = config.model
      print(f'{config.source.architecture} -> {FLAGS.workdir}: {m.attention}, '
            f'{m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}')
    else:
      hf_json = export_hf(FLAGS.workdir, FLAGS.to_hf, FLAGS.step, FLAGS.best)
      print(f'{FLAGS.workdir} -> {FLAGS.to_hf}: {hf_json["architectures"][0]}')
  except (ValueError, wd.WorkdirError) as e:  # HFError and ConfigError are ValueErrors
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
