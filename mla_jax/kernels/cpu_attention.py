"""Causal flash attention on XLA's CPU backend: cpu_attention.cc, built when a model that runs it
is built (mla_jax.attention_op.resolve, before anything is traced).

XLA:CPU has no fused attention: it runs the einsum path's batched dots one thread each and
walks the [b, h, t, s] scores several times over, forward and backward (docs/benchmarks.md).
cpu_attention.cc is the fused kernel for the one case a training step needs (a whole sequence
at positions 0 .. t - 1, float32), called through XLA's FFI, with a flash backward.

It is compiled once per machine with the C++ compiler found on PATH (or CXX) into
~/.cache/mla_jax/kernels (MLA_JAX_KERNEL_CACHE overrides) and loaded from there; `available()`
is False where that cannot be done (no compiler, a failed build or load: logged once as a
warning), and the model is built on the einsum path. MLA_JAX_CPU_KERNEL=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

SOURCE = pathlib.Path(__file__).with_name('cpu_attention.cc')
FLAGS = ('-O3', '-march=native', '-shared', '-fPIC', '-std=c++17')
_FORWARD, _BACKWARD = 'mla_causal_attention_forward', 'mla_causal_attention_backward'


def _cpu_signature() -> str:
  """What -march=native compiles for: the CPU's model and features (x86: model name, flags;
  ARM: implementer, part, Features), so a shared home folder never hands one CPU's build to
  another."""
  keys = ('model name', 'flags', 'CPU implementer', 'CPU part', 'Features')
  try:
    info = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    info = []
  return '\n'.join([platform.machine(), platform.processor(),
                    *sorted({ln for ln in info if ln.startswith(keys)})])


def library_path(cache_dir: str | None = None) -> pathlib.Path:
  """Where the build of this source, jax and jaxlib (the FFI headers), compiler flags and
  CPU lives."""
  cache_dir = cache_dir or os.environ.get('MLA_JAX_KERNEL_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'mla_jax', 'kernels')
  key = hashlib.sha256('\0'.join([SOURCE.read_text(), jax.__version__, jaxlib.__version__,
                                  ' '.join(FLAGS), _cpu_signature()]).encode()).hexdigest()[:16]
  return pathlib.Path(cache_dir) / f'cpu_attention-{key}.so'


def build(target: pathlib.Path) -> None:
  """Compiles the kernel into target (written under a temporary name, then renamed, so
  processes building at once never load a half-written library)."""
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if compiler is None:
    raise RuntimeError('no C++ compiler on PATH (set CXX)')
  target.parent.mkdir(parents=True, exist_ok=True)
  # Said where it happens (when a model is built, not inside a trace): seconds, once per host.
  print(f'mla_jax: compiling the CPU attention kernel into {target}', file=sys.stderr,
        flush=True)
  fd, tmp = tempfile.mkstemp(dir=target.parent, suffix='.so.tmp')
  os.close(fd)
  try:
    subprocess.run([compiler, *FLAGS, '-isystem', jax.ffi.include_dir(), str(SOURCE), '-o',
                    tmp], check=True, capture_output=True, text=True, timeout=600)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@functools.cache
def available() -> bool:
  """Whether the kernel is built, loaded and registered with XLA's CPU backend."""
  if os.environ.get('MLA_JAX_CPU_KERNEL', '1') == '0':
    return False
  try:
    path = library_path()
    if not path.exists():
      build(path)
    try:
      lib = ctypes.cdll.LoadLibrary(str(path))
    except OSError:  # a damaged file in the cache: build it again, once
      build(path)
      lib = ctypes.cdll.LoadLibrary(str(path))
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(lib.MlaCausalAttentionForward),
                                platform='cpu')
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(lib.MlaCausalAttentionBackward),
                                platform='cpu')
  except Exception as e:  # any failure means the einsum path, never a crashed run
    lines = str(getattr(e, 'stderr', None) or e).strip().splitlines()
    errors = [ln for ln in lines if 'error' in ln] or lines or [type(e).__name__]
    logging.warning('the C++ CPU attention kernel is unavailable, so whole sequences take '
                    'another kernel (mla_jax.attention_op.resolve): %s', errors[0])
    return False
  return True


def _forward(q_btgpe, k_btge, v_btgw, scale: float):
  b, t, g, p, e = q_btgpe.shape
  if k_btge.shape != (b, t, g, e) or v_btgw.shape[:3] != (b, t, g):
    raise ValueError(f'cpu_attention: q {q_btgpe.shape} [b, t, g, p, e] needs k [b, t, g, e] '
                     f'and v [b, t, g, w]; got k {k_btge.shape}, v {v_btgw.shape}')
  out = (jax.ShapeDtypeStruct((b, t, g, p, v_btgw.shape[-1]), jnp.float32),
         jax.ShapeDtypeStruct((b, g, p, t), jnp.float32))
  return jax.ffi.ffi_call(_FORWARD, out, vmap_method='sequential')(q_btgpe, k_btge, v_btgw,
                                                                  scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(q_btgpe, k_btge, v_btgw, scale: float):
  return _forward(q_btgpe, k_btge, v_btgw, scale)[0]


def _attention_fwd(q_btgpe, k_btge, v_btgw, scale):
  o, lse = _forward(q_btgpe, k_btge, v_btgw, scale)
  return o, (q_btgpe, k_btge, v_btgw, o, lse)


def _attention_bwd(scale, residuals, do_btgpw):
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in residuals[:3])
  return jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method='sequential')(
      *residuals, do_btgpw, scale=np.float32(scale))


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q_btgpe, k_btge, v_btgw, scale: float):
  """softmax(q k^T * scale, causal) v -> [b, t, g, p, w] float32 for a whole sequence, in the
  model's token-major layout: queries [b, t, g, p, e] (p query heads per key/value head),
  keys [b, t, g, e], values [b, t, g, w], all float32. Builds and registers the kernel first
  if no call has yet."""
  if not available():
    raise RuntimeError('the CPU attention kernel is not available (no C++ compiler on PATH, '
                       'or MLA_JAX_CPU_KERNEL=0): resolve the model with attention_op.resolve')
  return _attention(q_btgpe, k_btge, v_btgw, scale)
