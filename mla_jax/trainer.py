"""train_and_evaluate(config, workdir): the training loop behind `python -m mla_jax.train`.

State = (params, optimizer state, step) as nnx state, laid out on the mesh of config.mesh by
the logical-axis rules (mla_jax.sharding); the train step is a pure function of (graphdef,
state, batch) under jax.jit with explicit shardings and the state donated. The global batch
is a function of (seed, step) alone: each process draws its own rows of it, so a run resumed
from its latest checkpoint, or run on another number of hosts, sees the same data. The host
never waits on the device inside the loop: batches are prefetched by grain, and metrics are
fetched only every log_every steps. A new run may start from another run's parameters
(`init_from`: trained, converted to MLA, imported from Hugging Face) instead of config.seed's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from mla_jax import fused, sharding, tasks
from mla_jax import workdir as wd
from mla_jax.config import ConfigError, ModelConfig
from mla_jax.errors import Error, Preempted
from mla_jax.model import Transformer


class TrainingError(Error):
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
  model = Transformer(ModelConfig.from_dict(config.model), rngs=nnx.Rngs(config.seed))
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


# XLA:CPU options for the train step: dots on Eigen rather than YNNPACK, and 512-bit vectors
# where the CPU has them (XLA's default is narrower). On the 2026-12-01 host (Intel Xeon,
# AVX-512, 2 cores) they gave 9-14% more tokens/s on 2 threads and 5-10% less CPU time per step
# (docs/benchmarks.md, `python -m experiments.cpu_ab`). Both are experimental XLA options: one
# this jax lacks is left out, and the step compiles with XLA's default for it.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': '',
                        'xla_cpu_prefer_vector_width': 512}


@functools.cache
def _cpu_options_taken() -> tuple:
  """The (name, value) pairs of CPU_COMPILER_OPTIONS that this jax's XLA compiles with, tried
  one at a time on a one-device CPU mesh of their own (whatever mesh the caller is under)."""
  cpu = jax.local_devices(backend='cpu')[0]
  mesh = jax.make_mesh((1,), ('x',), axis_types=(jax.sharding.AxisType.Auto,), devices=[cpu])
  taken = []
  with jax.set_mesh(mesh):
    zero = jax.device_put(jnp.zeros(()), cpu)
    for name, value in CPU_COMPILER_OPTIONS.items():
      try:
        jax.jit(jnp.negative, compiler_options={name: value}).lower(zero).compile()
      except jax.errors.JaxRuntimeError:  # 'No such compile option', or a value it refuses
        continue
      taken.append((name, value))
  return tuple(taken)


def cpu_compiler_options() -> dict:
  """The XLA options the train step is compiled with on a CPU mesh: CPU_COMPILER_OPTIONS,
  less any this jax lacks."""
  return dict(_cpu_options_taken())


def jit_train_step(graphdef, state_shardings, batch_sharding, compiler_options=None):
  """train_step for one model under jit: state in and out laid out alike (and donated),
  batches split over the batch axes, metrics replicated. compiler_options: XLA's (None: the
  trainer's, cpu_compiler_options() on a CPU mesh; {}: XLA's defaults)."""
  mesh = batch_sharding.mesh
  if compiler_options is None:
    on_cpu = mesh.devices.flat[0].platform == 'cpu'
    compiler_options = cpu_compiler_options() if on_cpu else {}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(train_step, graphdef), donate_argnums=0,
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated),
                 compiler_options=compiler_options)


def batch_layout(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """(sharding, global shape [accum, b, seq_len] of each array of a batch, this process's
  rows of each b)."""
  accum, batch = config.opt.grad_accum_steps, config.data.batch_size
  shape = (accum, batch // accum, config.data.seq_len)
  layout = sharding.named_sharding(mesh, (None, 'batch', None), shape)
  return layout, shape, sharding.local_rows(layout, shape, axis=1)


def exit_before_first_step(signum, frame):
  """SIGTERM handler for start-up: there is nothing to save yet, so exit at once."""
  del signum, frame
  print('SIGTERM before the first step: nothing to save', file=sys.stderr, flush=True)
  sys.exit(128 + signal.SIGTERM)


class _Preemption:
  """SIGTERM during start-up exits at once (status 143, nothing to save); once the loop has
  begun it is a flag the loop checks, so that it can checkpoint its step and exit cleanly."""

  def __init__(self):
    self.requested = self.training = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    if not self.training:
      exit_before_first_step(signum, frame)
    self.requested = True

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


class _Log:
  """metrics.jsonl, TensorBoard and a one-line progress display (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, start: int):
    self.enabled = jax.process_index() == 0
    self.total = total_steps
    if self.enabled:
      from tensorboardX import SummaryWriter  # imported late: only the writer process needs it
      wd.truncate_metrics(workdir, start)  # the steps this run repeats are logged once
      self.jsonl = (workdir / 'metrics.jsonl').open('a')
      # TensorBoard hides the events of steps after `start` that an earlier life logged.
      self.tb = SummaryWriter(str(workdir / 'tb'), purge_step=start + 1)

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
  """Every training setting the model config does not check, before anything is written."""
  d, o, t, e = config.data, config.opt, config.train, config.eval
  at_least = {'data.seq_len': (d.seq_len, 1), 'data.batch_size': (d.batch_size, 1),
              'opt.grad_accum_steps': (o.grad_accum_steps, 1), 'train.steps': (t.steps, 1),
              'train.stop_after_steps': (t.stop_after_steps, 0),
              'train.log_every': (t.log_every, 1), 'train.eval_every': (t.eval_every, 1),
              'train.checkpoint_every': (t.checkpoint_every, 1),
              # 0 would let orbax delete every checkpoint: the run could never resume.
              'train.keep_checkpoints': (t.keep_checkpoints, 1),
              'eval.seq_len': (e.seq_len, 1), 'eval.batch_size': (e.batch_size, 1)}
  for name, (value, least) in at_least.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
      raise ConfigError(f'{name}={value!r} must be an integer >= {least}')
  if d.batch_size % o.grad_accum_steps:
    raise ConfigError(f'data.batch_size={d.batch_size} must divide evenly into '
                      f'opt.grad_accum_steps={o.grad_accum_steps} microbatches')
  if not 0 < e.stride <= e.seq_len:
    raise ConfigError(f'eval.stride={e.stride} must be in [1, eval.seq_len={e.seq_len}]')
  if max(d.seq_len, e.seq_len) > config.model.max_seq_len:
    raise ConfigError(f'data.seq_len / eval.seq_len ({d.seq_len} / {e.seq_len}) exceed '
                      f'model.max_seq_len={config.model.max_seq_len}')
  for name in ('lr', 'b1', 'b2', 'weight_decay', 'clip_norm', 'final_lr_fraction'):
    value = o[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0):
      raise ConfigError(f'opt.{name}={value!r} must be a finite number >= 0')


