"""Every timer the benchmarks use: a jitted function's median time, named steps timed
alternately (the A/B timer), the machine's copy bandwidth and matmul rate, the train step timed
alone, the bytes and flops a decode step must spend and the decode benchmark's rows, and
running one row without losing the others to its failure. Benchmarks live here in
experiments/, outside the package: mla_jax never imports them.
"""

from __future__ import annotations

import contextlib
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mla_jax
from experiments import common
from mla_jax import quant, tasks, training, variants
from mla_jax.cache import measured_per_token, storage_dtype
from mla_jax.config import ModelConfig
from mla_jax.model import train_flops_per_token
from mla_jax.quant import QuantArray


class Rows:
  """A benchmark's rows, written to `path` with `meta` after each one: a run stopped at its
  time limit keeps what it measured, and a row that fails on a device (out of memory, a kernel
  it cannot compile) is listed under 'failures' without losing the run's other rows."""

  def __init__(self, path: pathlib.Path, **meta):
    self.path, self.meta, self.rows, self.failures = path, meta, [], []

  def add(self, make_row: Callable[[], dict], failed: dict | None = None, **where) -> dict | None:
    """make_row()'s row, or None after recording the failure (and printing it); `failed`: a
    failure is also a row, these entries added (a check whose table shows it)."""
    try:
      self.rows.append(make_row())
    except Exception as e:
      self.failures.append({**where, 'error': f'{type(e).__name__}: {str(e)[:400]}'})
      print(f"{where}: FAILED {self.failures[-1]['error']}", flush=True)
      if failed is not None:
        self.rows.append({**self.failures[-1], **failed})
      self.save()
      return None
    self.save()
    return self.rows[-1]

  def save(self, **extra) -> None:
    common.write_json(self.path, {**self.meta, 'rows': self.rows, 'failures': self.failures,
                                  **extra})

  def finish(self) -> None:
    """Says where the rows are; a failed row fails the run (after the others ran)."""
    print(f'wrote {self.path}')
    if self.failures:
      raise SystemExit(f'error: {len(self.failures)} rows failed (listed in {self.path})')


def median_seconds(fn, runs: int) -> float:
  jax.block_until_ready(fn())  # warm-up (compile)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


Step = Callable[[], None]  # one synchronous call (a training step, an attention call)


def carried(fn: Callable, state, *args, mesh=None) -> Callable:
  """A call of fn(state, *args) -> (new state, out) that hands the new state to the next call
  (a donated state is used once) and returns out, ready; under `mesh` if one is given."""
  box = [state]

  def call():
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
      box[0], out = fn(box[0], *args)
      return jax.block_until_ready(out)

  return call


def timed(step: Step, n: int) -> list[tuple[float, float]]:
  """(wall, process CPU) seconds of n calls."""
  times = []
  for _ in range(n):
    start, cpu = time.perf_counter(), time.process_time()
    step()
    times.append((time.perf_counter() - start, time.process_time() - cpu))
  return times


def summary(times: list[tuple[float, float]], tokens: int) -> dict:
  """Median wall step time and tokens/s; also the CPU seconds per step, summed over this
  process's threads: on a shared machine it moves less with other load than wall time."""
  wall, cpu = np.asarray(times).T
  step_s = float(np.median(wall))
  return {'step_s': step_s, 'tokens_per_s': tokens / step_s, 'steps': len(wall),
          'step_s_min': float(np.min(wall)), 'step_s_max': float(np.max(wall)),
          'cpu_s': float(np.median(cpu))}


