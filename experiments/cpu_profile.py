r"""Where the train step's time goes on CPU, ours (XLA) and the transformers peer's (torch).

  python -m experiments.cpu_profile --variants=mla,mha

Two views, each measured for both frameworks in one process:
  phases  forward (loss), forward + backward, and the optimizer update (clip + AdamW) alone
          on fixed gradients, timed alternately (see timing.compare).
  ops     one profiled step: XLA's per-thunk trace (--xla_cpu_enable_xprof_traceme, set
          here before jax starts) grouped by kind (matmul, elementwise, with a transpose or
          a reduction inside) and by the source einsum or primitive; torch.profiler's
          self CPU time per aten op.
Shares are of the summed thunk (or op) time over threads, not of wall time.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_cpu_enable_xprof_traceme=true').strip()

import jax
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from experiments import timing, torch_peer
from mla_jax import cli, sharding, tasks, training
from mla_jax.config import ModelConfig

FLAGS = flags.FLAGS
flags.DEFINE_list('variants', ['mla', 'mha'], 'configs/<name>.py to profile')
flags.DEFINE_integer('batch', 16, 'windows per step')
flags.DEFINE_integer('seq_len', 256, 'tokens per window')
flags.DEFINE_integer('blocks', 4, 'alternating blocks for the phase timings')
flags.DEFINE_integer('top', 30, 'rows of the per-op tables')


# --- phases ------------------------------------------------------------------------------
def jax_phases(config) -> dict[str, timing.Step]:
  """forward, forward + backward and the optimizer update of the trainer's step, each jitted
  on its own (unsharded: one CPU device)."""
  graphdef, state, _ = training.init_state(config, sharding.make_mesh(config.mesh))
  model_def, params = nnx.split(nnx.merge(graphdef, state)[0])
  batch = jax.tree.map(jax.numpy.asarray, tasks.text_batch(np.random.default_rng(0).integers(
      0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1))))
  loss = jax.jit(lambda p, b: training.loss_fn(nnx.merge(model_def, p), b))
  grad = jax.jit(jax.value_and_grad(lambda p, b: training.loss_fn(nnx.merge(model_def, p), b)))
  grads = grad(params, batch)[1]

  @jax.jit
  def update(state, grads):
    model, opt = nnx.merge(graphdef, state)
    opt.update(model, grads)
    return nnx.state((model, opt)), optax.tree.norm(grads)

  return {'forward': lambda: jax.block_until_ready(loss(params, batch)),
          'forward+backward': lambda: jax.block_until_ready(grad(params, batch)),
          'update': timing.carried(update, state, grads)}


def torch_phases(model_cfg, batch: int, seq_len: int, **opt) -> dict[str, timing.Step]:
  """The same three phases of torch_peer.torch_step's model and optimizer."""
  forward, optimizer, clip = torch_peer.torch_step(model_cfg, batch, seq_len, **opt).parts

  def forward_backward():
    forward().backward()

  forward_backward()  # gradients exist from here on, for the update alone

  def update():
    clip()
    optimizer.step()

  return {'forward': forward, 'forward+backward': forward_backward, 'update': update}


