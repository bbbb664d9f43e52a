r"""Capacity vs KV-cache size: every row of configs/ablations/capacity_vs_cache.py, 3 seeds.

  python -m experiments.capacity_vs_cache --workdir=runs/capacity            # ~80 min, 2 cores
  python -m experiments.capacity_vs_cache --workdir=/tmp/cvc --quick         # ~2 min

Each (row, seed) trains in its own process, pinned to one CPU core, with --jobs of them at a
time (default: one per core). One core per run makes the numbers independent of how many
runs share the machine (XLA sizes its thread pool by the cores a process may use), and two
one-core runs on two cores train ~40% more tokens per second than one two-core run at this
size. A run is workdir/<row>/seed<k>, an ordinary mla_jax workdir: an interrupted run resumes
from its last checkpoint, and a finished one (result.json) is not redone.

Each run then: scores the validation split with mla_jax.evaluator.perplexity; prefills and
decodes with the trained model in bfloat16 and counts the elements and bytes per token of the
caches the decode loop returns, and the bytes per token of int8 and float8_e4m3fn caches
(ModelConfig.cache_dtype; their float32 per-token scales included). The report
(capacity_vs_cache.md / .json / .png) goes to --results_dir: experiments/results for the full
run, the workdir for --quick (which must never overwrite the committed results).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
from absl import app, flags

from configs.ablations import capacity_vs_cache as ablation
from experiments import capacity_report
from experiments.runner import available_cores as _available_cores
from experiments.runner import cache_formula, measure_decode_cache
from experiments.runner import machine as _machine
from experiments.runner import pin_to as _pin_to
from mla_jax import cli, data, evaluator, trainer
from mla_jax import workdir as wd
from mla_jax.model import param_count

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'where the runs live (one folder per row and seed)')
flags.DEFINE_list('rows', ['mha', 'gqa4', 'gqa2', 'mqa', 'mla2', 'mla4', 'mla8'], 'rows to run')
flags.DEFINE_integer('seeds', 3, 'seeds 0 .. N-1 for every row (parameters and data order)')
flags.DEFINE_bool('quick', False, 'a tiny model and 20 steps: checks the pipeline, not MLA')
flags.DEFINE_integer('jobs', 0, 'runs at a time, one core each (0: one per available core)')
flags.DEFINE_string('results_dir', None,
                    'where the report goes (default: experiments/results; with --quick, workdir)')
flags.DEFINE_string('data_files', '', 'a glob of text files instead of the Shakespeare corpus')
flags.DEFINE_string('worker', None, 'internal: ROW:SEED, the run this process trains')
flags.mark_flag_as_required('workdir')

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT = 'result.json'


def run_config(row: str, seed: int, quick: bool, data_files: str):
  config = ablation.get_config(row + (',quick' if quick else ''))
  config.seed = seed
  if data_files:
    config.data.files = data_files
  return config


def _worker(spec: str) -> None:
  """Trains, evaluates and measures one (row, seed); writes result.json last."""
  row, seed = spec.split(':')
  cli.quiet_logging()
  # Seeds of a row compile the same programs: the persistent cache compiles them once.
  jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(FLAGS.workdir) / 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  config = run_config(row, int(seed), FLAGS.quick, FLAGS.data_files)
  run_dir = run_path(row, int(seed))
  start = time.perf_counter()
  trainer.train_and_evaluate(config, str(run_dir), final_eval=False)
  train_s = time.perf_counter() - start
  model, cfg = wd.load_workdir(run_dir)
  val = data.load_splits(config.data)['val']
  start = time.perf_counter()
  e = config.eval
  result = evaluator.perplexity(model, val, e.seq_len, e.stride, e.batch_size)
  eval_s = time.perf_counter() - start
  formula, by_formula = cache_formula(cfg)
  prompt = val[:cfg.max_seq_len // 2]
  elements, nbytes = measure_decode_cache(model, prompt)
  bytes_8bit = {name: measure_decode_cache(model, prompt, name)[1]
                for name in ('int8', 'float8_e4m3fn')}
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').open()]
  speeds = [r['tokens_per_s'] for r in rows if 'tokens_per_s' in r][1:]  # the first compiles
  result.update(
      row=row, seed=int(seed), attention=cfg.attention, params=param_count(cfg), d_ff=cfg.d_ff,
      model=cfg.to_dict(), train_tokens=config.train.steps * config.data.batch_size
      * config.data.seq_len, tokens_per_s=float(np.median(speeds)) if speeds else None,
      cache_formula=formula, cache_elements_formula=by_formula,
      cache_elements_measured=elements, cache_bytes_bf16_measured=nbytes,
      cache_bytes_int8_measured=bytes_8bit['int8'],
      cache_bytes_fp8_measured=bytes_8bit['float8_e4m3fn'],
      train_s=train_s, eval_s=eval_s, jax=jax.__version__)
  tmp = run_dir / (RESULT + '.tmp')
  tmp.write_text(json.dumps(result, indent=1))
  tmp.replace(run_dir / RESULT)


def run_path(row: str, seed: int) -> pathlib.Path:
  return pathlib.Path(FLAGS.workdir) / row / f'seed{seed}'


def _run_all(todo: list[tuple[str, int]]) -> None:
  """Runs (row, seed) pairs as worker processes, --jobs at a time, each on its own core."""
  cores = _available_cores()
  jobs = min(FLAGS.jobs or len(cores), len(cores))
  running: dict[int, tuple[subprocess.Popen, str, int, float]] = {}  # core index -> run
  failed, done = [], 0
  while todo or running:
    for slot in [s for s in range(jobs) if s not in running]:
      if not todo or failed:
        break
      row, seed = todo.pop(0)
      run_dir = run_path(row, seed)
      run_dir.mkdir(parents=True, exist_ok=True)
      args = [sys.executable, '-m', 'experiments.capacity_vs_cache',
              f'--workdir={FLAGS.workdir}', f'--worker={row}:{seed}', f'--quick={FLAGS.quick}',
              f'--data_files={FLAGS.data_files}']
      with (run_dir / 'log.txt').open('a') as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=log,
                                preexec_fn=_pin_to(cores[slot]))
      running[slot] = (proc, row, seed, time.perf_counter())
    time.sleep(0.5)
    for slot, (proc, row, seed, started) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[slot]
      done += 1
      log = run_path(row, seed) / 'log.txt'
      if proc.returncode:
        lines = log.read_text().strip().splitlines() or ['(empty log)']
        failed.append(f'{row} seed {seed} failed (exit {proc.returncode}): {lines[-1]} '
                      f'(full log: {log})')
        continue
      r = json.loads((run_path(row, seed) / RESULT).read_text())
      print(f"[{done}] {row} seed {seed}: val loss {r['loss']:.4f} (perplexity "
            f"{r['perplexity']:.3f}) in {time.perf_counter() - started:.0f} s", flush=True)
  if failed:
    raise SystemExit('error: ' + '; '.join(failed))


def main(argv):
  del argv
  if FLAGS.worker:
    return _worker(FLAGS.worker)
  unknown = sorted(set(FLAGS.rows) - set(ablation.ROWS))
  if unknown or FLAGS.seeds < 1:
    raise SystemExit(f'error: unknown rows {unknown} or --seeds={FLAGS.seeds} < 1; rows are '
                     f'{sorted(ablation.ROWS)}')
  start = time.perf_counter()
  runs = [(row, seed) for row in FLAGS.rows for seed in range(FLAGS.seeds)]
  todo = [r for r in runs if not (run_path(*r) / RESULT).exists()]
  print(f'{len(runs) - len(todo)} of {len(runs)} runs already finished in {FLAGS.workdir}; '
        f'training {len(todo)}', flush=True)
  # Seed by seed, so an interrupted sweep has every row at the lower seeds.
  todo.sort(key=lambda r: r[1])
  _run_all(list(todo))
  results = [json.loads((run_path(*r) / RESULT).read_text()) for r in runs]
  out = pathlib.Path(FLAGS.results_dir or (FLAGS.workdir if FLAGS.quick
                                           else ROOT / 'experiments' / 'results'))
  wall_s = time.perf_counter() - start
  if len(todo) == len(runs):
    full_wall_s = wall_s  # every run trained by this invocation: the sweep's wall time
  else:  # a report-only or resumed invocation keeps the last full sweep's figure, if any
    previous = out / f'{capacity_report.NAME}.json'
    full_wall_s = (json.loads(previous.read_text())['setup'].get('full_sweep_wall_s')
                   if previous.exists() else None)
  setup = dict(command=' '.join(['python -m experiments.capacity_vs_cache', *sys.argv[1:]]),
               quick=FLAGS.quick, seeds=FLAGS.seeds, jobs=FLAGS.jobs or len(_available_cores()),
               machine=_machine(), wall_s=wall_s, runs_trained=len(todo),
               full_sweep_wall_s=full_wall_s, data=FLAGS.data_files or 'shakespeare')
  paths = capacity_report.write(results, setup, out)
  print('wrote ' + ', '.join(str(p) for p in paths))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
