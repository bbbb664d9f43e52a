r"""Training throughput: the train step alone vs the same step inside the training loop.

  python -m mla_jax.bench_train --out=experiments/results/bench_train.json

For each variant's default config (configs/*.py): the train step's jit compile time; the step
called directly on one fixed batch (median of timed calls, nothing else running); and the
trainer's own loop over real data (grain prefetch, metrics, logging) with validation and
checkpoints pushed past the end, timed per logging window after the first (which compiles).
The loop should stay within 10% of the bare step: the host must never stall the device.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from mla_jax import cli, trainer

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', ['mha', 'gqa', 'mqa', 'mla'], 'configs/<name>.py to measure')
flags.DEFINE_integer('direct_steps', 8, 'timed direct calls of the train step')
flags.DEFINE_integer('window', 8, 'steps per timed window of the training loop')
flags.DEFINE_string('out', 'bench_train.json', 'where to write the JSON results')


def bench_variant(name: str, direct_steps: int, window: int) -> dict:
  config = importlib.import_module(f'configs.{name}').get_config()
  model, opt = trainer.create_state(config)
  graphdef, state = nnx.split((model, opt))
  n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  d = config.data
  batch = np.random.default_rng(0).integers(0, 256, (1, d.batch_size, d.seq_len + 1),
                                            dtype=np.int32)
  start = time.perf_counter()
  compiled = trainer.train_step.lower(graphdef, state, batch).compile()
  compile_s = time.perf_counter() - start
  del compiled  # the timed calls below use the jit cache (compiled again once, untimed)
  state, metrics = trainer.train_step(graphdef, state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(direct_steps):
    start = time.perf_counter()
    state, metrics = trainer.train_step(graphdef, state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  direct = d.batch_size * d.seq_len / float(np.median(times))

  with tempfile.TemporaryDirectory() as workdir:
    config.train.update(steps=3 * window, log_every=window, checkpoint_every=10**9,
                        eval_every=10**9)
    trainer.train_and_evaluate(config, workdir, final_eval=False)
    rows = [json.loads(line)
            for line in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  loop = float(np.median([r['tokens_per_s'] for r in rows[1:] if 'tokens_per_s' in r]))
  return {'variant': name, 'params': n_params, 'compile_s': compile_s,
          'direct_tokens_per_s': direct, 'loop_tokens_per_s': loop, 'loop_vs_direct': loop / direct}


def main(argv):
  del argv
  cli.quiet_logging()
  rows = []
  for name in FLAGS.variants:
    rows.append(bench_variant(name, FLAGS.direct_steps, FLAGS.window))
    print(rows[-1], flush=True)
  lines = ['| variant | params | compile (s) | step alone (tokens/s) | training loop (tokens/s) '
           '| loop / alone |', '|---|---:|---:|---:|---:|---:|']
  lines += [f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['compile_s']:.1f} | "
            f"{r['direct_tokens_per_s']:.0f} | {r['loop_tokens_per_s']:.0f} | "
            f"{r['loop_vs_direct']:.2f} |" for r in rows]
  print('\n'.join(lines))
  pathlib.Path(FLAGS.out).write_text(json.dumps({'device': str(jax.devices()[0]), 'rows': rows},
                                                indent=1))
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
