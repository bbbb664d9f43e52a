r"""Continues a prompt with a trained or converted run.

  python -m mla_jax.generate --workdir=runs/mla --prompt="ROMEO:" --max_new_tokens=100
  python -m mla_jax.generate --workdir=runs/mla --prompt="KING" --temperature=0.8 --top_k=40

Greedy (temperature 0) is deterministic; sampling is reproducible from --seed. Without
--max_new_tokens it generates up to DEFAULT_NEW_TOKENS, as many as the model's cache
(max_seq_len) holds after the prompt. The logic is mla_jax.decode.generate.
"""

from absl import flags

from mla_jax import cli, data, decode
from mla_jax import workdir as wd
from mla_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'a trained or converted run')
flags.DEFINE_string('prompt', None, 'text to continue (UTF-8, byte tokens)')
DEFAULT_NEW_TOKENS = 200
flags.DEFINE_integer('max_new_tokens', None, f'tokens to generate (default: {DEFAULT_NEW_TOKENS}, '
                     "or what the model's max_seq_len leaves after the prompt)", lower_bound=1)
flags.DEFINE_float('temperature', 0.0, '0 = greedy')
flags.DEFINE_integer('top_k', 0, 'sample from the k most likely tokens (0 = all)', lower_bound=0)
flags.DEFINE_float('top_p', 1.0, 'nucleus sampling mass')
flags.DEFINE_integer('seed', 0, 'sampling seed')
flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest complete one)')
flags.mark_flags_as_required(['workdir', 'prompt'])


def main():
  prompt = data.encode(FLAGS.prompt)
  if len(prompt) == 0:
    raise InputError('--prompt is empty; give at least one character to continue')
  model, cfg = wd.load_workdir(FLAGS.workdir, FLAGS.step)
  room = cfg.max_seq_len - len(prompt)
  if FLAGS.max_new_tokens is None and room < 1:
    raise InputError(f'--prompt is {len(prompt)} tokens, which fills the cache (max_seq_len='
                     f'{cfg.max_seq_len}); shorten it')
  new_tokens = min(DEFAULT_NEW_TOKENS, room) if FLAGS.max_new_tokens is None else \
      FLAGS.max_new_tokens
  out = decode.generate(model, prompt[None], max_new_tokens=new_tokens,
                        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        seed=FLAGS.seed)
  print(FLAGS.prompt + data.decode(out[0]))


if __name__ == '__main__':
  cli.run(main)
