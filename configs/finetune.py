"""Fine-tuning another run's model: its model, data and eval sections, a short schedule.

  python -m mla_jax.train --config=configs/finetune.py:runs/gqa_mla --workdir=runs/gqa_mla_ft \\
      --init_from=runs/gqa_mla

The argument is the workdir to copy the model from (usually the same as --init_from, e.g. a
conversion written by python -m mla_jax.convert --to_mla). The schedule: 10 steps of base.py's
batch (82k tokens, 5% of base.py's 200 steps), warmup 2, peak lr 1e-3 (a third of base.py's:
the parameters start trained) decaying to 1e-4. Override anything with --config.a.b=value.
"""

import json
import pathlib

from configs import base


def get_config(arg: str = ''):
  if not arg:
    raise ValueError('give the workdir whose model to fine-tune: '
                     '--config=configs/finetune.py:WORKDIR')
  path = pathlib.Path(arg) / 'config.json'
  if not path.is_file():
    raise ValueError(f'{arg} has no config.json; give a trained, converted or imported workdir')
  source = json.loads(path.read_text())
  c = base.get_config()
  c.model.update(source['model'])
  for section in ('data', 'eval'):
    if section in source:
      c[section].update(source[section])
  c.seed = source.get('seed', c.seed)
  c.opt.update(lr=1e-3, warmup_steps=2)
  c.train.update(steps=10, log_every=1, checkpoint_every=5, eval_every=10)
  return c
