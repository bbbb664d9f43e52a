"""train_and_evaluate(config, workdir): the training loop behind `python -m mla_jax.train`.

State = (params, optimizer state, step) as nnx state; the train step is a pure function of
(graphdef, state, batch) under jax.jit with the state donated. The data order is a function of
(seed, step), so a run resumed from its latest checkpoint continues exactly as if never
stopped. The host never waits on the device inside the loop: batches are prefetched by grain,
and metrics are fetched only every log_every steps.
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

from mla_jax import data, evaluate
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


def loss_fn(model, batch_bt):
  """Mean next-token cross-entropy (float32) over windows [b, seq_len + 1]."""
  logits = model(batch_bt[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch_bt[:, 1:]).mean()


@functools.partial(jax.jit, static_argnames=('graphdef',), donate_argnames=('state',))
def train_step(graphdef, state, batch_abt):
  """One optimizer step over microbatches [accum, b, seq_len + 1]; -> (state, metrics)."""
  model, opt = nnx.merge(graphdef, state)
  model_def, params = nnx.split(model)
  grad_fn = jax.value_and_grad(lambda p, micro: loss_fn(nnx.merge(model_def, p), micro))

  def accumulate(carry, micro):
    loss, grads = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, batch_abt)
  n = batch_abt.shape[0]
  loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
  opt.update(model, grads)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
  return nnx.state((model, opt)), metrics


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
  if d.batch_size % (o.grad_accum_steps * jax.process_count()):
    raise ValueError(f'data.batch_size={d.batch_size} must divide evenly into '
                     f'opt.grad_accum_steps={o.grad_accum_steps} microbatches per process')
  if not 0 < e.stride <= e.seq_len:
    raise ValueError(f'eval.stride={e.stride} must be in [1, eval.seq_len={e.seq_len}]')
  if config.train.steps < 1 or d.seq_len < 1:
    raise ValueError('train.steps and data.seq_len must be >= 1')
  if max(d.seq_len, e.seq_len) > config.model.max_seq_len:
    raise ValueError(f'data/eval seq_len exceeds model.max_seq_len={config.model.max_seq_len}')


def _init_or_resume(config, ckpts) -> tuple:
  """(graphdef, state, start step, best validation loss) from config.seed or the checkpoint."""
  model, opt = create_state(config)
  start, best_loss = ckpts.latest_step() or 0, math.inf
  if start:
    model_state, opt_state = nnx.state(model), nnx.state(opt)
    _, _, meta = wd.restore(ckpts, start, model_state, opt_state)
    nnx.update(model, model_state)
    nnx.update(opt, opt_state)
    best_loss = meta.get('best_val_loss', math.inf)
    print(f'resuming from step {start}', file=sys.stderr)
  return *nnx.split((model, opt)), start, best_loss


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
  splits = data.load_splits(config.data)
  workdir = pathlib.Path(workdir)
  wd.write_config(workdir, config)
  ckpts = wd.manager(workdir / 'checkpoints', config.train.keep_checkpoints)
  best = wd.manager(workdir / 'best', 1)
  graphdef, state, start, best_loss = _init_or_resume(config, ckpts)

  t, accum = config.train, config.opt.grad_accum_steps
  end = t.steps if not t.stop_after_steps else min(t.steps, start + t.stop_after_steps)
  if start >= end:
    print(f'{workdir} is complete at step {start}; evaluate it with python -m '
          f'mla_jax.evaluate --workdir={workdir}', file=sys.stderr)
    return {}
  local_batch = config.data.batch_size // jax.process_count()
  batches = data.train_batches(splits['train'], config.data.seq_len, local_batch, config.seed,
                               start, shard=jax.process_index())
  validate = functools.partial(evaluate.perplexity, tokens=splits['val'],
                               seq_len=config.eval.seq_len, stride=config.eval.stride,
                               batch_size=config.eval.batch_size)
  schedule = learning_rate(config.opt, t.steps)
  log, preempt = _Log(workdir, t.steps), _Preemption()
  pending, window_start, window_tokens = [], time.perf_counter(), 0
  last_eval: dict = {}
  try:
    step = start
    while step < end:
      batch = next(batches).reshape(accum, local_batch // accum, -1)
      state, metrics = train_step(graphdef, state, batch)
      step += 1
      pending.append((step, metrics))
      window_tokens += accum * local_batch * config.data.seq_len
      if (step % t.log_every == 0 or step == end or preempt.requested
          or step % t.checkpoint_every == 0 or step % t.eval_every == 0):
        fetched = jax.device_get(pending)  # the only place the host waits for the device
        _check_finite(fetched, ckpts.latest_step())
        m = fetched[-1][1]
        log.write(step, {'loss': float(m['loss']), 'grad_norm': float(m['grad_norm']),
                         'lr': float(schedule(step - 1)), 'tokens_per_s':
                         window_tokens * jax.process_count() / (time.perf_counter()
                                                                 - window_start)})
        pending, window_tokens = [], 0
      evaluate_now = step % t.eval_every == 0 or (step == t.steps and final_eval)
      save_now = step % t.checkpoint_every == 0 or step == end or preempt.requested
      if evaluate_now or save_now:
        model, opt = nnx.merge(graphdef, state)
      if evaluate_now:
        last_eval = validate(model)
        log.write(step, {'val_loss': last_eval['loss'], 'val_perplexity':
                         last_eval['perplexity'], 'val_bits_per_byte':
                         last_eval['bits_per_byte']})
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
