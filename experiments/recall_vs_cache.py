r"""Recall vs KV-cache size: every row of configs/ablations/recall_vs_cache.py trained on MQAR at
several numbers of key-value pairs, each at its best learning rate, over seeds.

  python -m experiments.recall_vs_cache --workdir=runs/recall      # the CPU grid: ~2 h, 2 cores
  python -m experiments.recall_vs_cache --workdir=/tmp/rvc --quick # the pipeline, minutes
  python -m experiments.recall_vs_cache --workdir=runs/zoology --seq_len=256 \
      --kv_pairs=8,16,32,64 --lrs=2.2e-3,4.6e-3,1e-2,2.2e-2       # Zoology's grid (accelerator)

Protocol (experiments/sweep.py: Zoology's best of up to four learning rates, then seeds): for
each row and N, seed 0 is trained at each rate of --lrs and the rate with the best recall on
the validation set (the trainer's held-out set, val_seed 0) is chosen; then --seeds fresh
seeds (1, 2, ...) are trained at that rate and reported, as mean ± std, on a separate test set
(val_seed TEST_SEED). The run that chose the rate is never among those reported. With one
rate there is nothing to choose and no sweep is trained. A run whose loss turns non-finite is
recorded as diverged: the sweep passes over its rate, and the report counts diverged seeds
apart.

Each run is an ordinary mla_jax workdir,
workdir/<row>/seq<T>_kv<N>_steps<S>[_quick]/lr<rate>/seed<k>, trained in its own process pinned
to one core (experiments/runner.py): finished runs are never redone, an interrupted one resumes
from its last checkpoint, and runs of other settings (another --seq_len, --steps or --lrs) sit
beside them without mixing. Every finished run is also recorded in recall_vs_cache.ledger.jsonl
beside the report, and a workdir that lacks a run the ledger holds gets its result back: a
clone on a fresh machine continues a grid that another machine started (to redo a finished run,
delete its folder and its ledger line). Each reported run's decode cache (a sweep run's is not
measured) is counted from the arrays a bfloat16 prefill + decode step returns and must equal
the formula; the bytes per token of int8 and float8_e4m3fn caches (their float32 scales
included) are measured the same way. The CPU time left is estimated before anything trains
(--dry_run prints the plan and the estimate only: shrink --kv_pairs, --lrs, --seeds, --steps or
--rows until it fits a budget). The report (recall_vs_cache.md / .json / .png) goes to
--results_dir: experiments/results for the full protocol, the workdir for --quick (which never
overwrites the committed results).
"""

from __future__ import annotations

import copy
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from absl import flags

from configs.ablations import capacity_vs_cache as capacity
from configs.ablations import recall_vs_cache as ablation
from experiments import recall_report, runner
from experiments import sweep as sweep_lib
from mla_jax import cli, tasks, trainer
from mla_jax import workdir as wd
from mla_jax.errors import InputError
from mla_jax.model import param_count

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'where the runs live (row / setting / rate / seed)')
flags.DEFINE_list('rows', list(capacity.ROWS), 'rows to run')
flags.DEFINE_integer('seq_len', None, 'tokens per example (default: the config\'s SEQ_LEN; '
                     'with --quick, its QUICK_SEQ_LEN)')
flags.DEFINE_list('kv_pairs', None, 'difficulties: key-value pairs per example (default: the '
                  'config\'s KV_PAIRS; with --quick, QUICK_KV_PAIRS)')
flags.DEFINE_list('lrs', None, 'learning rates to choose from with seed 0 (default: the '
                  'config\'s; with --quick, its quick ones)')
flags.DEFINE_integer('seeds', None, 'seeds 1 .. N trained at the chosen rate and reported '
                     '(default: 3; with --quick, 1)')
flags.DEFINE_integer('steps', None, 'training steps per run (default: the config\'s STEPS; '
                     'with --quick, QUICK_STEPS)')
