"""The sweep protocol the multi-run experiments are declared in (capacity_vs_cache,
recall_vs_cache): cells, a config per run, a measure, a summary, comparisons. An experiment
subclasses `Sweep` and calls `main(TheSweep())`; the runner, the one worker and the report
writer (experiments/report.py) are here and nowhere else.

A *cell* is everything that fixes a run but its rate and seed; a *run* is (*cell, lr, seed).
With more than one rate, seed 0 of every cell trains at each rate and the experiment's `best`
chooses the cell's rate from those runs; seeds 1 .. N then train at it and are reported, never
the run that chose it (docs/results.md, "The protocol"). Each run is a workdir that `work`
trains in its own process pinned to one core (experiments/runner.py), result.json written last
(a diverged run too: the sweep passes over its rate). A finished run, in the workdir or in the
ledger committed beside the report, is never redone: an interrupted protocol resumes where it
stopped, on this machine or another.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable

import numpy as np
from absl import flags

from experiments import common, runner
from mla_jax import training
from mla_jax import workdir as wd
from mla_jax.errors import InputError
from mla_jax.model import param_count

flags.DEFINE_string('workdir', None, 'where the runs live (one workdir per run)')
flags.DEFINE_list('rows', None, 'rows to run (default: every row of the experiment)')
flags.DEFINE_list('lrs', None, "learning rates to choose from with seed 0 (default: the "
                  "experiment config's; with --quick, its quick ones)")
flags.DEFINE_integer('seeds', None, 'seeds 1 .. N trained at the chosen rate and reported '
                     '(default: 3; with --quick, the experiment\'s quick number)')
flags.DEFINE_integer('jobs', 0, 'runs at a time, one core each (0: one per available core)')
flags.DEFINE_bool('dry_run', False, 'print the plan and what is left to train; train nothing')
flags.DEFINE_string('worker', None, 'internal: the run (JSON) this process trains')
flags.mark_flag_as_required('workdir')
FLAGS = flags.FLAGS

Run = tuple  # (*cell, lr, seed)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the flags ask for: the cells, rates and seeds; `grid` (recorded in the report, and
  what makes two reports the same grid); `words` (the plan line's start); `stem` (the
  report's file name)."""

  cells: list[tuple]
  lrs: list[float]
  seeds: int
  grid: dict
  words: str
  stem: str


class Sweep:
  """An experiment's declaration. `name` is its module under experiments/ and its results
  folder. A subclass defines what one run is and how it is scored and reported:

    plan() -> Plan                         what the flags ask for
    config(run)                            the run's training config (ml_collections)
    path(run) -> Path                      its workdir: everything that fixes a run is in it
    fields(run) -> dict                    its own entries in its result (row, lr, seed, ...)
    measure(run, config, model)            (its scores, a prompt to measure the cache with)
    best(results) -> lr                    the rate a cell's seed-0 runs choose (ValueError:
                                           every rate diverged)
    describe(result) -> str                a run that trained to the end, in the progress line
    report(results, swept, setup, out)     writes the report (report.write); -> its paths

  and may override `estimate` and `default_jobs`."""

  name: str

  def default_jobs(self) -> int:
    """Runs at a time without --jobs: one per available core."""
    return len(common.available_cores())

  def estimate(self, plan: Plan, left: int, upper: bool, jobs: int) -> str:
    """What is left to train, in words."""
    return f"{'at most ' if upper else ''}{left} to train"

  def read(self, run: Run) -> dict | None:
    path = self.path(run) / runner.RESULT
    return json.loads(path.read_text()) if path.exists() else None


def rates(values: list[str]) -> list[float]:
  """--lrs, parsed: distinct positive numbers (to the 6 significant digits that name the run
  folders), sorted."""
  try:
    lrs = sorted(float(x) for x in values)
  except ValueError:
    lrs = []
  if not lrs or not all(lr > 0 for lr in lrs) or len({f'{lr:g}' for lr in lrs}) != len(lrs):
    raise InputError(f'--lrs takes distinct positive numbers, comma-separated (got '
                     f"{','.join(map(str, values))}; rates are told apart to 6 digits)")
  return lrs


