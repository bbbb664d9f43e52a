"""RunConfig: configs/*.py parse into frozen sections, back to the same dict, and every bad field
is one line naming it; a resumed run is compared field by field."""

import dataclasses
import json

import pytest

from configs import base
from configs import mla as mla_config
from mla_jax.config import ConfigError, ModelConfig
from mla_jax.run_config import RunConfig, changes, parse


@pytest.mark.parametrize('arg', ['', 'tiny'])
def test_a_config_file_round_trips_through_its_dict(arg):
  config = parse(mla_config.get_config(arg))
  assert isinstance(config.model, ModelConfig) and config.model.attention == 'mla'
  again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
  assert again == config
  assert parse(config) is config  # parsed once: a RunConfig passes through
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.opt.lr = 1.0


def _with(path: str, value) -> dict:
  """configs/base.py:tiny as a dict (as config.json holds it) with one field changed."""
  config = base.get_config('tiny').to_dict()
  section, name = path.split('.')
  config[section][name] = value
  return config


@pytest.mark.parametrize('path, value, message', [
    ('opt.b1', 1.0, r'opt.b1=1.0 must be a finite number in \[0, 1\)'),
    ('opt.lr', float('inf'), 'opt.lr=inf must be a finite number >= 0'),
    ('opt.weight_decay', -0.1, 'opt.weight_decay=-0.1 must be'),
    ('opt.grad_accum_steps', 3, 'data.batch_size=8 must divide evenly into opt.grad_accum_steps=3'),
    ('train.steps', 0, 'train.steps=0 must be an integer >= 1'),
    ('train.deterministic', 1, 'train.deterministic=1 must be true or false'),
    ('eval.stride', 33, r'eval.stride=33 must be an integer in \[1, 32\]'),
    ('data.seq_len', 129, 'data.seq_len=129 exceeds model.max_seq_len=128'),
    ('data.task', 'bogus', "data.task='bogus' is unknown"),
    ('model.n_heads', 3, 'model.d_model=32 is not divisible by n_heads=3'),
    ('mesh.fsdp', -2, 'mesh.fsdp=-2 must be an integer >= -1'),
    ('data.tokenizer', '', "data.tokenizer='' is empty"),
    ('data.tokenizer', 3, 'data.tokenizer=3 must be a string'),
    ('data.tokenizer', 'train:lots', "data.tokenizer='train:lots' must be 'train:N' with N an "
     'integer >= 257'),
    ('data.tokenizer', 'train:100', "data.tokenizer='train:100' must be 'train:N'"),
    ('data.tokenizer', 'train:512', "data.tokenizer='train:512' makes 512 tokens but "
     'model.vocab_size=256; raise model.vocab_size to 512'),
])
def test_each_bad_field_is_one_line_naming_it(path, value, message):
  with pytest.raises(ConfigError, match=message) as e:
    parse(_with(path, value))
  assert '\n' not in str(e.value)


def test_a_tokenizer_applies_to_text_only_and_old_configs_read_bytes():
  config = base.get_config('tiny').to_dict()
  config['data'].update(task='mqar', tokenizer='train:300')
  with pytest.raises(ConfigError, match=r"applies to data\.task='text' only") as e:
    parse(config)
  assert '\n' not in str(e.value)
  recorded = parse(base.get_config('tiny')).to_dict()
  del recorded['data']['tokenizer']  # config.json of a run from before tokenizers
  assert parse(recorded).data.tokenizer == 'byte'
  assert not changes(parse(recorded), parse(base.get_config('tiny')))


def test_unknown_and_missing_keys_are_named():
  recorded = parse(base.get_config()).to_dict()
  with pytest.raises(ConfigError, match=r"unknown opt keys \['lr_peak'\]"):
    RunConfig.from_dict({**recorded, 'opt': {**recorded['opt'], 'lr_peak': 1.0}})
  del recorded['train']['log_every']
  with pytest.raises(ConfigError, match='train has no log_every'):
    RunConfig.from_dict(recorded)
  with pytest.raises(ConfigError, match='a config must be a mapping'):
    RunConfig.from_dict([])


def test_a_converted_checkpoint_has_no_training_sections_and_keeps_its_records():
  recorded = parse(base.get_config()).to_dict()
  converted = {k: recorded[k] for k in ('seed', 'model', 'eval', 'mesh')}
  converted['conversion'] = {'kv_lora_rank': 12}
  config = RunConfig.from_dict(converted)
  assert config.data is None and config.opt is None
  assert config.conversion.kv_lora_rank == 12
  assert RunConfig.from_dict(config.to_dict()) == config
  with pytest.raises(ConfigError, match='has no data, opt, train section'):
    config.trainable()


def test_changes_name_the_fields_that_make_another_run():
  recorded = parse(base.get_config())
  now = base.get_config()
  now.train.update(stop_after_steps=5, log_every=1, eval_every=7)  # cadence: the same run
  now.model.attention_impl = 'einsum'  # how it computes, not what: the same run
  now.eval.batch_size = 4
  assert changes(recorded, parse(now)) == []
  now.opt.lr, now.train.steps = 1e-3, 300
  assert changes(recorded, parse(now)) == ['opt.lr: 0.003 in config.json, 0.001 now',
                                           'train.steps: 200 in config.json, 300 now']
