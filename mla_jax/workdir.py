"""A run's directory: config.json (the resolved config), checkpoints/ (orbax), best/ (the best
parameters by validation loss), metrics.jsonl, tb/ (TensorBoard) and eval.json.

Every CLI reads what it needs from here. Orbax writes each checkpoint into a temporary folder
and renames it when complete, so a partly written checkpoint is never taken for a good one.
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from mla_jax import sharding
from mla_jax.config import ModelConfig
from mla_jax.errors import Error
from mla_jax.model import abstract


class WorkdirError(Error):
  """A missing, foreign or unreadable run; the message says what to do."""


def config_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / 'config.json'


def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  """Records the resolved config; a resumed run must match it in model, data and opt."""
  path = config_path(workdir)
  new = json.loads(config.to_json_best_effort())
  if path.exists():
    old = json.loads(path.read_text())
    for section in ('seed', 'model', 'data', 'opt'):
      if old.get(section) != new.get(section):
        raise WorkdirError(f'{path.parent} holds a run whose {section!r} differs from this '
                           'config; resume with the same config or use a new --workdir')
  if jax.process_index():  # one writer when several hosts share the workdir
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(new, indent=1, sort_keys=True))
  tmp.replace(path)


def check_writable(workdir, name: str) -> None:
  """Refuses, before any work is done, a workdir where `name` cannot be written."""
  folder = pathlib.Path(workdir)
  probe = folder / f'.{name}.probe'
  try:
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f'cannot write {name} in {folder} ({e.strerror}); make it writable or '
                       'copy the run elsewhere') from None


def write_json(workdir, name: str, value) -> None:
  """workdir/name as indented JSON, written whole (a temporary file renamed into place)."""
  path = pathlib.Path(workdir) / name
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(value, indent=1))
  tmp.replace(path)


def read_config(workdir) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  if not path.exists():
    raise WorkdirError(f'no run in {workdir!r} ({path.name} missing); train one with '
                       'python -m mla_jax.train --config=configs/mla.py --workdir=DIR')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def manager(directory, keep: int | None = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state=None, meta=None) -> None:
  items = dict(params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
               meta=ocp.args.JsonSave(meta or {}))
  if opt_state is not None:
    items['opt'] = ocp.args.StandardSave(nnx.to_pure_dict(opt_state))
  mngr.save(step, args=ocp.args.Composite(**items), force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, params, opt_state=None):
  """Fills abstract (or concrete) params / opt_state with checkpoint `step`; -> (.., .., meta)."""
  items = dict(params=ocp.args.StandardRestore(nnx.to_pure_dict(params)),
               meta=ocp.args.JsonRestore())
  if opt_state is not None:
    items['opt'] = ocp.args.StandardRestore(nnx.to_pure_dict(opt_state))
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for damaged files
    raise WorkdirError(
        f'checkpoint {step} in {mngr.directory} cannot be read ({type(e).__name__}: '
        f'{str(e).splitlines()[0][:200] if str(e) else ""}); move that step folder aside to '
        'fall back to an earlier checkpoint, or start a new --workdir') from None
  nnx.replace_by_pure_dict(params, out['params'])
  if opt_state is not None:
    nnx.replace_by_pure_dict(opt_state, out['opt'])
  return params, opt_state, dict(out['meta'])


def load_workdir(workdir, step: int | None = None, best: bool = False, mesh=None):
  """(model, ModelConfig) from a trained or converted run: the latest (or `step`) checkpoint,
  laid out on `mesh` by the sharding rules (default: on one device), whatever mesh saved it."""
  config = read_config(workdir)
  cfg = ModelConfig.from_dict(config.model)
  folder = pathlib.Path(workdir) / ('best' if best else 'checkpoints')
  steps = manager(folder).all_steps() if folder.exists() else []
  if not steps:
    raise WorkdirError(f'{folder} has no checkpoint; train first (python -m mla_jax.train '
                       f'--workdir={workdir})')
  step = max(steps) if step is None else step
  if step not in steps:
    raise WorkdirError(f'{folder} has no checkpoint {step}; it has {sorted(steps)}')
  graphdef, params = abstract(cfg)
  # Orbax restores into the target's layout whatever the saving mesh was, given one.
  mesh = mesh or sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                        params, sharding.state_shardings(params, mesh))
  params, _, _ = restore(manager(folder), step, params)
  return nnx.merge(graphdef, params), cfg
