"""The trainer's tasks: a text batch gives the plain mean loss bit for bit; MQAR's loss counts
only the answers; an MQAR run trains, validates recall, checkpoints and resumes exactly; bad
task settings fail before anything is written."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from conftest import tiny_model
from flax import nnx

from configs import mla as mla_config
from mla_jax import mqar, tasks, training

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _value_and_grad(loss, model, batch):
  graphdef, state = nnx.split(model)
  return jax.jit(jax.value_and_grad(lambda s, b: loss(nnx.merge(graphdef, s), b)))(state, batch)


@pytest.fixture(scope='module')
def model():
  return tiny_model(attention='mla', kv_lora_rank=32, qk_rope_head_dim=8, n_layers=1)


def test_text_loss_is_the_plain_mean_bit_for_bit(model):
  """The loss of windows before batches carried weights: value and gradients identical."""
  windows = np.random.default_rng(0).integers(0, 256, (4, 33)).astype(np.int32)

  def plain_mean(m, w):
    return optax.softmax_cross_entropy_with_integer_labels(m(w[:, :-1]), w[:, 1:]).mean()

  old, old_grads = _value_and_grad(plain_mean, model, windows)
  new, new_grads = _value_and_grad(training.loss_fn, model, tasks.text_batch(windows))
  assert float(new) == float(old)
  for a, b in zip(jax.tree.leaves(old_grads), jax.tree.leaves(new_grads), strict=True):
    np.testing.assert_array_equal(a, b)


def test_mqar_loss_counts_only_the_answers(model):
  graphdef, state = nnx.split(model)
  loss_fn = jax.jit(lambda s, b: training.loss_fn(nnx.merge(graphdef, s), b))
  batch = mqar.MQAR(256, 32, 4).batch(0, 0, 6)
  loss = loss_fn(state, batch)
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, batch['inputs'])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  np.testing.assert_allclose(float(loss), np.asarray(nll)[batch['weights'] == 1].mean(),
                             rtol=1e-6)
  moved = {**batch, 'targets': np.where(batch['weights'] == 0, 7, batch['targets'])}
  assert float(loss_fn(state, moved)) == float(loss)


def mqar_config(**train):
  config = mla_config.get_config('tiny')
  config.data.task = 'mqar'
  config.data.mqar.update(num_kv_pairs=4, val_examples=40)  # 3 batches of 16, the last short
  config.train.update(train)
  return config


def _metrics(workdir):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]
  return [r['loss'] for r in rows if 'loss' in r], [r for r in rows if 'val_loss' in r]


@pytest.fixture(scope='module')
def mqar_runs(tmp_path_factory):
  whole = tmp_path_factory.mktemp('whole')
  last = training.train_and_evaluate(mqar_config(), str(whole))
  split = tmp_path_factory.mktemp('split')
  training.train_and_evaluate(mqar_config(stop_after_steps=5), str(split))
  training.train_and_evaluate(mqar_config(), str(split))
  return whole, split, last


@pytest.mark.slow
@pytest.mark.long
def test_mqar_run_validates_recall_and_resumes_exactly(mqar_runs):
  whole, split, last = mqar_runs
  losses, val = _metrics(whole)
  assert len(losses) == 10 and all(np.isfinite(losses))
  assert [sorted(v) for v in val] == [['step', 'val_accuracy', 'val_loss']] * 2
  assert last['answers'] == 4 * 40 and 0 <= last['accuracy'] <= 1
  assert val[-1]['val_accuracy'] == last['accuracy']
  split_losses, split_val = _metrics(split)
  assert split_losses == losses  # bit for bit: the batches are a function of (seed, step)
  assert split_val == val
  config = json.loads((whole / 'config.json').read_text())
  assert config['data']['task'] == 'mqar' and config['data']['mqar']['num_kv_pairs'] == 4


@pytest.mark.slow
@pytest.mark.long
def test_evaluate_cli_scores_an_mqar_run_on_its_heldout_set(mqar_runs):
  whole, _, last = mqar_runs
  run = subprocess.run([sys.executable, '-m', 'mla_jax.evaluate', f'--workdir={whole}'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert f"recall accuracy {last['accuracy']:.4f} over 160 answers" in run.stdout
  assert json.loads((whole / 'eval.json').read_text())['accuracy'] == last['accuracy']


@pytest.mark.parametrize('change, message', [
    (dict(task='bogus'), "data.task='bogus' is unknown"),
    (dict(mqar=dict(num_kv_pairs=9)), 'num_kv_pairs=9 needs'),
    (dict(mqar=dict(val_examples=0)), 'val_examples=0'),
])
def test_bad_task_settings_fail_before_writing(change, message, tmp_path):
  config = mqar_config()
  config.data.update({k: v for k, v in change.items() if k != 'mqar'})
  config.data.mqar.update(change.get('mqar', {}))
  with pytest.raises(ValueError, match=message):
    training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