# --- ops ---------------------------------------------------------------------------------
def _hlo_index(hlo: str):
  """{instruction: (opcode, line)} and {computation: body text} of compiled HLO text."""
  bodies, current, instructions = {}, None, {}
  for line in hlo.splitlines():
    head = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head:
      current = head.group(1)
      bodies[current] = []
      continue
    if current:
      bodies[current].append(line)
    m = re.match(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w\-]*)\(', line)
    if m:
      instructions[m.group(1)] = (m.group(2), line)
  return instructions, {k: '\n'.join(v) for k, v in bodies.items()}


def _kind_and_source(name: str, instructions, bodies):
  """('matmul' | 'elementwise[+transpose][+reduce]', 'fwd|bwd <einsum or primitive>')."""
  op, line = instructions[name]
  source = re.search(r'op_name="([^"]*)"', line)
  source = source.group(1) if source else ''
  direction = 'bwd' if 'transpose(' in source else 'fwd'
  ops, body = {op}, ''
  if op == 'fusion':
    called = re.search(r'calls=%?([\w.\-]+)', line)
    body = bodies.get(called.group(1), '') if called else ''
    ops = set(re.findall(r'= \S+ ([a-z\-]+)\(', body))
  einsums = re.findall(r'(\w+,\w+->\w+)', body if 'dot' in ops else source)
  if 'dot' in ops:
    kind = 'matmul'
  else:
    kind = ('elementwise' + ('+transpose' if ops & {'transpose', 'copy'} else '') +
            ('+reduce' if 'reduce' in ops else ''))
  what = einsums[0] if einsums else re.sub(r'\W+$', '', source.split('/')[-1])
  return kind, f'{direction} {what}'


def jax_ops(config, steps: int = 2) -> dict:
  """{'kinds': {kind: ms per step}, 'sources': {(kind, source): ms per step}} over threads."""
  from jax.profiler import ProfileData

  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    state, step, batch = timing.fixed_batch_step(config, mesh)
    instructions, bodies = _hlo_index(step.lower(state, batch).compile().as_text())
    for _ in range(2):
      state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as trace_dir:
      jax.profiler.start_trace(trace_dir)
      for _ in range(steps):
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      trace = ProfileData.from_file(glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)[0])
  kinds, sources = collections.Counter(), collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in instructions:  # thunks; not the executor's own events
          kind, source = _kind_and_source(event.name, instructions, bodies)
          kinds[kind] += event.duration_ns / steps / 1e6
          sources[kind, source] += event.duration_ns / steps / 1e6
  return {'kinds': dict(kinds), 'sources': dict(sources)}


def torch_ops(model_cfg, batch: int, seq_len: int, steps: int = 2, **opt) -> dict:
  """{aten op: self CPU ms per step} of torch_peer's step."""
  import torch

  step = torch_peer.torch_step(model_cfg, batch, seq_len, **opt)
  for _ in range(2):
    step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  return {e.key: e.self_cpu_time_total / steps / 1e3 for e in prof.key_averages()}


def _shares(title: str, ms: dict, top: int) -> list[str]:
  total = sum(ms.values())
  lines = [f'{title}: {total:.0f} ms per step (summed over threads)']
  for key, v in sorted(ms.items(), key=lambda kv: -kv[1])[:top]:
    shown = '  '.join(key) if isinstance(key, tuple) else key
    lines.append(f'  {100 * v / total:5.1f}%  {v:7.1f} ms  {shown}')
  return lines


def main(argv):
  del argv
  cli.quiet_logging()
  for variant in FLAGS.variants:
    config = torch_peer.peer_config(variant, FLAGS.batch, FLAGS.seq_len)
    model_cfg = ModelConfig.from_dict(config.model)
    args = (model_cfg, FLAGS.batch, FLAGS.seq_len)
    opt = torch_peer.opt_kwargs(config)
    phases = {f'jax {k}': v for k, v in jax_phases(config).items()}
    phases.update({f'torch {k}': v for k, v in torch_phases(*args, **opt).items()})
    timed = timing.compare(phases, FLAGS.batch * FLAGS.seq_len, FLAGS.blocks, 2)
    print(f'== {variant}: phases, median ms (min) over {FLAGS.blocks} alternating blocks')
    for name in phases:
      print(f"  {name:24s} {1e3 * timed[name]['step_s']:7.0f} "
            f"({1e3 * timed[name]['step_s_min']:.0f})")
    ours = jax_ops(config)
    print('\n'.join(_shares(f'== {variant}: jax by kind', ours['kinds'], 10)))
    print('\n'.join(_shares(f'== {variant}: jax by source', ours['sources'], FLAGS.top)))
    print('\n'.join(_shares(f'== {variant}: torch by op', torch_ops(*args, **opt), FLAGS.top)))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
