"""Files written whole, and the kill points the reliability tests use; without jax or orbax, so
`python -m mla_jax.tokenize` (mla_jax.shards) shares them with the run folders
(mla_jax.workdir).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import signal
import tempfile

from mla_jax.errors import Error

FAULT = 'MLA_JAX_FAULT'


def write_whole(path, data: str | bytes, error: type[Error]) -> None:
  """Writes path whole: into a temporary file named for this writer alone (two processes
  writing eval.json at once never share one), fsynced, renamed into place, so a reader sees the
  old file or the new one, after a kill or a power loss. A full disk is one line naming the
  folder, raised as `error`; the old file is kept."""
  path = pathlib.Path(path)
  try:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
  except OSError as e:
    raise _write_error(path, e, error) from None
  try:
    with os.fdopen(fd, 'wb' if isinstance(data, bytes) else 'w') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    replace_durably(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise _write_error(path, e, error) from None


def replace_durably(tmp, path) -> None:
  """os.replace(tmp, path) for a tmp already fsynced, then the folder fsynced too: after a
  power loss the folder holds the old file or the whole new one, as it does after a kill."""
  os.replace(tmp, path)
  folder = os.open(pathlib.Path(path).parent, os.O_RDONLY)
  try:
    os.fsync(folder)
  finally:
    os.close(folder)


def _write_error(path: pathlib.Path, e: OSError, error: type[Error]) -> Error:
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    return error(f'no space left on {path.parent} (writing {path.name}); free some space '
                 'and run the same command again (nothing was lost)')
  return error(f'cannot write {path} ({e.strerror}); make {path.parent} writable')


def fault(phase: str) -> None:
  """Fault injection for the kill-safety tests: MLA_JAX_FAULT=<phase> sends this process
  SIGKILL when it reaches <phase>, MLA_JAX_FAULT=<phase>:TERM sends SIGTERM. The phases are
  named where fault is called: mla_jax.workdir's docstring lists a run's, shards.fault a
  corpus writer's."""
  wanted = os.environ.get(FAULT, '')
  sig = signal.SIGKILL
  if wanted.endswith(':TERM'):
    wanted, sig = wanted.removesuffix(':TERM'), signal.SIGTERM
  if wanted == phase:
    os.kill(os.getpid(), sig)
