"""Training, in three parts (docs/design.md#7-training):

  step.py    the pure step: schedule, optimizer, loss, gradient accumulation, update, jit
  state.py   TrainState: created from the seed, resumed, started from init_from, saved
  loop.py    train_and_evaluate: prepare (every check, before anything is written), then the
             loop and its periodic actions (hooks.py: logging with an ETA, SIGTERM / SIGINT)
  memory.py  the rough memory estimate a run must fit before it starts

Commands and experiments use the names exported here (`from mla_jax import training`).
"""

from mla_jax.training.hooks import exit_before_first_step
from mla_jax.training.loop import (
    TrainingError,
    prepare,
    request_determinism,
    train_and_evaluate,
)
from mla_jax.training.state import TrainState, abstract_state, create_state, init_state
from mla_jax.training.step import (
    CPU_COMPILER_OPTIONS,
    batch_layout,
    cpu_compiler_options,
    jit_train_step,
    learning_rate,
    loss_fn,
    optimizer,
    train_step,
)

__all__ = ['CPU_COMPILER_OPTIONS', 'TrainState', 'TrainingError', 'abstract_state',
           'batch_layout', 'cpu_compiler_options', 'create_state', 'exit_before_first_step',
           'init_state', 'jit_train_step', 'learning_rate', 'loss_fn', 'optimizer', 'prepare',
           'request_determinism', 'train_and_evaluate', 'train_step']