def default(flag, full, quick):
  """A flag's value if given, else the experiment's default (its quick one under --quick)."""
  return flag if flag is not None else quick if FLAGS.quick else full


def grid_flags(known_rows, lrs: list, quick_lrs: list, quick_seeds: int,
               where: str = '') -> tuple[list[str], list[float], int]:
  """(--rows, --lrs, --seeds), checked: the rows among `known_rows` (default: all of them),
  the rates distinct and positive, at least one seed (default: 3, or quick_seeds)."""
  rows = list(dict.fromkeys(FLAGS.rows or known_rows))
  unknown = sorted(set(rows) - set(known_rows))
  lrs, seeds = rates(FLAGS.lrs or default(None, lrs, quick_lrs)), default(FLAGS.seeds, 3,
                                                                          quick_seeds)
  if unknown or not rows or seeds < 1:
    raise InputError(f'unknown rows {unknown} or --seeds={seeds} < 1; the rows{where} are '
                     f'{list(known_rows)}')
  return rows, lrs, seeds


def best_of(results: list[dict], score: Callable[[dict], object],
            where: Callable[[dict], str]) -> float:
  """The rate of the run with the highest score(run) (the first of equals) among a cell's
  runs that did not diverge; ValueError, naming the cell as where(run) says, when all did."""
  finished = [r for r in results if not r.get('diverged')]
  if not finished:
    raise ValueError(f'{where(results[0])}: every rate diverged (non-finite loss); rerun with '
                     'lower --lrs')
  return max(finished, key=score)['lr']


def sweep_runs(cells: list[tuple], lrs: list[float]) -> list[Run]:
  """Seed 0 of every cell at every rate; rate by rate, so the runs that train side by side
  are of different cells, and a cell's later rates find its programs compiled."""
  return [(*cell, lr, 0) for lr in lrs for cell in cells] if len(lrs) > 1 else []


def final_runs(cells: list[tuple], lrs: list[float], seeds: int,
               read: Callable[[Run], dict | None],
               best: Callable[[list[dict]], float]) -> list[Run]:
  """Seeds 1 .. `seeds` of every cell at its chosen rate (the sweep must be finished); seed by
  seed, so an interrupted run has every cell at the lower seeds."""
  try:
    chosen = {cell: best([read((*cell, lr, 0)) for lr in lrs]) if len(lrs) > 1 else lrs[0]
              for cell in cells}
  except ValueError as e:  # every rate of a cell diverged
    raise InputError(str(e)) from None
  return [(*cell, chosen[cell], seed) for seed in range(1, seeds + 1) for cell in cells]


def left_to_train(sweep: list[Run], plan: Plan, read: Callable[[Run], dict | None],
                  best: Callable[[list[dict]], float]) -> tuple[int, bool]:
  """(runs left, whether that is an upper bound: while the sweep is unfinished the rates are
  not chosen, and every reported run may be left)."""
  left = sum(read(r) is None for r in sweep)
  if left:
    return left + len(plan.cells) * plan.seeds, True
  final = final_runs(plan.cells, plan.lrs, plan.seeds, read, best)
  return sum(read(r) is None for r in final), False


def work(sweep: Sweep, run: Run) -> None:
  """The one worker: trains the run, scores it, measures its cache; result.json last."""
  runner.share_compilations(FLAGS.workdir)
  config, run_dir, fields = sweep.config(run), sweep.path(run), sweep.fields(run)
  start = time.perf_counter()
  try:
    training.train_and_evaluate(config, str(run_dir), final_eval=False)
  except training.TrainingError as e:  # a rate too high: the sweep passes over it
    wd.write_json(run_dir, runner.RESULT, dict(fields, diverged=str(e), cpu_s=runner.cpu_s()))
    return
  train_s = time.perf_counter() - start
  model, cfg = wd.load_workdir(run_dir)
  start = time.perf_counter()
  scores, prompt = sweep.measure(run, config, model)
  eval_s = time.perf_counter() - start
  start = time.perf_counter()
  cache = runner.measure_caches(model, prompt) if fields['seed'] else {}
  cache_s = time.perf_counter() - start
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').open()]
  speeds = [r['tokens_per_s'] for r in rows if 'tokens_per_s' in r][1:]  # the first compiles
  d = config.data
  runner.write_result(run_dir, dict(
      **scores, **fields, attention=cfg.attention, params=param_count(cfg), d_ff=cfg.d_ff,
      model=cfg.to_dict(), train_tokens=config.train.steps * d.batch_size * d.seq_len,
      tokens_per_s=float(np.median(speeds)) if speeds else None, **cache, train_s=train_s,
      eval_s=eval_s, cache_s=cache_s, cpu_s=runner.cpu_s()))


