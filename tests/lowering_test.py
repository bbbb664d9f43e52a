"""Every variant lowered, on this CPU, for TPU and for NVIDIA GPUs, with the kernels it would
run there: the train step, chunked prefill, the decode step (bfloat16 and 8-bit caches) and
the train step sharded over a (data, fsdp, tensor) mesh of 8 abstract devices.

platform.lowering_for(p) makes every platform decision as on p (the dtype 'auto' is
bfloat16, attention_op.resolve picks p's kernels, the Pallas kernels their backend), and
jax lowers the traced program for p (`lower(lowering_platforms=...)`). Each lowered module's
custom calls are read back and must be exactly the kernels the model resolved: a kernel that
silently fell back to XLA's attention or to the einsum path (or one that was called where
none was chosen) fails here. Lowering proves that tracing, the Pallas -> Mosaic / Triton
lowering and sharding propagation succeed; compiling (Mosaic's and Triton's compilers, XLA's
GPU / TPU passes), memory and speed need the device (docs/scaling.md).

cuDNN's attention asks the local GPU at trace time for the cuDNN version and compute
capability (jax._src.cudnn.fused_attention_stablehlo: check_cudnn_version,
check_compute_capability), and raises 'cuDNN is not detected' on a host without one, upon
which flash.py takes XLA's attention. The `cuda_target` fixture answers those two questions
as an H100 with cuDNN 9.10 would (what jax's own cuDNN tests assume); the lowering itself
needs nothing from the GPU.
"""

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from conftest import VARIANTS, tiny_config
from flax import nnx
from jax._src import custom_partitioning

from configs import base
from mla_jax import decode, platform, sharding, training, variants
from mla_jax.kernels import split_kv
from mla_jax.model import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
JAX_PLATFORM = {'tpu': 'tpu', 'gpu': 'cuda'}  # our platform names -> jax's lowering names
# Every conftest case, and MLA at widths Triton takes (its example's rope width 8 is not a
# power of two >= 16, so its absorbed decode steps stay einsum on a GPU).
CASES = {**VARIANTS, 'mla_pow2': dict(attention='mla', kv_lora_rank=32, qk_rope_head_dim=16)}
# In the default run: each kind of attention call once. MHA runs GQA's code with g = h; query
# compression (mla_q) changes no attention call; mla_naive's decode steps are prefill-kind
# calls, lowered in every MLA case's prefill; mla_pow2 differs from mla on a GPU only.
LONG = ('mha', 'mla_q', 'mla_naive')
PARAMS = [pytest.param(n, p, marks=pytest.mark.long) if n in LONG or (n, p) == ('mla_pow2', 'tpu')
          else (n, p) for n in sorted(CASES) for p in ('tpu', 'gpu')]
BATCH, SEQ, CACHE = 8, 64, 64


@contextlib.contextmanager
def declared_cuda_target():
  """The trace-time questions cuDNN's attention asks the local GPU, answered as for an H100
  (compute capability 9.0) with cuDNN 9.10; and no deterministic GPU ops (conftest asks for
  them, and under them attention avoids cuDNN: flash.py)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn
  answers = {'check_cudnn_version': lambda: 91000,
             'check_compute_capability': lambda capability: float(capability) <= 9.0,
             'is_cuda_compute_capability_equal': lambda capability: float(capability) == 9.0}
  with contextlib.ExitStack() as stack:
    for name, answer in answers.items():
      stack.enter_context(mock.patch.object(cudnn, name, answer))
    stack.enter_context(mock.patch.dict(os.environ, {'XLA_FLAGS': ''}))
    yield


@pytest.fixture
def cuda_target():
  with declared_cuda_target():
    yield


def kernels_in(text: str) -> set[str]:
  """The attention kernels a lowered module calls, one label per kind of custom call:
  'splash fwd' / 'splash dq' / 'splash dkv', 'mosaic' and 'triton' (the split-KV decode
  kernel), 'cudnn' / 'cudnn backward'; any other custom call by its target and name."""
  found = set()
  for line in text.splitlines():
    target = re.search(r'custom_call @([\w$.]+)', line)
    if not target:
      continue
    target, name = target[1], re.search(r'name = "([^"]*)"', line)
    name = name[1] if name else ''
    splash = re.fullmatch(r'splash_m[hq]a_(fwd|dq|dkv)\w*', name)
    if target == 'tpu_custom_call' and splash:
      found.add(f'splash {splash[1]}')
    elif name == 'split_kv_decode' and target in ('tpu_custom_call', '__gpu$xla.gpu.triton'):
      found.add('mosaic' if target == 'tpu_custom_call' else 'triton')
    elif target.startswith('__cudnn$fmha'):
      found.add('cudnn backward' if target.endswith('Backward') else 'cudnn')
    elif target == 'CustomSPMDPartitioning':  # its callback, by the key the call carries
      key = re.search(r'backend_config = "(\d+)"', line)[1].encode()
      partition = custom_partitioning._sharding_callbacks[key].partition
      cudnn = partition.__module__ == 'jax._src.cudnn.fused_attention_stablehlo'
      backward = '_bwd_' in partition.__name__
      found.add(('cudnn backward' if backward else 'cudnn') + ' (partitioned)' if cudnn
                else f'{target} {partition.__module__}.{partition.__name__}')
    else:
      found.add(f'{target} {name}'.strip())
  return found


def expected(kernel: str, backward: bool = False) -> set[str]:
  """kernels_in's labels for one AttentionOp kernel ('xla' and 'einsum' call none)."""
  labels = {'splash': {'splash fwd', 'splash dq', 'splash dkv'} if backward else {'splash fwd'},
            'cudnn': {'cudnn', 'cudnn backward'} if backward else {'cudnn'},
            'mosaic': {'mosaic'}, 'triton': {'triton'}}
  return labels.get(kernel, set())


