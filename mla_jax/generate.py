r"""Continues a prompt with a trained or converted run.

  python -m mla_jax.generate --workdir=runs/mla --prompt="ROMEO:" --max_new_tokens=100
  python -m mla_jax.generate --workdir=runs/mla --prompt="KING" --temperature=0.8 --top_k=40

The prompt is encoded with the run's tokenizer (workdir.load_tokenizer) and the output decoded
with it as text; generation stops at the tokenizer's end-of-text token, if it has one.
Greedy (temperature 0) is deterministic; sampling is reproducible from --seed. Without
--max_new_tokens it generates up to DEFAULT_NEW_TOKENS, as many as the model's cache
(max_seq_len) holds after the prompt. The logic is mla_jax.decode.generate.
"""

import numpy as np
from absl import flags

from mla_jax import cli, decode
from mla_jax import workdir as wd
from mla_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'a trained or converted run')
flags.DEFINE_string('prompt', None, "text to continue (encoded with the run's tokenizer)")
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
  if not FLAGS.prompt:
    raise InputError('--prompt is empty; give at least one character to continue')
  tok = wd.load_tokenizer(FLAGS.workdir)
  prompt = tok.encode(FLAGS.prompt).astype(np.int32)
  model, cfg = wd.load_workdir(FLAGS.workdir, FLAGS.step)
  room = cfg.max_seq_len - len(prompt)
  if FLAGS.max_new_tokens is None and room < 1:
    raise InputError(f'--prompt is {len(prompt)} tokens, which fills the cache (max_seq_len='
                     f'{cfg.max_seq_len}); shorten it')
  new_tokens = min(DEFAULT_NEW_TOKENS, room) if FLAGS.max_new_tokens is None else \
      FLAGS.max_new_tokens
  out = np.asarray(decode.generate(model, prompt[None], max_new_tokens=new_tokens,
                                   temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                   top_p=FLAGS.top_p, seed=FLAGS.seed, eos_id=tok.eos_id)[0])
  ends = np.flatnonzero(np.isin(out, tok.eos_ids))
  out = out[:ends[0]] if ends.size else out  # up to the end of text, not past it
  # Decoded with the prompt: a tokenizer may spell a token differently at the start of text.
  print(tok.decode(np.concatenate([prompt, out]), skip_special=True))  # no <s> printed


if __name__ == '__main__':
  cli.run(main)
