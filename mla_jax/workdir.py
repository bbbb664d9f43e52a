"""A run's directory: config.json (the resolved config), checkpoints/ (orbax), best/ (the best
parameters by validation loss), metrics.jsonl, tb/ (TensorBoard), eval.json and .lock.

Every CLI reads what it needs from here. A run survives being killed at any instant:
- orbax writes each checkpoint into a temporary folder and renames it when complete, so a
  partly written checkpoint is never taken for a good one (and its leftover is overwritten by
  the next save of that step);
- each checkpoint folder holds checksums.json, the sha256 of every file orbax wrote, written
  last and verified before every restore: a damaged or half-deleted checkpoint is refused by
  name instead of loading NaN or subtly wrong weights (one without it, from before checksums
  or killed in the instant between, loads unverified);
- saving a step that exists already (a resumed run repeating its steps) keeps it if it
  verifies and replaces it if not, so no leftover of a killed run blocks the next one;
- metrics.jsonl is cut back to the resumed step, so each step has one row;
- .lock (an flock, which the kernel drops when its process dies) keeps a second `train`
  out of a workdir that is being trained.
MLA_JAX_FAULT=<phase>[:TERM] kills the process (SIGKILL, or SIGTERM) at a named point of a
save or of start-up, to test all this (see `fault`).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import threading
import time

import jax
import orbax.checkpoint as ocp
from flax import nnx

from mla_jax import sharding
from mla_jax.config import ConfigError
from mla_jax.errors import Error
from mla_jax.model import abstract
from mla_jax.run_config import RunConfig


class WorkdirError(Error):
  """A missing, foreign or unreadable run; the message says what to do."""


def config_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / 'config.json'


def checkpoint_steps(folder) -> list[int]:
  """The finished checkpoints in a checkpoints/ or best/ folder, without creating it (orbax's
  manager would)."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def write_config(workdir, config) -> None:
  """Records a run's config (a RunConfig, or a ConfigDict / mapping, parsed first) as
  config.json, written whole (a temporary file renamed into place)."""
  config = RunConfig.from_dict(config)
  if jax.process_index():  # one writer when several hosts share the workdir
    return
  path = config_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
  tmp.replace(path)


def check_workdir(workdir) -> None:
  """Refuses, before anything is written, a --workdir that is a file or cannot be written."""
  folder = pathlib.Path(workdir)
  if folder.exists() and not folder.is_dir():
    raise WorkdirError(f'--workdir={workdir} is a file; give a folder (new, or a run to resume)')
  if folder.is_dir():
    check_writable(folder, 'checkpoints')


def check_writable(workdir, name: str) -> None:
  """Refuses, before any work is done, a workdir where `name` cannot be written."""
  folder = pathlib.Path(workdir)
  # Named by host and pid: the processes of a multi-host run probe the same folder at once.
  probe = folder / f'.{name}.{socket.gethostname()}.{os.getpid()}.probe'
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


def read_config(workdir) -> RunConfig:
  """The RunConfig a run's config.json records (its .model a ModelConfig), parsed once here;
  a missing, unreadable or invalid file is one line."""
  path = config_path(workdir)
  if not path.exists():
    raise WorkdirError(f'no run in {workdir!r} ({path.name} missing); train one with '
                       'python -m mla_jax.train --config=configs/mla.py --workdir=DIR')
  try:
    return RunConfig.from_dict(_read_json(path))
  except ConfigError as e:
    raise WorkdirError(f'{path} does not hold a valid config ({e}); restore it from a copy of '
                       'the run') from None


def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path} cannot be read ({e}); restore it from a copy of the '
                       'run') from None


def lock_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / '.lock'


@contextlib.contextmanager
def lock(workdir):
  """Holds workdir/.lock while a run trains (process 0 of a multi-host run holds it for all):
  a second `train` on the same workdir is refused with one line naming the holder, having
  changed nothing. The kernel drops an flock when its process dies, so a killed run never
  leaves a stale lock; its pid stays in the file until the next holder writes its own."""
  if jax.process_index():
    yield
    return
  folder = pathlib.Path(workdir)
  try:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f'cannot create {lock_path(folder)} ({e.strerror}); give a --workdir '
                       'you can write') from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors='replace').strip() or 'another process'
      raise WorkdirError(f'{folder} is being trained by {holder}; wait for it or use another '
                         '--workdir') from None
    os.ftruncate(fd, 0)
    os.write(fd, f'process {os.getpid()} on {socket.gethostname()}'.encode())
    yield
  finally:
    os.close(fd)  # releases the lock