def _init_or_resume(config, ckpts, best, mesh) -> tuple:
  """(graphdef, state, shardings, start step, best validation loss) from config.seed, the
  run's latest checkpoint, or (a new run) config.init_from's parameters, restored straight
  into this mesh's layout (whatever mesh saved it)."""
  graphdef, state, shardings = init_state(config, mesh)
  start, best_loss = ckpts.latest_step() or 0, math.inf
  model, opt = nnx.merge(graphdef, state)
  model_state, opt_state = nnx.state(model), nnx.state(opt)
  if start:
    _, _, meta = wd.restore(ckpts, start, model_state, opt_state, fix='resume')
    nnx.update(model, model_state)
    nnx.update(opt, opt_state)
    best_loss = meta.get('best_val_loss', math.inf)
    if jax.process_index() == 0:
      print(f'resuming from step {start}', file=sys.stderr)
    return graphdef, nnx.state((model, opt)), shardings, start, best_loss
  # No run yet: a best/ left by a start that was killed or failed is stale.
  for step in best.all_steps():
    best.delete(step)
  if config.get('init_from'):
    source = wd.manager(pathlib.Path(config.init_from) / 'checkpoints')
    wd.restore(source, source.latest_step(), model_state)
    nnx.update(model, model_state)
    if jax.process_index() == 0:
      print(f'starting from the parameters of {config.init_from} (step '
            f'{source.latest_step()})', file=sys.stderr)
  return graphdef, nnx.state((model, opt)), shardings, start, best_loss


# Model fields that say how a model computes, not what: a run may start from parameters
# trained (or converted) under other values of these.
EXECUTION_FIELDS = ('dtype', 'param_dtype', 'attention_impl', 'mla_decode', 'max_seq_len')


