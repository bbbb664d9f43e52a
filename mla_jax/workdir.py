"""A run's directory: config.json (the resolved config), checkpoints/ (orbax), best/ (the best
parameters by validation loss), metrics.jsonl, tb/ (TensorBoard), eval.json, .lock, and the
Hugging Face files of its tokenizer (tokenizer.json ...) unless it reads bytes.

Every CLI reads what it needs from here. A run survives being killed at any instant:
- orbax writes each checkpoint into a temporary folder and renames it when complete, so a
  partly written checkpoint is never taken for a good one (and its leftover is overwritten by
  the next save of that step);
- each checkpoint folder holds checksums.json, the sha256 of every file orbax wrote, written
  last and verified before every restore: a damaged or half-deleted checkpoint is refused by
  name instead of loading NaN or subtly wrong weights;
- a checkpoint is complete once its checksums.json exists. One without it is being written,
  was killed between orbax's rename and the checksums, or predates checksums: nothing proves
  its files intact, so nothing loads it. Readers (evaluate, generate, convert) take the newest
  complete checkpoint, so they run beside a `train` that is saving; the trainer resumes from
  the newest complete one and recomputes the steps after it, which replaces the incomplete
  one (the same numbers: a resumed run is bit for bit an uninterrupted one);
- saving a step that exists already (a resumed run repeating its steps) keeps it if it
  verifies and replaces it if not, so no leftover of a killed run blocks the next one;
- metrics.jsonl is cut back to the resumed step, so each step has one row;
- every small file (eval.json, checksums.json, metrics.jsonl when cut back) is written whole
  under a temporary name of its own and renamed into place: concurrent writers never share a
  temporary file, and a reader sees the old file or the new one, never half of one;
- .lock (an flock, which the kernel drops when its process dies) keeps a second `train`
  out of a workdir that is being trained.
MLA_JAX_FAULT=<phase>[:TERM] kills the process (SIGKILL, or SIGTERM) at a named point of a
save or of start-up, to test all this (files.fault): 'start' (workdir locked, run restored,
config written; before the first step) and, around each save into checkpoints/ or best/,
'<folder>:before', '<folder>:during' (orbax's temporary folder exists, the checkpoint is not
finished), '<folder>:written' (finished, no checksums yet) and '<folder>:after'.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import logging
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

from mla_jax import attention_op, files, sharding, tokenizer
from mla_jax.config import ConfigError, ModelConfig
from mla_jax.errors import Error, InputError
from mla_jax.files import FAULT, fault
from mla_jax.model import abstract, param_shapes
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
  config.json, written whole (write_whole)."""
  config = RunConfig.from_dict(config)
  if jax.process_index():  # one writer when several hosts share the workdir
    return
  path = config_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  write_whole(path, json.dumps(config.to_dict(), indent=1, sort_keys=True))


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
  """workdir/name as indented JSON, written whole (see write_whole)."""
  write_whole(pathlib.Path(workdir) / name, json.dumps(value, indent=1))


def write_whole(path, text: str) -> None:
  """Writes path whole (files.write_whole): a reader sees the old file or the new one; a full
  disk is one WorkdirError naming the folder."""
  files.write_whole(path, text, WorkdirError)


def must_be_new(path, what: str) -> None:
  """Refuses a target that exists and is not an empty folder: nothing is ever overwritten."""
  path = pathlib.Path(path)
  if path.exists() and (not path.is_dir() or any(path.iterdir())):
    raise InputError(f'{what} {path} already exists and is not empty; give a new folder '
                     '(nothing is overwritten)')


STAGING = '.{name}.partial-{pid}'  # beside the target: the same file system, so rename works