def truncate_metrics(workdir, step: int) -> None:
  """Keeps the rows of metrics.jsonl up to `step`, the step a run resumes from (0: none), so
  that a resumed run logs the steps it repeats once; a row cut short by a kill is dropped.
  Written whole (a temporary file renamed into place): a kill here loses nothing."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if jax.process_index() or not path.exists():
    return
  kept = []
  for line in path.read_text(errors='replace').splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] <= step:
      kept.append(line + '\n')
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(''.join(kept))
  tmp.replace(path)


# --- kill safety: fault injection, checksums, idempotent saves -----------------------------
FAULT = 'MLA_JAX_FAULT'
CHECKSUMS = 'checksums.json'


def fault(phase: str) -> None:
  """Fault injection for the kill-safety tests: MLA_JAX_FAULT=<phase> sends this process
  SIGKILL when it reaches <phase>, MLA_JAX_FAULT=<phase>:TERM sends SIGTERM. Phases: 'start'
  (workdir locked, run restored, config written; before the first step) and, around each save
  into checkpoints/ or best/, '<folder>:before', '<folder>:during' (orbax's temporary folder
  exists, the checkpoint is not finished), '<folder>:written' (finished, no checksums yet) and
  '<folder>:after'."""
  wanted = os.environ.get(FAULT, '')
  sig = signal.SIGKILL
  if wanted.endswith(':TERM'):
    wanted, sig = wanted.removesuffix(':TERM'), signal.SIGTERM
  if wanted == phase:
    os.kill(os.getpid(), sig)


def _kill_during_save(folder: pathlib.Path, step: int) -> None:
  """For MLA_JAX_FAULT=<folder>:during: SIGKILL as soon as orbax creates the temporary folder
  of `step` (a leftover of an earlier kill is removed first, so it cannot trigger early)."""
  pattern = str(folder / f'{step}.orbax-checkpoint-tmp*')
  for stale in glob.glob(pattern):
    shutil.rmtree(stale, ignore_errors=True)

  def watch():
    while not glob.glob(pattern):
      time.sleep(1e-4)
    os.kill(os.getpid(), signal.SIGKILL)

  threading.Thread(target=watch, daemon=True).start()


def _digests(folder: pathlib.Path) -> dict[str, str]:
  """sha256 of every file in a checkpoint folder (but the checksum file and its temporary)."""
  digests = {}
  for path in sorted(folder.rglob('*')):
    if path.is_file() and not path.name.startswith(CHECKSUMS):
      with path.open('rb') as f:
        digests[str(path.relative_to(folder))] = hashlib.file_digest(f, 'sha256').hexdigest()
  return digests


def intact(step_folder) -> bool | None:
  """Whether a checkpoint's files match the checksums saved with it: False if any differs, is
  missing or was added; None for a checkpoint without checksums (saved before they existed,
  or killed between finishing it and writing them), which loads unverified."""
  step_folder = pathlib.Path(step_folder)
  try:
    recorded = json.loads((step_folder / CHECKSUMS).read_text())['sha256']
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return _digests(step_folder) == recorded


def _damaged(folder: pathlib.Path, step: int, fix: str) -> WorkdirError:
  """One line for a checkpoint that fails its checksums, naming the previous intact step.
  fix: 'resume' (the trainer), 'step' (commands with --step) or 'best' (the best/ folder)."""
  earlier = [s for s in reversed(checkpoint_steps(folder))
             if s < step and intact(folder / str(s)) is not False]
  if fix == 'best':
    hint = 'move it aside, or load the latest checkpoint (without --best)'
  elif not earlier:
    hint = ('no earlier checkpoint is intact; move it aside to start again from step 0'
            if fix == 'resume' else 'no earlier checkpoint is intact')
  elif fix == 'resume':
    hint = f'move it aside to resume from step {earlier[0]}'
  else:
    hint = f'move it aside, or pass --step={earlier[0]}'
  return WorkdirError(f'checkpoint {step} in {folder} is damaged (checksum mismatch); {hint}')


def manager(directory, keep: int | None = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state=None, meta=None) -> None:
  """Saves checkpoint `step`, then its checksums. A step that exists already (a resumed run
  repeating a step that a killed run had saved) is kept if intact and replaced if not: the
  kept one is the same step of the same run (bit for bit on a CPU or with train.deterministic;
  up to the order of GPU reductions otherwise)."""
  folder = pathlib.Path(mngr.directory)
  if step in mngr.all_steps():
    if intact(folder / str(step)):
      return
    mngr.delete(step)
  items = dict(params=ocp.args.StandardSave(nnx.to_pure_dict(params)),
               meta=ocp.args.JsonSave(meta or {}))
  if opt_state is not None:
    items['opt'] = ocp.args.StandardSave(nnx.to_pure_dict(opt_state))
  fault(f'{folder.name}:before')
  if os.environ.get(FAULT) == f'{folder.name}:during':
    _kill_during_save(folder, step)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)
  mngr.wait_until_finished()  # every process's files are written and the folder renamed
  fault(f'{folder.name}:written')
  if jax.process_index() == 0:
    write_json(folder / str(step), CHECKSUMS, {'sha256': _digests(folder / str(step))})
  fault(f'{folder.name}:after')


def restore(mngr: ocp.CheckpointManager, step: int, params, opt_state=None, fix='step'):
  """Fills abstract (or concrete) params / opt_state with checkpoint `step` after checking
  its checksums; -> (params, opt_state, meta). fix: what a damaged checkpoint's message
  advises (see _damaged)."""
  folder = pathlib.Path(mngr.directory)
  if intact(folder / str(step)) is False:
    raise _damaged(folder, step, fix)
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
  cfg = read_config(workdir).model
  folder = pathlib.Path(workdir) / ('best' if best else 'checkpoints')
  steps = checkpoint_steps(folder)
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
  params, _, _ = restore(manager(folder), step, params, fix='best' if best else 'step')
  return nnx.merge(graphdef, params), cfg
