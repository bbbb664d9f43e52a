"""Sharded training, evaluation, decoding and checkpoints on simulated CPU devices, and a
two-process run over gloo. Each case runs in a subprocess: the device count is fixed when
jax starts."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from mla_jax import sharding, training

pytestmark = pytest.mark.slow  # every case starts jax in a subprocess with 8 devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]

PRELUDE = '''
import jax
jax.config.update('jax_num_cpu_devices', {devices})
jax.config.update('jax_numpy_rank_promotion', 'raise')
import json, sys
import numpy as np
from flax import nnx
from configs import gqa, mha, mla
from mla_jax import data, decode, sharding, tasks, training
from mla_jax import workdir as wd
CORPUS = {corpus!r}

def tiny(module):
  c = module.get_config('tiny')
  c.data.files = CORPUS
  return c

def mesh_of(sizes, n=None):
  devices = jax.devices()[:n or int(np.prod(sizes))]
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, sizes)), devices)

def losses_on(config, sizes, steps):
  """The first `steps` training losses of config under a mesh of these sizes."""
  mesh = mesh_of(sizes)
  with jax.set_mesh(mesh):
    graphdef, state, shardings = training.init_state(config, mesh)
    layout, shape, rows = training.batch_layout(config, mesh)
    step = training.jit_train_step(graphdef, shardings, layout)
    sampler = data.WindowSampler(data.load_splits(config.data)['train'], config.data.seq_len,
                                 config.data.batch_size, config.seed, rows=rows)
    out = []
    for i in range(steps):
      batch = {{k: sharding.global_batch(x, layout, shape)
                for k, x in tasks.text_batch(sampler[i]).items()}}
      state, metrics = step(state, batch)
      out.append(float(metrics['loss']))
  return out
'''


def run_python(code: str, corpus: str, devices: int = 8, timeout: int = 600):
  script = textwrap.dedent(PRELUDE.format(devices=devices, corpus=corpus)) + textwrap.dedent(code)
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_cpu_train_step_compiles_first_under_a_mesh_of_several_devices(corpus):
  """The trainer's XLA:CPU options are looked up once, on a one-device mesh of their own,
  whatever mesh the first train step is built under (as the train command builds it)."""
  loss, options = run_python('''
  config = tiny(mla)
  mesh = mesh_of((8, 1, 1))
  with jax.set_mesh(mesh):
    graphdef, state, shardings = training.init_state(config, mesh)
    layout, shape, rows = training.batch_layout(config, mesh)
    step = training.jit_train_step(graphdef, shardings, layout)
    windows = np.random.default_rng(0).integers(0, 256, (*shape[:-1], shape[-1] + 1))
    batch = jax.device_put(tasks.text_batch(windows.astype(np.int32)), layout)
    state, metrics = step(state, batch)
  print(json.dumps([float(metrics['loss']), training.cpu_compiler_options()]))
  ''', corpus)
  assert 5.0 < loss < 6.0  # about ln 256 at the start
  assert options.items() <= training.CPU_COMPILER_OPTIONS.items()


@pytest.mark.long
def test_five_steps_match_one_device_on_every_mesh(corpus):
  losses = run_python(f'''
  result = {{}}
  for name, module in (('mha', mha), ('gqa', gqa), ('mla', mla)):
    config = tiny(module)
    for sizes in [(1, 1, 1)] + {MESHES!r}:
      result[f'{{name}} {{sizes}}'] = losses_on(config, sizes, 5)
  print(json.dumps(result))
  ''', corpus)
  for name in ('mha', 'gqa', 'mla'):
    reference = losses[f'{name} (1, 1, 1)']
    assert reference[-1] < reference[0] - 0.1  # it trains
    for sizes in MESHES:
      np.testing.assert_allclose(losses[f'{name} {sizes}'], reference, rtol=1e-5,
                                 err_msg=f'{name} {sizes}')


def test_moe_steps_match_one_device_with_the_experts_split(corpus):
  """Expert parallelism: a tiny DeepSeek-V3-style MoE (8 experts, top-2 of 4 groups keeping 2,
  the router bias updated every step) trains to the same losses with its experts split over
  8 devices, and over fsdp 2 x expert 4, as on one device."""
  losses = run_python('''
  config = tiny(mla)
  config.model.update(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                      moe_intermediate_size=32, first_k_dense_replace=1, scoring_func='sigmoid',
                      topk_method='noaux_tc', n_group=4, topk_group=2, norm_topk_prob=True,
                      routed_scaling_factor=2.5, bias_update_speed=1e-3)
  sizes = [(1, 1, 1, 1), (1, 1, 1, 8), (1, 2, 1, 4)]
  out = {str(s): losses_on(config, s, 4) for s in sizes}
  mesh = mesh_of((1, 1, 1, 8))
  shardings = training.init_state(config, mesh)[2]
  # the experts' leading [E] dimension (weights and their optimizer moments), as laid out
  out['experts'] = sorted({str(v.get_value().spec[0]) for path, v in nnx.to_flat_state(shardings)
                           if path[-1] in ('w_gate', 'w_up', 'w_down')
                           and len(v.get_value().spec) == 3})
  print(json.dumps(out))
  ''', corpus)
  assert losses['experts'] == ['expert']  # split over the expert axis, not replicated
  reference = losses['(1, 1, 1, 1)']
  assert reference[-1] < reference[0] - 0.1  # it trains
  for sizes in ('(1, 1, 1, 8)', '(1, 2, 1, 4)'):
    np.testing.assert_allclose(losses[sizes], reference, rtol=1e-5, err_msg=sizes)


def test_moe_shard_map_path_matches_one_device_in_loss_and_gradients(corpus):
  """The experts under a mesh (moe.experts_sharded: tokens all-gathered within the expert axis,
  outputs reduce-scattered back) give one device's loss and gradients of every parameter, on
  expert = 8, fsdp 2 x expert 4 and data 2 x tensor 2 x expert 2 (the dense reference on expert
  = 8), with routing skewed so some experts get no token; and a mesh takes that path (the
  program has the shard_map), unless derived_collectives asks for XLA's own."""
  result = run_python('''
  from mla_jax import moe
  from mla_jax.config import ModelConfig
  from mla_jax.model import Transformer
  out = {}
  tokens = np.random.default_rng(1).integers(0, 64, (8, 17)).astype(np.int32)
  for impl, meshes in (('ragged', [(1, 1, 1, 8), (1, 2, 1, 4), (2, 1, 2, 2)]),
                       ('dense', [(1, 1, 1, 8)])):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=32,
                      attention='mla', kv_lora_rank=16, qk_rope_head_dim=4,
                      n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                      moe_intermediate_size=16, first_k_dense_replace=1,
                      scoring_func='sigmoid', topk_method='noaux_tc', n_group=4, topk_group=2,
                      norm_topk_prob=True, routed_scaling_factor=2.5, moe_impl=impl,
                      attention_impl='einsum')  # one program for every mesh
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    moe_layer = model.blocks[1].mlp
    # skew the routing: experts 0-1 favoured by the bias, 6-7 never reached
    moe_layer.e_score_correction_bias[...] = np.array([2., 2., 0, 0, 0, 0, -9., -9.], np.float32)
    graphdef, state = nnx.split(model)

    def loss(state, tokens):
      logits = nnx.merge(graphdef, state)(tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jax.numpy.mean(jax.numpy.take_along_axis(logp, tokens[:, 1:, None], -1))

    grad = jax.jit(jax.value_and_grad(loss))
    runs = {}
    for sizes in [(1, 1, 1, 1)] + meshes:
      mesh = mesh_of(sizes)
      with jax.set_mesh(mesh):
        placed = jax.device_put(state, sharding.state_shardings(state, mesh))
        rows = jax.device_put(tokens, sharding.named_sharding(mesh, ('batch', None), tokens.shape))
        value, grads = grad(placed, rows)
        runs[sizes] = (float(value), {k: np.asarray(v) for k, v in nnx.to_flat_state(grads)})
        if sizes == (1, 1, 1, 8):
          program = lambda: str(jax.make_jaxpr(lambda s, r: loss(s, r))(placed, rows))
          out[f'{impl} program'] = 'shard_map' in program()
          with moe.derived_collectives():
            out[f'{impl} derived'] = 'shard_map' in program()
    ref_value, ref = runs[(1, 1, 1, 1)]
    for sizes, (value, grads) in runs.items():
      out[f'{impl} {sizes} loss'] = abs(value - ref_value) / ref_value
      out[f'{impl} {sizes} grad'] = max(float(np.max(np.abs(grads[k] - ref[k])))
                                        / (float(np.max(np.abs(ref[k]))) or 1.0) for k in ref)
    out[f'{impl} moe grad'] = float(np.max(np.abs(ref[('blocks', 1, 'mlp', 'w_up')])))
    out[f'{impl} unused expert grad'] = float(np.max(np.abs(ref[('blocks', 1, 'mlp', 'w_up')][6:])))
  print(json.dumps(out))
  ''', corpus)
  for impl, meshes in (('ragged', ('(1, 1, 1, 8)', '(1, 2, 1, 4)', '(2, 1, 2, 2)')),
                       ('dense', ('(1, 1, 1, 8)',))):
    assert result[f'{impl} program'] and not result[f'{impl} derived'], result
    assert result[f'{impl} moe grad'] > 1e-4 and result[f'{impl} unused expert grad'] == 0.0
    for sizes in meshes:
      assert result[f'{impl} {sizes} loss'] < 1e-6, (impl, sizes, result)
      assert result[f'{impl} {sizes} grad'] < 1e-5, (impl, sizes, result)


