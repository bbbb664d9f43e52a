r"""How close converted checkpoints come to transformers: one row per golden fixture.

  python -m experiments.hf_equality      # experiments/results/hf_equality/hf_equality.json

For each fixture of tests/hf_fixtures (recorded with transformers, float32 eager attention):
the largest |logit error| of the full forward and of the decode cache (every position, one
prefill chunk then token by token; both MLA paths), whether greedy generation reproduces the
recorded continuation, and the perplexity of the fixture text both ways. Needs no torch.

  python -m experiments.hf_equality --trained=runs/mla,runs/gqa   # needs the dev extra

also exports runs trained here, loads them with transformers, and compares the logits and the
perplexity of the first validation windows (eval.seq_len bytes each) both ways.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common, tables
from mla_jax import cli, decode, hf, perplexity
from mla_jax.model import with_config

FIXTURES = pathlib.Path(__file__).parents[1] / 'tests' / 'hf_fixtures'
FLAGS = flags.FLAGS


def reference_nll(logits: np.ndarray, tokens: np.ndarray) -> float:
  """Mean next-token NLL (float64) of logits [t, V] for tokens [t]."""
  x = logits[:-1].astype(np.float64)
  top = x.max(-1)
  log_z = np.log(np.exp(x - top[:, None]).sum(-1)) + top
  return float(np.mean(log_z - x[np.arange(len(x)), tokens[1:]]))


def row(folder: pathlib.Path) -> dict:
  g = hf.read_safetensors(folder / 'golden.safetensors')
  model, hf_json = hf.load(folder)
  tokens = g['tokens']
  forward = np.asarray(model(jnp.asarray(tokens)[None]))[0]
  result = dict(fixture=folder.name, architecture=hf_json['architectures'][0],
                attention=model.cfg.attention, rope_layout=model.cfg.rope_layout,
                yarn=model.cfg.rope_scaling is not None,  # as the recorded results have it
                rope_scaling=getattr(model.cfg.rope_scaling, 'type', None),
                positions=len(tokens),
                forward_err=float(np.abs(forward - g['logits']).max()))
  paths = ('absorbed', 'naive') if model.cfg.attention == 'mla' else ('absorbed',)
  for path in paths:
    m = with_config(model, mla_decode=path)
    key = path if model.cfg.attention == 'mla' else 'cache'
    result[f'{key}_err'] = float(np.abs(decode.logits_through_cache(m, tokens) -
                                        g['logits']).max())
    out = decode.generate(m, g['prompt'][None], max_new_tokens=len(g['continuation']))
    result[f'{key}_greedy_equal'] = bool(np.array_equal(np.asarray(out[0]), g['continuation']))
  ours = perplexity.perplexity(model, tokens, len(tokens), len(tokens), 1)
  result.update(ppl_mla_jax=ours['perplexity'],
                ppl_transformers=math.exp(reference_nll(g['logits'], tokens)))
  return result


def trained_row(workdir: str, windows: int = 8) -> dict:
  """Export a trained run, load it with transformers, score the same validation windows."""
  import tempfile

  import torch
  import transformers

  from mla_jax import data
  from mla_jax import workdir as wd

  model, cfg = wd.load_workdir(workdir)
  config = wd.read_config(workdir)
  seq_len = config.eval.seq_len
  val = data.load_splits(config.data)['val'][:windows * seq_len].reshape(windows, seq_len)
  with tempfile.TemporaryDirectory() as tmp:
    hf_json = hf.save(model, tmp)
    theirs_model = getattr(transformers, hf_json['architectures'][0]).from_pretrained(
        tmp, dtype=torch.float32, attn_implementation='eager')
  with torch.no_grad():
    theirs = theirs_model(torch.tensor(val, dtype=torch.long)).logits.numpy()
  ours = np.asarray(model(jnp.asarray(val, jnp.int32)))
  nll = lambda logits: np.mean([reference_nll(x, t) for x, t in zip(logits, val, strict=True)])
  return dict(workdir=workdir, architecture=hf_json['architectures'][0],
              attention=cfg.attention, rope_layout=cfg.rope_layout,
              tokens_scored=int(windows * (seq_len - 1)),
              max_err=float(np.abs(ours - theirs).max()),
              ppl_mla_jax=math.exp(nll(ours)), ppl_transformers=math.exp(nll(theirs)))


def main(argv):
  del argv
  cli.quiet_logging()
  rows = [row(d) for d in sorted(FIXTURES.iterdir()) if (d / 'golden.safetensors').is_file()]
  worst = max(max(v for k, v in r.items() if k.endswith('_err')) for r in rows)
  result = dict(rows=rows, worst_err=worst)
  print('\n'.join(tables.hf_equality_table(result)))
  print(f'worst |logit error| over every fixture, path and position: {worst:.2e}')
  path = common.out_dir('hf_equality') / 'hf_equality.json'
  if FLAGS.trained:
    result['trained'] = [trained_row(w) for w in FLAGS.trained]
    print('\n' + '\n'.join(tables.hf_trained_table(result)))
  elif path.exists() and 'trained' in (previous := json.loads(path.read_text())):
    # The trained rows need runs this machine may not have: kept, with where they came from.
    result['trained'] = previous['trained']
    result['trained_from'] = previous.get('provenance', 'before provenance was recorded')
  common.write_json(path, result)
  print(f'wrote {path}')


if __name__ == '__main__':
  flags.DEFINE_list('trained', [], 'workdirs to export and check in transformers (dev extra)')
  app.run(main, flags_parser=cli.parse_flags)
