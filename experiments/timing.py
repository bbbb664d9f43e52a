"""What the benchmarks share: timing a jitted function, the machine's copy bandwidth and matmul
rate, the train step timed alone, and the bytes and flops a decode step must spend. Benchmarks
live here in experiments/, outside the package: mla_jax never imports them.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import tasks, trainer, variants
from mla_jax.config import ModelConfig


def median_seconds(fn, runs: int) -> float:
  jax.block_until_ready(fn())  # warm-up (compile)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def machine_limits(runs: int, mib: int = 1024, dtype: str = 'float32', n: int = 2048) -> dict:
  """Copy bandwidth (read + write, in place) and the matmul rate in `dtype`, measured now (on
  an accelerator give n >= 8192: a small product does not fill it)."""
  x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
  bump = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  box = [bump(x)]

  def copy():
    box[0] = bump(box[0])
    return box[0]

  copy_s = median_seconds(copy, runs)
  a = jnp.ones((n, n), dtype)
  square = jax.jit(lambda a: a @ a)
  matmul_s = median_seconds(lambda: square(a), runs)
  return {'copy_bytes_per_s': 2 * box[0].nbytes / copy_s,
          'matmul_flops_per_s': 2 * n**3 / matmul_s, 'dtype': dtype}


def time_train_step(config, mesh, steps: int) -> dict:
  """Compile time, median step time and compiled HLO text of the train step on `mesh`, called
  directly on one fixed batch (nothing else running)."""
  with jax.set_mesh(mesh):
    graphdef, state, shardings = trainer.init_state(config, mesh)
    batch_sharding, shape, _ = trainer.batch_layout(config, mesh)
    step = trainer.jit_train_step(graphdef, shardings, batch_sharding)
    windows = np.random.default_rng(0).integers(0, 256, (*shape[:-1], shape[-1] + 1),
                                                dtype=np.int32)
    batch = jax.device_put(tasks.text_batch(windows), batch_sharding)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start  # the timed calls below compile once more, untimed
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  return {'compile_s': compile_s, 'step_s': float(np.median(times)), 'hlo': compiled.as_text()}


def decode_step_cost(cfg: ModelConfig, n_params: int, batch: int, context: int,
              cache_bytes_per_token: int) -> tuple[float, float]:
  """(bytes that must be read, flops) for one decode step at `context` keys.

  Every weight is read once and used once per sequence, except an untied embedding table, of
  which the step reads one row per sequence (a tied one is also the output head: read whole).
  The attention's flops come from its variant's registry entry.
  """
  itemsize = jnp.dtype(cfg.dtype).itemsize
  embedding_rows = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  weights = n_params - embedding_rows
  flops = 2 * batch * weights
  flops += batch * cfg.n_layers * variants.get(cfg.attention).decode_flops(cfg, context)
  read = weights * itemsize + batch * context * cache_bytes_per_token
  return float(read), float(flops)
