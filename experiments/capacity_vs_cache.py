r"""Capacity vs KV-cache size: every row of configs/ablations/capacity_vs_cache.py, each at its
best learning rate, then 3 seeds.

  python -m experiments.capacity_vs_cache --workdir=runs/capacity                  # 2-3.5 h
  python -m experiments.capacity_vs_cache --workdir=runs/capacity --geometry=paper # 6 rows: as long
  python -m experiments.capacity_vs_cache --workdir=/tmp/cvc --quick               # minutes
  python -m experiments.capacity_vs_cache --workdir=runs/capacity --geometry=paper --match=mlp \
      --rows=mha,gqa2,mqa,mla4 --lrs=6e-3   # the control: every row at MHA's MLP width

Protocol (experiments/sweep.py): seed 0 of every row is trained at each rate of --lrs and the
rate with the lowest validation loss is the row's; then seeds 1 .. --seeds are trained at it
and reported (mean ± std). The run that chose the rate is not among those reported. With one
rate there is no sweep. A run whose loss turns non-finite is recorded as diverged, and the
sweep passes over its rate.

Each run is an ordinary mla_jax workdir, workdir/<geometry>[-mlp][-quick]/<row>/lr<rate>/seed<k>,
trained in its own process pinned to one CPU core, --jobs at a time (experiments/runner.py): an
interrupted run resumes from its last checkpoint, and a finished one (result.json) is not
redone. Every finished run is also recorded in capacity_vs_cache.ledger.jsonl beside the
report, and a workdir that lacks a run the ledger holds gets its result back: a clone on a
fresh machine continues a grid that another machine started (to redo a finished run, delete its
folder and its ledger line). Each run scores the validation split with
mla_jax.evaluator.perplexity; a reported run also prefills and decodes with the trained model
in bfloat16, counts the elements and bytes per token of the caches the decode loop returns
(which must equal the formula), and the bytes per token of int8 and float8_e4m3fn caches
(ModelConfig.cache_dtype; their float32 per-token scales included). The report
(capacity_vs_cache[_paper][_mlp].md / .json / .png) goes to --results_dir: experiments/results
for the full run, the workdir for --quick (which never overwrites the committed results).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import flags

from configs.ablations import capacity_vs_cache as ablation
from experiments import capacity_report, runner
from experiments import sweep as sweep_lib
from mla_jax import cli, data, evaluator, trainer
from mla_jax import workdir as wd
from mla_jax.errors import InputError
from mla_jax.model import param_count

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'where the runs live (geometry / row / rate / seed)')
flags.DEFINE_enum('geometry', 'small', list(ablation.GEOMETRIES),
                  'small: 8 heads of d_h = 16; paper: 4 heads of d_h = 32 (d_r = 16)')
flags.DEFINE_enum('match', 'params', list(capacity_report.MATCHING),
                  "params: each row's SwiGLU width matches MHA's parameter count; mlp: every "
                  "row has MHA's SwiGLU width (the control for what the matching gives)")
flags.DEFINE_list('rows', None, "rows to run (default: every row of the geometry)")
flags.DEFINE_list('lrs', None, 'learning rates to choose from with seed 0 (default: the '
                  "config's LEARNING_RATES of the geometry; with --quick, QUICK_LEARNING_RATES)")
flags.DEFINE_integer('seeds', 3, 'seeds 1 .. N trained at the chosen rate and reported')
flags.DEFINE_bool('quick', False, 'a tiny model and 20 steps: checks the pipeline, not MLA')
flags.DEFINE_integer('jobs', 0, 'runs at a time, one core each (0: one per available core)')
flags.DEFINE_string('results_dir', None,
                    'where the report goes (default: experiments/results; with --quick, workdir)')
flags.DEFINE_string('data_files', '', 'a glob of text files instead of the Shakespeare corpus')
flags.DEFINE_string('worker', None, 'internal: ROW:RATE:SEED, the run this process trains')
flags.mark_flag_as_required('workdir')

LEDGER = 'capacity_vs_cache.ledger.jsonl'  # every geometry's and matching's runs


def run_config(row: str, lr: float, seed: int):
  options = ''.join(f',{o}' for o, on in (('paper', FLAGS.geometry == 'paper'),
                                          ('mlp', FLAGS.match == 'mlp'),
                                          ('quick', FLAGS.quick)) if on)
  config = ablation.get_config(row + options)
  config.opt.lr = lr
  config.seed = seed
  if FLAGS.data_files:
    config.data.files = FLAGS.data_files
  return config


def run_path(row: str, lr: float, seed: int) -> pathlib.Path:
  """Everything that fixes a run is in its path (a --quick run is another model, so it never
  passes for a full one), but the corpus: --data_files takes its own --results_dir."""
  variant = (FLAGS.geometry + ('' if FLAGS.match == 'params' else f'-{FLAGS.match}')
             + ('-quick' if FLAGS.quick else ''))
  return pathlib.Path(FLAGS.workdir) / variant / row / f'lr{lr:g}' / f'seed{seed}'


def _worker(spec: str) -> None:
  """Trains, evaluates and (not for a sweep run) measures one run; writes result.json last."""
  row, lr, seed = spec.split(':')
  lr, seed = float(lr), int(seed)
  runner.share_compilations(FLAGS.workdir)
  config = run_config(row, lr, seed)
  run_dir = run_path(row, lr, seed)
  start = time.perf_counter()
  try:
    trainer.train_and_evaluate(config, str(run_dir), final_eval=False)
  except trainer.TrainingError as e:  # a rate too high: the sweep passes over it
    wd.write_json(run_dir, runner.RESULT, dict(row=row, lr=lr, seed=seed, diverged=str(e),
                                        cpu_s=runner.cpu_s()))
    return
  train_s = time.perf_counter() - start
  model, cfg = wd.load_workdir(run_dir)
  val = data.load_splits(config.data)['val']
  start = time.perf_counter()
  e = config.eval
  result = evaluator.perplexity(model, val, e.seq_len, e.stride, e.batch_size)
  eval_s = time.perf_counter() - start
  # A sweep run (seed 0) is read only for its validation loss: its cache is not measured.
  cache = runner.measure_caches(model, val[:cfg.max_seq_len // 2]) if seed else {}
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').open()]
  speeds = [r['tokens_per_s'] for r in rows if 'tokens_per_s' in r][1:]  # the first compiles
  result.update(
      row=row, lr=lr, seed=seed, geometry=FLAGS.geometry, attention=cfg.attention,
      params=param_count(cfg), d_ff=cfg.d_ff, model=cfg.to_dict(),
      train_tokens=config.train.steps * config.data.batch_size * config.data.seq_len,
      tokens_per_s=float(np.median(speeds)) if speeds else None, **cache, train_s=train_s,
      eval_s=eval_s, cpu_s=runner.cpu_s(), jax=jax.__version__, machine=runner.machine())
  wd.write_json(run_dir, runner.RESULT, result)


def _task(run: tuple) -> runner.Task:
  row, lr, seed = run
  path = run_path(*run)
  return runner.Task(
      f'{row} lr{lr:g} seed{seed}',
      ['experiments.capacity_vs_cache', f'--workdir={FLAGS.workdir}', f'--worker={row}:{lr!r}:'
       f'{seed}', f'--geometry={FLAGS.geometry}', f'--match={FLAGS.match}',
       f'--quick={FLAGS.quick}',
       f'--data_files={FLAGS.data_files}'],
      path / 'log.txt', path / runner.RESULT,
      describe=lambda r: 'diverged' if r.get('diverged') else
      f"val loss {r['loss']:.4f} (perplexity {r['perplexity']:.3f})")


def _read(run: tuple) -> dict | None:
  path = run_path(*run) / runner.RESULT
  return json.loads(path.read_text()) if path.exists() else None


def _settings() -> tuple[list[str], list[float]]:
  rows = list(dict.fromkeys(FLAGS.rows or ablation.GEOMETRIES[FLAGS.geometry][1]))
  unknown = sorted(set(rows) - set(ablation.GEOMETRIES[FLAGS.geometry][1]))
  lrs = sweep_lib.rates(FLAGS.lrs or (ablation.QUICK_LEARNING_RATES if FLAGS.quick
                                      else ablation.LEARNING_RATES[FLAGS.geometry]))
  if FLAGS.data_files and not (FLAGS.results_dir or FLAGS.quick):
    raise InputError('--data_files needs --results_dir (and a workdir of its own): a report and '
                     'ledger on another corpus must not replace the committed Shakespeare ones')
  if unknown or FLAGS.seeds < 1:
    raise InputError(f'unknown rows {unknown} or --seeds={FLAGS.seeds} < 1; the rows of '
                     f'--geometry={FLAGS.geometry} are {ablation.GEOMETRIES[FLAGS.geometry][1]}')
  return rows, lrs


def main():
  if FLAGS.worker:
    return _worker(FLAGS.worker)
  rows, lrs = _settings()
  start = time.perf_counter()
  out = runner.results_dir(FLAGS.results_dir, FLAGS.workdir, FLAGS.quick)
  ledger = runner.Ledger(out / LEDGER, FLAGS.workdir)
  restored = ledger.sync()
  cells = [(row,) for row in rows]
  sweep = sweep_lib.sweep_runs(cells, lrs)
  best = capacity_report.best_rate
  left, upper = sweep_lib.left_to_train(sweep, cells, lrs, FLAGS.seeds, _read, best)
  print(f'{len(rows)} rows ({FLAGS.geometry} geometry): {len(sweep)} sweep runs (seed 0 at each '
        f'of {len(lrs)} rates) + {len(cells) * FLAGS.seeds} reported runs (seeds '
        f"1-{FLAGS.seeds}); {'at most ' if upper else ''}{left} to train"
        f'{runner.restored_words(restored, ledger)}', flush=True)
  jobs = min(FLAGS.jobs or len(runner.available_cores()), len(runner.available_cores()))
  trained = sweep_lib.train(sweep, 'learning-rate sweep', _task, _read, jobs, ledger)
  final = sweep_lib.final_runs(cells, lrs, FLAGS.seeds, _read, best)
  trained += sweep_lib.train(final, 'seeds at the chosen rates', _task, _read, jobs, ledger)
  name = capacity_report.name(FLAGS.geometry, FLAGS.match)
  wall_s = time.perf_counter() - start
  grid = dict(quick=FLAGS.quick, geometry=FLAGS.geometry, match=FLAGS.match, rows=rows,
              seeds=FLAGS.seeds, lrs=lrs, data=FLAGS.data_files or 'shakespeare')
  setup = dict(command=' '.join(['python -m experiments.capacity_vs_cache', *sys.argv[1:]]),
               **grid, jobs=jobs, machine=runner.machine(), wall_s=wall_s,
               runs_trained=trained, runs_total=len(sweep) + len(final),
               cpu_s=sum(_read(r)['cpu_s'] for r in sweep + final),
               full_wall_s=runner.full_wall_s(out / f'{name}.json', wall_s,
                                              trained == len(sweep) + len(final), grid))
  try:
    paths = capacity_report.write([_read(r) for r in final], [_read(r) for r in sweep], setup,
                                  out)
  except ValueError as e:  # every seed of a row diverged
    raise InputError(str(e)) from None
  print('wrote ' + ', '.join(str(p) for p in paths))


if __name__ == '__main__':
  cli.run(main)