flags.DEFINE_bool('quick', False, 'a tiny model and 20 steps: checks the pipeline, not MLA')
flags.DEFINE_bool('dry_run', False, 'print the plan and its CPU-time estimate; train nothing')
flags.DEFINE_integer('jobs', 0, 'runs at a time, one core each (0: one per available core)')
flags.DEFINE_string('results_dir', None,
                    'where the report goes (default: experiments/results; with --quick, workdir)')
flags.DEFINE_string('worker', None, 'internal: ROW:T:N:STEPS:RATE:SEED, the run to train')
flags.mark_flag_as_required('workdir')

# CPU seconds of one training step of the full-size rows at batch 32, T tokens per example:
# 32 T (A + B T) (attention makes it quadratic in T), fitted to one core of this project's
# CPU (0.14 s at T = 64, 1.15 s at T = 256); plus the rest of a run (start-up, compiling,
# scoring 2 x 1024 held-out examples, three cache measurements: ~45 s for a row's first run,
# less once the compilation cache holds its programs). Only for the estimate printed
# before training: once runs of a setting have finished, their measured CPU time is used.
STEP_A_S, STEP_B_S, RUN_OVERHEAD_S = 4.4e-5, 3.75e-7, 30.0


def run_config(row: str, seq_len: int, kv_pairs: int, steps: int, lr: float, seed: int,
               quick: bool):
  config = ablation.get_config(f'{row},kv{kv_pairs},seq{seq_len}' + (',quick' if quick else ''))
  ablation.set_steps(config, steps)
  config.opt.lr = lr
  config.seed = seed
  return config


def setting_name(seq_len: int, kv_pairs: int | str, steps: int) -> str:
  """The folder of one difficulty; a --quick run is another model, so it never passes for a
  full one."""
  return f"seq{seq_len}_kv{kv_pairs}_steps{steps}{'_quick' if FLAGS.quick else ''}"


def run_path(row: str, seq_len: int, kv_pairs: int, steps: int, lr: float,
             seed: int) -> pathlib.Path:
  return (pathlib.Path(FLAGS.workdir) / row / setting_name(seq_len, kv_pairs, steps)
          / f'lr{lr:g}' / f'seed{seed}')


