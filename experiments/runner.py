"""What the multi-run experiments share: worker processes pinned one per CPU core, a ledger
of the finished runs that travels with the committed results, and the decode cache measured
from the arrays a decode step returns.

One core per run makes the numbers independent of how many runs share the machine (XLA sizes
its thread pool by the cores a process may use), and on this project's 2-core CPU two one-core
runs train ~40% more tokens per second than one two-core run at these sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import common
from mla_jax import decode, variants
from mla_jax import workdir as wd
from mla_jax.cache import measured_per_token
from mla_jax.errors import InputError
from mla_jax.model import with_config

# A run's results, written last by every experiment's worker: a run that has one is finished
# (Task.done), and the ledger keeps these files.
RESULT = 'result.json'


def pin_to(core: int):
  """Runs in the child before exec (this process has no threads): its one core, inherited."""
  if not hasattr(os, 'sched_setaffinity'):
    return None
  return lambda: os.sched_setaffinity(0, {core})


def cache_formula(cfg) -> tuple[str, int]:
  """DeepSeek-V2 Table 1 as the variant's registry entry writes it, and its value."""
  return variants.get(cfg.attention).cache_formula, variants.cache_elements_per_token(cfg)


def measure_decode_cache(model, prompt, cache_dtype=None) -> tuple[int, int]:
  """(elements, bytes) per token of the caches a bfloat16 prefill + decode step returns, in
  cache_dtype (None: bfloat16, the compute dtype; an 8-bit cache's bytes include its scales)."""
  model = with_config(model, dtype='bfloat16', cache_dtype=cache_dtype)
  graphdef, state = nnx.split(model)
  batch, max_len = 2, model.cfg.max_seq_len
  caches = model.init_cache(batch, max_len)  # as decode allocates
  prompts = jnp.asarray([prompt, prompt], jnp.int32)
  lengths = jnp.full((batch,), len(prompt), jnp.int32)
  logits, caches = decode.prefill(graphdef, state, caches, prompts, lengths)
  next_tokens = jnp.argmax(logits, -1).astype(jnp.int32)
  _, caches = decode.decode_step(graphdef, state, caches, next_tokens, lengths)
  return measured_per_token(caches, batch, max_len)


def share_compilations(workdir) -> None:
  """Worker processes of one experiment share a persistent compilation cache in
  workdir/xla_cache: runs of the same shape (the seeds of a row, a row's cache programs)
  compile their programs once."""
  jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(workdir) / 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def measure_caches(model, prompt) -> dict:
  """The decode cache of a trained model, as the experiments report it: the formula (Table 1)
  and elements per token measured from the arrays (which must agree), and the bytes per token
  in bfloat16 and in the 8-bit formats (their float32 scales included)."""
  formula, by_formula = cache_formula(model.cfg)
  elements, nbytes = measure_decode_cache(model, prompt)
  # None where the variant has no 8-bit cache (GTA, GLA, TPA)
  eight_bit = lambda dtype: (measure_decode_cache(model, prompt, dtype)[1]
                             if variants.get(model.cfg.attention).quantized_cache else None)
  if elements != by_formula:
    raise AssertionError(f'{model.cfg.attention}: the decode cache holds {elements} elements '
                         f'per token, the formula {formula} gives {by_formula}')
  return dict(cache_formula=formula, cache_elements_formula=by_formula,
              cache_elements_measured=elements, cache_bytes_bf16_measured=nbytes,
              cache_bytes_int8_measured=eight_bit('int8'),
              cache_bytes_fp8_measured=eight_bit('float8_e4m3fn'))


def write_result(run_dir: pathlib.Path, result: dict) -> None:
  """A finished run's result.json: `result`, then where and from what code it ran."""
  wd.write_json(run_dir, RESULT, dict(result, machine=common.machine(), commit=common.commit(),
                                      versions=common.versions()))