def train_state(cfg, mesh=None):
  """(graphdef, abstract state) of (model, optimizer) for cfg: shapes, nothing allocated."""
  def make():
    model = Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh)
    opt = training.optimizer(base.get_config('tiny').opt, 10)
    return model, nnx.Optimizer(model, opt, wrt=nnx.Param)
  return nnx.split(nnx.eval_shape(make))


def batch(sharding_=None):
  shape = (1, BATCH, SEQ)
  ints = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding_)
  return {'inputs': ints, 'targets': ints,
          'weights': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding_)}


def config(name: str, plat: str, **fields):
  return tiny_config(**{**CASES[name], 'attention_impl': 'auto', 'dtype': 'auto', **fields})


def lower(jitted, plat: str, *args, **kwargs) -> set[str]:
  return kernels_in(jitted.trace(*args, **kwargs).lower(
      lowering_platforms=(JAX_PLATFORM[plat],)).as_text())


def decode_paths(cfg, plat: str) -> tuple:
  """(the model's op, kernels of its chunked prefill, kernels of its decode step)."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  caches = jax.eval_shape(lambda: model.init_cache(2, CACHE))
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  prefill = lower(decode.prefill, plat, graphdef, state, caches, ints(2, 48), ints(2), chunk=16)
  step = lower(decode.decode_step, plat, graphdef, state, caches, ints(2), ints(2))
  return model.op, prefill, step


def decode_kernel(op, cfg) -> str:
  """The kernel of a decode step: MLA's naive steps are prefill-kind calls (attention.py)."""
  naive = variants.get(cfg.attention).name == 'mla' and cfg.mla_decode == 'naive'
  return op.prefill if naive else op.decode


def variant_of(name: str) -> variants.Variant:
  return variants.get(CASES[name]['attention'])


@pytest.mark.parametrize('name, plat', PARAMS)
def test_every_path_lowers_with_the_kernels_resolved_for_the_platform(name, plat, cuda_target):
  with platform.lowering_for(plat):
    cfg = config(name, plat)
    assert cfg.compute_dtype == jnp.bfloat16  # 'auto' as on the accelerator
    graphdef, state = train_state(cfg)
    op = nnx.merge(graphdef, state)[0].op
    assert op.platform == plat and not op.interpret
    variant = variant_of(name)
    # A variant that declares kernels gets them here (which ones: attention_op_test's table).
    if variant.flash_widths:
      assert op.whole != 'einsum' and op.prefill != 'einsum', op
    assert (op.whole == 'splash') == (plat == 'tpu' and bool(variant.flash_widths)), op
    widths = variant.decode_widths and variant.decode_widths(cfg)
    backend = {'tpu': 'mosaic', 'gpu': 'triton'}[plat]
    takes = bool(widths) and split_kv.fits(*widths, backend=backend)  # the kernel's own word
    assert op.decode == (backend if takes else 'einsum'), op
    step = jax.jit(lambda state, batch: training.train_step(graphdef, state, batch))
    assert lower(step, plat, state, batch()) == expected(op.whole, backward=True), op

    op, prefill, step = decode_paths(cfg, plat)
    assert prefill == expected(op.prefill), op
    assert step == expected(decode_kernel(op, cfg)), op
    if variant.quantized_cache:  # 8-bit caches: the kernels read the int8 values and scales
      op8, prefill8, step8 = decode_paths(config(name, plat, cache_dtype='int8'), plat)
      assert op8 == op and prefill8 == prefill and step8 == step


