"""RunConfig: a run's whole configuration, parsed once into frozen, validated sections.

configs/*.py return ml_collections ConfigDicts (the file format, and the --config.a.b=value
override channel). They are parsed here once, where they enter: by the train command, by
training.train_and_evaluate, and by workdir.read_config when a run's config.json is loaded.
Everything downstream reads the parsed sections:

  seed       parameters and data order, an integer in [0, 2**32)
  model      ModelConfig (mla_jax.config)
  data       the task and its data (None for a converted or imported checkpoint)
  opt        AdamW and its schedule (None likewise)
  train      length, logging, evaluation and checkpoint cadence (None likewise)
  eval       the validation windows
  mesh       device mesh sizes (mla_jax.sharding.make_mesh)
  init_from  the workdir a new run took its first parameters from, if any
  records    what config.json records beside the config: 'kernels' (the attention kernels the
             model resolved), 'source' (an imported checkpoint), 'conversion' (a to_mla run)

Each section checks its own fields when built and raises a ConfigError of one line that names
the field, its value and the fix (`opt.b2=1.5 must be in [0, 1)`); RunConfig checks what spans
sections (the batch splits into microbatches, windows fit the model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from mla_jax import tokenizer
from mla_jax.config import ConfigError, ModelConfig

TASKS = ('text', 'mqar')  # mla_jax.tasks implements each
SEED_LIMIT = 2**32  # jax and numpy draw from 32-bit seeds: larger ones would alias
# Model fields that say how a model computes, not what: a run resumes, or starts from another
# run's parameters (init_from), under other values of these.
EXECUTION_FIELDS = ('dtype', 'param_dtype', 'attention_impl', 'mla_decode', 'max_seq_len',
                    'moe_impl')
# Model fields that say how a model trains, not what it is: a fine-tuning run (init_from) may
# set its own; a resumed run may not (they would make it another run).
TRAINING_FIELDS = ('aux_loss_alpha', 'seq_aux_loss_alpha', 'bias_update_speed')
# Top-level keys of config.json that record facts about a run rather than configure it.
RECORDS = ('kernels', 'source', 'conversion')


def _integer(name: str, value, least: int, most: int | None = None, fix: str = '') -> None:
  """Refuses a non-integer (a bool included) or one outside [least, most]."""
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= least and (
      most is None or value <= most)
  if not ok:
    bounds = f'>= {least}' if most is None else f'in [{least}, {most}]'
    raise ConfigError(f'{name}={value!r} must be an integer {bounds}{fix}')


def _number(name: str, value, lo: float, hi: float = math.inf, *, lo_open=False,
            hi_open=True, fix: str = '') -> None:
  """Refuses a non-number, a NaN or infinity, or one outside the interval from lo to hi."""
  ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
  if ok:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
  if not ok:
    if hi == math.inf:
      bounds = f'{">" if lo_open else ">="} {lo:g}'
    else:
      bounds = f'in {"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}'
    raise ConfigError(f'{name}={value!r} must be a finite number {bounds}{fix}')


def _string(name: str, value) -> None:
  if not isinstance(value, str):
    raise ConfigError(f'{name}={value!r} must be a string')


@dataclasses.dataclass(frozen=True)
class MQARSettings:
  """data.mqar: multi-query associative recall (mla_jax.mqar); read only when data.task='mqar'."""

  num_kv_pairs: int = 8  # key-value pairs in the context, each queried once
  power_a: float = 0.01  # query gaps P(g) ∝ (g + 1)^(power_a - 1); 1 = uniform
  val_examples: int = 1024  # the fixed held-out set
  val_seed: int = 0

  def __post_init__(self):
    _integer('data.mqar.num_kv_pairs', self.num_kv_pairs, 1)
    _number('data.mqar.power_a', self.power_a, 0, lo_open=True)
    _integer('data.mqar.val_examples', self.val_examples, 1)
    _integer('data.mqar.val_seed', self.val_seed, 0, SEED_LIMIT - 1)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the model learns from (configs/base.py comments each field)."""

  corpus: str
  files: str
  val_fraction: float
  cache_dir: str
  seq_len: int
  batch_size: int
  task: str = 'text'  # configs recorded before tasks existed are text
  mqar: MQARSettings = MQARSettings()
  tokenizer: str = 'byte'  # configs recorded before tokenizers existed read bytes

  def trained_vocab(self) -> int | None:
    """N of data.tokenizer='train:N', else None."""
    return tokenizer.trained_size(self.tokenizer)

  def __post_init__(self):
    if isinstance(self.mqar, Mapping):
      object.__setattr__(self, 'mqar', _build(MQARSettings, self.mqar, 'data.mqar'))
    if self.task not in TASKS:
      raise ConfigError(f'data.task={self.task!r} is unknown; use one of {TASKS}')
    for name in ('corpus', 'files', 'cache_dir'):
      _string(f'data.{name}', getattr(self, name))
    # Whole files (or a single file's tail) are held out: both splits must be non-empty.
    _number('data.val_fraction', self.val_fraction, 0, 1, lo_open=True,
            fix='; it is the share of data.files held out for validation (e.g. 0.1)')
    _integer('data.seq_len', self.seq_len, 1)
    _integer('data.batch_size', self.batch_size, 1)
    _string('data.tokenizer', self.tokenizer)
    if not self.tokenizer.strip():
      raise ConfigError("data.tokenizer='' is empty; give 'byte', 'train:N' (a BPE of N tokens "
                        'trained on the corpus) or the path of a tokenizer.json')
    try:
      self.trained_vocab()
    except tokenizer.TokenizerError as e:
      raise ConfigError(str(e)) from None
    if self.task != 'text' and self.tokenizer != tokenizer.BYTE:
      raise ConfigError(f'data.tokenizer={self.tokenizer!r} applies to data.task=\'text\' only '
                        f'(task {self.task!r} draws its own token ids); leave it \'byte\'')


