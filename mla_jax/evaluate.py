r"""Perplexity of a run on its validation split or on any text file.

  python -m mla_jax.evaluate --workdir=runs/mla [--split=val | --data=file.txt] [--step=N]
  python -m mla_jax.evaluate --workdir=runs/imported --data=ids.npy --tokenizer=ids

Perplexity = exp(mean NLL over every scored token), never clipped; bits per byte = mean NLL /
ln 2 (--tokenizer=byte, the default: tokens are bytes). --tokenizer=ids reads a .npy of token
ids made by a converted checkpoint's own tokenizer (then bits are per token). Windows of
eval.seq_len (or --seq_len) advance by eval.stride: every token but the first is scored
exactly once, with at least seq_len - stride tokens of context once the text is that long.
Writes eval.json in the workdir and prints one line. A run trained on MQAR (data.task='mqar')
is scored on its held-out recall set instead (accuracy and loss at the answers).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from mla_jax import cli, data, sharding
from mla_jax import workdir as wd


# Inputs arrive placed (parameters by the rules, batches split over the batch axes); the sum
# leaves replicated over the mesh set by the caller (jax.set_mesh).
@functools.partial(jax.jit, static_argnames=('graphdef',),
                   out_shardings=jax.sharding.PartitionSpec())
def eval_step(graphdef, state, windows_bt, scored_bt):
  """Sum of NLL over the scored targets of a batch of windows [b, seq_len + 1]."""
  logits = nnx.merge(graphdef, state)(windows_bt[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows_bt[:, 1:])
  return jnp.sum(jnp.where(scored_bt, nll, 0.0))


def perplexity(model, tokens: np.ndarray, seq_len: int, stride: int, batch_size: int,
               mesh: jax.sharding.Mesh | None = None) -> dict:
  """Exact exp(mean NLL) over tokens[1:], each predicted from what precedes it.

  Every process enumerates the same windows and feeds its rows of each batch; the batch is
  split over the mesh's batch axes (default mesh: data parallel over every device).
  """
  if not 0 < stride <= seq_len:
    raise ValueError(f'eval stride {stride} must be in [1, seq_len={seq_len}]: a larger stride '
                     'would skip tokens')
  mesh = mesh or sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, sharding.state_shardings(state, mesh))
  shape, mask_shape = (batch_size, seq_len + 1), (batch_size, seq_len)
  windows_sharding = sharding.sharding(mesh, ('batch', None), shape)
  mask_sharding = sharding.sharding(mesh, ('batch', None), mask_shape)
  rows = sharding.local_rows(windows_sharding, shape, axis=0)
  windows, masks = [], []
  for window, _, first, end in data.eval_windows(tokens, seq_len, stride):
    windows.append(window)
    masks.append((np.arange(seq_len) >= first) & (np.arange(seq_len) < end))
  pad = -len(windows) % batch_size  # whole batches: one compiled shape
  windows += [np.zeros(seq_len + 1, np.int32)] * pad
  masks += [np.zeros(seq_len, bool)] * pad
  windows, masks = np.stack(windows), np.stack(masks)
  total = 0.0  # float64 on the host: exact over millions of tokens
  with jax.set_mesh(mesh):
    for i in range(0, len(windows), batch_size):
      window_batch = sharding.global_batch(windows[i:i + batch_size][rows], windows_sharding,
                                           shape)
      mask_batch = sharding.global_batch(masks[i:i + batch_size][rows], mask_sharding,
                                         mask_shape)
      total += float(eval_step(graphdef, state, window_batch, mask_batch))
  count = int(masks.sum())
  assert count == len(tokens) - 1, (count, len(tokens))
  loss = total / count
  return {'loss': loss, 'perplexity': math.exp(loss), 'bits_per_byte': loss / math.log(2),
          'tokens': count}


def _read_tokens(path: str, tokenizer: str, vocab_size: int) -> np.ndarray:
  """Token ids of --data: a text file's bytes, or a 1-D integer .npy (never pickled)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise data.DataError(f'--data={path} is not a file; give a file to score')
  if tokenizer == 'byte':
    if vocab_size < 256:
      raise data.DataError(f'the model has {vocab_size} tokens, too few for bytes; tokenize '
                           '--data with its tokenizer and pass --tokenizer=ids')
    tokens = np.frombuffer(file.read_bytes(), np.uint8)
  else:
    try:
      tokens = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise data.DataError(f'--data={path} is not a .npy array ({e}); with --tokenizer=ids '
                           'give np.save(path, ids)') from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise data.DataError(f'--data={path} holds {tokens.dtype} {list(tokens.shape)}; give a '
                           '1-D integer array of token ids')
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
      raise data.DataError(f'--data={path} has ids outside [0, {vocab_size}); tokenize with '
                           "the checkpoint's own tokenizer")
  if len(tokens) < 2:
    raise data.DataError(f'--data={path} has {len(tokens)} tokens; perplexity needs two')
  return tokens.astype(np.int32)


