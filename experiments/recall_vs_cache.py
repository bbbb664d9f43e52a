r"""Recall vs KV-cache size: every row of configs/ablations/recall_vs_cache.py trained on MQAR at
several numbers of key-value pairs, each at its best learning rate, over seeds.

  python -m experiments.recall_vs_cache --workdir=runs/recall          # the full grid
  python -m experiments.recall_vs_cache --workdir=/tmp/rvc --quick     # the pipeline, minutes

Protocol (Zoology's best of four learning rates, then seeds): for each row and N, seed 0 is
trained at each rate of --lrs and the rate with the best recall on the validation set (the
trainer's held-out set, val_seed 0) is chosen; then --seeds fresh seeds (1, 2, ...) are trained
at that rate and reported, as mean ± std, on a separate test set (val_seed TEST_SEED). The run
that chose the rate is never among those reported.

Each run is an ordinary mla_jax workdir, workdir/<row>/kv<N>/lr<rate>/seed<k>, trained in its
own process pinned to one core (experiments/runs.py): finished runs are not redone, an
interrupted one resumes from its last checkpoint. Each run's decode cache is counted from the
arrays a bfloat16 prefill + decode step returns and must equal the formula. The report
(recall_vs_cache.md / .json / .png) goes to --results_dir: experiments/results for the full
run, the workdir for --quick (which never overwrites the committed results).
"""

from __future__ import annotations

import copy
import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags

from configs.ablations import capacity_vs_cache as capacity
from configs.ablations import recall_vs_cache as ablation
from experiments import recall_report, runs
from mla_jax import cli, tasks, trainer
from mla_jax import workdir as wd
from mla_jax.model import param_count

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'where the runs live (row / kvN / lr / seed)')
flags.DEFINE_list('rows', list(capacity.ROWS), 'rows to run')
flags.DEFINE_list('kv_pairs', None, 'numbers of key-value pairs (default: the config\'s; '
                  'with --quick, its quick ones)')
flags.DEFINE_list('lrs', None, 'learning rates to choose from with seed 0 (default: the '
                  'config\'s; with --quick, its quick ones)')
flags.DEFINE_integer('seeds', None, 'seeds 1 .. N trained at the chosen rate and reported '
                     '(default: 3; with --quick, 1)')
flags.DEFINE_bool('quick', False, 'a tiny model and 20 steps: checks the pipeline, not MLA')
flags.DEFINE_integer('jobs', 0, 'runs at a time, one core each (0: one per available core)')
flags.DEFINE_string('results_dir', None,
                    'where the report goes (default: experiments/results; with --quick, workdir)')
flags.DEFINE_string('worker', None, 'internal: ROW:N:RATE:SEED, the run this process trains')
flags.mark_flag_as_required('workdir')


def run_config(row: str, kv_pairs: int, lr: float, seed: int, quick: bool):
  config = ablation.get_config(f'{row},kv{kv_pairs}' + (',quick' if quick else ''))
  config.opt.lr = lr
  config.seed = seed
  return config


def run_path(row: str, kv_pairs: int, lr: float, seed: int) -> pathlib.Path:
  return pathlib.Path(FLAGS.workdir) / row / f'kv{kv_pairs}' / f'lr{lr:g}' / f'seed{seed}'