@contextlib.contextmanager
def staged(target, what: str):
  """Yields a new temporary sibling of `target` to write into, renamed to `target` (new, or an
  empty folder) when the block ends: a killed or failed write leaves no half-written target
  to block the next attempt. What a SIGKILL left (its process gone) is removed here."""
  target = pathlib.Path(target).absolute()
  must_be_new(target, what)
  target.parent.mkdir(parents=True, exist_ok=True)
  for leftover in target.parent.glob(STAGING.format(name=target.name, pid='*')):
    pid = leftover.name.rsplit('-', 1)[-1]
    if pid.isdigit() and not _alive(int(pid)):
      shutil.rmtree(leftover, ignore_errors=True)
  tmp = target.parent / STAGING.format(name=target.name, pid=os.getpid())
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    yield tmp
    os.rename(tmp, target)  # atomic; replaces an empty folder, refuses a non-empty one
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_new(workdir, flag: str, config, model, source: str, tok=None) -> None:
  """A new workdir made by a conversion (import, to_mla): config.json, the tokenizer's files
  (if tok) and checkpoint 0 of the model's variables (its parameters and any MoE router bias,
  moe.RouterBias: all that load_checkpoint restores, as a train saves), written whole
  (`staged`); `flag` names the target in a refusal."""
  with staged(workdir, flag) as tmp:
    save_tokenizer(tmp, tok)
    write_config(tmp, config)
    mngr = manager(tmp / 'checkpoints')
    save(mngr, 0, nnx.state(model), meta={'source': source})
    mngr.close()


def save_tokenizer(workdir, tok) -> None:
  """Writes tok's Hugging Face files into workdir, each whole, and removes any other
  tokenizer file (a start that was killed may have left another's); a byte tokenizer (or
  None) has none."""
  if jax.process_index():
    return
  files = tok.files if tok is not None else {}
  for name in tokenizer.FILES:
    path = pathlib.Path(workdir) / name
    if name in files:
      write_whole(path, files[name])
    elif path.exists():
      path.unlink()


def load_tokenizer(workdir, required: bool = True) -> tokenizer.Tokenizer | None:
  """The tokenizer a run reads text with: bytes for a run trained with data.tokenizer='byte',
  else the tokenizer.json it stores. An imported checkpoint without tokenizer files reads bytes
  if its vocabulary is the 256 bytes; any other has no tokenizer: None, or (required: a prompt
  or a text to encode) refused in one line, never fed bytes it was not trained on."""
  config = read_config(workdir)
  spec = config.data.tokenizer if config.data is not None else None
  stored = (pathlib.Path(workdir) / 'tokenizer.json').is_file()
  if spec == tokenizer.BYTE or (spec is None and not stored and config.model.vocab_size == 256):
    return tokenizer.ByteTokenizer()
  if spec is None and not stored:
    if not required:
      return None
    raise WorkdirError(f'{workdir} holds a {config.model.vocab_size}-token model without its '
                       'tokenizer; copy its tokenizer.json into the workdir, or import again '
                       'from a folder that holds one')
  if not stored:
    raise WorkdirError(f'{workdir} holds a run trained with data.tokenizer={spec!r} but no '
                       'tokenizer.json; restore it from a copy of the run')
  try:
    return tokenizer.HFTokenizer.from_path(workdir, hf_config=False)
  except tokenizer.TokenizerError as e:
    raise WorkdirError(str(e)) from None


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


def _read_json(path: pathlib.Path) -> dict:
  """A JSON object from path; one line naming the file if it cannot be read, is cut short or
  holds anything but an object (every reader of config.json comes through here)."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise WorkdirError(f'{path} cannot be read ({e}); restore it from a copy of the '
                       'run') from None
  if not isinstance(value, dict):
    raise WorkdirError(f'{path} holds a JSON {type(value).__name__}, not an object of config '
                       'sections; restore it from a copy of the run')
  return value


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
    previous = os.read(fd, 200)
    _write_lock(fd, f'process {os.getpid()} on {socket.gethostname()}'.encode())
    try:
      yield
    except Error:
      _write_lock(fd, previous)  # a refused run leaves the file as it found it
      raise
  finally:
    os.close(fd)  # releases the lock


def _write_lock(fd: int, content: bytes) -> None:
  os.ftruncate(fd, 0)
  os.pwrite(fd, content, 0)


def _holder(workdir) -> str | None:
  """'process N on HOST' while a train holds workdir's lock, else None; found without taking
  the lock (a reader must never make a train's start fail). Linux lists every flock in
  /proc/locks; elsewhere the pid in the file is asked whether it still runs."""
  path = lock_path(workdir)
  try:
    text = path.read_text(errors='replace').strip() or 'another process'
    inode = path.stat().st_ino
  except OSError:
    return None
  try:
    table = pathlib.Path('/proc/locks').read_text()
  except OSError:
    return text if _alive_here(text) else None
  for row in table.splitlines():
    fields = row.split()
    if len(fields) > 5 and fields[1] == 'FLOCK' and fields[5].endswith(f':{inode}'):
      return text
  return None


def _alive_here(holder: str) -> bool:
  pid, _, host = holder.removeprefix('process ').partition(' on ')
  return host == socket.gethostname() and pid.isdigit() and _alive(int(pid))


def _alive(pid: int) -> bool:
  """Whether process pid runs on this host."""
  try:
    os.kill(pid, 0)
  except PermissionError:  # alive, another user's
    return True
  except OSError:
    return False
  return True


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
  write_whole(path, ''.join(kept))


# --- kill safety: fault injection, checksums, idempotent saves -----------------------------
CHECKSUMS = 'checksums.json'


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
  missing or was added; None for an incomplete checkpoint (no checksums: see `complete`)."""
  step_folder = pathlib.Path(step_folder)
  try:
    recorded = json.loads((step_folder / CHECKSUMS).read_text())['sha256']
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError):
    return False
  return _digests(step_folder) == recorded


