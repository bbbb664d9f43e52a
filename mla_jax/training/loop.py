"""train_and_evaluate(config, workdir): the training run behind `python -m mla_jax.train`.

A run is prepared, then trained. `prepare` parses the config once and checks everything that
can be checked before anything is written: the config, the mesh and the batch's layout on it
(built here once, and used by the loop), the memory the run needs, the workdir (a run to
resume under the same config, or a new one), --init_from, and the task's data. Only then is
the workdir locked and written. The loop steps the pure train step (training.step) over
batches that are a function of (seed, step), and around it logs, validates, checkpoints and
stops on SIGTERM / SIGINT, each every so many steps. The host never waits on the device inside
the loop but to fetch metrics, every log_every steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
from flax import nnx

from mla_jax import flash, platform, sharding, tasks
from mla_jax import workdir as wd
from mla_jax.config import ConfigError
from mla_jax.errors import Error, Preempted
from mla_jax.model import active_param_count, param_count, train_flops_per_token
from mla_jax.run_config import RunConfig, changes, parse
from mla_jax.training import memory
from mla_jax.training.hooks import MetricsLog, Preemption
from mla_jax.training.state import (
  TrainState,
  abstract_state,
  announce,
  latest_checkpoint,
  resolve_init_from,
)
from mla_jax.training.step import batch_layout, jit_train_step, learning_rate


class TrainingError(Error):
  """Training cannot go on (non-finite loss); the last good checkpoint is kept."""


def request_determinism(config) -> None:
  """Asks XLA for deterministic GPU reductions when config.train.deterministic: it must run
  before jax starts its backends (XLA reads XLA_FLAGS once), as the train command does."""
  if getattr(config.train, 'deterministic', False) and not flash.deterministic_gpu_ops():
    os.environ['XLA_FLAGS'] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f'{flash.DETERMINISTIC_FLAG}').strip()


def _require_determinism(config: RunConfig, mesh) -> None:
  if (config.train.deterministic and platform.current(mesh) == 'gpu'
      and not flash.deterministic_gpu_ops()):
    raise ConfigError('train.deterministic needs XLA_FLAGS=--xla_gpu_deterministic_ops=true '
                      'before jax starts (python -m mla_jax.train sets it); set it, or '
                      'train.deterministic=False to give up bit-exact resume on GPU')


@dataclasses.dataclass(frozen=True)
class Plan:
  """A run checked and laid out, before anything is written."""

  config: RunConfig
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  state_shardings: Any
  batch_sharding: jax.sharding.NamedSharding
  batch_shape: tuple[int, int, int]  # [accum, b, seq_len], global
  rows: slice  # this process's rows of b
  task: Any  # tasks.Text | tasks.MQAR
  resume: bool  # the workdir holds a checkpoint of this run


def _workdir_run(workdir: pathlib.Path, config: RunConfig) -> tuple[RunConfig | None, bool]:
  """(the config the workdir records, whether it holds a checkpoint), refusing a workdir whose
  state would lose data or misrecord the run: traces of a run without its checkpoints/, a
  checkpoint without the config.json it was trained under, or a checkpoint of a run trained
  under another config. A workdir without a checkpoint holds no run yet (a start that failed
  or was killed before its first save) and is started afresh."""
  checkpoints = workdir / 'checkpoints'
  has_checkpoint = latest_checkpoint(checkpoints) is not None
  has_config = wd.config_path(workdir).exists()
  traces = [name for name in ('metrics.jsonl', 'best') if (workdir / name).exists()]
  if traces and not checkpoints.exists():
    held = ', '.join(['config.json'] * has_config + traces)
    raise wd.WorkdirError(f'{workdir} holds a run ({held}) but no checkpoints/; put its '
                          'checkpoints/ back to resume it, or use a new --workdir')
  if has_checkpoint and not has_config:
    raise wd.WorkdirError(f'{workdir} holds checkpoints but no config.json, so the config they '
                          'were trained under is unknown; restore config.json from a copy of '
                          'the run, or use a new --workdir')
  if not has_config:
    return None, False
  if not has_checkpoint:
    try:  # only its init_from is read: the config itself is replaced
      return wd.read_config(workdir), False
    except Error:
      return None, False
  recorded = wd.read_config(workdir)
  differ = changes(recorded, config)
  if differ:
    hint = (' (train.steps is the schedule\'s length: to train further, start a new --workdir '
            f'with --init_from={workdir})') if any(d.startswith('train.steps') for d in differ) \
        else ''
    raise wd.WorkdirError(f'{workdir} holds a run trained under another config: '
                          f'{"; ".join(differ)}; resume with the same config or use a new '
                          f'--workdir{hint}')
  return recorded, True


def prepare(config, workdir, init_from: str | None = None) -> Plan:
  """Parses and checks a run before anything is written (see the module docstring)."""
  config = parse(config).trainable()
  workdir = pathlib.Path(workdir)
  wd.check_workdir(workdir)  # a file, or read-only: before the corpus is loaded
  mesh = sharding.make_mesh(config.mesh)
  _require_determinism(config, mesh)
  batch_sharding, batch_shape, rows = batch_layout(config, mesh)
  abstract = abstract_state(config, mesh)
  state_shardings = sharding.state_shardings(nnx.split(abstract)[1], mesh)
  memory.check(config, mesh, abstract)
  recorded, resume = _workdir_run(workdir, config)
  config = resolve_init_from(config, recorded, resume, init_from)
  return Plan(config, workdir, mesh, state_shardings, batch_sharding, batch_shape, rows,
              tasks.load(config, workdir if resume else None), resume)


def train_and_evaluate(config, workdir, *, final_eval: bool = True,
                       init_from: str | None = None) -> dict:
  """Trains (or resumes) the run in workdir, a new one from init_from's parameters if given;
  config: a ConfigDict (configs/*.py) or a RunConfig. Returns the validation metrics of the
  step it stopped at, or {} if it did not validate there (stopped early by
  train.stop_after_steps, or already complete). A SIGTERM or SIGINT checkpoints the step in
  progress and raises mla_jax.errors.Preempted.

  Nothing is written before every check has passed; the workdir is locked while training.
  """
  preemption = Preemption()  # first: a signal during start-up says so and exits
  try:
    plan = prepare(config, workdir, init_from)
    # The activation constraints (sharding.constrain) read the mesh set here.
    with jax.set_mesh(plan.mesh):
      state = TrainState.create(plan.config, plan.mesh, plan.state_shardings)
      if not plan.resume and plan.config.init_from:  # read, not written: before the lock
        source_step = state.load_parameters(plan.config.init_from)
        announce(f'starting from the parameters of {plan.config.init_from} (step '
                 f'{source_step})')
      with wd.lock(plan.workdir):
        # Again, under the lock: another process may have trained here since.
        if _workdir_run(plan.workdir, plan.config)[1] != plan.resume:
          raise wd.WorkdirError(f'{plan.workdir} changed while this run was starting (another '
                                'train wrote a checkpoint); run the command again')
        return _start(plan, state, preemption, final_eval)
  finally:
    preemption.close()


def _start(plan: Plan, state: TrainState, preemption: Preemption, final_eval: bool) -> dict:
  """Under the lock: resume or start, record the config, train."""
  workdir, config = plan.workdir, plan.config
  checkpoints = wd.manager(workdir / 'checkpoints', config.train.keep_checkpoints)
  best = wd.manager(workdir / 'best', 1)
  sizes = ' x '.join(f'{axis}={n}' for axis, n in plan.mesh.shape.items())
  announce(f'mesh {sizes} over {jax.device_count()} devices in {jax.process_count()} '
           'processes')
  if plan.resume:
    state.resume(checkpoints)  # a damaged checkpoint stops it here
    announce(f'resuming from step {state.step}')
  else:  # no run yet: a best/ left by a start that was killed or failed is stale
    for step in best.all_steps():
      best.delete(step)
  op = state.merged()[0].op  # the attention kernels the model resolved, recorded once
  config = dataclasses.replace(config, records={**config.records, 'kernels': op.to_dict()})
  announce(str(op))
  active = (f', {active_param_count(config.model):,} active per token'  # MoE: beside those stored
            if config.model.n_routed_experts else '')
  flops = train_flops_per_token(config.model, config.data.seq_len)
  announce(f'{param_count(config.model):,} parameters{active}; {flops / 1e6:,.1f} MFLOP per '
           'token per train step (MFU counts these)')
  if not plan.resume:  # a resumed run reads the tokenizer it stored: never rewritten
    wd.save_tokenizer(workdir, getattr(plan.task, 'tokenizer', None))
  wd.write_config(workdir, config)
  wd.fault('start')
  return _Loop(plan, state, checkpoints=checkpoints, best=best, preemption=preemption,
               final_eval=final_eval).run()


def _check_finite(fetched, last_good_step) -> None:
  for step, metrics in fetched:
    values = {k: float(v) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
      raise TrainingError(
          f'non-finite loss or gradient at step {step} ({values}); the last good checkpoint '
          f'({last_good_step}) is kept. Lower opt.lr or raise opt.warmup_steps, then resume '
          'or start a new --workdir')


class _Loop:
  """The steps from state.step to the end of this run, and the periodic actions around them:
  log every train.log_every steps, validate every train.eval_every (and at train.steps if
  final_eval), checkpoint every train.checkpoint_every, and stop on a signal; each step also
  logs and checkpoints at the run's last step and when a signal arrived."""

  def __init__(self, plan: Plan, state: TrainState, *, checkpoints, best,
               preemption: Preemption, final_eval: bool):
    self.plan, self.state, self.checkpoints, self.best = plan, state, checkpoints, best
    self.preemption, self.final_eval = preemption, final_eval
    t = plan.config.train
    self.end = t.steps if not t.stop_after_steps else min(t.steps, state.step + t.stop_after_steps)
    self.pending = []  # (step, metrics on the device) not fetched yet
    self.window_start, self.window_tokens = time.perf_counter(), 0
    # MFU on the active parameters, logged where the device's nominal peak is known
    peak = platform.peak_flops()
    self.flops_per_peak = (train_flops_per_token(plan.config.model, plan.config.data.seq_len)
                           / (peak * jax.device_count()) if peak else None)
    self.last_eval, self.evaluated_at = {}, None

  def run(self) -> dict:
    plan, state, t = self.plan, self.state, self.plan.config.train
    if state.step >= self.end:
      print(f'{plan.workdir} is complete at step {state.step}; evaluate it with python -m '
            f'mla_jax.evaluate --workdir={plan.workdir}', file=sys.stderr)
      return {}
    train_step = jit_train_step(state.graphdef, state.shardings, plan.batch_sharding)
    batches = plan.task.train_batches(state.step, plan.rows)
    self.schedule = learning_rate(plan.config.opt, t.steps)
    self.log = MetricsLog(plan.workdir, t.steps, state.step)
    try:
      if state.step == 0 and plan.config.init_from:  # where the given parameters start from
        self._run_validation(always_best=True)
        self.window_start = time.perf_counter()
      self.preemption.training = True  # from here a signal finishes the step and saves it
      while state.step < self.end:
        batch = {k: sharding.global_batch(x, plan.batch_sharding, plan.batch_shape)
                 for k, x in next(batches).items()}
        state.state, metrics = train_step(state.state, batch)
        state.step += 1
        self._after_step(metrics)
    finally:
      self.log.close()
    return self.last_eval if self.evaluated_at == state.step else {}

  def _after_step(self, metrics) -> None:
    step, t = self.state.step, self.plan.config.train
    # Read once per step: a signal that arrives while this step validates or saves stops the
    # run after the next step, saved; acting on it midway would skip the save.
    stop = self.preemption.requested
    self.pending.append((step, metrics))
    self.window_tokens += self.plan.config.data.batch_size * self.plan.config.data.seq_len
    save_now = step % t.checkpoint_every == 0 or step == self.end or stop
    evaluate_now = step % t.eval_every == 0 or (step == t.steps and self.final_eval)
    if step % t.log_every == 0 or save_now or evaluate_now:
      self._log_training()
    if evaluate_now:
      self._run_validation()
    if save_now:
      self.state.save(self.checkpoints)
    if stop and step < self.end:  # an exception, so that no caller takes the run for finished
      raise Preempted(f'stopped at step {step} by {stop}; run the same command to resume')
    if not self.pending:  # a window starts after any logging, validation or saving
      self.window_start = time.perf_counter()

  def _log_training(self) -> None:
    fetched = jax.device_get(self.pending)  # the only place the host waits for the device
    _check_finite(fetched, self.checkpoints.latest_step())
    step, m = fetched[-1]
    tokens_per_s = self.window_tokens / (time.perf_counter() - self.window_start)
    mfu = {'mfu': tokens_per_s * self.flops_per_peak} if self.flops_per_peak else {}
    self.log.write(step, {'loss': float(m['loss']), 'grad_norm': float(m['grad_norm']),
                          'lr': float(self.schedule(step - 1)), 'tokens_per_s': tokens_per_s,
                          **mfu,
                          # an MoE model's routing (training.step.moe_metrics); none if dense
                          **{k: float(v) for k, v in m.items() if k.startswith('moe_')}})
    self.pending, self.window_tokens = [], 0

  def _run_validation(self, always_best: bool = False) -> None:
    state, task = self.state, self.plan.task
    model, _ = state.merged()
    self.last_eval = task.validate(model, mesh=self.plan.mesh)
    self.evaluated_at = state.step
    self.log.write(state.step, {f'val_{k}': self.last_eval[k] for k in task.logged})
    if always_best or self.last_eval['loss'] < state.best_val_loss:
      # best/ before checkpoints/: a run resumed from checkpoint s finds best/ up to date with
      # s, and one resumed from earlier finds this step saved (wd.save skips it).
      state.save_best(self.best, self.last_eval['loss'])


