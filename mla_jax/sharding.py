"""Device mesh, logical-axis rules and multi-host start-up (docs/design.md#8-sharding).

Every parameter carries logical axis names (`axes=` metadata, see layers.weight); RULES maps
each name to a mesh axis. The mesh has four axes:

  data    batch split, parameters replicated          (data parallel)
  fsdp    batch split, parameters split along 'embed' (ZeRO-3: gathered per layer, per use)
  tensor  heads / MLP width / vocabulary split        (Megatron tensor parallel)
  expert  batch split, MoE experts split              (expert parallel; 1 for dense models)

A mesh axis of size 1 shards nothing, so one config runs unchanged on one CPU and on a pod.
Activations are constrained at the few places where the layout is a choice (`constrain`); it
does nothing when no mesh is set, so the modules work unsharded too.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mla_jax.errors import Error

MESH_AXES = ('data', 'fsdp', 'tensor', 'expert')  # expert last: (d, f, t) keeps its meaning
# A mesh section may leave out 'expert' (configs from before expert parallelism): size 1.
OPTIONAL_AXES = {'expert': 1}
# Logical axis -> mesh axes. Parameters: embed, vocab, heads, kv_heads, head_dim, mlp, q_lora,
# kv_lora, experts; activations and caches also use batch and seq.
RULES: dict[str, tuple[str, ...]] = {
    'batch': ('data', 'fsdp', 'expert'),
    'embed': ('fsdp',),
    'vocab': ('tensor',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'mlp': ('tensor',),
    'experts': ('expert',),  # MoE experts: each device of the expert axis holds E / n
    'head_dim': (),
    'q_lora': (),
    'kv_lora': (),
    'seq': (),
}


class ShardingError(Error, ValueError):
  """A mesh or a mapping that cannot work; the message names the fix."""


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A (data, fsdp, tensor, expert) mesh over all devices; one size may be -1 ("the rest").
  mesh_cfg: a RunConfig's mesh section, a ConfigDict or a dict."""
  devices = jax.devices() if devices is None else devices
  if dataclasses.is_dataclass(mesh_cfg):
    mesh_cfg = dataclasses.asdict(mesh_cfg)
  sizes = [int(mesh_cfg[a] if a in mesh_cfg else OPTIONAL_AXES[a]) for a in MESH_AXES]
  shown = ' x '.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes, strict=True))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ShardingError(f'mesh {shown}: sizes must be >= 1, with at most one -1 ("the rest")')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ShardingError(f'mesh {shown}: {len(devices)} devices do not divide by {known}; '
                          'pick sizes whose product divides the device count')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ShardingError(f'mesh {shown} has {math.prod(sizes)} slots but there are '
                        f'{len(devices)} devices; make the sizes multiply to {len(devices)} '
                        '(or set one to -1)')
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(axes, shape, mesh_shape: dict[str, int], what: str = 'array'):
  """PartitionSpec for an array whose dimensions have logical names (None: replicated)."""
  if len(axes) != len(shape):
    raise ShardingError(f'{what}: {len(axes)} axis names {axes} for shape {shape}')
  spec, used = [], {}
  for name, dim in zip(axes, shape, strict=True):
    if name is not None and name not in RULES:
      raise ShardingError(f'{what}: logical axis {name!r} has no rule; known: {sorted(RULES)}')
    mesh_axes = tuple(a for a in (RULES[name] if name else ()) if mesh_shape.get(a, 1) > 1)
    for a in mesh_axes:
      if a in used:
        raise ShardingError(f'{what}: logical axes {used[a]!r} and {name!r} both map to mesh '
                            f'axis {a!r}; change RULES so each mesh axis splits one dimension')
      used[a] = name
    ways = math.prod(mesh_shape[a] for a in mesh_axes)
    if dim % ways:
      raise ShardingError(
          f'{what}: {name}={dim} is not divisible by mesh axis {"x".join(mesh_axes)}='
          f'{ways}; choose a mesh whose {"x".join(mesh_axes)} size divides {dim}')
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return PartitionSpec(*spec)


def _axes_of(variable, shape) -> tuple:
  return tuple(variable.get_metadata().get('axes', (None,) * len(shape)))


def state_shardings(state, mesh: Mesh):
  """The NamedSharding of every variable of an nnx.State (optimizer moments included: they
  copy their parameter's axes); variables without names (step counters) are replicated."""
  from flax import nnx

  def one(path, variable):  # the same tree, each variable holding its sharding
    what = '/'.join(str(p) for p in path)
    shape = variable.get_value().shape  # arrays and abstract ShapeDtypeStructs alike
    spec = logical_to_spec(_axes_of(variable, shape), shape, dict(mesh.shape), what)
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def place(tree, shardings):
  """Host-side values, the same on every process, as global arrays laid out by `shardings`
  (each process fills only the shards its devices hold)."""
  def one(value, where):
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def named_sharding(mesh: Mesh, axes, shape) -> NamedSharding:
  """The NamedSharding of an array whose dimensions have logical names."""
  return NamedSharding(mesh, logical_to_spec(axes, shape, dict(mesh.shape)))


def constrain(x, axes):
  """with_sharding_constraint by logical names under the current mesh; no mesh: x as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(
      x, logical_to_spec(axes, x.shape, dict(mesh.shape), 'activation'))


def local_rows(global_sharding: NamedSharding, global_shape, axis: int) -> slice:
  """The rows along `axis` that this process's devices hold (one contiguous block)."""
  index = global_sharding.addressable_devices_indices_map(tuple(global_shape))
  starts = [ix[axis].start or 0 for ix in index.values()]
  stops = [global_shape[axis] if ix[axis].stop is None else ix[axis].stop
           for ix in index.values()]
  lo, hi = min(starts), max(stops)
  covered = sum(b - a for a, b in {(a, b) for a, b in zip(starts, stops, strict=True)})
  if covered != hi - lo:
    raise ShardingError('this process holds a non-contiguous part of the batch; order the '
                        'mesh devices process by process')
  return slice(lo, hi)


def global_batch(local, global_sharding: NamedSharding, global_shape):
  """One global array from each process's rows (the block local_rows names)."""
  return jax.make_array_from_process_local_data(global_sharding, np.asarray(local),
                                                tuple(global_shape))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """jax.distributed.initialize when this is one of several processes, else nothing.

  Explicit flags win; otherwise a multi-host TPU slice or a SLURM job with several tasks is
  detected from its environment and JAX finds the coordinator itself. CPU processes talk
  through gloo.
  """
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ShardingError('--coordinator_address needs --num_processes and --process_id')
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1') or 1)
  if not explicit and ',' not in tpu_hosts and slurm_tasks < 2:
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
