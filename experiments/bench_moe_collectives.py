r"""What the MoE train step communicates under expert parallelism, read from its compiled HLO.

  python -m experiments.bench_moe_collectives   # experiments/results/bench_moe_collectives/
  python -m experiments.bench_moe_collectives --quick --out=/tmp/moe   # tiny config, 1 step

For configs/mla_moe.py's model on 8 simulated CPU devices and each mesh (data, fsdp, tensor,
expert), the train step is compiled twice: with the MoE layers' experts in shard_map (the
path a mesh takes, mla_jax.moe.experts_sharded: tokens all-gathered within the expert axis,
outputs reduce-scattered back) and with their tokens' travel left to XLA's SPMD partitioner
(moe.derived_collectives). For each, every collective of the compiled program is counted and
sized: the bytes a device sends by the usual algorithms (ring all-gather and reduce-scatter
(g - 1)/g of the whole, all-reduce twice that, all-to-all (g - 1)/g, a permute its buffer to
another device), split by what it carries (`kind_of`): expert weights, the other weights (and
their gradients), the MoE layers' activations and the rest. Beside
them: what an ideal all-to-all dispatch would send (each device's N' K rows of d values,
(n - 1)/n of them off the device, there and back, forward and backward) and the expert
weights' bytes. Simulated devices share this machine's cores: the step times are indicative
only, the bytes are the measure.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import jax
from absl import app, flags

from experiments import common, tables
from experiments.timing import time_train_step
from mla_jax import cli, moe, sharding
from mla_jax.config import ModelConfig
from mla_jax.model import param_shapes

FLAGS = flags.FLAGS
flags.DEFINE_integer('devices', 8, 'simulated CPU devices')
flags.DEFINE_string('config', 'mla_moe', 'configs/<name>.py to measure (a MoE model)')
flags.DEFINE_multi_string('mesh', ['8,1,1,1', '1,1,1,8', '1,2,1,4'],
                          'data,fsdp,tensor,expert; repeat the flag (the first is the baseline)')
flags.DEFINE_integer('steps', 2, 'timed calls of the train step per mesh and path')
# XLA's derived path holds every row of the batch on every device: at the config's 32 x 256
# tokens the eight simulated devices' buffers took 16 GiB, more than this machine has free.
flags.DEFINE_integer('batch_size', 8, 'sequences per step (0: the config\'s)')

COLLECTIVES = tables.MOE_COLLECTIVES
KINDS = ('expert weights', 'other weights', 'moe activations', 'other')
_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1}
_OP = re.compile(r'=\s*(.*?)\s(' + '|'.join(COLLECTIVES) + r')(?:-start)?\((.*)$')


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(dtype, tuple(int(d) for d in dims.split(',') if d))
          for dtype, dims in re.findall(r'\b([a-z]+\d*)\[([\d,]*)\]', text)
          if dtype in _DTYPE_BYTES]


def group_size(attrs: str, mesh_sizes: dict[str, int]) -> int:
  """The devices of one replica group, in any of the ways XLA prints them."""
  named = re.search(r"mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
  if named:
    axes = dict((a, int(s)) for a, s in re.findall(r"'(\w+)'=(\d+)", named.group(1)))
    return math.prod(axes[a] for a in re.findall(r"'(\w+)'", named.group(2)))
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]<=', attrs)
  if iota:
    return int(iota.group(2))
  listed = re.search(r'replica_groups=\{\{([\d,]*)\}', attrs)
  if listed:
    return len(listed.group(1).split(','))
  pairs = re.findall(r'\{(\d+),(\d+)\}', attrs)  # collective-permute: source -> target pairs
  return len(pairs) or math.prod(mesh_sizes.values())


def sent_bytes(op: str, size: int, g: int, attrs: str) -> float:
  """Bytes one device sends for a collective whose result is `size` bytes on each device."""
  if op == 'collective-permute':
    pairs = re.findall(r'\{(\d+),(\d+)\}', attrs)
    moved = sum(a != b for a, b in pairs)
    return size * moved / max(len(pairs), 1)
  if g <= 1:
    return 0.0
  return {'all-gather': size * (g - 1) / g, 'reduce-scatter': size * (g - 1),
          'all-reduce': 2 * size * (g - 1) / g, 'all-to-all': size * (g - 1) / g}[op]


def is_expert_weight(path: tuple, shape: tuple) -> bool:
  """A routed experts' stacked weight [E, ...] (not the shared experts' or a dense MLP's)."""
  return path[-1] in ('w_gate', 'w_up', 'w_down') and len(shape) == 3


