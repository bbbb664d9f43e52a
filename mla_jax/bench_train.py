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

from mla_jax import cli, sharding, tasks, trainer
from mla_jax import workdir as wd
from mla_jax.model import param_count

FLAGS = flags.FLAGS


def _define_flags():  # only for the CLI: bench_mesh imports this module too
  flags.DEFINE_list('variants', ['mha', 'gqa', 'mqa', 'mla'], 'configs/<name>.py to measure')
  flags.DEFINE_integer('direct_steps', 8, 'timed direct calls of the train step')
  flags.DEFINE_integer('window', 8, 'steps per timed window of the training loop')
  flags.DEFINE_string('out', 'bench_train.json', 'where to write the JSON results')


def time_train_step(config, mesh, steps: int) -> dict:
  """Compile time, median step time and compiled HLO text of the train step on `mesh`, called
  directly on one fixed batch (nothing else running)."""
  with jax.set_mesh(mesh):
    graphdef, state, shardings = trainer.init_state(config, mesh)
    batch_sharding, shape, _ = trainer.batch_layout(config, mesh)
    step = trainer.jit_train_step(graphdef, shardings, batch_sharding)
    windows = np.random.default_rng(0).integers(0, 256, (*shape[:-1], shape[-1] + 1),
                                                dtype=np.int32)
    batch = jax.device_put(tasks.text_batch(windows), batch_sharding)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start  # the timed calls below compile once more, untimed
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  return {'compile_s': compile_s, 'step_s': float(np.median(times)), 'hlo': compiled.as_text()}


def bench_variant(name: str, direct_steps: int, window: int) -> dict:
  config = importlib.import_module(f'configs.{name}').get_config()
  timed = time_train_step(config, sharding.make_mesh(config.mesh), direct_steps)
  direct = config.data.batch_size * config.data.seq_len / timed['step_s']

  with tempfile.TemporaryDirectory() as workdir:
    config.train.update(steps=3 * window, log_every=window, checkpoint_every=10**9,
                        eval_every=10**9)
    trainer.train_and_evaluate(config, workdir, final_eval=False)
    rows = [json.loads(line)
            for line in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  loop = float(np.median([r['tokens_per_s'] for r in rows[1:] if 'tokens_per_s' in r]))
  return {'variant': name, 'params': param_count(wd.model_config(config)),
          'compile_s': timed['compile_s'], 'direct_tokens_per_s': direct,
          'loop_tokens_per_s': loop, 'loop_vs_direct': loop / direct}


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
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