def _worker(spec: str) -> None:
  """Trains one run, scores it on the validation and test sets, measures its decode cache;
  writes result.json last."""
  row, kv, lr, seed = spec.split(':')
  kv, lr, seed = int(kv), float(lr), int(seed)
  cli.quiet_logging()
  runs.use_compilation_cache(FLAGS.workdir)  # the seeds of a row and N compile alike
  config = run_config(row, kv, lr, seed, FLAGS.quick)
  run_dir = run_path(row, kv, lr, seed)
  start = time.perf_counter()
  trainer.train_and_evaluate(config, str(run_dir), final_eval=False)
  train_s = time.perf_counter() - start
  model, cfg = wd.load_workdir(run_dir)
  start = time.perf_counter()
  val_task = tasks.MQAR(config)
  val = val_task.validate(model)
  test_config = copy.deepcopy(config)
  test_config.data.mqar.val_seed = ablation.TEST_SEED
  test = tasks.MQAR(test_config).validate(model)
  eval_s = time.perf_counter() - start
  cache = runs.cache_columns(model, val_task.heldout[0]['inputs'][0][:cfg.max_seq_len // 2])
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').open()]
  speeds = [r['tokens_per_s'] for r in rows if 'tokens_per_s' in r][1:]  # the first compiles
  d = config.data
  runs.write_result(run_dir, dict(
      row=row, kv_pairs=kv, lr=lr, seed=seed, attention=cfg.attention, params=param_count(cfg),
      d_ff=cfg.d_ff, model=cfg.to_dict(), seq_len=d.seq_len, power_a=d.mqar.power_a,
      val_accuracy=val['accuracy'], val_loss=val['loss'], accuracy=test['accuracy'],
      loss=test['loss'], answers=test['answers'], test_examples=d.mqar.val_examples,
      steps=config.train.steps,
      train_tokens=config.train.steps * d.batch_size * d.seq_len,
      tokens_per_s=float(np.median(speeds)) if speeds else None, **cache, train_s=train_s,
      eval_s=eval_s, jax=jax.__version__))


def _train(todo: list[tuple]) -> None:
  """Trains (row, N, rate, seed) runs as worker processes, --jobs at a time."""
  done = 0

  def report(label, run_dir, seconds):
    nonlocal done
    done += 1
    r = runs.read_result(run_dir)
    print(f"[{done}/{len(todo)}] {label}: recall {r['val_accuracy']:.3f} (validation), "
          f"{r['accuracy']:.3f} (test) in {seconds:.0f} s", flush=True)

  jobs = [(f'{row} kv{kv} lr{lr:g} seed{seed}', run_path(row, kv, lr, seed),
           ['-m', 'experiments.recall_vs_cache', f'--workdir={FLAGS.workdir}',
            f'--worker={row}:{kv}:{lr!r}:{seed}', f'--quick={FLAGS.quick}'])
          for row, kv, lr, seed in todo]
  runs.run_workers(jobs, FLAGS.jobs, report)


def best_rate(results: list[dict]) -> float:
  """The rate whose run has the best validation recall (then the lower validation loss)."""
  return max(results, key=lambda r: (r['val_accuracy'], -r['val_loss']))['lr']


def main(argv):
  del argv
  if FLAGS.worker:
    return _worker(FLAGS.worker)
  kv_pairs = [int(k) for k in FLAGS.kv_pairs or (ablation.QUICK_KV_PAIRS if FLAGS.quick
                                                  else ablation.KV_PAIRS)]
  lrs = [float(x) for x in FLAGS.lrs or (ablation.QUICK_LEARNING_RATES if FLAGS.quick
                                         else ablation.LEARNING_RATES)]
  seeds = FLAGS.seeds or (1 if FLAGS.quick else 3)
  unknown = sorted(set(FLAGS.rows) - set(capacity.ROWS))
  if unknown or seeds < 1:
    raise SystemExit(f'error: unknown rows {unknown} or --seeds={seeds} < 1; rows are '
                     f'{sorted(capacity.ROWS)}')
  for row in FLAGS.rows:  # an impossible N fails here, before anything is trained
    for kv in kv_pairs:
      try:
        tasks.MQAR(run_config(row, kv, lrs[0], 0, FLAGS.quick))
      except ValueError as e:
        raise SystemExit(f'error: --kv_pairs={kv}: {e}') from None
  start = time.perf_counter()
  cells = [(row, kv) for kv in kv_pairs for row in FLAGS.rows]
  total = len(cells) * (len(lrs) + seeds)
  sweep = [(row, kv, lr, 0) for row, kv in cells for lr in lrs]
  finished = lambda r: runs.read_result(run_path(*r)) is not None
  todo = [r for r in sweep if not finished(r)]
  print(f'learning-rate sweep: {len(sweep) - len(todo)} of {len(sweep)} runs already finished '
        f'in {FLAGS.workdir}; training {len(todo)}', flush=True)
  trained = len(todo)
  _train(todo)
  swept = {cell: [runs.read_result(run_path(*cell, lr, 0)) for lr in lrs] for cell in cells}
  chosen = {cell: best_rate(results) for cell, results in swept.items()}
  final = [(row, kv, chosen[row, kv], seed) for row, kv in cells
           for seed in range(1, seeds + 1)]
  todo = [r for r in final if not finished(r)]
  print(f'seeds at the chosen rates: {len(final) - len(todo)} of {len(final)} runs already '
        f'finished; training {len(todo)}', flush=True)
  trained += len(todo)
  _train(todo)
  results = [runs.read_result(run_path(*r)) for r in final]
  sweep_results = [r for rs in swept.values() for r in rs]
  out = pathlib.Path(FLAGS.results_dir or (FLAGS.workdir if FLAGS.quick
                                           else runs.ROOT / 'experiments' / 'results'))
  wall_s = time.perf_counter() - start
  if trained == total:
    full_wall_s = wall_s  # every run trained by this invocation: the whole grid's wall time
  else:  # a report-only or resumed invocation keeps the last full run's figure, if any
    previous = out / f'{recall_report.NAME}.json'
    full_wall_s = (json.loads(previous.read_text())['setup'].get('full_wall_s')
                   if previous.exists() else None)
  setup = dict(command=' '.join(['python -m experiments.recall_vs_cache', *sys.argv[1:]]),
               quick=FLAGS.quick, seeds=seeds, lrs=lrs, kv_pairs=kv_pairs,
               jobs=FLAGS.jobs or len(runs.available_cores()), machine=runs.machine(),
               wall_s=wall_s, runs_trained=trained, runs_total=total, full_wall_s=full_wall_s,
               test_seed=ablation.TEST_SEED)
  paths = recall_report.write(results, sweep_results, setup, out)
  print('wrote ' + ', '.join(str(p) for p in paths))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
