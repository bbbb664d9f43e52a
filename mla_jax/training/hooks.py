"""What the training loop does besides stepping: stop on a signal, and log.

Preemption  SIGTERM or SIGINT (Ctrl-C). During start-up nothing is saved yet, so the process
            exits at once (128 + the signal); once the loop runs, the signal is a flag that
            the loop reads once per step, so it checkpoints that step and stops cleanly.
MetricsLog  metrics.jsonl, TensorBoard and one line on the terminal with an ETA (process 0).
"""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import time

import jax

from mla_jax import workdir as wd

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_before_first_step(signum, frame):
  """Handler for start-up: there is nothing to save yet, so exit at once."""
  del frame
  name = signal.Signals(signum).name
  print(f'{name} before the first step: nothing to save', file=sys.stderr, flush=True)
  sys.exit(128 + signum)


class Preemption:
  """SIGTERM and SIGINT: exit at once during start-up; a flag (`requested`, the signal's name)
  once `training` is set. close() restores the previous handlers."""

  def __init__(self):
    self.requested: str | None = None
    self.training = False
    self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

  def _handle(self, signum, frame):
    if not self.training:
      exit_before_first_step(signum, frame)
    self.requested = signal.Signals(signum).name

  def close(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


class MetricsLog:
  """metrics.jsonl, TensorBoard and a one-line progress display with an ETA (process 0 only).
  The rows of steps after `start` that an earlier life of the run logged are dropped, so each
  step has one row."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, start: int):
    self.enabled = jax.process_index() == 0
    self.total, self.start = total_steps, start
    self.started = time.perf_counter()
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported late: only the writer process needs it
      wd.truncate_metrics(workdir, start)
      self.jsonl = (workdir / 'metrics.jsonl').open('a')
      # TensorBoard hides the events of steps after `start` that an earlier life logged.
      self.tb = SummaryWriter(str(workdir / 'tb'), purge_step=start + 1)

  def eta(self, step: int) -> str:
    """Time left to train.steps at this life's mean pace (validation included)."""
    done = step - self.start
    if done <= 0:
      return '?'
    return _duration((time.perf_counter() - self.started) / done * (self.total - step))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    for key, value in metrics.items():
      self.tb.add_scalar(key, value, step)
    shown = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    validation = any(k.startswith('val_') for k in metrics)
    end = '\r' if sys.stderr.isatty() and not validation else '\n'
    eta = '' if validation or step >= self.total else f' eta {self.eta(step)}'
    print(f'step {step}/{self.total} {shown}{eta}', end=end, file=sys.stderr, flush=True)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()
