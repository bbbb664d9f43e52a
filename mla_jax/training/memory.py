"""A rough estimate of a run's memory, checked before anything is written: a batch or a model
far too large for the machine is refused in one line instead of ending in an out-of-memory
traceback with a half-made workdir behind it.

The estimate counts, in bytes: the (model, optimizer) state and two float32 copies of the
gradients (the accumulator and one microbatch's); the activations one microbatch keeps for the
backward pass (per layer about 12 d_model + 3 d_ff values per token, plus the [h, t, t] scores
and probabilities where whole sequences take a path that materialises them, einsum or XLA's
attention; and the float32 logits, their softmax and gradient); and the batches in flight
(grain's prefetch). It is meant to catch mistakes of 2x and more, not to predict XLA's peak.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from flax import nnx

from mla_jax import platform
from mla_jax.config import ConfigError

PREFETCH = 4  # data.prefetched's buffer, plus the batch on the device


def _bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def estimate(config, abstract) -> dict[str, int]:
  """{'state', 'activations', 'batches'} in bytes for a RunConfig and its (model, optimizer)
  as shapes (training.state.abstract_state)."""
  model, _ = abstract
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  m, d = config.model, config.data
  rows = d.batch_size // config.opt.grad_accum_steps
  tokens = rows * d.seq_len
  width = 2 if m.dtype in ('bfloat16', 'float16') else 4  # 'auto': float32 on a CPU
  per_layer = tokens * (12 * m.d_model + 3 * m.d_ff)
  if model.op.whole in ('einsum', 'xla'):  # scores and probabilities, materialised
    per_layer += 2 * rows * m.n_heads * d.seq_len ** 2
  activations = m.n_layers * per_layer * width + 3 * tokens * m.vocab_size * 4
  batches = (PREFETCH + 1) * d.batch_size * d.seq_len * 12  # inputs, targets, weights
  return {'state': _bytes(nnx.state(abstract)) + 2 * 4 * n_params, 'activations': activations,
          'batches': batches}


def host_memory() -> int:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _gb(n: float) -> str:
  return f'{n / 2**30:.3g} GiB'


def check(config, mesh, abstract) -> None:
  """Refuses a run whose estimate exceeds the memory it would run in: the host's on a CPU
  mesh (its devices share it), else each device's share against the device's memory."""
  need = estimate(config, abstract)
  device = mesh.devices.flat[0]
  sizes = dict(mesh.shape)
  if platform.current(mesh) == 'cpu':
    total, have, where = sum(need.values()), host_memory(), 'this host has'
  else:
    stats = device.memory_stats() or {}
    have = stats.get('bytes_limit')
    if not have:
      return  # a device that does not say how much memory it has
    total = (need['state'] / (sizes.get('fsdp', 1) * sizes.get('tensor', 1))
             + (need['activations'] + need['batches'])
             / (sizes.get('data', 1) * sizes.get('fsdp', 1) * sizes.get('expert', 1)))
    where = f'each {device.device_kind} has'
  if total > have:
    raise ConfigError(
        f'this run needs about {_gb(total)} of memory (state and gradients '
        f"{_gb(need['state'])}, activations {_gb(need['activations'])}, batches "
        f"{_gb(need['batches'])}) but {where} {_gb(have)}; lower data.batch_size or the "
        'model sizes, or raise opt.grad_accum_steps (or the mesh)')