def weight_shapes(cfg: ModelConfig) -> tuple[set, set]:
  """(expert weight shapes, other parameter shapes), each with its shards by 2, 4 and 8 along
  any one dimension (what a gather or a gradient's reduction carries)."""
  def with_shards(shape):
    out = {shape}
    for i, d in enumerate(shape):
      out |= {(*shape[:i], d // n, *shape[i + 1:]) for n in (2, 4, 8) if d % n == 0}
    return out

  experts, other = set(), set()
  for path, shape in param_shapes(cfg).items():
    (experts if is_expert_weight(path, shape) else other).update(with_shards(shape))
  return experts, other - experts


def kind_of(op: str, shape: tuple, op_name: str, experts: set, other: set, tokens: int) -> str:
  """What a collective's array carries: parameter shapes (or their shards) are weights or their
  gradients, except that the shard_map's own all-gathers and reduce-scatters carry only tokens
  (its all-reduces are its weights' gradients); XLA's derived collectives under a block's mlp
  carry the whole batch's rows ([tokens x ...])."""
  if shape in experts:
    return 'expert weights'
  if '/mlp/shard_map/' in op_name and op != 'all-reduce':
    return 'moe activations'
  if shape in other:
    return 'other weights'
  if '/mlp/' in op_name and shape and shape[0] % tokens == 0:
    return 'moe activations'
  return 'other'


def collectives(hlo: str, cfg: ModelConfig, mesh_sizes: dict[str, int], tokens: int) -> dict:
  """{op: {count, sent bytes by kind}} over the compiled program's collectives (tokens: the
  step's, b * t)."""
  experts, other = weight_shapes(cfg)
  out = {op: {'count': 0, **dict.fromkeys(KINDS, 0.0)} for op in COLLECTIVES}
  for line in hlo.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    result, op, attrs = match.groups()
    g = group_size(attrs, mesh_sizes)
    out[op]['count'] += 1
    for dtype, shape in _shapes(result):
      size = math.prod(shape) * _DTYPE_BYTES[dtype]
      op_name = re.search(r'op_name="([^"]*)"', attrs)
      kind = kind_of(op, shape, op_name.group(1) if op_name else '', experts, other, tokens)
      out[op][kind] += sent_bytes(op, size, g, attrs)
  return out


def all_to_all_bytes(config, cfg: ModelConfig, mesh_sizes: dict[str, int]) -> float:
  """What an ideal all-to-all dispatch sends per device per step: each MoE layer moves the
  device's N' K rows of d values there and back, forward and backward, (n - 1)/n of them off
  the device (n = the expert axis; uniform routing)."""
  n = mesh_sizes['expert']
  tokens = config.data.batch_size * config.data.seq_len // math.prod(mesh_sizes.values())
  layers = sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))
  row = cfg.d_model * 4  # float32 activations on a CPU
  return 4 * layers * tokens * cfg.num_experts_per_tok * row * (n - 1) / n


def measure(config, cfg, sizes: dict, path: str, steps: int) -> dict:
  derived = moe.derived_collectives() if path == 'derived' else contextlib.nullcontext()
  with derived:
    timed = time_train_step(config, sharding.make_mesh(sizes), steps)
  found = collectives(timed['hlo'], cfg, sizes, config.data.batch_size * config.data.seq_len)
  kinds = {k: sum(found[op][k] for op in COLLECTIVES) for k in KINDS}
  return {'mesh': sizes, 'path': path, 'step_s': timed['step_s'], 'compile_s': timed['compile_s'],
          'collectives': found, 'sent_bytes': kinds, 'sent_total': sum(kinds.values()),
          'all_to_all_bytes': all_to_all_bytes(config, cfg, sizes)}


def main(argv):
  del argv
  cli.quiet_logging()
  # Simulated devices are threads sharing a few cores: a slow step can leave one 40 s behind
  # the others at a collective, which XLA:CPU's default would end as stuck.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '.join(
      f' --xla_cpu_collective{kind}_timeout_seconds=1800'
      for kind in ('', '_call_terminate', '_call_warn_stuck')))
  jax.config.update('jax_num_cpu_devices', FLAGS.devices)
  config = common.load_config(FLAGS.config, 'tiny' if FLAGS.quick else '')
  if FLAGS.batch_size and not FLAGS.quick:
    config.data.batch_size = FLAGS.batch_size
  cfg = ModelConfig.from_dict(config.model)
  if not cfg.n_routed_experts:
    raise SystemExit(f'error: configs/{FLAGS.config}.py has no routed experts; use a MoE config')
  meshes = FLAGS.mesh[:2] if FLAGS.quick else FLAGS.mesh
  steps = 1 if FLAGS.quick else FLAGS.steps
  expert_bytes = sum(math.prod(s) * 4 for p, s in param_shapes(cfg).items()
                     if is_expert_weight(p, s))
  rows = []
  path = common.out_dir('bench_moe_collectives') / 'bench_moe_collectives.json'
  meta = {'devices': f'{FLAGS.devices} simulated {jax.devices()[0].platform} devices',
          'config': FLAGS.config, 'expert_weight_bytes': expert_bytes,
          'tokens_per_step': config.data.batch_size * config.data.seq_len}
  for mesh_arg in meshes:
    sizes = dict(zip(sharding.MESH_AXES, map(int, mesh_arg.split(',')), strict=True))
    for how in ('derived', 'shard_map'):
      rows.append(measure(config, cfg, sizes, how, steps))
      print({k: v for k, v in rows[-1].items() if k != 'collectives'}, flush=True)
      common.write_json(path, {**meta, 'rows': rows})
  print(f'expert weights: {expert_bytes / 2**20:.1f} MiB (float32, all MoE layers)')
  print('\n'.join(tables.bench_moe_collectives_table({'rows': rows})))
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