def complete(step_folder) -> bool:
  """Whether a checkpoint's save finished, its checksums written (no hashing: cheap). One
  without them is being written, was killed before its checksums, or predates them."""
  return (pathlib.Path(step_folder) / CHECKSUMS).is_file()


def complete_steps(folder) -> list[int]:
  folder = pathlib.Path(folder)
  return [s for s in checkpoint_steps(folder) if complete(folder / str(s))]


# What a refusal advises depends on who refuses: 'resume' (the trainer resuming its run),
# 'step' (evaluate, generate, convert, which have --step), 'best' (the same with --best;
# best/ keeps one checkpoint) or 'init_from' (train starting from another run's parameters).
FIXES = ('resume', 'step', 'best', 'init_from')


def _earlier_intact(folder: pathlib.Path, step: int) -> int | None:
  return next((s for s in reversed(complete_steps(folder))
               if s < step and intact(folder / str(s)) is not False), None)


def _damaged(folder: pathlib.Path, step: int, fix: str) -> WorkdirError:
  """One line for a checkpoint that fails its checksums, naming the previous intact step."""
  earlier = _earlier_intact(folder, step)
  if fix == 'best':
    hint = 'move it aside, or load the latest checkpoint (without --best)'
  elif earlier is None:
    hint = {'resume': 'no earlier checkpoint is intact; move it aside to start again from step '
                      '0',
            'init_from': 'no earlier checkpoint is intact; give another --init_from'}.get(
                fix, 'no earlier checkpoint is intact')
  else:
    hint = {'resume': f'move it aside to resume from step {earlier}',
            'init_from': f'move it aside for --init_from to start from step {earlier}'}.get(
                fix, f'move it aside, or pass --step={earlier}')
  return WorkdirError(f'checkpoint {step} in {folder} is damaged (checksum mismatch); {hint}')


def _incomplete(folder: pathlib.Path, step: int, fix: str) -> WorkdirError:
  """One line for a checkpoint without checksums that was asked for by step (or is all a
  folder has): never advice to move it, which a running save or a resume would miss."""
  holder = _holder(folder.parent)
  why = (f'its save by {holder} is in progress' if holder else
         'its save was killed before it finished, or it predates checksums')
  earlier = _earlier_intact(folder, step)
  if holder:
    hint = 'wait for the save to finish'
  elif fix == 'best':
    hint = 'load the latest checkpoint (without --best)'
  elif fix == 'init_from':
    hint = 'give another --init_from, or run its train command again to recompute it'
  elif _converted(folder.parent):
    hint = 'run the convert command again, into a new folder'
  else:
    hint = 'run the train command again: it recomputes the step'
  if earlier is not None and fix == 'step':
    hint += f', or pass --step={earlier}'
  return WorkdirError(f'checkpoint {step} in {folder} is incomplete (no {CHECKSUMS}: {why}), '
                      f'so nothing proves it intact; {hint}')


def _converted(workdir) -> bool:
  """Whether convert wrote workdir (its config.json records the source or the conversion)."""
  try:
    recorded = _read_json(config_path(workdir))
  except WorkdirError:
    return False
  return bool(recorded.get('conversion') or recorded.get('source'))


class _Manager(ocp.CheckpointManager):
  """orbax's manager, but latest_step is the newest complete checkpoint: the trainer resumes
  from it (and recomputes the steps after it) and names it as the last good one."""

  def latest_step(self) -> int | None:
    folder = pathlib.Path(self.directory)
    return max((s for s in self.all_steps() if complete(folder / str(s))), default=None)


