r"""One layer's causal attention on a CPU, forward and forward + backward: the einsum reference
and the C++ kernel (mla_jax.kernels.cpu_attention), each as attention_op.AttentionOp.causal
runs it in a model (the einsum path with its transposes to heads-first), and torch's sdpa
where torch is installed (the dev extra), timed alternately in one process.

  python -m experiments.cpu_attention_bench             # experiments/results/cpu_attention_bench/
  python -m experiments.cpu_attention_bench --quick --out=/tmp/attn

Shapes: the default model at batch 16 x 256 (8 heads): MHA (query/key and value width 32) and
MLA's naive training path (query/key 48 = d_n 32 + d_r 16, values 32; torch's sdpa takes
unequal widths on its math path, not its flash kernel). float32. The "ms" columns are the
median wall time of a call, the JSON's "cpu_ms" its CPU time summed over threads
(timing.compare: blocks of calls, alternating). --quick: batch 2 x 64 tokens.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import common, tables, timing, torch_peer
from mla_jax import attention_op, cli
from mla_jax.kernels import cpu_attention

FLAGS = flags.FLAGS
flags.DEFINE_integer('blocks', 4, 'alternating blocks')
flags.DEFINE_integer('block_steps', 5, 'calls of each per block')

HEADS = 8
SHAPES = {'mha': (32, 32), 'mla': (48, 32)}  # (query/key width, value width)


def _calls(e: int, v: int, batch: int, t: int) -> dict[str, timing.Step]:
  """{'<impl> fwd' / '<impl> fwd+bwd': a blocking call} for einsum, kernel and torch."""
  rng = np.random.default_rng(0)
  q, k, values, do = (rng.standard_normal(s).astype(np.float32) for s in (
      (batch, HEADS, t, e), (batch, HEADS, t, e), (batch, HEADS, t, v), (batch, HEADS, t, v)))
  # ours in the model's token-major layout [b, t, heads, (1,) .]; torch's heads first
  token_major = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))
  args = [token_major(q)[:, :, :, None], token_major(k), token_major(values)]
  cot = token_major(do)[:, :, :, None]
  calls = {}
  for name, whole in (('einsum', 'einsum'), ('kernel', 'cpu_kernel')):
    op = attention_op.AttentionOp('cpu', whole)
    attend = lambda *x, op=op: op.causal(*x, e**-0.5)
    fwd = jax.jit(attend)
    grad = jax.jit(jax.grad(lambda *x, f=attend: jnp.sum(f(*x) * cot), argnums=(0, 1, 2)))
    calls[f'{name} fwd'] = lambda f=fwd: jax.block_until_ready(f(*args))
    calls[f'{name} fwd+bwd'] = lambda f=grad: jax.block_until_ready(f(*args))
  if not torch_peer.available():
    return calls
  import torch

  tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, values))
  tdo = torch.tensor(do)
  sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
  calls['torch fwd'] = sdpa
  # gradients returned, not accumulated into .grad: the same work as jax.grad's
  calls['torch fwd+bwd'] = lambda: torch.autograd.grad(sdpa(), (tq, tk, tv), tdo)
  return calls


def main():
  if not cpu_attention.available():
    sys.exit('error: the CPU attention kernel did not build here: put a C++ compiler on PATH '
             '(or name one in CXX)')
  cores = len(common.available_cores())
  if torch_peer.available():
    import torch
    torch.set_num_threads(cores)
  else:
    print(torch_peer.MISSING, flush=True)
  batch, t = (2, 64) if FLAGS.quick else (16, 256)
  results = {}
  for variant, (e, v) in SHAPES.items():
    timed = timing.compare(_calls(e, v, batch, t), batch * t, FLAGS.blocks, FLAGS.block_steps)
    results[variant] = {name: {'ms': 1e3 * r['step_s'], 'cpu_ms': 1e3 * r['cpu_s']}
                        for name, r in timed.items() if not name.startswith('ratio_')}
  payload = dict(cores=cores, batch=batch, heads=HEADS, tokens=t, calls=results)
  print(f'ms per call, one layer ({cores} core(s), batch {batch}, {HEADS} heads, {t} tokens, '
        'float32):')
  print('\n'.join(tables.cpu_attention_bench_table(payload)))
  path = common.write_json(common.out_dir('cpu_attention_bench') / 'cpu_attention_bench.json',
                           payload)
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
