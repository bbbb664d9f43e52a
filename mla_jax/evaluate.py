r"""Perplexity of a run on its validation split or on any text file.

  python -m mla_jax.evaluate --workdir=runs/mla [--split=val | --data=file.txt] [--step=N]
  python -m mla_jax.evaluate --workdir=runs/imported --data=ids.npy --tokenizer=ids

Text is encoded with the run's tokenizer (workdir.load_tokenizer: bytes, or the tokenizer.json
the workdir stores); --tokenizer=byte scores a file's raw bytes instead, and --tokenizer=ids a
.npy of token ids (then bits are per token). It reports the NLL per token (loss), perplexity and
bits per byte = summed NLL / (ln 2 x UTF-8 bytes of the scored text), which compares models with
different tokenizers on the same text. Writes eval.json in the workdir (with the checkpoint step
it scored) and prints one line. The logic is mla_jax.perplexity. A run trained on MQAR
(data.task='mqar') is scored on its held-out recall set instead (recall accuracy and loss at the
answers, as the trainer validates it).
"""


import jax
from absl import flags

from mla_jax import cli, data, perplexity, sharding, tasks
from mla_jax import workdir as wd
from mla_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'a trained or converted run')
flags.DEFINE_enum('split', 'val', ('val', 'train'), "split of the run's corpus")
flags.DEFINE_string('data', None, 'a text file to evaluate instead of a split')
flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest complete one)')
flags.DEFINE_enum('tokenizer', 'run', ('run', 'byte', 'ids'), "--data holds text encoded with "
                  "the run's tokenizer (run), text scored as bytes (byte) or a .npy array of "
                  'token ids (ids)')
flags.DEFINE_integer('seq_len', None, "window length (default: the run's eval.seq_len)",
                     lower_bound=1)
flags.DEFINE_integer('stride', None, "window stride (default: the run's eval.stride)",
                     lower_bound=1)
flags.DEFINE_integer('batch_size', None, 'windows per batch (default: eval.batch_size)',
                     lower_bound=1)
flags.mark_flag_as_required('workdir')
cli.define_distributed_flags()


def main():
  cli.initialize_distributed()
  config = wd.read_config(FLAGS.workdir)
  wd.check_writable(FLAGS.workdir, 'eval.json')  # before scoring, not after
  mesh = sharding.make_mesh(config.mesh)
  model, cfg, step = wd.load_checkpoint(FLAGS.workdir, FLAGS.step, mesh=mesh)
  if not FLAGS.data and config.data is not None and config.data.task == 'mqar':
    return _recall(config, model, mesh, step)
  if FLAGS.data:
    # .npy ids need no tokenizer (an imported checkpoint may have none)
    tok = wd.load_tokenizer(FLAGS.workdir, required=FLAGS.tokenizer == 'run')
    tokens, n_bytes = perplexity.read_tokens(FLAGS.data, FLAGS.tokenizer, cfg.vocab_size, tok)
    source = FLAGS.data
  else:
    if config.data is None:
      raise data.DataError(f'{FLAGS.workdir} has no corpus (a converted checkpoint); give '
                           '--data=FILE')
    text = tasks.Text(config, stored=FLAGS.workdir)  # the run's corpus and tokenizer
    tok, tokens, source = text.tokenizer, text.splits[FLAGS.split], FLAGS.split
    n_bytes = text.scored_bytes(FLAGS.split)
  pick = lambda flag, default: default if flag is None else flag
  seq_len = pick(FLAGS.seq_len, config.eval.seq_len)
  if seq_len > cfg.max_seq_len:
    raise InputError(f"--seq_len={seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
  result = perplexity.perplexity(model, tokens, seq_len, pick(FLAGS.stride, config.eval.stride),
                                 pick(FLAGS.batch_size, config.eval.batch_size), mesh,
                                 scored_bytes=n_bytes)
  if jax.process_index():
    return  # every process computed the same numbers; process 0 reports them
  unit = 'token' if n_bytes is None else 'byte'  # ids: no text to count bytes of
  result[f'bits_per_{unit}'] = result.pop('bits_per_byte')
  if n_bytes is None:
    del result['bytes']
  result.update(source=source, tokenizer=tok.kind if FLAGS.tokenizer == 'run' else
                FLAGS.tokenizer, workdir=FLAGS.workdir, step=step)
  wd.write_json(FLAGS.workdir, 'eval.json', result)
  over = f"{result['tokens']} tokens" + (f" ({n_bytes} bytes)" if n_bytes is not None else '')
  print(f"{source}: perplexity {result['perplexity']:.4f}, {result[f'bits_per_{unit}']:.4f} "
        f"bits per {unit}, loss {result['loss']:.5f} nats per token over {over} "
        f'({jax.device_count()} devices, {jax.process_count()} processes)')


def _recall(config, model, mesh, step: int) -> None:
  """An MQAR run: recall accuracy and loss on its held-out set, as the trainer validates."""
  task = tasks.MQAR(config)
  result = task.validate(model, mesh)
  if jax.process_index():
    return
  result.update(source='mqar heldout', workdir=FLAGS.workdir, step=step)
  wd.write_json(FLAGS.workdir, 'eval.json', result)
  print(f'mqar heldout: {task.describe(result)}')


if __name__ == '__main__':
  cli.run(main)