def _worker(spec: str) -> None:
  """Trains one run, scores it on the validation and test sets, measures its decode cache
  (not for a sweep run); writes result.json last."""
  row, seq_len, kv, steps, lr, seed = spec.split(':')
  seq_len, kv, steps, lr, seed = int(seq_len), int(kv), int(steps), float(lr), int(seed)
  runner.share_compilations(FLAGS.workdir)
  config = run_config(row, seq_len, kv, steps, lr, seed, FLAGS.quick)
  run_dir = run_path(row, seq_len, kv, steps, lr, seed)
  start = time.perf_counter()
  try:
    trainer.train_and_evaluate(config, str(run_dir), final_eval=False)
  except trainer.TrainingError as e:  # a rate too high: the sweep passes over it
    wd.write_json(run_dir, runner.RESULT, dict(
        row=row, seq_len=seq_len, kv_pairs=kv, steps=steps, lr=lr, seed=seed, diverged=str(e),
        cpu_s=runner.cpu_s()))
    return
  train_s = time.perf_counter() - start
  model, cfg = wd.load_workdir(run_dir)
  start = time.perf_counter()
  val_task = tasks.MQAR(config)
  val = val_task.validate(model)
  test_config = copy.deepcopy(config)
  test_config.data.mqar.val_seed = ablation.TEST_SEED
  test = tasks.MQAR(test_config).validate(model)
  eval_s = time.perf_counter() - start
  # A sweep run (seed 0) is read only for its validation score: its cache is not measured.
  start = time.perf_counter()
  prompt = val_task.heldout[0]['inputs'][0][:cfg.max_seq_len // 2]
  cache = runner.measure_caches(model, prompt) if seed else {}
  cache_s = time.perf_counter() - start
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').open()]
  speeds = [r['tokens_per_s'] for r in rows if 'tokens_per_s' in r][1:]  # the first compiles
  d = config.data
  wd.write_json(run_dir, runner.RESULT, dict(
      row=row, seq_len=seq_len, kv_pairs=kv, steps=steps, lr=lr, seed=seed,
      attention=cfg.attention, params=param_count(cfg), d_ff=cfg.d_ff, model=cfg.to_dict(),
      power_a=d.mqar.power_a, val_accuracy=val['accuracy'], val_loss=val['loss'],
      accuracy=test['accuracy'], loss=test['loss'], answers=test['answers'],
      test_examples=d.mqar.val_examples, train_tokens=steps * d.batch_size * d.seq_len,
      tokens_per_s=float(np.median(speeds)) if speeds else None, **cache, train_s=train_s,
      eval_s=eval_s, cache_s=cache_s, cpu_s=runner.cpu_s(), jax=jax.__version__,
      machine=runner.machine()))


def _task(run: tuple) -> runner.Task:
  row, seq_len, kv, steps, lr, seed = run
  path = run_path(*run)
  return runner.Task(
      f'{row} seq{seq_len} kv{kv} lr{lr:g} seed{seed}',
      ['experiments.recall_vs_cache', f'--workdir={FLAGS.workdir}', f'--quick={FLAGS.quick}',
       f'--worker={row}:{seq_len}:{kv}:{steps}:{lr!r}:{seed}'],
      path / 'log.txt', path / runner.RESULT,
      describe=lambda r: 'diverged' if r.get('diverged') else
      f"recall {r['val_accuracy']:.3f} (validation), {r['accuracy']:.3f} (test)")


def _read(run: tuple) -> dict | None:
  path = run_path(*run) / runner.RESULT
  return json.loads(path.read_text()) if path.exists() else None


def cpu_estimate(runs: int, seq_len: int, steps: int) -> tuple[float, str]:
  """(CPU seconds, how it was estimated) to train `runs` runs: from the finished runs of this
  setting in the workdir if there are any, else from the step-time model above."""
  measured = [r['cpu_s'] for r in map(_read, runs_of_setting(seq_len, steps)) if r]
  if measured:
    return runs * statistics.median(measured), f'the median of {len(measured)} finished runs'
  per_step = 32 * seq_len * (STEP_A_S + STEP_B_S * seq_len)
  return runs * (steps * per_step + RUN_OVERHEAD_S), 'a step-time model of the full-size rows'


def runs_of_setting(seq_len: int, steps: int) -> list[tuple]:
  """Every run in the workdir at this seq_len and steps (any row, N, rate, seed)."""
  out = []
  for path in pathlib.Path(FLAGS.workdir).glob(f"*/{setting_name(seq_len, '*', steps)}/lr*/seed*"):
    row, setting, lr, seed = path.parts[-4:]
    kv = int(setting.split('_kv')[1].split('_')[0])
    out.append((row, seq_len, kv, steps, float(lr[2:]), int(seed[4:])))
  return out


def _estimate(sweep: list[tuple], cells: list[tuple], lrs: list[float], seeds: int,
              jobs: int) -> str:
  """The CPU time left to train, in words (an upper bound while the rates are not chosen)."""
  left, upper = sweep_lib.left_to_train(sweep, cells, lrs, seeds, _read,
                                        recall_report.best_rate)
  if not left:
    return 'nothing left to train'
  seconds, basis = cpu_estimate(left, cells[0][1], cells[0][3])
  return (f"{left} to train, {'at most ' if upper else ''}~{seconds / 60:.0f} CPU minutes "
          f'(~{seconds / 60 / jobs:.0f} min on {jobs} cores; {basis})')


def _settings() -> tuple:
  quick = FLAGS.quick
  pick = lambda flag, full, short: flag if flag is not None else (short if quick else full)
  seq_len = pick(FLAGS.seq_len, ablation.SEQ_LEN, ablation.QUICK_SEQ_LEN)
  steps = pick(FLAGS.steps, ablation.STEPS, ablation.QUICK_STEPS)
  seeds = pick(FLAGS.seeds, 3, 1)
  try:
    kv_pairs = [int(k) for k in FLAGS.kv_pairs or (ablation.QUICK_KV_PAIRS if quick
                                                    else ablation.KV_PAIRS)]
  except ValueError as e:
    raise InputError(f'--kv_pairs takes comma-separated numbers ({e})') from None
  lrs = sweep_lib.rates(FLAGS.lrs or (ablation.QUICK_LEARNING_RATES if quick
                                      else ablation.LEARNING_RATES))
  rows = list(dict.fromkeys(FLAGS.rows))
  unknown = sorted(set(rows) - set(capacity.ROWS))
  if unknown or not rows or not kv_pairs:
    raise InputError(f'unknown rows {unknown} or none given (--rows={FLAGS.rows}, '
                     f'--kv_pairs={kv_pairs}); rows are {sorted(capacity.ROWS)}')
  if seeds < 1 or steps < 1:
    raise InputError(f'--seeds={seeds} and --steps={steps} must be >= 1')
  # An impossible N fails here, before anything is trained. (The shared config, not a row's:
  # matching a row's parameters starts jax, and the workers are forked from this process.)
  for kv in kv_pairs:
    try:
      tasks.MQAR(ablation.shared(kv, seq_len, quick))
    except ValueError as e:
      raise InputError(f'--kv_pairs={kv} at --seq_len={seq_len}: {e}') from None
  return rows, seq_len, kv_pairs, steps, lrs, seeds


def main():
  if FLAGS.worker:
    return _worker(FLAGS.worker)
  rows, seq_len, kv_pairs, steps, lrs, seeds = _settings()
  start = time.perf_counter()
  out = runner.results_dir(FLAGS.results_dir, FLAGS.workdir, FLAGS.quick)
  ledger = runner.Ledger(out / f'{recall_report.NAME}.ledger.jsonl', FLAGS.workdir)
  restored = ledger.sync()  # before the estimate (--dry_run too), which counts what it restores
  cells = [(row, seq_len, kv, steps) for kv in kv_pairs for row in rows]
  sweep = sweep_lib.sweep_runs(cells, lrs)
  jobs = min(FLAGS.jobs or len(runner.available_cores()), len(runner.available_cores()))
  print(f'{len(rows)} rows x N = {kv_pairs} at {seq_len} tokens, {steps} steps: '
        f'{len(sweep)} sweep runs (seed 0 at each of {len(lrs)} rates) + {len(cells) * seeds} '
        f'reported runs (seeds 1-{seeds}); {_estimate(sweep, cells, lrs, seeds, jobs)}'
        f'{runner.restored_words(restored, ledger)}',
        flush=True)
  if FLAGS.dry_run:
    return
  trained = sweep_lib.train(sweep, 'learning-rate sweep', _task, _read, jobs, ledger)
  final = sweep_lib.final_runs(cells, lrs, seeds, _read, recall_report.best_rate)
  trained += sweep_lib.train(final, 'seeds at the chosen rates', _task, _read, jobs, ledger)
  results = [_read(r) for r in final]
  wall_s = time.perf_counter() - start
  grid = dict(quick=FLAGS.quick, rows=rows, seq_len=seq_len, steps=steps, seeds=seeds, lrs=lrs,
              kv_pairs=kv_pairs)
  setup = dict(command=' '.join(['python -m experiments.recall_vs_cache', *sys.argv[1:]]),
               **grid, jobs=jobs, machine=runner.machine(), wall_s=wall_s,
               runs_total=len(sweep) + len(final),
               cpu_s=sum(_read(r)['cpu_s'] for r in sweep + final),
               full_wall_s=runner.full_wall_s(out / f'{recall_report.NAME}.json', wall_s,
                                              trained == len(sweep) + len(final), grid),
               test_seed=ablation.TEST_SEED)
  try:
    paths = recall_report.write(results, [_read(r) for r in sweep], setup, out)
  except ValueError as e:  # every seed of a row diverged
    raise InputError(str(e)) from None
  print('wrote ' + ', '.join(str(p) for p in paths))


if __name__ == '__main__':
  cli.run(main)
