"""train_and_evaluate(config, workdir): the training loop behind `python -m mla_jax.train`.

State = (params, optimizer state, step) as nnx state, laid out on the mesh of config.mesh by
the logical-axis rules (mla_jax.sharding); the train step is a pure function of (graphdef,
state, batch) under jax.jit with explicit shardings and the state donated. The global batch
is a function of (seed, step) alone: each process draws its own rows of it, so a run resumed
from its latest checkpoint, or run on another number of hosts, sees the same data. The host
never waits on the device inside the loop: batches are prefetched by grain, and metrics are
fetched only every log_every steps.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mla_jax import sharding, tasks
from mla_jax import workdir as wd
from mla_jax.model import Transformer


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite loss); the last good checkpoint is kept."""


def learning_rate(opt: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """Linear warmup to opt.lr, then cosine decay to opt.lr * final_lr_fraction."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.lr, warmup_steps=opt.warmup_steps,
      decay_steps=max(steps, opt.warmup_steps + 1), end_value=opt.lr * opt.final_lr_fraction)


def optimizer(opt: ml_collections.ConfigDict, steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on norms (1-D parameters)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(learning_rate(opt, steps), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay, mask=decay_mask))


def create_state(config: ml_collections.ConfigDict):
  """(model, optimizer) initialised from config.seed."""
  model = Transformer(wd.model_config(config), rngs=nnx.Rngs(config.seed))
  tx = optimizer(config.opt, config.train.steps)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def init_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(graphdef, state, shardings) of (model, optimizer), laid out on the mesh.

  Initialised eagerly on every host, then split onto the devices: a seed gives the same
  parameters, bit for bit, on any mesh and any number of hosts (a jitted initialiser fuses
  the scaling into the sampler and rounds differently). The cost is one full copy per host
  while starting, which bounds the model by a host's memory, not a device's.
  """
  graphdef, state = nnx.split(create_state(config))
  shardings = sharding.state_shardings(state, mesh)
  return graphdef, sharding.place(state, shardings), shardings


def loss_fn(model, batch):
  """Weighted mean cross-entropy (float32), sum(weights * NLL) / sum(weights), over a batch
  {'inputs', 'targets', 'weights'} [b, seq_len].

  All-ones weights (text) take the plain mean instead: the same value, but XLA fuses the
  product into the sum and rounds the last bit differently, and text losses stay bit for bit
  what they were before batches carried weights (the gradients agree either way).
  """
  logits = model(batch['inputs'])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  weights = batch['weights']
  weighted = jnp.sum(nll * weights) / jnp.sum(weights)
  return jnp.where(jnp.all(weights == 1), nll.mean(), weighted)


def train_step(graphdef, state, batch_abt):
  """One optimizer step over microbatches {'inputs', 'targets', 'weights'} [accum, b,
  seq_len]; -> (state, metrics). Each microbatch's loss counts equally."""
  model, opt = nnx.merge(graphdef, state)
  model_def, params = nnx.split(model)
  grad_fn = jax.value_and_grad(lambda p, micro: loss_fn(nnx.merge(model_def, p), micro))

  def accumulate(carry, micro):
    loss, grads = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, batch_abt)
  n = batch_abt['inputs'].shape[0]
  loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
  opt.update(model, grads)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
  return nnx.state((model, opt)), metrics


def jit_train_step(graphdef, state_shardings, batch_sharding):
  """train_step for one model under jit: state in and out laid out alike (and donated),
  batches split over the batch axes, metrics replicated."""
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(train_step, graphdef), donate_argnums=0,
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated))


def batch_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(sharding, global shape [accum, b, seq_len] of each array of a batch, this process's
  rows of each b)."""
  accum, batch = config.opt.grad_accum_steps, config.data.batch_size
  shape = (accum, batch // accum, config.data.seq_len)
  layout = sharding.sharding(mesh, (None, 'batch', None), shape)
  return layout, shape, sharding.local_rows(layout, shape, axis=1)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so it can checkpoint and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


class _Log:
  """metrics.jsonl, TensorBoard and a one-line progress display (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total = total_steps
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported late: only the writer process needs it
      self.jsonl = (workdir / 'metrics.jsonl').open('a')
      self.tb = SummaryWriter(str(workdir / 'tb'))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({'step': step, **metrics}) + '\n')
    self.jsonl.flush()
    for key, value in metrics.items():
      self.tb.add_scalar(key, value, step)
    shown = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    end = '\r' if sys.stderr.isatty() and 'val_loss' not in metrics else '\n'
    print(f'step {step}/{self.total} {shown}', end=end, file=sys.stderr, flush=True)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _validate(config: ml_collections.ConfigDict) -> None:
  d, o, e = config.data, config.opt, config.eval
  if d.batch_size % o.grad_accum_steps:
    raise ValueError(f'data.batch_size={d.batch_size} must divide evenly into '
                     f'opt.grad_accum_steps={o.grad_accum_steps} microbatches')
  if not 0 < e.stride <= e.seq_len:
    raise ValueError(f'eval.stride={e.stride} must be in [1, eval.seq_len={e.seq_len}]')
  if config.train.steps < 1 or d.seq_len < 1:
    raise ValueError('train.steps and data.seq_len must be >= 1')
  if max(d.seq_len, e.seq_len) > config.model.max_seq_len:
    raise ValueError(f'data/eval seq_len exceeds model.max_seq_len={config.model.max_seq_len}')