def _train(runs: list[Run], what: str, sweep: Sweep, jobs: int, ledger: runner.Ledger) -> int:
  """Trains the unfinished runs, recording each in the ledger; -> how many there were."""
  todo = [r for r in runs if sweep.read(r) is None]
  print(f'{what}: {len(runs) - len(todo)} of {len(runs)} runs already finished in '
        f'{ledger.root}; training {len(todo)}', flush=True)
  workdir = pathlib.Path(FLAGS.workdir).resolve()

  def task(run: Run) -> runner.Task:
    path = sweep.path(run)
    name = ' '.join(f'{k}={v}' for k, v in sweep.fields(run).items())
    # the worker parses this process's flags, so it builds the same plan's run
    args = [f'experiments.{sweep.name}', *sys.argv[1:], f'--workdir={workdir}',
            f'--worker={json.dumps(run)}']
    return runner.Task(name, args, path / 'log.txt', path / runner.RESULT, describe=lambda r:
                       'diverged' if r.get('diverged') else sweep.describe(r))

  runner.run_tasks([task(r) for r in runs], jobs, ledger=ledger)
  return len(todo)


def main(sweep: Sweep) -> None:
  """The experiment's command: its plan, then the sweep, the reported seeds and the report."""
  if FLAGS.worker:
    return work(sweep, tuple(json.loads(FLAGS.worker)))
  plan = sweep.plan()
  start = time.perf_counter()
  out = common.out_dir(sweep.name, FLAGS.workdir)
  ledger = runner.Ledger(out / f'{sweep.name}.ledger.jsonl', FLAGS.workdir)
  restored = ledger.sync()  # before the plan line, which counts what it restores
  swept = sweep_runs(plan.cells, plan.lrs)
  jobs = min(FLAGS.jobs or sweep.default_jobs(), len(common.available_cores()))
  left, upper = left_to_train(swept, plan, sweep.read, sweep.best)
  print(f'{plan.words}: {len(swept)} sweep runs (seed 0 at each of {len(plan.lrs)} rates) + '
        f'{len(plan.cells) * plan.seeds} reported runs (seeds 1-{plan.seeds}); '
        f'{sweep.estimate(plan, left, upper, jobs)}'
        + (f' ({restored} finished runs restored from {ledger.path})' if restored else ''),
        flush=True)
  if FLAGS.dry_run:
    return
  trained = _train(swept, 'learning-rate sweep', sweep, jobs, ledger)
  final = final_runs(plan.cells, plan.lrs, plan.seeds, sweep.read, sweep.best)
  trained += _train(final, 'seeds at the chosen rates', sweep, jobs, ledger)
  wall_s = time.perf_counter() - start
  total = len(swept) + len(final)
  setup = common.setup(
      **plan.grid, jobs=jobs, wall_s=wall_s, runs_trained=trained, runs_total=total,
      cpu_s=sum(sweep.read(r)['cpu_s'] for r in swept + final),
      full_wall_s=runner.full_wall_s(out / f'{plan.stem}.json', wall_s, trained == total,
                                     plan.grid))
  try:
    sweep.report([sweep.read(r) for r in final], [sweep.read(r) for r in swept], setup, out)
  except ValueError as e:  # every seed of a row diverged
    raise InputError(str(e)) from None
