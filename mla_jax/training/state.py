"""TrainState: a run's (model, optimizer) laid out on the mesh, its step and best validation
loss; created from config.seed, resumed from the run's latest checkpoint, or started from
another run's parameters (init_from), and saved.

A seed gives the same parameters, bit for bit, on any mesh and any number of hosts: the state
is initialised eagerly on every host and then split onto the devices (a jitted initialiser
fuses the scaling into the sampler and rounds differently). The cost is one full copy per host
while starting, which bounds the model by a host's memory, not a device's.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys
from typing import Any

import jax
from flax import nnx

from mla_jax import sharding
from mla_jax import workdir as wd
from mla_jax.config import ConfigError
from mla_jax.model import Transformer
from mla_jax.run_config import EXECUTION_FIELDS, TRAINING_FIELDS, RunConfig, parse
from mla_jax.training.step import optimizer


def create_state(config, mesh=None) -> tuple[Transformer, nnx.Optimizer]:
  """(model, optimizer) initialised from config.seed (a RunConfig or a ConfigDict), its
  attention kernels resolved for the platform of `mesh` (mla_jax.attention_op)."""
  config = parse(config)
  model = Transformer(config.model, rngs=nnx.Rngs(config.seed), mesh=mesh)
  return model, nnx.Optimizer(model, optimizer(config.opt, config.train.steps), wrt=nnx.Param)


def abstract_state(config, mesh=None) -> tuple[Transformer, nnx.Optimizer]:
  """create_state's (model, optimizer) as shapes and dtypes: nothing is allocated."""
  return nnx.eval_shape(lambda: create_state(config, mesh))


def init_state(config, mesh: jax.sharding.Mesh, shardings=None):
  """(graphdef, state, shardings) of (model, optimizer) from config.seed, laid out on the
  mesh (shardings: the layout, if the caller has it already)."""
  graphdef, state = nnx.split(create_state(config, mesh))
  shardings = sharding.state_shardings(state, mesh) if shardings is None else shardings
  return graphdef, sharding.place(state, shardings), shardings


@dataclasses.dataclass
class TrainState:
  """(model, optimizer) as nnx state on the mesh, the step it has reached, and the best
  validation loss a run has seen (what a checkpoint holds)."""

  graphdef: Any
  state: nnx.State
  shardings: Any
  step: int = 0
  best_val_loss: float = math.inf

  @classmethod
  def create(cls, config: RunConfig, mesh, shardings=None) -> TrainState:
    return cls(*init_state(config, mesh, shardings))

  def merged(self) -> tuple[Transformer, nnx.Optimizer]:
    return nnx.merge(self.graphdef, self.state)

  def resume(self, checkpoints) -> None:
    """Restores the run's newest complete checkpoint into this layout (whatever mesh saved
    it); a damaged checkpoint is refused by name."""
    step = checkpoints.latest_step()
    model, opt = self.merged()
    model_state, opt_state = nnx.state(model), nnx.state(opt)
    _, _, meta = wd.restore(checkpoints, step, model_state, opt_state, fix='resume')
    nnx.update(model, model_state)
    nnx.update(opt, opt_state)
    self.state, self.step = nnx.state((model, opt)), step
    self.best_val_loss = meta.get('best_val_loss', math.inf)

  def load_parameters(self, source) -> int:
    """Replaces the parameters with the newest complete checkpoint of workdir `source` (the
    optimizer starts afresh); -> that checkpoint's step."""
    checkpoints = wd.manager(pathlib.Path(source) / 'checkpoints')
    step = checkpoints.latest_step()
    model, opt = self.merged()
    model_state = nnx.state(model)
    wd.restore(checkpoints, step, model_state, fix='init_from')
    nnx.update(model, model_state)
    self.state = nnx.state((model, opt))
    return step

  def save(self, checkpoints) -> None:
    model, opt = self.merged()
    wd.save(checkpoints, self.step, nnx.state(model), nnx.state(opt),
            {'step': self.step, 'best_val_loss': self.best_val_loss})

  def save_best(self, best, val_loss: float) -> None:
    """Records val_loss as the best and saves the parameters into best/."""
    self.best_val_loss = val_loss
    model, _ = self.merged()
    wd.save(best, self.step, nnx.state(model), meta={'step': self.step, 'val_loss': val_loss})


def latest_checkpoint(folder: pathlib.Path) -> int | None:
  """The step a run resumes from (the newest complete checkpoint), without creating the folder
  (orbax's manager would)."""
  return wd.manager(folder).latest_step() if folder.is_dir() else None


def resolve_init_from(config: RunConfig, recorded: RunConfig | None, has_checkpoint: bool,
                      init_from: str | None) -> RunConfig:
  """config with init_from set to the workdir a new run starts from, checked before anything
  is written: --init_from (or the one config.json records) must hold a checkpoint of the same
  model (up to EXECUTION_FIELDS and TRAINING_FIELDS). A run with a checkpoint of its own
  resumes from it and keeps the init_from it records; giving it another is refused."""
  given = str(pathlib.Path(init_from).absolute()) if init_from else None
  previous = recorded.init_from if recorded is not None else None
  if given and given != previous and (has_checkpoint or previous):
    raise ConfigError(f'this workdir is a run of its own (initialised from {previous}); '
                      '--init_from applies to a new run: resume without it, or use a new '
                      '--workdir')
  source = given or previous or config.init_from
  if source is None or has_checkpoint:
    return dataclasses.replace(config, init_from=source)
  theirs, ours = wd.read_config(source).model, config.model
  differ = [f.name for f in dataclasses.fields(ours)
            if f.name not in EXECUTION_FIELDS + TRAINING_FIELDS
            and getattr(theirs, f.name) != getattr(ours, f.name)]
  if differ:
    shown = ', '.join(f'{n} ({getattr(theirs, n)!r} there, {getattr(ours, n)!r} here)'
                      for n in differ)
    raise ConfigError(f'--init_from={source} holds another model: {shown}; set them in the '
                      'config (configs/finetune.py:WORKDIR copies them)')
  if latest_checkpoint(pathlib.Path(source) / 'checkpoints') is None:
    raise wd.WorkdirError(f'--init_from={source} has no checkpoint to start from')
  return dataclasses.replace(config, init_from=source)


def announce(message: str) -> None:
  """One line on stderr from process 0."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