def _init_or_resume(config, ckpts, mesh) -> tuple:
  """(graphdef, state, shardings, start step, best validation loss) from config.seed or the
  latest checkpoint, restored straight into this mesh's layout (whatever mesh saved it)."""
  graphdef, state, shardings = init_state(config, mesh)
  start, best_loss = ckpts.latest_step() or 0, math.inf
  if start:
    model, opt = nnx.merge(graphdef, state)
    model_state, opt_state = nnx.state(model), nnx.state(opt)
    _, _, meta = wd.restore(ckpts, start, model_state, opt_state)
    nnx.update(model, model_state)
    nnx.update(opt, opt_state)
    state = nnx.state((model, opt))
    best_loss = meta.get('best_val_loss', math.inf)
    if jax.process_index() == 0:
      print(f'resuming from step {start}', file=sys.stderr)
  return graphdef, state, shardings, start, best_loss


def _check_finite(fetched, last_good_step) -> None:
  for step, metrics in fetched:
    values = {k: float(v) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
      raise TrainingError(
          f'non-finite loss or gradient at step {step} ({values}); the last good checkpoint '
          f'({last_good_step}) is kept. Lower opt.lr or raise opt.warmup_steps, then resume '
          'or start a new --workdir')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       final_eval: bool = True) -> dict:
  """Trains (or resumes) the run in workdir; returns the last validation metrics."""
  _validate(config)
  wd.model_config(config)  # a bad model config fails before anything is written
  mesh = sharding.make_mesh(config.mesh)
  # A batch or a model the mesh cannot split fails here too, before anything is written.
  batch_layout(config, mesh)
  sharding.state_shardings(nnx.eval_shape(lambda: create_state(config)), mesh)
  task = tasks.load(config)  # the corpus or the held-out set: a bad one fails here
  workdir = pathlib.Path(workdir)
  wd.write_config(workdir, config)
  ckpts = wd.manager(workdir / 'checkpoints', config.train.keep_checkpoints)
  best = wd.manager(workdir / 'best', 1)
  if jax.process_index() == 0:
    sizes = ' x '.join(f'{axis}={n}' for axis, n in mesh.shape.items())
    print(f'mesh {sizes} over {jax.device_count()} devices in {jax.process_count()} '
          'processes', file=sys.stderr)
  with jax.set_mesh(mesh):  # the activation constraints (sharding.constrain) read it
    return _loop(config, workdir, task, mesh, ckpts, best, final_eval)


def _loop(config, workdir, task, mesh, ckpts, best, final_eval) -> dict:
  graphdef, state, shardings, start, best_loss = _init_or_resume(config, ckpts, mesh)
  step_sharding, batch_shape, rows = batch_layout(config, mesh)
  train_step_fn = jit_train_step(graphdef, shardings, step_sharding)
  t = config.train
  end = t.steps if not t.stop_after_steps else min(t.steps, start + t.stop_after_steps)
  if start >= end:
    print(f'{workdir} is complete at step {start}; evaluate it with python -m '
          f'mla_jax.evaluate --workdir={workdir}', file=sys.stderr)
    return {}
  batches = task.train_batches(start, rows)
  validate = functools.partial(task.validate, mesh=mesh)
  schedule = learning_rate(config.opt, t.steps)
  log, preempt = _Log(workdir, t.steps), _Preemption()
  pending, window_start, window_tokens = [], time.perf_counter(), 0
  last_eval: dict = {}
  try:
    step = start
    while step < end:
      batch = {k: sharding.global_batch(x, step_sharding, batch_shape)
               for k, x in next(batches).items()}
      state, metrics = train_step_fn(state, batch)
      step += 1
      pending.append((step, metrics))
      window_tokens += config.data.batch_size * config.data.seq_len
      if (step % t.log_every == 0 or step == end or preempt.requested
          or step % t.checkpoint_every == 0 or step % t.eval_every == 0):
        fetched = jax.device_get(pending)  # the only place the host waits for the device
        _check_finite(fetched, ckpts.latest_step())
        m = fetched[-1][1]
        log.write(step, {'loss': float(m['loss']), 'grad_norm': float(m['grad_norm']),
                         'lr': float(schedule(step - 1)), 'tokens_per_s':
                         window_tokens / (time.perf_counter() - window_start)})
        pending, window_tokens = [], 0
      evaluate_now = step % t.eval_every == 0 or (step == t.steps and final_eval)
      save_now = step % t.checkpoint_every == 0 or step == end or preempt.requested
      if evaluate_now or save_now:
        model, opt = nnx.merge(graphdef, state)
      if evaluate_now:
        last_eval = validate(model)
        log.write(step, {f'val_{k}': last_eval[k] for k in task.logged})
        if last_eval['loss'] < best_loss:
          best_loss = last_eval['loss']
          wd.save(best, step, nnx.state(model), meta={'step': step, 'val_loss': best_loss})
      if save_now:
        wd.save(ckpts, step, nnx.state(model), nnx.state(opt),
                {'step': step, 'best_val_loss': best_loss})
      if preempt.requested:
        print(f'SIGTERM: saved step {step}, exiting', file=sys.stderr)
        break
      if not pending:  # a window starts after any logging, validation or saving
        window_start = time.perf_counter()
  finally:
    preempt.close()
    log.close()
  return last_eval