@pytest.mark.long
def test_decode_with_sharded_batch_and_caches_matches_one_device(corpus):
  result = run_python('''
  from mla_jax.model import Transformer
  from mla_jax.config import ModelConfig
  out = {}
  for name, extra in (('mha', {}), ('mla', dict(kv_lora_rank=32, qk_rope_head_dim=8)),
                      ('gla', dict(kv_lora_rank=32, qk_rope_head_dim=8, latent_heads=2))):
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=32, attention=name, **extra)
    prompts = np.random.default_rng(0).integers(0, 256, (4, 12)).astype(np.int32)
    lengths = np.array([12, 5, 9, 12], np.int32)
    runs = {}
    for sizes in [(1, 1, 1), (2, 2, 2)]:
      mesh = mesh_of(sizes)
      with jax.set_mesh(mesh):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        state = jax.device_put(state, sharding.state_shardings(state, mesh))
        caches = model.init_cache(4, 32)
        rows = sharding.named_sharding(mesh, ('batch', None), prompts.shape)
        lengths_rows = sharding.named_sharding(mesh, ('batch',), (4,))
        logits, caches = decode.prefill(graphdef, state, caches, jax.device_put(prompts, rows),
                                        jax.device_put(lengths, lengths_rows))
        steps = [np.asarray(logits)]
        token = np.argmax(steps[-1], -1).astype(np.int32)
        for i in range(3):
          logits, caches = decode.decode_step(graphdef, state, caches, token, lengths + i)
          steps.append(np.asarray(logits))
          token = np.argmax(steps[-1], -1).astype(np.int32)
        runs[sizes] = steps
        first = jax.tree.leaves(caches[0])[0]
        spec = [list(a) if isinstance(a, tuple) else a for a in first.sharding.spec]
        while spec and spec[-1] is None:
          spec.pop()
        out[f'{name} spec'] = spec
    out[name] = max(float(np.max(np.abs(a - b))) for a, b in zip(runs[(1, 1, 1)], runs[(2, 2, 2)]))
  print(json.dumps(out))
  ''', corpus)
  assert result['mha'] < 1e-5 and result['mla'] < 1e-5 and result['gla'] < 1e-5, result
  assert result['mha spec'] == [['data', 'fsdp'], 'tensor']  # k [b, g, s, k]: batch and heads
  assert result['mla spec'] == [['data', 'fsdp']]  # c_kv [b, s, c]: batch only
  # GLA's c_kv [b, g, s, c / g]: its latent heads split over tensor, d_c / g a device
  assert result['gla spec'] == [['data', 'fsdp'], 'tensor']


