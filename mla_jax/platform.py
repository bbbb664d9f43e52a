"""Which platform runs the computation: the one module of the package that asks jax.

Everything that depends on the platform (the compute dtype 'auto', the attention kernels of
mla_jax.attention_op, whether Pallas kernels run interpreted, the trainer's XLA options)
asks here, with the mesh it will run on where there is one, so that one rule decides.
"""

from __future__ import annotations

import jax

PLATFORMS = ('cpu', 'gpu', 'tpu')


def current(mesh=None) -> str:
  """'cpu', 'gpu' or 'tpu': the platform of the mesh's devices, else jax's default backend."""
  if isinstance(mesh, jax.sharding.Mesh) and not mesh.empty:
    name = mesh.devices.flat[0].platform
  else:  # no mesh, or an abstract one (no devices): the default backend runs it
    name = jax.default_backend()
  return 'gpu' if name in ('cuda', 'rocm') else name


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