def manager(directory, keep: int | None = None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=False)
  return _Manager(pathlib.Path(directory).absolute(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state=None, meta=None) -> None:
  """Saves checkpoint `step`, then its checksums. A step that exists already (a resumed run
  repeating a step that a killed run had saved) is kept if intact and replaced if not: the
  kept one is the same step of the same run (bit for bit on a CPU or with train.deterministic;
  up to the order of GPU reductions otherwise). A full disk is one line."""
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
  try:
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()  # every process's files are written and the folder renamed
  except Exception as e:  # orbax and tensorstore wrap a full disk in their own types
    if not _no_space(e):
      raise
    raise WorkdirError(f'no space left on {folder} (saving checkpoint {step}); free some space '
                       'and run the same command again (earlier checkpoints are kept)') from None
  fault(f'{folder.name}:written')
  if jax.process_index() == 0:
    write_json(folder / str(step), CHECKSUMS, {'sha256': _digests(folder / str(step))})
  fault(f'{folder.name}:after')


def _no_space(e: BaseException | None) -> bool:
  while e is not None:
    if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        'No space left on device' in str(e)):
      return True
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
  return False


def restore(mngr: ocp.CheckpointManager, step: int, params, opt_state=None,
            fix: str = 'init_from', cfg: ModelConfig | None = None):
  """Fills abstract (or concrete) params / opt_state with checkpoint `step` after checking
  its checksums; -> (params, opt_state, meta). fix: whose advice a refusal gives (FIXES);
  cfg: the model config.json describes, to name the fields of a model mismatch."""
  assert fix in FIXES, fix
  folder = pathlib.Path(mngr.directory)
  if not (folder / str(step)).is_dir():
    raise _Vanished(folder, step)
  verified = intact(folder / str(step))
  if verified is None:
    raise _incomplete(folder, step, fix)
  if verified is False:
    raise _damaged(folder, step, fix)
  items = dict(params=ocp.args.StandardRestore(nnx.to_pure_dict(params)),
               meta=ocp.args.JsonRestore())
  if opt_state is not None:
    items['opt'] = ocp.args.StandardRestore(nnx.to_pure_dict(opt_state))
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types
    if not (folder / str(step)).is_dir():
      raise _Vanished(folder, step) from None
    mismatch = _model_mismatch(folder / str(step), params, cfg)
    if mismatch:
      raise WorkdirError(f'checkpoint {step} in {folder} holds another model than '
                         f'{config_path(folder.parent).name} describes: {mismatch}') from None
    # Its checksums match: the files are as saved, so the reader is what fails.
    raise WorkdirError(
        f'checkpoint {step} in {folder} matches its checksums but cannot be read '
        f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}); read it '
        'with the mla_jax and orbax versions that wrote it') from None
  nnx.replace_by_pure_dict(params, out['params'])
  if opt_state is not None:
    nnx.replace_by_pure_dict(opt_state, out['opt'])
  return params, opt_state, dict(out['meta'])


class _Vanished(WorkdirError):
  """A checkpoint deleted before or while it was read (a train keeps keep_checkpoints)."""

  def __init__(self, folder: pathlib.Path, step: int):
    super().__init__(f'checkpoint {step} in {folder} was deleted while it was read (a train '
                     'there keeps only its latest checkpoints)')


def _flat_shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path):
          tuple(leaf.shape) for path, leaf in leaves}


