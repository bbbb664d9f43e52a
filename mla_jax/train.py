r"""Trains a model from a config file; restarting the same command resumes the run.

  python -m mla_jax.train --config=configs/mla.py --workdir=runs/mla
  python -m mla_jax.train --config=configs/mla.py:tiny --workdir=/tmp/t --config.train.steps=20
  python -m mla_jax.train --config=configs/mla.py --workdir=gs://b/mla --config.mesh.fsdp=8
  python -m mla_jax.train --config=configs/finetune.py:runs/gqa_mla --workdir=runs/gqa_mla_ft \
      --init_from=runs/gqa_mla     # a new run from another run's parameters (same model)

On several hosts run the same command on each (TPU slices and SLURM jobs are detected; else
add --coordinator_address=HOST:PORT --num_processes=N --process_id=I). SIGTERM or Ctrl-C
checkpoints the step in progress and exits 143; the same command resumes.

All logic lives in mla_jax.training; this file parses flags and the config (once).
"""

import signal

import jax
from absl import flags
from ml_collections import config_flags

from mla_jax import cli, tasks, training
from mla_jax.run_config import RunConfig

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'a configs/*.py file (optionally :arg)')
flags.DEFINE_string('workdir', None, 'the run directory (created, or resumed if it exists)')
flags.DEFINE_string('init_from', None, "a new run starts from this workdir's latest parameters "
                    '(trained, converted or imported; the model config must match)')
flags.mark_flags_as_required(['config', 'workdir'])
cli.define_distributed_flags()


def main():
  for signum in (signal.SIGTERM, signal.SIGINT):  # until the trainer's own
    signal.signal(signum, training.exit_before_first_step)
  config = RunConfig.from_dict(FLAGS.config).trainable()  # a bad config: one line, nothing run
  training.request_determinism(config)  # before anything starts jax's backends
  cli.initialize_distributed()
  result = training.train_and_evaluate(config, FLAGS.workdir, init_from=FLAGS.init_from)
  if result and jax.process_index() == 0:
    print(f'validation: {tasks.task_class(config).describe(result)}')


if __name__ == '__main__':
  cli.run(main)
