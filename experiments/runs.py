"""What the cache experiments share: runs as worker processes pinned one per core, finished runs
kept (result.json) and interrupted ones resumed, and the KV cache counted from the decode loop.

A run is an ordinary mla_jax workdir plus result.json, written last and atomically: a run with
result.json is done and never redone; one without resumes from its last checkpoint.

One core per run makes a run's numbers independent of how many runs share the machine (XLA
sizes its thread pool by the cores a process may use), and two one-core runs on two cores train
~40% more tokens per second than one two-core run at these sizes.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax import decode
from mla_jax.cache import measured_per_token
from mla_jax.model import with_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT = 'result.json'


def cache_formula(cfg) -> tuple[str, int]:
  """DeepSeek-V2 Table 1, written from the config's fields (not from the cache code)."""
  layers = cfg.n_layers
  if cfg.attention == 'mla':
    return '(d_c + d_h^R)·l', (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * layers
  if cfg.attention == 'mqa':
    return '2·d_h·l', 2 * cfg.head_dim * layers
  if cfg.attention == 'gqa':
    return '2·n_g·d_h·l', 2 * cfg.n_kv_heads * cfg.head_dim * layers
  return '2·n_h·d_h·l', 2 * cfg.n_heads * cfg.head_dim * layers


def measure_decode_cache(model, prompt) -> tuple[int, int]:
  """(elements, bytes) per token of the caches a bfloat16 prefill + decode step returns."""
  model = with_config(model, dtype='bfloat16')
  graphdef, state = nnx.split(model)
  batch, max_len = 2, model.cfg.max_seq_len
  caches = model.init_cache(batch, max_len)  # bfloat16, as decode allocates
  prompts = jnp.asarray([prompt, prompt], jnp.int32)
  lengths = jnp.full((batch,), len(prompt), jnp.int32)
  logits, caches = decode.prefill(graphdef, state, caches, prompts, lengths)
  next_tokens = jnp.argmax(logits, -1).astype(jnp.int32)
  _, caches = decode.decode_step(graphdef, state, caches, next_tokens, lengths)
  return measured_per_token(caches, batch, max_len)


def cache_columns(model, prompt) -> dict:
  """The cache by the formula and as measured from the decode loop's arrays (must agree)."""
  formula, by_formula = cache_formula(model.cfg)
  elements, nbytes = measure_decode_cache(model, prompt)
  if elements != by_formula:
    raise AssertionError(f'{model.cfg.attention}: the decode cache holds {elements} elements '
                         f'per token, the formula {formula} gives {by_formula}')
  return dict(cache_formula=formula, cache_elements_formula=by_formula,
              cache_elements_measured=elements, cache_bytes_bf16_measured=nbytes)


def use_compilation_cache(workdir) -> None:
  """Runs of one model compile the same programs: a persistent cache compiles them once."""
  jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(workdir) / 'xla_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def write_result(run_dir: pathlib.Path, result: dict) -> None:
  tmp = run_dir / (RESULT + '.tmp')
  tmp.write_text(json.dumps(result, indent=1))
  tmp.replace(run_dir / RESULT)


def read_result(run_dir: pathlib.Path) -> dict | None:
  path = run_dir / RESULT
  return json.loads(path.read_text()) if path.exists() else None


def available_cores() -> list[int]:
  if hasattr(os, 'sched_getaffinity'):
    return sorted(os.sched_getaffinity(0))
  return list(range(os.cpu_count() or 1))


def _pin_to(core: int):
  """Runs in the child before exec (this process has no threads): its one core, inherited."""
  if not hasattr(os, 'sched_setaffinity'):
    return None
  return lambda: os.sched_setaffinity(0, {core})


def run_workers(jobs: list[tuple[str, pathlib.Path, list[str]]], max_jobs: int,
                on_done: Callable[[str, pathlib.Path, float], None]) -> None:
  """Runs each (label, run_dir, argv) as `python argv...` from the repository root, max_jobs at
  a time (0: one per available core), each on its own core, its output in run_dir/log.txt.

  on_done(label, run_dir, seconds) follows each success. After a failure nothing new starts;
  the runs under way finish, then SystemExit names every failure and its log.
  """
  cores = available_cores()
  slots = min(max_jobs or len(cores), len(cores))
  todo, running, failed = list(jobs), {}, []
  while todo or running:
    for slot in [s for s in range(slots) if s not in running]:
      if not todo or failed:
        break
      label, run_dir, argv = todo.pop(0)
      run_dir.mkdir(parents=True, exist_ok=True)
      with (run_dir / 'log.txt').open('a') as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=log,
                                preexec_fn=_pin_to(cores[slot]))
      running[slot] = (proc, label, run_dir, time.perf_counter())
    time.sleep(0.5)
    for slot, (proc, label, run_dir, started) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[slot]
      log = run_dir / 'log.txt'
      if proc.returncode:
        lines = log.read_text().strip().splitlines() or ['(empty log)']
        failed.append(f'{label} failed (exit {proc.returncode}): {lines[-1]} (full log: {log})')
        continue
      on_done(label, run_dir, time.perf_counter() - started)
  if failed:
    raise SystemExit('error: ' + '; '.join(failed))


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  cpuinfo = pathlib.Path('/proc/cpuinfo')
  if cpuinfo.exists():
    names = [line.split(':', 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith('model name')]
    cpu = names[0] if names else cpu
  return f'{cpu}, {len(available_cores())} cores available, Python {platform.python_version()}'
