"""What the absl entry points share: one-line errors for bad flags, quiet library logging, and
the multi-host start-up flags."""

import logging as std_logging
import sys

from absl import flags, logging


def parse_flags(argv):
  """absl's flag parsing, with every failure (a bad --config.a.b override included, which
  ml_collections reports as KeyError or AttributeError) turned into one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}; pass --helpfull to list the flags')
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    name = next((a for a in argv[1:] if a.startswith('--config.')), 'a --config override')
    sys.exit(f'error: {name.split("=")[0]} is not a valid override ({e}); check the key '
             'against the config file')


def quiet_logging():
  """Only warnings from libraries (orbax reports every save at INFO)."""
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger().setLevel(std_logging.WARNING)


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
