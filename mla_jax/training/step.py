"""The pure training step: schedule, optimizer, loss, gradient accumulation, update, jit.

train_step is a function of (graphdef, state, batch) alone; jit_train_step compiles it for one
model on one mesh with the state donated. Nothing here reads files, flags or the clock.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mla_jax import moe, platform, sharding


def learning_rate(opt, steps: int) -> optax.Schedule:
  """Linear warmup to opt.lr, then cosine decay to opt.lr * final_lr_fraction."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.lr, warmup_steps=opt.warmup_steps,
      decay_steps=max(steps, opt.warmup_steps + 1), end_value=opt.lr * opt.final_lr_fraction)


def optimizer(opt, steps: int) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on norms (1-D parameters). opt: the
  config's opt section (an OptConfig or a ConfigDict)."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(learning_rate(opt, steps), b1=opt.b1, b2=opt.b2,
                  weight_decay=opt.weight_decay, mask=decay_mask))


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
  seq_len]; -> (state, metrics). Each microbatch's loss counts equally.

  An MoE model (docs/design.md#11-deepseekmoe) also minimises its balance losses (weighted by
  aux_loss_alpha and seq_aux_loss_alpha; 'loss' stays the cross-entropy), moves V3's router
  bias by bias_update_speed from the step's expert loads, and reports its routing (moe_*)."""
  model, opt = nnx.merge(graphdef, state)
  model_def, params = nnx.split(model)
  cfg = model.cfg

  def objective(p, micro):
    with moe.collect() as routed:
      loss = loss_fn(nnx.merge(model_def, p), micro)
    if not routed:  # a dense model: the loss alone, as before MoE
      return loss, (loss, {})
    stats = {k: jnp.stack([layer[k] for layer in routed]) for k in routed[0]}
    total = (loss + cfg.aux_loss_alpha * jnp.sum(stats['aux'])
             + cfg.seq_aux_loss_alpha * jnp.sum(stats['seq_aux']))
    return total, (loss, stats)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def accumulate(carry, micro):
    (_, (loss, stats)), grads = grad_fn(params, micro)
    return jax.tree.map(jnp.add, carry, (loss, grads, stats)), None

  n_moe = sum(map(cfg.is_moe_layer, range(cfg.n_layers)))
  no_stats = {} if not n_moe else {
      'counts': jnp.zeros((n_moe, cfg.n_routed_experts), jnp.float32),
      **{k: jnp.zeros((n_moe,), jnp.float32) for k in ('entropy', 'aux', 'seq_aux')}}
  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params), no_stats)
  (loss, grads, stats), _ = jax.lax.scan(accumulate, zeros, batch_abt)
  n = batch_abt['inputs'].shape[0]
  loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
  opt.update(model, grads)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads)}
  if stats:
    layers = [block.mlp for block in model.blocks if isinstance(block.mlp, moe.MoE)]
    if cfg.bias_update_speed:  # counts summed over the microbatches: the step's whole batch
      for layer, counts_E in zip(layers, stats['counts'], strict=True):
        layer.e_score_correction_bias[...] = moe.balanced_bias(
            layer.e_score_correction_bias[...], counts_E, cfg.bias_update_speed)
    metrics.update(moe_metrics(stats, n, cfg))
  return nnx.state((model, opt)), metrics


def moe_metrics(stats, n: int, cfg) -> dict:
  """The routing of one step, summarised over the MoE layers: the expert load (each expert's
  share of the step's assignments) at its largest and smallest in any layer, its imbalance
  (max / mean load: 1 is balanced, E all on one expert) averaged over the layers and at the
  worst layer, the router's entropy (nats, averaged), and each balance loss in use as it
  entered the objective (alpha * the sum over layers; microbatch mean)."""
  load_LE = stats['counts'] / jnp.sum(stats['counts'], axis=-1, keepdims=True)
  imbalance_L = jnp.max(load_LE, axis=-1) * load_LE.shape[-1]
  out = {'moe_load_max': jnp.max(load_LE), 'moe_load_min': jnp.min(load_LE),
         'moe_imbalance': jnp.mean(imbalance_L), 'moe_imbalance_max': jnp.max(imbalance_L),
         'moe_entropy': jnp.mean(stats['entropy']) / n}
  if cfg.aux_loss_alpha:
    out['moe_aux_loss'] = cfg.aux_loss_alpha * jnp.sum(stats['aux']) / n
  if cfg.seq_aux_loss_alpha:
    out['moe_seq_aux_loss'] = cfg.seq_aux_loss_alpha * jnp.sum(stats['seq_aux']) / n
  return out


# XLA:CPU options for the train step: dots on Eigen rather than YNNPACK, and 512-bit vectors
# where the CPU has them (XLA's default is narrower); docs/benchmarks.md has the measurements
# (`python -m experiments.cpu_ab`). Both are experimental XLA options: one this jax lacks is
# left out, and the step compiles with XLA's default for it.
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
    compiler_options = cpu_compiler_options() if platform.current(mesh) == 'cpu' else {}
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(train_step, graphdef), donate_argnums=0,
                 in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated),
                 compiler_options=compiler_options)


def batch_layout(config, mesh: jax.sharding.Mesh):
  """(sharding, global shape [accum, b, seq_len] of each array of a batch, this process's
  rows of each b) for config's data and opt sections (a RunConfig or a ConfigDict)."""
  accum, batch = config.opt.grad_accum_steps, config.data.batch_size
  shape = (accum, batch // accum, config.data.seq_len)
  layout = sharding.named_sharding(mesh, (None, 'batch', None), shape)
  return layout, shape, sharding.local_rows(layout, shape, axis=1)