@dataclasses.dataclass(frozen=True)
class OptConfig:
  """AdamW with global-norm clipping; linear warmup to lr, cosine decay to lr *
  final_lr_fraction."""

  lr: float
  warmup_steps: int
  final_lr_fraction: float
  b1: float
  b2: float
  weight_decay: float
  clip_norm: float
  grad_accum_steps: int

  def __post_init__(self):
    _number('opt.lr', self.lr, 0)
    _integer('opt.warmup_steps', self.warmup_steps, 0)
    _number('opt.final_lr_fraction', self.final_lr_fraction, 0, 1, hi_open=False,
            fix=' (the decay ends at lr times it)')
    _number('opt.b1', self.b1, 0, 1, fix=" (Adam's first-moment decay, e.g. 0.9)")
    _number('opt.b2', self.b2, 0, 1, fix=" (Adam's second-moment decay, e.g. 0.95)")
    _number('opt.weight_decay', self.weight_decay, 0)
    _number('opt.clip_norm', self.clip_norm, 0, lo_open=True,
            fix=' (the global gradient norm is clipped to it; 0 would zero every update)')
    _integer('opt.grad_accum_steps', self.grad_accum_steps, 1)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How long a run trains, and how often it logs, validates and checkpoints."""

  steps: int
  stop_after_steps: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  eval_every: int
  deterministic: bool = False

  def __post_init__(self):
    _integer('train.steps', self.steps, 1)
    _integer('train.stop_after_steps', self.stop_after_steps, 0)
    for name in ('log_every', 'checkpoint_every', 'eval_every'):
      _integer(f'train.{name}', getattr(self, name), 1)
    # 0 would let orbax delete every checkpoint: the run could never resume.
    _integer('train.keep_checkpoints', self.keep_checkpoints, 1)
    if not isinstance(self.deterministic, bool):
      raise ConfigError(f'train.deterministic={self.deterministic!r} must be true or false')


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Validation windows: each scores the tokens the previous one did not."""

  seq_len: int
  stride: int
  batch_size: int

  def __post_init__(self):
    _integer('eval.seq_len', self.seq_len, 1)
    _integer('eval.stride', self.stride, 1, self.seq_len if isinstance(self.seq_len, int) else 1,
             fix=' (eval.seq_len is the most)')
    _integer('eval.batch_size', self.batch_size, 1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; one may be -1 ("the rest"). mla_jax.sharding.make_mesh checks them
  against the devices there are."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  expert: int = 1  # MoE experts split over it (configs recorded before it existed: 1)

  def __post_init__(self):
    for f in dataclasses.fields(self):
      _integer(f'mesh.{f.name}', getattr(self, f.name), -1)


_SECTIONS = {'data': DataConfig, 'opt': OptConfig, 'train': TrainConfig, 'eval': EvalConfig,
             'mesh': MeshConfig}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A run's configuration, parsed and checked (see the module docstring)."""

  seed: int
  model: ModelConfig
  eval: EvalConfig
  mesh: MeshConfig = MeshConfig()
  data: DataConfig | None = None
  opt: OptConfig | None = None
  train: TrainConfig | None = None
  init_from: str | None = None
  records: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _integer('seed', self.seed, 0, SEED_LIMIT - 1)
    if self.init_from is not None:
      _string('init_from', self.init_from)
    seq_lens = {'eval.seq_len': self.eval.seq_len}
    if self.data is not None:
      seq_lens['data.seq_len'] = self.data.seq_len
    for name, seq_len in seq_lens.items():
      if seq_len > self.model.max_seq_len:
        raise ConfigError(f'{name}={seq_len} exceeds model.max_seq_len='
                          f'{self.model.max_seq_len}; lower it or raise model.max_seq_len')
    trained = self.data.trained_vocab() if self.data is not None else None
    if trained is not None and trained > self.model.vocab_size:
      raise ConfigError(f'data.tokenizer={self.data.tokenizer!r} makes {trained} tokens but '
                        f'model.vocab_size={self.model.vocab_size}; raise model.vocab_size to '
                        f'{trained}')
    if self.data is not None and self.opt is not None and (
        self.data.batch_size % self.opt.grad_accum_steps):
      raise ConfigError(f'data.batch_size={self.data.batch_size} must divide evenly into '
                        f'opt.grad_accum_steps={self.opt.grad_accum_steps} microbatches')
    if self.opt is not None and self.train is not None and (
        self.opt.warmup_steps > self.train.steps):
      raise ConfigError(f'opt.warmup_steps={self.opt.warmup_steps} is longer than the run '
                        f'(train.steps={self.train.steps}); lower it (e.g. a tenth of the run)')

  def trainable(self) -> RunConfig:
    """self, if it has the sections a training run needs; else a ConfigError."""
    missing = [name for name in ('data', 'opt', 'train') if getattr(self, name) is None]
    if missing:
      raise ConfigError(f'the config has no {", ".join(missing)} section; train from a '
                        'configs/*.py file (configs/finetune.py for a converted checkpoint)')
    return self

  def __getattr__(self, name: str):
    """A record as an attribute (config.conversion.kv_lora_rank): read-only, like the rest."""
    records = self.__dict__.get('records', {})
    if name in records:
      import ml_collections  # here: only a record that is read needs it
      return ml_collections.FrozenConfigDict(records[name])
    raise AttributeError(f'RunConfig has no field or record {name!r}')

  def to_dict(self) -> dict[str, Any]:
    """The config.json form: sections as dicts, records beside them, None sections left out."""
    out = {'seed': self.seed, 'model': self.model.to_dict()}
    for name in _SECTIONS:
      section = getattr(self, name)
      if section is not None:
        out[name] = dataclasses.asdict(section)
    if self.init_from is not None:
      out['init_from'] = self.init_from
    return {**out, **self.records}

  @classmethod
  def from_dict(cls, d) -> RunConfig:
    """Parses a ConfigDict or a mapping (config.json); a RunConfig is returned as it is."""
    if isinstance(d, RunConfig):
      return d
    d = _plain(d)
    if not isinstance(d, Mapping):
      raise ConfigError(f'a config must be a mapping of sections, not {type(d).__name__}')
    known = {'seed', 'model', 'init_from', *_SECTIONS, *RECORDS}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f'unknown config keys {unknown}; known keys: {sorted(known)}')
    for name in ('seed', 'model', 'eval'):
      if name not in d:
        raise ConfigError(f'the config has no {name!r}; start from a configs/*.py file')
    sections = {name: _build(kind, d[name], name) for name, kind in _SECTIONS.items()
                if d.get(name) is not None}
    return cls(seed=d['seed'], model=_model(d['model']), init_from=d.get('init_from'),
               records={k: d[k] for k in RECORDS if k in d}, **sections)


