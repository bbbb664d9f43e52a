r"""Hugging Face checkpoints to workdirs and back.

  python -m mla_jax.convert --hf_dir=path/to/hf_model --workdir=runs/imported
  python -m mla_jax.convert --workdir=runs/mla --to_hf=exported/mla [--step=N | --best]

Import writes a workdir that evaluate and generate use as they use a trained run; export writes
a folder that transformers' from_pretrained loads. Neither overwrites anything. The logic is
mla_jax.converter (workdirs) and mla_jax.hf (the mapping).
"""

from absl import flags

from mla_jax import cli, converter, hf
from mla_jax.config import DTYPES, MLA_DECODE_PATHS

FLAGS = flags.FLAGS
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


def main():
  if bool(FLAGS.hf_dir) == bool(FLAGS.to_hf):
    raise hf.HFError('give --hf_dir (import into --workdir) or --to_hf (export --workdir), '
                     'not both or neither')
  if FLAGS.hf_dir:
    config = converter.import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.dtype, FLAGS.param_dtype,
                                 FLAGS.mla_decode)
    m = config.model
    print(f'{config.source.architecture} -> {FLAGS.workdir}: {m.attention}, '
          f'{m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}')
  else:
    hf_json = converter.export_hf(FLAGS.workdir, FLAGS.to_hf, FLAGS.step, FLAGS.best)
    print(f'{FLAGS.workdir} -> {FLAGS.to_hf}: {hf_json["architectures"][0]}')


if __name__ == '__main__':
  cli.run(main)
