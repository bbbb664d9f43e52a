"""Which platform runs the computation: the one module of the package that asks jax.

Everything that depends on the platform (the compute dtype 'auto', the attention kernels of
mla_jax.attention_op, whether Pallas kernels run interpreted, the trainer's XLA options)
asks here, with the mesh it will run on where there is one, so that one rule decides.

`lowering_for(platform)` makes every such decision as on another platform, so that a host
without that platform can trace and lower what would run there (jax lowers for any platform:
`.lower(lowering_platforms=...)`); tests/lowering_test.py lowers every variant for TPU and
NVIDIA GPUs on a CPU this way. Nothing runs under it but tracing.
"""

from __future__ import annotations

import contextlib

import jax

PLATFORMS = ('cpu', 'gpu', 'tpu')
_lowering_for: str | None = None  # set by lowering_for


def current(mesh=None) -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the mesh's devices, else jax's default backend
  (inside lowering_for: the platform it names)."""
  if _lowering_for is not None:
    return _lowering_for
  if isinstance(mesh, jax.sharding.Mesh) and not mesh.empty:
    name = mesh.devices.flat[0].platform
  else:  # no mesh, or an abstract one (no devices): the default backend runs it
    name = jax.default_backend()
  return 'gpu' if name in ('cuda', 'rocm') else name


@contextlib.contextmanager
def lowering_for(name: str):
  """Inside: current() is `name` ('gpu' or 'tpu'), whatever runs here, for tracing and lowering
  a program for that platform from another (the dtype 'auto', the kernels and their backends
  decide as they would there)."""
  global _lowering_for
  if name not in PLATFORMS:
    raise ValueError(f'lowering_for({name!r}): use one of {PLATFORMS}')
  before, _lowering_for = _lowering_for, name
  try:
    yield
  finally:
    _lowering_for = before


def devices(mesh=None) -> int:
  """How many devices a computation spans: the mesh's (given, or set with jax.set_mesh), else 1."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh is None or mesh.empty else mesh.size


def is_accelerator(platform: str) -> bool:
  return platform != 'cpu'


# Nominal dense bfloat16 peaks (TFLOP/s) of the device kinds MFU is reported for.
PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0}


def peak_flops() -> float | None:
  """One device's nominal peak (flop/s) where PEAK_TFLOPS names its kind; None elsewhere (a
  CPU: no nominal figure means anything there, benchmarks measure its matmul rate instead)."""
  kind = jax.devices()[0].device_kind
  return next((tflops * 1e12 for name, tflops in PEAK_TFLOPS.items() if name in kind), None)
