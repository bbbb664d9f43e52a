r"""Hugging Face checkpoints to workdirs and back; MHA / GQA / MQA runs to MLA runs.

  python -m mla_jax.convert --hf_dir=path/to/hf_model --workdir=runs/imported
  python -m mla_jax.convert --workdir=runs/mla --to_hf=exported/mla [--step=N | --best]
  python -m mla_jax.convert --workdir=runs/gqa --to_mla=runs/gqa_mla            # exact
  python -m mla_jax.convert --workdir=runs/gqa --to_mla=runs/gqa_mla64 --kv_lora_rank=48 \
      --qk_rope_head_dim=16 [--rope_selection=2norm|uniform] [--calibration_batches=4]

Import writes a workdir that evaluate and generate use as they use a trained run; export writes
a folder that transformers' from_pretrained loads; --to_mla writes an MLA workdir: without
--kv_lora_rank the exact embedding (same logits and cache size), with it the standard (DeepSeek)
architecture, lossy, to fine-tune with python -m mla_jax.train --init_from. Nothing overwrites
anything. The logic is mla_jax.hf (import_workdir, export_workdir) and mla_jax.mla_conversion
(to_mla_workdir).
"""

from absl import flags

from mla_jax import cli, hf, mla_conversion, variants
from mla_jax import workdir as wd
from mla_jax.config import DTYPES, MLA_DECODE_PATHS
from mla_jax.mla_conversion import LATENT_NORMS, ROPE_SELECTIONS

FLAGS = flags.FLAGS
flags.DEFINE_string('hf_dir', None, 'import: a Hugging Face model folder')
flags.DEFINE_string('workdir', None, 'import: the new workdir; export / to_mla: the run to '
                    'convert')
flags.DEFINE_string('to_hf', None, 'export: the new Hugging Face folder')
flags.DEFINE_string('to_mla', None, 'to_mla: the new MLA workdir (from an MHA / GQA / MQA run)')
flags.DEFINE_integer('kv_lora_rank', None, 'to_mla: the latent rank d_c (compression into the '
                     'standard MLA); unset: the exact embedding', lower_bound=1)
flags.DEFINE_integer('qk_rope_head_dim', None, 'to_mla: the shared rope key width d_r (even, '
                     '<= head_dim; default head_dim / 2)', lower_bound=1)
flags.DEFINE_enum('rope_selection', '2norm', ROPE_SELECTIONS, 'to_mla: which RoPE pairs keep '
                  'their rotation: by query x key norm (2norm) or evenly spaced (uniform)')
flags.DEFINE_integer('calibration_batches', 0, "to_mla: training batches for activation-aware "
                     'statistics (0: from the weights)', lower_bound=0)
flags.DEFINE_enum('latent_norm', 'calibrated', LATENT_NORMS, "to_mla: the latent RMSNorm's "
                  'scale: the typical latent size (calibrated) or 1 (unit)')
flags.DEFINE_enum('dtype', 'float32', DTYPES, 'import: compute dtype of the converted model')
flags.DEFINE_enum('param_dtype', 'float32', DTYPES, 'import: dtype its parameters are kept in '
                  '(bfloat16 halves the memory of a float32 copy of a bfloat16 checkpoint)')
flags.DEFINE_enum('mla_decode', 'absorbed', MLA_DECODE_PATHS, 'import: MLA decode path')
flags.DEFINE_integer('step', None, 'export / to_mla: checkpoint step (default: the latest)')
flags.DEFINE_bool('best', False, 'export / to_mla: the best checkpoint by validation loss')
flags.mark_flag_as_required('workdir')


def main():
  if sum(map(bool, (FLAGS.hf_dir, FLAGS.to_hf, FLAGS.to_mla))) != 1:
    raise hf.HFError('give one of --hf_dir (import into --workdir), --to_hf (export --workdir) '
                     'or --to_mla (convert --workdir to MLA)')
  if FLAGS.to_mla:
    config = mla_conversion.to_mla_workdir(
        FLAGS.workdir, FLAGS.to_mla, FLAGS.kv_lora_rank, FLAGS.qk_rope_head_dim,
        FLAGS.rope_selection, FLAGS.calibration_batches, FLAGS.latent_norm, FLAGS.step,
        FLAGS.best)
    c = config.conversion
    cache = lambda workdir: variants.cache_elements_per_token(wd.read_config(workdir).model)
    kind = 'exact embedding' if c.exact else (
        f'd_c {c.kv_lora_rank}, d_r {c.qk_rope_head_dim}, {c.rope_selection} RoPE pairs, '
        f'{c.calibration_batches} calibration batches')
    print(f'{c.source_attention} {FLAGS.workdir} -> mla {FLAGS.to_mla} ({kind}): cache '
          f'{cache(FLAGS.workdir)} -> {cache(FLAGS.to_mla)} elements '
          'per token')
  elif FLAGS.hf_dir:
    config = hf.import_workdir(FLAGS.hf_dir, FLAGS.workdir, FLAGS.dtype, FLAGS.param_dtype,
                               FLAGS.mla_decode)
    m = config.model
    print(f'{config.source.architecture} -> {FLAGS.workdir}: {m.attention}, '
          f'{m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}')
  else:
    hf_json = hf.export_workdir(FLAGS.workdir, FLAGS.to_hf, FLAGS.step, FLAGS.best)
    print(f'{FLAGS.workdir} -> {FLAGS.to_hf}: {hf_json["architectures"][0]}')


if __name__ == '__main__':
  cli.run(main)