@pytest.mark.long  # minutes of 8-device subprocesses
def test_checkpoint_restores_under_other_meshes(corpus, tmp_path):
  saved = tmp_path / 'saved.npz'
  run_python(f'''
  config = tiny(mla)
  config.mesh.update(data=8, fsdp=1, tensor=1)
  config.train.update(steps=2, checkpoint_every=2, eval_every=100)
  training.train_and_evaluate(config, {str(tmp_path / 'run')!r}, final_eval=False)
  saved = {{}}
  for sizes in [(8, 1, 1), (2, 4, 1)]:
    model, _ = wd.load_workdir({str(tmp_path / 'run')!r}, mesh=mesh_of(sizes))
    flat = {{'/'.join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}}
    saved[str(sizes)] = flat
  a, b = saved['(8, 1, 1)'], saved['(2, 4, 1)']
  assert all(np.array_equal(a[k], b[k]) for k in a)
  w = model.blocks[0].attn.w_q[...]
  assert w.sharding.spec[0] == 'fsdp' and not any(w.sharding.spec[1:]), w.sharding.spec
  np.savez({str(saved)!r}, **saved['(2, 4, 1)'])
  print(json.dumps(len(saved['(8, 1, 1)'])))
  ''', corpus)
  n = run_python(f'''
  model, _ = wd.load_workdir({str(tmp_path / 'run')!r})  # one device, no mesh
  saved = np.load({str(saved)!r})
  flat = {{'/'.join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model))}}
  assert set(flat) == set(saved.files)
  assert all(np.array_equal(flat[k], saved[k]) for k in flat)
  print(json.dumps(len(flat)))
  ''', corpus, devices=1)
  assert n > 10