def compare(steps: dict[str, Step], tokens: int, blocks: int, block_steps: int,
            warmup: int = 2) -> dict:
  """The A/B timer: named steps timed alternately, every block running block_steps of each in
  turn, so load from other processes on a shared machine hits them alike.

  -> {name: summary over all blocks}, plus 'ratio_<a>_over_<b>' (tokens/s) for each later
  name b against the first name a, and its spread over the blocks (min, max of per-block
  median ratios)."""
  for step in steps.values():
    timed(step, warmup)
  times: dict[str, list[list[tuple[float, float]]]] = {name: [] for name in steps}
  for _ in range(blocks):
    for name, step in steps.items():
      times[name].append(timed(step, block_steps))
  out = {name: summary([x for block in t for x in block], tokens) for name, t in times.items()}
  first, *rest = steps
  for name in rest:
    per_block = [np.median(np.asarray(b)[:, 0]) / np.median(np.asarray(a)[:, 0])
                 for a, b in zip(times[first], times[name], strict=True)]
    out[f'ratio_{first}_over_{name}'] = {
        'ratio': out[first]['tokens_per_s'] / out[name]['tokens_per_s'],
        'cpu_ratio': out[name]['cpu_s'] / out[first]['cpu_s'],
        'block_min': float(np.min(per_block)), 'block_max': float(np.max(per_block))}
  return out


