"""What the absl entry points share: `run(main)`, which turns every mistake a user can make on
the command line into one `error: ...` line and a non-zero exit, and the multi-host flags.

Exit codes: 2 for a bad flag or config file (nothing ran), 1 for bad input found while running
(an mla_jax.Error). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging as std_logging
import signal
import sys
from collections.abc import Callable

from absl import app, flags, logging

from mla_jax.errors import Error, Preempted


def _config_error(argv, e: Exception) -> str:
  """One line for a --config file that cannot be loaded (ml_collections embeds a traceback in
  the message; its last line is the cause)."""
  given = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), '?')
  if isinstance(e, SyntaxError):
    return f'--config={given} has a syntax error (line {e.lineno}: {e.msg}); fix the file'
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
  except (KeyError, AttributeError, TypeError, ValueError) as e:
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


def run(main: Callable[[], None]) -> None:
  """The entry point of a `python -m mla_jax.X` command: parse flags, run main(), and print an
  mla_jax.Error as one line with exit status 1 (a run stopped by SIGTERM: its line, 143)."""
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