# The mesh each variant shards over: (data, fsdp, tensor, expert), 8 devices; tensor 2 where
# the KV heads divide by it (MQA's one KV head cannot be split: (4, 2, 1) instead).
def mesh_sizes(cfg) -> tuple[int, ...]:
  tensor = 2 if cfg.n_kv_heads % 2 == 0 else 1
  return (8 // (2 * tensor), 2, tensor, 1)


def sharded_step(name: str, plat: str, mesh) -> tuple:
  """(op, kernels_in, the lowered text) of jit_train_step as the trainer builds it, under
  `mesh`."""
  with platform.lowering_for(plat), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    graphdef, state = train_state(config(name, plat), mesh)
    shardings = sharding.state_shardings(state, mesh)
    layout = sharding.named_sharding(mesh, (None, 'batch', None), (1, BATCH, SEQ))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         state, shardings)
    step = training.jit_train_step(graphdef, shardings, layout, compiler_options={})
    text = step.trace(state, batch(layout)).lower(
        lowering_platforms=(JAX_PLATFORM[plat],)).as_text()
  assert re.search(r'mhlo\.num_partitions = 8\b', text)
  return nnx.merge(graphdef, state)[0].op, kernels_in(text), text


# The registry's variants that declare kernels (the others' sharded steps call none).
SHARDED = sorted(n for n in variants.names() if n not in LONG and variants.get(n).flash_widths)


@pytest.mark.parametrize('name', SHARDED)
def test_the_sharded_train_step_lowers_for_a_tpu_with_splash(name):
  """On 8 abstract devices (jax.sharding.AbstractMesh: no devices needed), splash runs in a
  shard_map over batch and heads (flash.splash_attention): a custom call left to XLA's
  partitioner would gather its inputs and run whole on every device."""
  cfg = config(name, 'tpu')
  mesh = jax.sharding.AbstractMesh(mesh_sizes(cfg), sharding.MESH_AXES,
                                   axis_types=(jax.sharding.AxisType.Auto,) * 4)
  op, found, text = sharded_step(name, 'tpu', mesh)
  assert found == expected(op.whole, backward=True), op
  # Inside the shard_map each device's kernel sees its own rows (8 / (data x fsdp)) and heads:
  # without it the calls would take the whole [8, 4, t, e] queries.
  calls = [line for line in text.splitlines() if '@tpu_custom_call' in line]
  assert 'sdy.manual_computation' in text and calls
  assert not any(f'tensor<{BATCH}x{cfg.n_heads}x' in call for call in calls)


@pytest.mark.slow  # a subprocess with 8 CPU devices: ~10 s
def test_the_sharded_train_step_lowers_for_gpus_with_cudnn():
  """cuDNN's attention is partitioned by jax's custom_partitioning, which needs a mesh of
  real devices to lower (AbstractMesh is refused: 'primitives that require devices'), so this
  runs on 8 simulated CPU devices. Under a mesh the module holds a CustomSPMDPartitioning call
  whose per-device body, the cuDNN call, XLA's partitioner builds when it compiles: the
  callback it will run is checked to be cuDNN's attention (forward and backward)."""
  script = textwrap.dedent(f'''
      import json, sys
      sys.path.insert(0, 'tests')
      import jax
      jax.config.update('jax_num_cpu_devices', 8)
      import lowering_test as t
      from mla_jax import sharding
      out = {{}}
      with t.declared_cuda_target():
        for name in {SHARDED!r}:
          sizes = dict(zip(sharding.MESH_AXES, t.mesh_sizes(t.config(name, 'gpu'))))
          op, found, _ = t.sharded_step(name, 'gpu', sharding.make_mesh(sizes))
          out[name] = [op.whole, sorted(found)]
      print(json.dumps(out))
      ''')
  run = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert set(result) == set(SHARDED)
  for name, (whole, found) in result.items():
    want = {'cudnn (partitioned)', 'cudnn backward (partitioned)'} if whole == 'cudnn' else set()
    assert set(found) == want, (name, whole, found)
  assert result['mla'][0] == result['gqa'][0] == 'cudnn'


def test_the_kernels_chosen_for_a_tpu_are_what_a_run_records_and_prints():
  """The trainer records model.op.to_dict() in config.json's "kernels" and prints str(op)
  (training/loop.py): on a TPU that names splash, XLA's prefill and Mosaic."""
  with platform.lowering_for('tpu'):
    graphdef, state = train_state(config('mla', 'tpu'))
  op = nnx.merge(graphdef, state)[0].op
  assert op.to_dict() == dict(platform='tpu', whole='splash', prefill='xla', decode='mosaic',
                              interpret=False)
  assert str(op) == ('attention on tpu: whole sequences splash, prefill xla, decode steps '
                     'mosaic')


def test_lowering_for_names_a_platform_and_ends():
  with platform.lowering_for('tpu'):
    assert platform.current() == 'tpu'
  assert platform.current() == 'cpu'
  with pytest.raises(ValueError, match='use one of'), platform.lowering_for('cuda'):
    pass
