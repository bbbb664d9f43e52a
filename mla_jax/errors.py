"""The one base class of every error a user can cause (a bad config, flag, file or checkpoint).

Library code raises a subclass with a message that names the problem and the fix; the command
line entry points (mla_jax.cli.run) print it as one `error: ...` line and exit 1. Anything
else that escapes is a bug in mla_jax and keeps its traceback.
"""

from __future__ import annotations

import numpy as np


class Error(Exception):
  """Bad input; the message says what is wrong and how to fix it."""


class ConfigError(Error, ValueError):
  """An invalid configuration (model or training); the message names the field and the fix."""


class Preempted(Exception):
  """A run stopped by SIGTERM after checkpointing its step: not finished, and not the user's
  mistake. Entry points (mla_jax.cli.run) print the message and exit 143 (128 + SIGTERM), so
  that a script or an experiment worker never takes the run for a finished one."""


class InputError(Error, ValueError):
  """A bad argument to a library function (tokens, prompts, sampling settings)."""


def check_token_ids(tokens, vocab_size: int, what: str = 'token', shape: str | None = None) -> None:
  """Refuses, at the API edge, ids that are not integers, an array of the wrong rank (shape,
  e.g. '[batch, time]': one letter of rank per name) and ids outside [0, vocab_size): the
  embedding lookup would turn them into NaN logits (or read -1 in a uint8 array as 255)
  without a word, and a float or misshaped array fails deep inside jax."""
  tokens = np.asarray(tokens)
  rank = None if shape is None else len(shape.strip('[]').split(','))
  if not np.issubdtype(tokens.dtype, np.integer) or (rank is not None and tokens.ndim != rank):
    wanted = f'an int array {shape}' if shape else 'an int array'
    raise InputError(f'{what} ids must be {wanted}; got {tokens.dtype} {list(tokens.shape)}')
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
    raise InputError(f'{what} ids must lie in [0, {vocab_size}); got [{tokens.min()}, '
                     f'{tokens.max()}]')
