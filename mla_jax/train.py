r"""Trains a model from a config file; restarting the same command resumes the run.

  python -m mla_jax.train --config=configs/mla.py --workdir=runs/mla
  python -m mla_jax.train --config=configs/mla.py:tiny --workdir=/tmp/t --config.train.steps=20
  python -m mla_jax.train --config=configs/mla.py --workdir=gs://b/mla --config.mesh.fsdp=8

On several hosts run the same command on each (TPU slices and SLURM jobs are detected; else
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I).

All logic lives in mla_jax.trainer; this file parses flags and reports bad input in one line.
"""

import jax
from absl import app, flags
from ml_collections import config_flags

from mla_jax import cli, data, tasks, trainer
from mla_jax import config as model_config
from mla_jax import workdir as wd

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'a configs/*.py file (optionally :tiny)')
flags.DEFINE_string('workdir', None, 'the run directory (created, or resumed if it exists)')
flags.mark_flags_as_required(['config', 'workdir'])
cli.define_distributed_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; flags look like --name=value')
  cli.quiet_logging()
  try:
    cli.initialize_distributed()
    result = trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (model_config.ConfigError, data.DataError, wd.WorkdirError, trainer.TrainingError,
          ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  if result and jax.process_index() == 0:
    print(f'validation: {tasks.task_class(FLAGS.config).describe(result)}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