def parse(config) -> RunConfig:
  """RunConfig.from_dict: a ConfigDict or mapping parsed, a RunConfig as it is."""
  return RunConfig.from_dict(config)


def _plain(d):
  """A ConfigDict (FieldReferences resolved) or mapping as plain dicts."""
  if hasattr(d, 'to_dict') and not dataclasses.is_dataclass(d):
    d = d.to_dict()
  if isinstance(d, Mapping):
    return {k: _plain(v) for k, v in d.items()}
  return d


def _build(kind, d, name: str):
  """A section from its mapping: unknown or missing keys are one line each."""
  if not isinstance(d, Mapping):
    raise ConfigError(f'{name} must be a section (a mapping), not {d!r}')
  fields = {f.name: f for f in dataclasses.fields(kind)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConfigError(f'unknown {name} keys {unknown}; known keys: {sorted(fields)}')
  required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING]
  missing = [n for n in required if n not in d]
  if missing:
    raise ConfigError(f'{name} has no {", ".join(missing)}; configs/base.py sets every field')
  return kind(**d)


def _model(d) -> ModelConfig:
  """ModelConfig.from_dict, its messages prefixed with the section ('model.d_model=...')."""
  try:
    return d if isinstance(d, ModelConfig) else ModelConfig.from_dict(d)
  except ConfigError as e:
    message = str(e)
    field = message.split('=')[0].split(' ')[0]
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    raise ConfigError(f'model.{message}' if field in names else f'model: {message}') from None
  except TypeError as e:  # a non-mapping model section
    raise ConfigError(f'model must be a section of ModelConfig fields ({e})') from None