def _cli(args, devices=8, **kw):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = {**os.environ, 'XLA_FLAGS': flags.strip(),
         'JAX_PLATFORMS': 'cpu'}
  return subprocess.Popen([sys.executable, '-m', *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.parametrize('mesh, message', [
    ('--config.mesh.data=3',
     'mesh data=3 x fsdp=1 x tensor=1 x expert=1 has 3 slots but there are 8'),
    ('--config.mesh.tensor=8', 'is not divisible by mesh axis tensor=8'),
    ('--config.model.n_routed_experts=6 --config.model.num_experts_per_tok=2 '
     '--config.model.moe_intermediate_size=32 --config.mesh.data=2 --config.mesh.expert=4',
     'experts=6 is not divisible by mesh axis expert=4'),
])
def test_bad_mesh_is_one_clear_line(corpus, tmp_path, mesh, message):
  proc = _cli(['mla_jax.train', '--config=configs/mla.py:tiny', f'--workdir={tmp_path / "w"}',
               f'--config.data.files={corpus}', *mesh.split()])
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1
  last = err.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, err[-2000:]
  assert not (tmp_path / 'w').exists()


def test_make_mesh_fills_the_rest_and_refuses_two_rules_on_one_axis():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  assert mesh.shape['data'] == len(jax.devices())
  with pytest.raises(sharding.ShardingError, match='at most one -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1, 'tensor': 1})
  with pytest.raises(sharding.ShardingError, match="both map to mesh axis 'tensor'"):
    sharding.logical_to_spec(('heads', 'mlp'), (8, 8), {'data': 1, 'fsdp': 1, 'tensor': 2})
  with pytest.raises(sharding.ShardingError, match='no rule'):
    sharding.logical_to_spec(('expert',), (8,), {'data': 2})
  spec = sharding.logical_to_spec(('batch', None, 'heads'), (8, 3, 4),
                                  {'data': 2, 'fsdp': 2, 'tensor': 2})
  assert spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'tensor')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(args):
  port = _free_port()
  procs = [_cli([*args, f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}'], devices=2) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  return outs[0]


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').open()]
  return [r['loss'] for r in rows if 'loss' in r]


@pytest.mark.long
def test_two_processes_train_and_evaluate_like_one(corpus, tmp_path):
  train = ['mla_jax.train', '--config=configs/mla.py:tiny', f'--config.data.files={corpus}',
           '--config.train.steps=3', '--config.train.eval_every=100']
  one, two = tmp_path / 'one', tmp_path / 'two'
  proc = _cli([*train, f'--workdir={one}'], devices=1)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  _, log = _two_processes([*train, f'--workdir={two}'])
  assert 'over 4 devices in 2 processes' in log
  assert len(_losses(one)) == 3
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5)

  proc = _cli(['mla_jax.evaluate', f'--workdir={one}'], devices=1)
  single, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  double, _ = _two_processes(['mla_jax.evaluate', f'--workdir={one}'])
  value = lambda text: float(re.search(r'perplexity ([\d.]+)', text).group(1))
  assert value(single) > 1 and value(double) == pytest.approx(value(single), rel=1e-5)
  assert '(4 devices, 2 processes)' in double
