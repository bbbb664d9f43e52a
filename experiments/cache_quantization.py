r"""What an 8-bit decode cache costs: perplexity and greedy generation through the cache, per
cache dtype, for the four default runs (configs/{mha,gqa,mqa,mla}.py).

  python -m experiments.cache_quantization --workdir=runs/quant            # see README timing
  python -m experiments.cache_quantization --workdir=/tmp/cq --quick       # ~1-2 min, tiny

A run missing from workdir/<variant> is trained there first (mla_jax.training; an interrupted
one resumes, a finished one is reused). Then, for each cache dtype (ModelConfig.cache_dtype;
the reference is the float32 cache):
- validation perplexity THROUGH the decode cache: the held-out split in windows of --window
  tokens, stride --window (every token but the first scored once, data.eval_windows), --batch
  windows at a time; each window is prefilled with its first --prefill tokens and then decoded
  one token per step (what decode.logits_through_cache does, batched, the steps in one
  lax.scan), so every logit was computed from keys and values read back from the cache;
- next-token argmax agreement with the float32 cache over the same tokens (teacher-forced);
- greedy agreement: --gen_tokens generated from --prompts fixed validation prompts, and per
  prompt the number of leading tokens that equal the float32 cache's.
The float32 row's perplexity is checked against a full forward (mla_jax.perplexity) on the same
windows: they must agree to float32 rounding, or the cache path is wrong.

The report (cache_quantization.md / .json) goes to --out: experiments/results/
cache_quantization/ for the full run, the workdir for --quick (never the committed results).
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx

import mla_jax
from experiments import common, report, tables
from mla_jax import cli, data, perplexity, training
from mla_jax import workdir as wd
from mla_jax.model import with_config

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'where the runs live (one folder per variant)')
flags.DEFINE_list('variants', ['mha', 'gqa', 'mqa', 'mla'], 'configs/<variant>.py runs')
flags.DEFINE_list('cache_dtypes', ['float32', 'bfloat16', 'int8', 'float8_e4m3fn'],
                  'cache dtypes to compare; the first is the reference')
flags.DEFINE_integer('window', 256, 'tokens scored per validation window (stride = window)')
flags.DEFINE_integer('batch', 64, 'windows decoded at once')
flags.DEFINE_integer('prefill', 8, 'tokens of each window prefilled before decoding 1 by 1')
flags.DEFINE_integer('max_windows', 0, '>0: only the first N windows (0: the whole split)')
flags.DEFINE_integer('prompts', 4, 'fixed validation prompts for greedy agreement')
flags.DEFINE_integer('prompt_len', 64, 'tokens per prompt')
flags.DEFINE_integer('gen_tokens', 256, 'greedy tokens generated per prompt')
flags.DEFINE_string('data_files', '', 'a glob of text files instead of the Shakespeare corpus')
flags.mark_flag_as_required('workdir')

NAME = 'cache_quantization'
# --quick: small enough for a test, big enough to exercise batching, padding and the pulled-
# back last window.
QUICK = dict(window=32, batch=8, prefill=4, max_windows=20, prompts=2, prompt_len=8,
             gen_tokens=48)


def trained_model(variant: str, run_dir: pathlib.Path, quick: bool, data_files: str = ''):
  """(model, config) of run_dir (configs/<variant>.py), trained there first if unfinished."""
  config = common.load_config(variant, 'tiny' if quick else '')
  if data_files:
    config.data.files = data_files
  training.train_and_evaluate(config, str(run_dir), final_eval=False)  # no-op when finished
  model, _ = wd.load_workdir(run_dir)
  return model, config


@functools.partial(jax.jit, static_argnames=('graphdef', 'prefill'))
def _window_batch(graphdef, state, windows_bt, prefill: int):
  """NLL and argmax [b, t] of windows [b, t + 1] computed through the decode cache: positions
  0 .. prefill - 1 in one forward, then one token per step, each step reading the cache."""
  model = nnx.merge(graphdef, state)
  inputs, targets = windows_bt[:, :-1], windows_bt[:, 1:]
  b, t = inputs.shape
  caches = model.init_cache(b, t)
  positions = jnp.broadcast_to(jnp.arange(prefill), (b, prefill))
  h, caches = model.forward(inputs[:, :prefill], positions, caches)
  first = model.logits(h)

  def step(caches, i):
    h, caches = model.forward(inputs[:, i, None], jnp.full((b, 1), i), caches)
    return caches, model.logits(h)[:, 0]

  _, rest = jax.lax.scan(step, caches, jnp.arange(prefill, t))
  logits = jnp.concatenate([first, rest.transpose(1, 0, 2)], axis=1)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def eval_windows(tokens: np.ndarray, window: int, max_windows: int = 0):
  """(windows [n, window + 1], scored mask [n, window]) covering tokens once (stride = window)."""
  windows, masks = [], []
  for w, _, first, end in data.eval_windows(tokens, window, window):
    windows.append(w)
    masks.append((np.arange(window) >= first) & (np.arange(window) < end))
    if len(windows) == max_windows:
      break
  return np.stack(windows), np.stack(masks)


def through_cache(model, windows, masks, batch: int, prefill: int) -> dict:
  """Perplexity of the scored tokens through the cache, and the argmax at each of them."""
  graphdef, state = nnx.split(model)
  pad = -len(windows) % batch  # whole batches: one compiled shape
  windows = np.concatenate([windows, np.zeros((pad, windows.shape[1]), windows.dtype)])
  nlls, argmaxes = [], []
  for i in range(0, len(windows), batch):
    nll, top = _window_batch(graphdef, state, jnp.asarray(windows[i:i + batch]), prefill)
    nlls.append(np.asarray(nll, np.float64))
    argmaxes.append(np.asarray(top))
  nll, top = np.concatenate(nlls)[:len(masks)], np.concatenate(argmaxes)[:len(masks)]
  loss = float(nll[masks].sum() / masks.sum())  # float64 on the host
  return {'loss': loss, 'perplexity': math.exp(loss), 'argmax': top[masks],
          'tokens': int(masks.sum())}


def fixed_prompts(tokens: np.ndarray, n: int, length: int) -> np.ndarray:
  """n prompts of `length` tokens at evenly spaced places of the validation split."""
  starts = np.linspace(0, len(tokens) - length - 1, n).astype(int)
  return np.stack([tokens[s:s + length] for s in starts]).astype(np.int32)


def leading_agreement(a: np.ndarray, b: np.ndarray) -> list[int]:
  """Per row, how many leading tokens of a and b are equal."""
  differ = a != b
  return [int(np.argmax(row)) if row.any() else len(row) for row in differ]


def measure_variant(model, val, cache_dtypes, opts: dict) -> list[dict]:
  """One row per cache dtype; the first dtype is the reference."""
  windows, masks = eval_windows(val, opts['window'], opts['max_windows'])
  prompts = fixed_prompts(val, opts['prompts'], opts['prompt_len'])
  max_len = opts['prompt_len'] + opts['gen_tokens']
  model = with_config(model, max_seq_len=max(model.cfg.max_seq_len, max_len))
  rows, reference = [], None
  for cache_dtype in cache_dtypes:
    m = with_config(model, cache_dtype=cache_dtype)
    start = time.perf_counter()
    scores = through_cache(m, windows, masks, opts['batch'], opts['prefill'])
    ppl_s = time.perf_counter() - start
    start = time.perf_counter()
    generated = np.asarray(mla_jax.generate(m, prompts, max_new_tokens=opts['gen_tokens']))
    gen_s = time.perf_counter() - start
    reference = reference or dict(scores, generated=generated, cache_dtype=cache_dtype)
    agree = leading_agreement(generated, reference['generated'])
    rows.append(dict(
        cache_dtype=cache_dtype, bytes_per_token=mla_jax.cache_bytes_per_token(m.cfg),
        loss=scores['loss'], perplexity=scores['perplexity'], tokens=scores['tokens'],
        perplexity_change_pct=100 * (scores['perplexity'] / reference['perplexity'] - 1),
        argmax_agreement=float(np.mean(scores['argmax'] == reference['argmax'])),
        greedy_leading=agree, greedy_min=min(agree), greedy_mean=float(np.mean(agree)),
        perplexity_s=ppl_s, generate_s=gen_s))
  full = perplexity.perplexity(with_config(model, cache_dtype=None), val[:_covered(windows, val)],
                              opts['window'], opts['window'], opts['batch'])
  rows[0]['full_forward_perplexity'] = full['perplexity']
  return rows


def _covered(windows, val) -> int:
  """How many leading tokens of val the windows cover (all of it unless --max_windows)."""
  return min(len(val), len(windows) * windows.shape[1] - (len(windows) - 1))


def options() -> dict:
  opts = {k: getattr(FLAGS, k) for k in QUICK}
  if FLAGS.quick:  # the quick sizes, unless a flag was given explicitly
    opts.update({k: v for k, v in QUICK.items() if not FLAGS[k].present})
  return opts


def main():
  start = time.perf_counter()
  opts = options()
  for name in FLAGS.cache_dtypes:
    mla_jax.ModelConfig(cache_dtype=name)  # an unknown dtype fails before any training
  results = {}
  for variant in FLAGS.variants:
    run_dir = pathlib.Path(FLAGS.workdir) / variant
    model, config = trained_model(variant, run_dir, FLAGS.quick, FLAGS.data_files)
    # A variant measured before (same checkpoint, dtypes and options) is not measured again:
    # the experiment resumes per variant.
    key = dict(step=max(wd.checkpoint_steps(run_dir / 'checkpoints')), options=opts,
               cache_dtypes=list(FLAGS.cache_dtypes))
    saved = run_dir / f'{NAME}.json'
    if saved.exists() and json.loads(saved.read_text())['key'] == key:
      results[variant] = json.loads(saved.read_text())['rows']
      print(f'{variant}: measured before ({saved})', flush=True)
      continue
    val = data.load_splits(config.data)['val']
    results[variant] = measure_variant(model, val, FLAGS.cache_dtypes, opts)
    wd.write_json(run_dir, f'{NAME}.json', dict(key=key, rows=results[variant]))
    for r in results[variant]:
      print(f"{variant} {r['cache_dtype']:14s} perplexity {r['perplexity']:.4f} "
            f"({r['perplexity_change_pct']:+.3f}%) argmax {100 * r['argmax_agreement']:.2f}% "
            f"greedy {r['greedy_leading']} [{r['perplexity_s']:.0f} s + {r['generate_s']:.0f} s]",
            flush=True)
  setup = common.setup(quick=FLAGS.quick, wall_s=time.perf_counter() - start, options=opts,
                       cache_dtypes=FLAGS.cache_dtypes, data=FLAGS.data_files or 'shakespeare',
                       jax=jax.__version__)
  report.write(common.out_dir(NAME, FLAGS.workdir), NAME, dict(setup=setup, results=results),
               tables.cache_quantization_report)


if __name__ == '__main__':
  cli.run(main)
