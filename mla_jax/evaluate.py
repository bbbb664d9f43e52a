r"""Perplexity of a run on its validation split or on any text file.

  python -m mla_jax.evaluate --workdir=runs/mla [--split=val | --data=file.txt] [--step=N]

Perplexity = exp(mean NLL over every scored token), never clipped; bits per byte = mean NLL /
ln 2 (tokens are bytes). Windows of eval.seq_len advance by eval.stride: every token but the
first is scored exactly once, with at least seq_len - stride tokens of context once the text is
that long. Writes eval.json in the workdir and prints one line.
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


FLAGS = flags.FLAGS


def _define_flags():  # only for the CLI: the trainer imports this module too
  flags.DEFINE_string('workdir', None, 'a trained or converted run')
  flags.DEFINE_string('split', 'val', "split of the run's corpus: val or train")
  flags.DEFINE_string('data', None, 'a text file to evaluate instead of a split')
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)')
  flags.mark_flag_as_required('workdir')
  cli.define_distributed_flags()


def main(argv):
  del argv
  cli.quiet_logging()
  try:
    cli.initialize_distributed()
    config = wd.read_config(FLAGS.workdir)
    mesh = sharding.make_mesh(config.mesh)
    model, _ = wd.load_workdir(FLAGS.workdir, FLAGS.step, mesh=mesh)
    if FLAGS.data:
      path = pathlib.Path(FLAGS.data)
      if not path.is_file():
        raise data.DataError(f'--data={FLAGS.data} is not a file; give a text file to score')
      tokens, source = np.frombuffer(path.read_bytes(), np.uint8), str(path)
    else:
      if FLAGS.split not in ('val', 'train'):
        raise data.DataError(f"--split={FLAGS.split} is unknown; use 'val' or 'train'")
      tokens, source = data.load_splits(config.data)[FLAGS.split], FLAGS.split
    result = perplexity(model, tokens, config.eval.seq_len, config.eval.stride,
                        config.eval.batch_size, mesh)
  except (wd.WorkdirError, data.DataError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  if jax.process_index():
    return  # every process computed the same numbers; process 0 reports them
  result.update(source=source, workdir=FLAGS.workdir)
  (pathlib.Path(FLAGS.workdir) / 'eval.json').write_text(json.dumps(result, indent=1))
  print(f"{source}: perplexity {result['perplexity']:.4f}, {result['bits_per_byte']:.4f} bits "
        f"per byte, loss {result['loss']:.5f} nats over {result['tokens']} tokens "
        f'({jax.device_count()} devices, {jax.process_count()} processes)')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
