"""Training: the public API the commands and the experiments use (`from mla_jax import training`).

The names below are the contract; where they are defined may change.
"""

from mla_jax.trainer import (
                             batch_layout,
                             cpu_compiler_options,
                             create_state,
                             init_state,
                             jit_train_step,
                             learning_rate,
                             loss_fn,
                             optimizer,
                             train_and_evaluate,
                             train_step,
)

__all__ = ['batch_layout', 'cpu_compiler_options', 'create_state', 'init_state', 'jit_train_step',
           'learning_rate', 'loss_fn', 'optimizer', 'train_and_evaluate', 'train_step']