def resolve_init_from(config: ml_collections.ConfigDict, workdir, init_from: str | None,
                      cfg: ModelConfig) -> None:
  """Checks --init_from before anything is written and records it as config.init_from.

  A new run (no checkpoint of its own) starts from init_from's latest parameters, whose model
  must equal cfg in every field but EXECUTION_FIELDS; a resumed run resumes from its own
  checkpoints and keeps the init_from its config.json records.
  """
  path = wd.config_path(workdir)
  recorded = json.loads(path.read_text()).get('init_from') if path.exists() else None
  given = str(pathlib.Path(init_from).absolute()) if init_from else None
  own = (pathlib.Path(workdir) / 'checkpoints').exists() and wd.manager(
      pathlib.Path(workdir) / 'checkpoints').latest_step() is not None
  if given and given != recorded and (own or recorded):
    raise ConfigError(f'{workdir} is a run of its own (initialised from {recorded}); '
                      '--init_from applies to a new run: resume without it, or use a new '
                      '--workdir')
  source = given or recorded
  if source is None:
    return
  if not own:
    theirs = ModelConfig.from_dict(wd.read_config(source).model)
    differ = [f.name for f in dataclasses.fields(cfg) if f.name not in EXECUTION_FIELDS
              and getattr(theirs, f.name) != getattr(cfg, f.name)]
    if differ:
      shown = ', '.join(f'{n} ({getattr(theirs, n)!r} there, {getattr(cfg, n)!r} here)'
                        for n in differ)
      raise ConfigError(f'--init_from={init_from or source} holds another model: {shown}; '
                        'set them in the config (configs/finetune.py:WORKDIR copies them)')
    checkpoints = pathlib.Path(source) / 'checkpoints'
    if not checkpoints.exists() or wd.manager(checkpoints).latest_step() is None:
      raise wd.WorkdirError(f'--init_from={source} has no checkpoint to start from')
  with config.unlocked():
    config.init_from = source


def _check_finite(fetched, last_good_step) -> None:
  for step, metrics in fetched:
    values = {k: float(v) for k, v in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
      raise TrainingError(
          f'non-finite loss or gradient at step {step} ({values}); the last good checkpoint '
          f'({last_good_step}) is kept. Lower opt.lr or raise opt.warmup_steps, then resume '
          'or start a new --workdir')


def request_determinism(config: ml_collections.ConfigDict) -> None:
  """Asks XLA for deterministic GPU reductions when config.train.deterministic: it must run
  before jax starts its backends (XLA reads XLA_FLAGS once), as the train command does."""
  if config.train.get('deterministic', False) and not fused.deterministic_gpu_ops():
    os.environ['XLA_FLAGS'] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f'{fused.DETERMINISTIC_FLAG}').strip()


def _check_determinism(config: ml_collections.ConfigDict) -> None:
  if (config.train.get('deterministic', False) and jax.default_backend() == 'gpu'
      and not fused.deterministic_gpu_ops()):
    raise ConfigError('train.deterministic needs XLA_FLAGS=--xla_gpu_deterministic_ops=true '
                      'before jax starts (python -m mla_jax.train sets it); set it, or '
                      'train.deterministic=False to give up bit-exact resume on GPU')