FLAGS = flags.FLAGS


def _define_flags():  # only for the CLI: the trainer imports this module too
  flags.DEFINE_string('workdir', None, 'a trained or converted run')
  flags.DEFINE_string('split', 'val', "split of the run's corpus: val or train")
  flags.DEFINE_string('data', None, 'a text file to evaluate instead of a split')
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)')
  flags.DEFINE_enum('tokenizer', 'byte', ('byte', 'ids'), '--data holds text scored as bytes '
                    '(byte) or a .npy array of token ids (ids)')
  flags.DEFINE_integer('seq_len', None, "window length (default: the run's eval.seq_len)")
  flags.DEFINE_integer('stride', None, "window stride (default: the run's eval.stride)")
  flags.DEFINE_integer('batch_size', None, "windows per batch (default: eval.batch_size)")
  flags.mark_flag_as_required('workdir')
  cli.define_distributed_flags()


def main(argv):
  del argv
  cli.quiet_logging()
  try:
    cli.initialize_distributed()
    config = wd.read_config(FLAGS.workdir)
    mesh = sharding.make_mesh(config.mesh)
    model, cfg = wd.load_workdir(FLAGS.workdir, FLAGS.step, mesh=mesh)
    if not FLAGS.data and config.get('data', {}).get('task') == 'mqar':
      return _recall(config, model, mesh)
    if FLAGS.data:
      tokens, source = _read_tokens(FLAGS.data, FLAGS.tokenizer, cfg.vocab_size), FLAGS.data
    else:
      if 'data' not in config:
        raise data.DataError(f'{FLAGS.workdir} has no corpus (a converted checkpoint); give '
                             '--data=FILE')
      if FLAGS.split not in ('val', 'train'):
        raise data.DataError(f"--split={FLAGS.split} is unknown; use 'val' or 'train'")
      tokens, source = data.load_splits(config.data)[FLAGS.split], FLAGS.split
    pick = lambda flag, default: default if flag is None else flag
    seq_len = pick(FLAGS.seq_len, config.eval.seq_len)
    if seq_len > cfg.max_seq_len:
      raise ValueError(f'--seq_len={seq_len} exceeds the model\'s max_seq_len={cfg.max_seq_len}')
    result = perplexity(model, tokens, seq_len, pick(FLAGS.stride, config.eval.stride),
                        pick(FLAGS.batch_size, config.eval.batch_size), mesh)
  except (wd.WorkdirError, data.DataError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  if jax.process_index():
    return  # every process computed the same numbers; process 0 reports them
  unit = 'byte' if FLAGS.tokenizer == 'byte' or not FLAGS.data else 'token'
  result[f'bits_per_{unit}'] = result.pop('bits_per_byte')
  result.update(source=source, workdir=FLAGS.workdir)
  (pathlib.Path(FLAGS.workdir) / 'eval.json').write_text(json.dumps(result, indent=1))
  print(f"{source}: perplexity {result['perplexity']:.4f}, {result[f'bits_per_{unit}']:.4f} "
        f"bits per {unit}, loss {result['loss']:.5f} nats over {result['tokens']} tokens "
        f'({jax.device_count()} devices, {jax.process_count()} processes)')


def _recall(config, model, mesh) -> None:
  """An MQAR run: recall accuracy and loss on its held-out set, as the trainer validates."""
  from mla_jax import tasks  # tasks imports this module

  task = tasks.MQAR(config)
  result = task.validate(model, mesh)
  if jax.process_index():
    return
  result.update(source='mqar heldout', workdir=FLAGS.workdir)
  (pathlib.Path(FLAGS.workdir) / 'eval.json').write_text(json.dumps(result, indent=1))
  print(f'mqar heldout: {task.describe(result)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