def machine_limits(runs: int, mib: int = 1024, dtype: str = 'float32', n: int = 2048) -> dict:
  """Memory bandwidth and the matmul rate in `dtype`, measured now (on an accelerator give
  n >= 8192: a small product does not fill it). Bandwidth is measured two ways: an in-place
  copy (bytes read + written) and a read-only sum. A decode step mostly reads, and on an H200 a
  kernel read its cache at 1.28x the copy rate, so the limit divides by the faster of the two
  ('stream_bytes_per_s')."""
  x = jnp.zeros((mib * 2**20 // 4,), jnp.float32)
  bump = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  box = [bump(x)]

  def copy():
    box[0] = bump(box[0])
    return box[0]

  copy_s = median_seconds(copy, runs)
  total = jax.jit(jnp.sum)
  read_s = median_seconds(lambda: total(box[0]), runs)
  a = jnp.ones((n, n), dtype)
  square = jax.jit(lambda a: a @ a)
  matmul_s = median_seconds(lambda: square(a), runs)
  copy_rate, read_rate = 2 * box[0].nbytes / copy_s, box[0].nbytes / read_s
  return {'copy_bytes_per_s': copy_rate, 'read_bytes_per_s': read_rate,
          'stream_bytes_per_s': max(copy_rate, read_rate),
          'matmul_flops_per_s': 2 * n**3 / matmul_s, 'dtype': dtype}


def fixed_batch_step(config, mesh, compiler_options=None) -> tuple:
  """(initial state, the jitted train step, one fixed random text batch) on `mesh`: the train
  step as the trainer builds it (compiler_options: see training.jit_train_step), to time or
  profile alone. Call under jax.set_mesh(mesh)."""
  graphdef, state, shardings = training.init_state(config, mesh)
  batch_sharding, shape, _ = training.batch_layout(config, mesh)
  step = training.jit_train_step(graphdef, shardings, batch_sharding, compiler_options)
  return state, step, jax.device_put(tasks.text_batch(fixed_windows(shape)), batch_sharding)


def fixed_windows(shape: tuple[int, ...]) -> np.ndarray:
  """The fixed batch's token windows [..., seq_len + 1] for a batch of `shape` [..., seq_len]
  (fixed_batch_step's; the torch peer trains on the same ones when it checks its loss)."""
  return np.random.default_rng(0).integers(0, 256, (*shape[:-1], shape[-1] + 1), dtype=np.int32)


# A custom call's name in the train step's program -> the attention kernel it is.
KERNEL_CALLS = {'__cudnn$fmha': 'cudnn', 'mla_causal_attention_forward': 'cpu_kernel'}


def attention_kernel(config, mesh) -> str:
  """Which attention kernel the train step of `config` calls, read from its program: 'cudnn'
  (cuDNN's flash attention), 'cpu_kernel' (mla_jax.kernels.cpu_attention's custom call), or
  'xla' (no kernel: XLA's own ops). On one device the lowered step shows the choice without
  compiling; on a mesh of several, cuDNN's call is custom-partitioned and named only in the
  compiled program."""
  with jax.set_mesh(mesh):
    state, step, batch = fixed_batch_step(config, mesh)
    lowered = step.lower(state, batch)
    program = (lowered.compile() if mesh.size > 1 else lowered).as_text()
  return next((kernel for call, kernel in KERNEL_CALLS.items() if call in program), 'xla')


def time_train_step(config, mesh, steps: int) -> dict:
  """Compile time, median step time and compiled HLO text of the train step on `mesh`, called
  directly on one fixed batch (nothing else running)."""
  with jax.set_mesh(mesh):
    state, step, batch = fixed_batch_step(config, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start  # the timed calls below compile once more, untimed
    step_s = median_seconds(carried(step, state, batch), steps)
  return {'compile_s': compile_s, 'step_s': step_s, 'hlo': compiled.as_text()}


# bench_train's 'large' size, the accelerator report's training rows (MLA at d_c = 4 d_h,
# d_r = d_h / 2); capacity_vs_cache scales their measured rate to its 125m geometry.
LARGE_MODEL = dict(d_model=1024, n_layers=8, n_heads=16, d_ff=2752, max_seq_len=1024)
LARGE_MLA = dict(kv_lora_rank=256, qk_rope_head_dim=32)


def large_config(variant: str):
  """configs/<variant>.py at the 'large' size: batch 32 x 1024."""
  config = common.load_config(variant)
  m = config.model
  if m.n_routed_experts:  # experts as wide, against d_model, as the config's
    m.moe_intermediate_size = m.moe_intermediate_size * LARGE_MODEL['d_model'] // m.d_model
  m.update(LARGE_MODEL, **(LARGE_MLA if m.attention == 'mla' else {}))
  config.data.update(batch_size=32, seq_len=1024)
  return config


def flops_per_token(cfg: ModelConfig, seq_len: int, experts: int = 0) -> float:
  """model.train_flops_per_token: 6 N + 12 L T d, the matmuls of forward and backward and
  attention's scores and values, N the parameters a token passes through (an MoE layer's K
  chosen experts of E) less the embedding table. experts: as if each token went through that
  many routed experts instead of K (E: what the dense all-experts reference computes)."""
  extra = routed_expert_params(cfg) * (experts - cfg.num_experts_per_tok) if experts else 0
  return train_flops_per_token(cfg, seq_len) + 6 * extra


def routed_expert_params(cfg: ModelConfig) -> int:
  """The parameters of one routed expert (a SwiGLU: gate, up, down), over all MoE layers."""
  layers = sum(map(cfg.is_moe_layer, range(cfg.n_layers)))
  return layers * 3 * cfg.d_model * (cfg.moe_intermediate_size or 0)


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


def decode_configs(d_model: int, n_heads: int, n_layers: int, dtype: str, impls=('einsum',),
            cache_dtypes=(None,)) -> dict:
  """The benchmark's rows: every variant at d_c = 4 d_h, d_r = d_h / 2 for MLA, under each
  attention_impl (kernels: the Pallas decode kernels; MLA naive has none, so einsum only) and
  each cache dtype (None: the compute dtype)."""
  d_h = d_model // n_heads
  base = dict(d_model=d_model, n_heads=n_heads, n_layers=n_layers, vocab_size=256,
              max_seq_len=1 << 20, dtype=dtype, param_dtype=dtype)
  mla = dict(attention='mla', kv_lora_rank=4 * d_h, qk_rope_head_dim=d_h // 2)
  rows = {
      'MHA': dict(attention='mha'), 'GQA (G=2)': dict(attention='gqa', n_kv_heads=2),
      'MQA': dict(attention='mqa'), 'MLA naive': dict(**mla, mla_decode='naive'),
      'MLA absorbed': dict(**mla, mla_decode='absorbed'),
      # the cache-efficient family: GTA at GQA-2's groups, GLA-2 on MLA's latent, TPA at the
      # paper's ranks (no decode kernel: einsum only)
      'GTA (G=2)': dict(attention='gta', n_kv_heads=2, qk_rope_head_dim=d_h // 2),
      'GLA-2': dict(attention='gla', kv_lora_rank=4 * d_h, qk_rope_head_dim=d_h // 2,
                    latent_heads=2),
      'TPA': dict(attention='tpa', tpa_q_rank=6, tpa_k_rank=2, tpa_v_rank=2),
  }
  out = {}
  for name, fields in rows.items():
    variant = variants.get(fields['attention'])
    for impl in impls:
      if impl in ('kernels', 'fused') and (name == 'MLA naive' or variant.decode_widths is None):
        continue
      for cache_dtype in cache_dtypes:
        if cache_dtype and jnp.dtype(cache_dtype).itemsize == 1 and not variant.quantized_cache:
          continue
        kind = 'kernel' if impl in ('kernels', 'fused') else impl
        label = name if len(impls) == 1 else f'{name} [{kind}]'
        if len(cache_dtypes) > 1:
          label += f' {cache_dtype or dtype} cache'
        out[label] = mla_jax.ModelConfig(**base, **fields, attention_impl=impl,
                                         cache_dtype=cache_dtype)
  return out


def random_caches(caches, key):
  """Caches filled with standard normal values: an 8-bit cache holds them quantized."""
  is_quant = lambda x: isinstance(x, QuantArray)
  leaves, treedef = jax.tree.flatten(caches, is_leaf=is_quant)
  filled = []
  for x, k in zip(leaves, jax.random.split(key, len(leaves)), strict=True):
    if is_quant(x):
      filled.append(quant.quantize(jax.random.normal(k, x.shape), x.values.dtype, x.axis))
    else:
      filled.append(jax.random.normal(k, x.shape, x.dtype))
  return jax.tree.unflatten(treedef, filled)


def decode_row(name, cfg, batch, context, limits, runs):
  """One decode benchmark row: the median step time of `cfg` at batch x context over a random
  cache, its measured cache size beside the formula, and the fraction of the machine's limit."""
  model = mla_jax.Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  n_params = sum(x.size for x in jax.tree.leaves(state))
  caches = model.init_cache(batch, context)
  elements_per_token, cache_bytes_per_token = measured_per_token(caches, batch, context)
  caches = random_caches(caches, jax.random.key(1))
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(caches))
  tokens = jnp.ones((batch,), jnp.int32)
  positions = jnp.full((batch,), context - 1, jnp.int32)
  step = lambda caches: mla_jax.decode_step(graphdef, state, caches, tokens, positions)[::-1]
  seconds = median_seconds(carried(step, caches), runs)  # decode_step -> (logits, caches)
  read, flops = decode_step_cost(cfg, n_params, batch, context, cache_bytes_per_token)
  limit = max(read / limits['stream_bytes_per_s'], flops / limits['matmul_flops_per_s'])
  return {
      'variant': name, 'impl': cfg.attention_impl, 'cache_dtype': str(storage_dtype(cfg)),
      'batch': batch, 'context': context, 'params': n_params,
      'ms_per_token': 1e3 * seconds, 'tokens_per_s': batch / seconds,
      'cache_elements_per_token': elements_per_token,
      'cache_elements_per_token_formula': mla_jax.cache_elements_per_token(cfg),
      'cache_bytes_per_token': cache_bytes_per_token,
      'cache_bytes_per_token_formula': mla_jax.cache_bytes_per_token(cfg),
      'cache_mib': cache_bytes / 2**20,
      'bytes_read': read, 'flops': flops, 'limit_ms': 1e3 * limit,
      'fraction_of_limit': limit / seconds,
  }