def cpu_s() -> float:
  """CPU seconds this process has used (user + system)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def full_wall_s(previous: pathlib.Path, wall_s: float, ran_all: bool, grid: dict) -> float | None:
  """The wall time of the whole grid: this invocation's if it ran every task, else the figure
  an earlier report of the same grid (`grid`: the setup entries that define it) recorded;
  None when there is none (a grid that spanned several invocations has no single wall time)."""
  if ran_all:
    return wall_s
  if not previous.exists():
    return None
  setup = json.loads(previous.read_text())['setup']
  same = all(setup.get(k) == json.loads(json.dumps(v)) for k, v in grid.items())  # as stored
  return setup.get('full_wall_s') if same else None


class Ledger:
  """Every finished run's result file, one JSON line each (its path under the workdir and its
  contents), kept beside the reports. A workdir stays on the machine that trained it; the
  ledger is committed with the results, so a grid that spans sessions on fresh machines
  resumes from it instead of training its finished runs again. The reports are computed from
  the result files alone, so a restored run reports exactly what it reported when it ran."""

  def __init__(self, path: pathlib.Path, workdir: str):
    self.path, self.root = pathlib.Path(path), pathlib.Path(workdir)

  def _parse(self, text: str) -> dict[str, dict]:
    held = {}
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        file, result = entry['file'], entry['result']
        posix = pathlib.PurePosixPath(file)
        ok = (isinstance(result, dict) and posix.name == RESULT and '..' not in posix.parts
              and not posix.is_absolute())
      except (ValueError, KeyError, TypeError):
        ok = False
      if not ok:
        raise InputError(f'{self.path} line {number} is not a ledger entry ({line[:60]!r}); '
                         'delete that line: its run is then recorded again from a workdir '
                         'that has it, or trained again')
      held[file] = result
    return held

  @contextlib.contextmanager
  def _locked(self):
    """(the ledger open for appending, what it holds), this process alone: two experiments on
    one workdir, or a sync beside a run finishing, never write a run twice."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with self.path.open('a+') as f:
      fcntl.flock(f, fcntl.LOCK_EX)
      f.seek(0)
      yield f, self._parse(f.read())

  def sync(self) -> int:
    """Writes back the result files the workdir lacks, then records those the ledger lacks;
    -> how many were written back."""
    done = sorted(self.root.rglob(RESULT))
    if not done and not self.path.exists():
      return 0
    with self._locked() as (f, held):
      restored = [key for key in held if not (self.root / key).exists()]
      for key in restored:
        (self.root / key).parent.mkdir(parents=True, exist_ok=True)
        wd.write_json((self.root / key).parent, RESULT, held[key])
      for path in done:
        self._append(f, held, path)
    return len(restored)

  def record(self, done: pathlib.Path) -> None:
    """Records one finished run, unless the ledger holds it."""
    with self._locked() as (f, held):
      self._append(f, held, done)

  def _append(self, f, held: dict, done: pathlib.Path) -> None:
    key = done.relative_to(self.root).as_posix()
    if key not in held:
      held[key] = json.loads(done.read_text())
      f.write(json.dumps(dict(file=key, result=held[key]), sort_keys=True) + '\n')


@dataclasses.dataclass
class Task:
  """One worker process: `args` after `python -m`, its log, the tasks it waits for, and
  `done` (its result file: a task whose result exists is never run again). `describe`, if
  given, turns the result (JSON) into the words after the task's name in the progress line."""

  name: str
  args: list[str]
  log: pathlib.Path
  done: pathlib.Path
  after: tuple[str, ...] = ()
  describe: Callable[[dict], str] | None = None


def run_tasks(tasks: list[Task], jobs: int = 0, report=print,
              ledger: Ledger | None = None) -> None:
  """Runs the unfinished tasks, each on its own core, `jobs` at a time (0: one per core), in
  list order as soon as the tasks they wait for are done, recording each finished one in
  `ledger`. A failure stops new starts; the running ones finish; then SystemExit with each
  failure's last log line."""
  cores = common.available_cores()
  jobs = min(jobs or len(cores), len(cores))
  todo = [t for t in tasks if not t.done.exists()]
  finished = {t.name for t in tasks if t.done.exists()}
  running: dict[int, tuple[subprocess.Popen, Task, float]] = {}
  failed = []
  while todo or running:
    for slot in [s for s in range(jobs) if s not in running]:
      for task in [t for t in todo if t.done.exists()]:  # finished meanwhile by another process
        todo.remove(task)
        finished.add(task.name)
      ready = [t for t in todo if set(t.after) <= finished]
      if not ready or failed:
        break
      task = ready[0]
      todo.remove(task)
      task.log.parent.mkdir(parents=True, exist_ok=True)
      with task.log.open('a') as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, '-m', *task.args], cwd=common.ROOT, stdout=log,
                                stderr=log, preexec_fn=pin_to(cores[slot]))
      running[slot] = (proc, task, time.perf_counter())
    if not running:
      if todo:  # nothing can start: a task waits for one that is not in the list
        failed.append(f'{todo[0].name} waits for {set(todo[0].after) - finished}')
      break
    time.sleep(0.5)
    for slot, (proc, task, started) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[slot]
      if proc.returncode or not task.done.exists():
        lines = task.log.read_text().strip().splitlines() or ['(empty log)']
        failed.append(f'{task.name} failed (exit {proc.returncode}): {lines[-1]} '
                      f'(full log: {task.log})')
        continue
      finished.add(task.name)
      if ledger is not None:
        ledger.record(task.done)
      words = f': {task.describe(json.loads(task.done.read_text()))}' if task.describe else ''
      report(f'[{len(finished)}/{len(tasks)}] {task.name}{words} in '
             f'{time.perf_counter() - started:.0f} s')
  if failed:
    raise SystemExit('error: ' + '; '.join(failed))