def _check(config: ml_collections.ConfigDict) -> tuple:
  """Everything about a config that can be checked before anything is written: the training
  settings, the model, the mesh's split of the batch and the model, the task's data (a
  corpus and its ids, or MQAR's held-out set). -> (task, mesh)."""
  _validate(config)
  _check_determinism(config)
  ModelConfig.from_dict(config.model)  # a bad model config fails here
  mesh = sharding.make_mesh(config.mesh)
  batch_layout(config, mesh)
  sharding.state_shardings(nnx.eval_shape(lambda: create_state(config)), mesh)
  return tasks.load(config), mesh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       final_eval: bool = True, init_from: str | None = None) -> dict:
  """Trains (or resumes) the run in workdir, a new one from init_from's parameters if given;
  returns the validation metrics of the step it stopped at, or {} if it did not validate
  there (stopped early by train.stop_after_steps, or already complete). A SIGTERM checkpoints
  the step in progress and raises mla_jax.errors.Preempted.

  Nothing is written before every check has passed; the workdir is locked while training.
  """
  preempt = _Preemption()  # first: a SIGTERM during start-up says so and exits
  try:
    workdir = pathlib.Path(workdir)
    wd.check_workdir(workdir)  # a file, or read-only: before the corpus is loaded
    task, mesh = _check(config)
    resolve_init_from(config, workdir, init_from, ModelConfig.from_dict(config.model))
    wd.check_config(workdir, config)  # and again under the lock, by write_config
    # The activation constraints (sharding.constrain) read the mesh set here.
    with wd.lock(workdir), jax.set_mesh(mesh):
      ckpts = wd.manager(workdir / 'checkpoints', config.train.keep_checkpoints)
      best = wd.manager(workdir / 'best', 1)
      if jax.process_index() == 0:
        sizes = ' x '.join(f'{axis}={n}' for axis, n in mesh.shape.items())
        print(f'mesh {sizes} over {jax.device_count()} devices in {jax.process_count()} '
              'processes', file=sys.stderr)
      run = _init_or_resume(config, ckpts, best, mesh)  # a damaged checkpoint stops it here
      wd.write_config(workdir, config)
      wd.fault('start')
      return _loop(config, workdir, task, mesh, ckpts, best, run, preempt, final_eval)
  finally:
    preempt.close()


def _loop(config, workdir, task, mesh, ckpts, best, run, preempt, final_eval) -> dict:
  graphdef, state, shardings, start, best_loss = run
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
  log = _Log(workdir, t.steps, start)
  pending, window_start, window_tokens = [], time.perf_counter(), 0
  last_eval, evaluated_at = {}, None
  if start == 0 and config.get('init_from'):  # where the given parameters start from
    model = nnx.merge(graphdef, state)[0]
    last_eval, evaluated_at = validate(model), 0
    log.write(0, {f'val_{k}': last_eval[k] for k in task.logged})
    best_loss = last_eval['loss']
    wd.save(best, 0, nnx.state(model), meta={'step': 0, 'val_loss': best_loss})
    window_start = time.perf_counter()
  preempt.training = True  # from here a SIGTERM finishes the step and saves it first
  try:
    step = start
    while step < end:
      batch = {k: sharding.global_batch(x, step_sharding, batch_shape)
               for k, x in next(batches).items()}
      state, metrics = train_step_fn(state, batch)
      step += 1
      # Read once per step: a SIGTERM that arrives while this step validates or saves stops
      # the run after the next step, saved; acting on it midway would skip the save.
      stop = preempt.requested
      pending.append((step, metrics))
      window_tokens += config.data.batch_size * config.data.seq_len
      if (step % t.log_every == 0 or step == end or stop
          or step % t.checkpoint_every == 0 or step % t.eval_every == 0):
        fetched = jax.device_get(pending)  # the only place the host waits for the device
        _check_finite(fetched, ckpts.latest_step())
        m = fetched[-1][1]
        log.write(step, {'loss': float(m['loss']), 'grad_norm': float(m['grad_norm']),
                         'lr': float(schedule(step - 1)), 'tokens_per_s':
                         window_tokens / (time.perf_counter() - window_start)})
        pending, window_tokens = [], 0
      evaluate_now = step % t.eval_every == 0 or (step == t.steps and final_eval)
      save_now = step % t.checkpoint_every == 0 or step == end or stop
      if evaluate_now or save_now:
        model, opt = nnx.merge(graphdef, state)
      if evaluate_now:
        last_eval, evaluated_at = validate(model), step
        log.write(step, {f'val_{k}': last_eval[k] for k in task.logged})
        if last_eval['loss'] < best_loss:
          best_loss = last_eval['loss']
          # best/ before checkpoints/: a run resumed from checkpoint s finds best/ up to date
          # with s, and one resumed from earlier finds this step saved (wd.save skips it).
          wd.save(best, step, nnx.state(model), meta={'step': step, 'val_loss': best_loss})
      if save_now:
        wd.save(ckpts, step, nnx.state(model), nnx.state(opt),
                {'step': step, 'best_val_loss': best_loss})
      if stop and step < end:  # an exception, so that no caller takes the run for finished
        raise Preempted(f'stopped at step {step} by SIGTERM; run the same command to resume')
      if not pending:  # a window starts after any logging, validation or saving
        window_start = time.perf_counter()
  finally:
    log.close()
  return last_eval if evaluated_at == step else {}
