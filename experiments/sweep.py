"""The learning-rate protocol the capacity experiments share (Zoology's, and what a fair
comparison of architectures needs: each row at its own best rate).

A *cell* is everything that fixes a run but its rate and seed (a row, and for recall the
difficulty); a *run* is (*cell, lr, seed). With more than one rate, seed 0 of every cell is
trained at every rate (the sweep) and the cell's rate is chosen from those runs by the
experiment's `best` (validation loss, or validation recall); then seeds 1 .. N are trained at
the chosen rate and reported. The run that chose a rate is never among those reported, so the
choice does not flatter the reported numbers. With one rate there is nothing to choose: no
sweep, seeds 1 .. N at that rate.

Runs are experiments/runner.py tasks: finished ones (a result file, in the workdir or in the
ledger beside the report) are never redone, so a protocol interrupted anywhere, even one
continued on another machine from the committed ledger, resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable

from experiments import runner
from mla_jax.errors import InputError

Run = tuple  # (*cell, lr, seed)


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


def left_to_train(sweep: list[Run], cells: list[tuple], lrs: list[float], seeds: int,
                  read: Callable[[Run], dict | None],
                  best: Callable[[list[dict]], float]) -> tuple[int, bool]:
  """(runs left, whether that is an upper bound: while the sweep is unfinished the rates are
  not chosen, and every reported run may be left)."""
  left = sum(read(r) is None for r in sweep)
  if left:
    return left + len(cells) * seeds, True
  return sum(read(r) is None for r in final_runs(cells, lrs, seeds, read, best)), False


def train(runs: list[Run], what: str, task: Callable[[Run], runner.Task],
          read: Callable[[Run], dict | None], jobs: int, ledger: runner.Ledger) -> int:
  """Trains the unfinished runs (runner.run_tasks), recording each in the ledger; -> how many
  there were."""
  todo = [r for r in runs if read(r) is None]
  print(f'{what}: {len(runs) - len(todo)} of {len(runs)} runs already finished in '
        f'{ledger.root}; training {len(todo)}', flush=True)
  runner.run_tasks([task(r) for r in runs], jobs, ledger=ledger)
  return len(todo)