def _model_mismatch(step_folder: pathlib.Path, params, cfg: ModelConfig | None) -> str:
  """'' if the checkpoint's parameters have the shapes of params; else what differs: the
  config field whose value explains every shape if one does, else the parameters."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # orbax warns that params/ has no step metadata
  try:
    saved = ocp.PyTreeCheckpointer().metadata(step_folder / 'params')
    saved = _flat_shapes(getattr(saved, 'item_metadata', saved).tree)
  except Exception:  # metadata unreadable too: not a mismatch we can name
    return ''
  finally:
    absl_logger.setLevel(level)
  here = _flat_shapes(nnx.to_pure_dict(params))
  if saved == here:
    return ''
  field = _explaining_field(cfg, saved, here) if cfg is not None else None
  if field:
    name, ours, theirs = field
    return (f'model.{name} is {ours!r} there but the checkpoint was saved with {theirs!r}; '
            'restore config.json from a copy of the run')
  differ = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
  shown = ', '.join(f'{k} {list(saved[k]) if k in saved else "absent"} saved, '
                    f'{list(here[k]) if k in here else "absent"} expected' for k in differ[:3])
  more = f' and {len(differ) - 3} more' if len(differ) > 3 else ''
  return f'{shown}{more}; restore config.json from a copy of the run'


def _explaining_field(cfg: ModelConfig, saved: dict, here: dict):
  """(field, value in cfg, value saved) for the one integer field of cfg whose change gives
  the saved shapes, or None. Candidates: the fields whose value is a differing dimension (or
  the layer count), each tried at the dimensions the checkpoint has there."""
  ours, theirs = set(), set()
  for k in saved.keys() & here.keys():
    if len(saved[k]) == len(here[k]):
      for a, b in zip(saved[k], here[k], strict=True):
        if a != b:
          theirs.add(a)
          ours.add(b)
  layers = lambda shapes: len({k.split('/')[1] for k in shapes if k.startswith('blocks/')})
  if layers(saved) != layers(here):
    theirs.add(layers(saved))
    ours.add(layers(here))
  fields = cfg.to_dict()
  for name, value in fields.items():
    if isinstance(value, bool) or not isinstance(value, int) or value not in ours:
      continue
    for candidate in sorted(theirs):
      try:
        other = ModelConfig.from_dict({**fields, name: candidate})
        shapes = {'/'.join(map(str, k)): v for k, v in param_shapes(other).items()}
      except Exception:  # an invalid combination: not this field
        continue
      if shapes == saved:
        return name, value, candidate
  return None


def load_checkpoint(workdir, step: int | None = None, best: bool = False, mesh=None):
  """(model, ModelConfig, step) from a trained or converted run: the newest complete (or
  `step`) checkpoint, laid out on `mesh` by the sharding rules (default: on one device),
  whatever mesh saved it. Safe beside a `train` that is saving: an incomplete checkpoint is
  skipped, and one deleted under us (keep_checkpoints) gives way to the next newest."""
  config = read_config(workdir)
  cfg = config.model
  folder = pathlib.Path(workdir) / ('best' if best else 'checkpoints')
  fix = 'best' if best else 'step'
  # Orbax restores into the target's layout whatever the saving mesh was, given one; the
  # attention kernels are chosen for that mesh too (attention_op.resolve).
  mesh = mesh or sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  graphdef, params = abstract(cfg, attention_op.resolve(cfg, mesh))
  params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
                        params, sharding.state_shardings(params, mesh))
  for _ in range(5):
    chosen = _choose(workdir, folder, step)
    try:
      with contextlib.closing(manager(folder)) as mngr:
        params, _, _ = restore(mngr, chosen, params, fix=fix, cfg=cfg)
      return nnx.merge(graphdef, params), cfg, chosen
    except _Vanished as e:
      if step is not None:
        raise WorkdirError(f'{e}; pass a newer --step') from None
  raise WorkdirError(f'the checkpoints in {folder} were deleted while they were read, five '
                     'times; wait for the train there to finish')


def load_workdir(workdir, step: int | None = None, best: bool = False, mesh=None):
  """(model, ModelConfig) from a run (see load_checkpoint)."""
  model, cfg, _ = load_checkpoint(workdir, step, best, mesh)
  return model, cfg


def _choose(workdir, folder: pathlib.Path, step: int | None) -> int:
  """The step to load: `step` if it exists, else the newest complete checkpoint."""
  steps = checkpoint_steps(folder)
  if step is not None:
    if step not in steps:
      raise WorkdirError(f'{folder} has no checkpoint {step}; it has {steps}')
    return step
  done = complete_steps(folder)
  if done:
    return done[-1]
  if steps:  # only incomplete ones: refused by name
    return steps[-1]
  holder = _holder(workdir)
  if holder:
    raise WorkdirError(f'{folder} has no checkpoint yet: {holder} is training there; wait for '
                       'its first save')
  if _converted(workdir):
    raise WorkdirError(f'{folder} has no checkpoint: the convert that wrote {workdir} did not '
                       'finish; remove it and run the convert command again')
  raise WorkdirError(f'{folder} has no checkpoint; train first (python -m mla_jax.train '
                     f'--config=configs/mla.py --workdir={workdir}, with the config the run '
                     'was started with)')
