"""What the absl entry points share: `run(main)`, which turns every mistake a user can make on
the command line into one `error: ...` line and a non-zero exit, and the multi-host flags.

Exit codes: 2 for a bad flag or config file (nothing ran), 1 for bad input found while running
(an mla_jax.Error). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import signal
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging

from mla_jax.errors import Error, Preempted


def _config_file(argv) -> str:
  return next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), '?')


def _raised_in_config_file(argv, e: Exception) -> int | None:
  """The line of the --config file where e was raised, or None if it was raised elsewhere
  (a bad --config.a.b override)."""
  path = _config_file(argv).split(':', 1)[0]
  if path == '?' or not os.path.exists(path):
    return None
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.exists(f.filename) and os.path.samefile(f.filename, path)]
  return frames[-1].lineno if frames else None


def _config_error(argv, e: Exception) -> str:
  """One line for a --config file that cannot be loaded (ml_collections embeds a traceback in
  the message; its last line is the cause)."""
  given = _config_file(argv)
  if isinstance(e, SyntaxError):
    return f'--config={given} has a syntax error (line {e.lineno}: {e.msg}); fix the file'
  if isinstance(e, AttributeError) and "has no attribute 'get_config'" in str(e):
    return (f'--config={given} has no get_config function; define get_config(arg=\'\') '
            'returning an ml_collections.ConfigDict (see configs/base.py)')
  line = _raised_in_config_file(argv, e)
  if line is not None:
    return (f'--config={given} could not be loaded ({type(e).__name__} at line {line}: {e}); '
            'check the file and its :arg')
  cause = next((line for line in reversed(str(e).strip().splitlines()) if line.strip()), str(e))
  return f'--config={given} could not be loaded ({cause.strip()}); check the file and its :arg'


def parse_flags(argv):
  """absl's flag parsing, with every failure (a bad --config file or --config.a.b override
  included, which ml_collections reports as several exception types) as one line, exit 2."""
  def fail(message):
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)

  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    if 'Error whilst parsing config file' in str(e):
      fail(_config_error(argv, e))
    fail(f'{e}; pass --helpfull to list the flags')
  except (SyntaxError, OSError) as e:  # OSError: a --config.a.b override of a missing file
    fail(_config_error(argv, e))
  except Exception as e:  # the config file is user code: it may raise anything
    if not isinstance(e, (KeyError, AttributeError, TypeError, ValueError)) or (
        "has no attribute 'get_config'" in str(e) or _raised_in_config_file(argv, e)):
      fail(_config_error(argv, e))
    name = next((a for a in argv[1:] if a.startswith('--config.')), 'a --config override')
    fail(f'{name.split("=")[0]} is not a valid override ({e}); check the key against the '
         'config file')
  for name in flags.FLAGS:  # a missing config file is reported lazily, on first use: not here
    value = flags.FLAGS[name].value
    if type(value).__name__ == '_ErrorConfig':
      cause = str(value._error).strip().splitlines()[-1].strip()
      fail(f'--{name} could not be loaded ({cause}); give the path of a configs/*.py file')
  if len(rest) > 1:
    fail(f'unexpected arguments {rest[1:]}: flags look like --name=value; quote a value that '
         'has spaces (--prompt="ROMEO and JULIET")')
  return rest


def quiet_logging():
  """Only warnings from libraries (orbax reports every save at INFO)."""
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger().setLevel(std_logging.WARNING)


def no_space(e: BaseException) -> str | None:
  """The path of a write that failed for lack of disk space anywhere in e's chain (orbax and
  tensorstore wrap the OSError in their own types), '' if the path is unknown, else None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return str(e.filename or '')
    if 'No space left on device' in str(e) or 'Disk quota exceeded' in str(e):
      return ''
    e = e.__cause__ or e.__context__
  return None


def run(main: Callable[[], None]) -> None:
  """The entry point of a `python -m mla_jax.X` command: parse flags, run main(), and print an
  mla_jax.Error as one line with exit status 1 (a run stopped by SIGTERM: its line, 143; a
  full disk: one line, 1)."""
  def wrapped(argv):
    del argv  # parse_flags refused extra arguments
    quiet_logging()
    try:
      main()
    except Error as e:
      sys.exit(f'error: {e}')
    except Preempted as e:
      print(e, file=sys.stderr, flush=True)
      sys.exit(128 + signal.SIGTERM)
    except Exception as e:
      path = no_space(e)
      if path is None:
        raise  # a bug: keep the traceback
      where = path or (flags.FLAGS['workdir'].value if 'workdir' in flags.FLAGS else None)
      print(f'error: no space left on {where or "the disk"}; free some space (or give a '
            '--workdir on another disk) and run the same command again', file=sys.stderr,
            flush=True)
      # Exit now: the writer threads of orbax, tensorstore and TensorBoard would each print
      # their own traceback for the same full disk while the interpreter shuts down.
      sys.stdout.flush()
      os._exit(1)

  app.run(wrapped, flags_parser=parse_flags)


def define_distributed_flags():
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a multi-host '
                      'run outside TPU / SLURM (which are detected without flags)')
  flags.DEFINE_integer('num_processes', None, 'processes in the run (with --coordinator_address)')
  flags.DEFINE_integer('process_id', None, 'this process, 0 .. num_processes - 1')


def initialize_distributed():
  """jax.distributed.initialize from the flags or the cluster's environment (if several)."""
  from mla_jax import sharding  # imports jax: only the entry points that need it pay for it

  f = flags.FLAGS
  sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