# --- comparing a run's recorded config with the one it resumes under ----------------------
def _comparable(config: RunConfig) -> dict[str, Any]:
  """The fields whose change would make a resumed run another run: the seed, the model but
  its EXECUTION_FIELDS, the data (a task's settings only for the task that runs), the
  optimizer, and train.steps (the schedule's length)."""
  out = {'seed': config.seed}
  out.update({f'model.{k}': v for k, v in config.model.to_dict().items()
              if k not in EXECUTION_FIELDS})
  if config.data is not None:
    data = dataclasses.asdict(config.data)
    mqar = data.pop('mqar')
    if config.data.task == 'mqar':
      data.update({f'mqar.{k}': v for k, v in mqar.items()})
    out.update({f'data.{k}': v for k, v in data.items()})
  if config.opt is not None:
    out.update({f'opt.{k}': v for k, v in dataclasses.asdict(config.opt).items()})
  if config.train is not None:
    out['train.steps'] = config.train.steps
  return out


def changes(recorded: RunConfig, now: RunConfig) -> list[str]:
  """The fields in which `now` would train another run than `recorded`, each as
  'opt.lr: 0.003 in config.json, 0.001 now'."""
  old, new = _comparable(recorded), _comparable(now)
  return [f'{name}: {old.get(name)!r} in config.json, {new.get(name)!r} now'
          for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
