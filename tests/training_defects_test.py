"""The training path's defects that a 259-case reliability probe found (2026-12-07, commit
4b9ed11), one test each, numbered as the probe numbered them. Every bad input is refused with
one line naming the problem, and nothing is written or lost."""

import hashlib
import math
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_run

from mla_jax import data, run_config, training
from mla_jax import workdir as wd
from mla_jax.attention_op import AttentionOp
from mla_jax.errors import Error
from mla_jax.training import memory as training_memory
from mla_jax.training import state as training_state

ROOT = pathlib.Path(__file__).resolve().parents[1]


def snapshot(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.fixture(scope='module')
def finished(corpus, tmp_path_factory) -> pathlib.Path:
  """A complete 10-step tiny run (checkpoints 5 and 10, best/, metrics.jsonl)."""
  folder = tmp_path_factory.mktemp('finished')
  training.train_and_evaluate(tiny_run(corpus), str(folder))
  return folder


@pytest.fixture
def copy(finished, tmp_path) -> pathlib.Path:
  shutil.copytree(finished, tmp_path / 'run')
  (tmp_path / 'run' / '.lock').unlink(missing_ok=True)
  return tmp_path / 'run'


# --- 1. data loss --------------------------------------------------------------------------
def test_a_run_whose_checkpoints_are_gone_is_refused_untouched(corpus, copy, tmp_path):
  """checkpoints/ moved aside: training again used to delete best/ and cut metrics.jsonl to
  one row, with exit 0."""
  shutil.move(copy / 'checkpoints', tmp_path / 'aside')
  before = snapshot(copy)
  with pytest.raises(wd.WorkdirError, match=r'but no checkpoints/; put its checkpoints/ back'):
    training.train_and_evaluate(tiny_run(corpus), str(copy))
  assert snapshot(copy) == before


# --- 2. checkpoints without config.json ---------------------------------------------------
def test_checkpoints_without_their_config_are_refused(corpus, copy):
  """Deleting config.json used to disable the drift check: the run resumed under another lr
  and wrote a config.json that misrecorded it."""
  (copy / 'config.json').unlink()
  before = snapshot(copy)
  config = tiny_run(corpus, steps=12)
  config.opt.lr = 1e-3
  with pytest.raises(wd.WorkdirError, match=r'holds checkpoints but no config\.json'):
    training.train_and_evaluate(config, str(copy))
  assert snapshot(copy) == before


# --- 5. sizes the machine cannot hold ------------------------------------------------------
@pytest.mark.parametrize('override', ['--config.data.batch_size=100000000',
                                      '--config.model.d_model=32768'])
def test_a_run_too_large_for_memory_is_refused_before_writing(override, corpus, tmp_path):
  # Under a 12 GiB address-space limit: were the estimate to miss, the run would end in a
  # MemoryError instead of swapping the host.
  result = subprocess.run(
      ['bash', '-c', 'ulimit -v 12582912 && exec "$@"', 'bash', sys.executable, '-m',
       'mla_jax.train', '--config=configs/mla.py:tiny', f'--workdir={tmp_path / "run"}',
       f'--config.data.files={corpus}', override],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'GiB of memory' in lines[0] and 'this host has' in lines[0], lines
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('whole', ['einsum', 'xla'])
def test_the_memory_estimate_counts_the_scores_of_paths_that_materialise_them(whole, corpus):
  """Einsum and XLA's attention hold [h, t, t] scores and probabilities per layer for the
  backward pass; the C++ kernel (flash attention) holds none."""
  config = run_config.RunConfig.from_dict(tiny_run(corpus))
  model, optimizer = training_state.abstract_state(config)

  def activations(op):
    model.op = op
    return training_memory.estimate(config, (model, optimizer))['activations']

  m, d = config.model, config.data
  scores = m.n_layers * 2 * d.batch_size * m.n_heads * d.seq_len ** 2 * 4  # float32
  assert (activations(AttentionOp('cpu', whole=whole))
          - activations(AttentionOp('cpu', whole='cpu_kernel'))) == scores


# --- 11. seeds out of range ----------------------------------------------------------------
@pytest.mark.parametrize('seed', [-1, 2**70])
def test_a_seed_out_of_range_is_refused_before_writing(seed, corpus, tmp_path):
  config = tiny_run(corpus)
  config.seed = seed
  with pytest.raises(Error, match=rf'seed={seed} must be an integer in \[0, 4294967295\]'):
    training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


# --- 14. a refused --init_from -------------------------------------------------------------
def test_a_refused_init_from_writes_nothing(corpus, copy, tmp_path):
  """A source whose checkpoint is damaged: refused, and the new workdir is never made (it
  used to be left with .lock, best/ and checkpoints/)."""
  for f in (copy / 'checkpoints' / '10' / 'params').rglob('*'):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b'\0' * 64)
  with pytest.raises(wd.WorkdirError, match='is damaged'):
    training.train_and_evaluate(tiny_run(corpus), str(tmp_path / 'new'), init_from=str(copy))
  assert not (tmp_path / 'new').exists()


# --- 16. optimizer values ------------------------------------------------------------------
@pytest.mark.parametrize('field, value, message', [
    ('warmup_steps', -1, 'opt.warmup_steps=-1 must be an integer >= 0'),
    ('warmup_steps', 11, r'opt.warmup_steps=11 is longer than the run \(train.steps=10\)'),
    ('b2', 1.5, r'opt.b2=1.5 must be a finite number in \[0, 1\)'),
    ('clip_norm', 0.0, 'opt.clip_norm=0.0 must be a finite number > 0'),
    ('final_lr_fraction', 50.0, r'opt.final_lr_fraction=50.0 must be a finite number in \[0, 1\]'),
])
def test_bad_optimizer_values_are_refused_before_writing(field, value, message, corpus,
                                                         tmp_path):
  config = tiny_run(corpus)
  config.opt[field] = value
  with pytest.raises(Error, match=message):
    training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_resuming_with_a_longer_schedule_is_refused(corpus, copy):
  """A larger train.steps on resume used to stretch the cosine schedule silently (the lr
  jumped): refused, with the way to train further."""
  before = snapshot(copy)
  with pytest.raises(wd.WorkdirError, match=r'train.steps: 10 in config.json, 20 now.*'
                                            r'--init_from='):
    training.train_and_evaluate(tiny_run(corpus, steps=20), str(copy))
  assert snapshot(copy) == before


# --- 17. data.val_fraction -----------------------------------------------------------------
@pytest.mark.parametrize('fraction', [1.0, 0.0, -0.5, math.nan])
def test_a_bad_val_fraction_is_refused_by_name(fraction, corpus, tmp_path):
  config = tiny_run(corpus)
  config.data.val_fraction = fraction
  with pytest.raises(Error, match=rf'data.val_fraction={fraction!r} must be'):
    training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_several_files_never_put_the_whole_corpus_in_validation(tmp_path):
  """val_fraction=0 used to hold out blobs[-0:], every file; the smallest fraction holds out
  one whole file."""
  for i, text in enumerate(['a' * 100, 'b' * 100, 'c' * 100]):
    (tmp_path / f'{i}.txt').write_text(text)
  with pytest.raises(data.DataError, match=r'data\.val_fraction=0\.0 must be in'):
    data.text_file_splits(str(tmp_path / '*.txt'), 0.0)
  splits = data.text_file_splits(str(tmp_path / '*.txt'), 1e-9)
  assert data.decode(splits['val']) == 'c' * 100
  assert data.decode(splits['train']) == 'a' * 100 + 'b' * 100


# --- 18. what a drift refusal says ---------------------------------------------------------
def test_a_changed_config_is_refused_by_field_with_both_values(corpus, copy):
  before = snapshot(copy)
  config = tiny_run(corpus)
  config.opt.lr = 1e-3
  config.seed = 1
  with pytest.raises(wd.WorkdirError) as e:
    training.train_and_evaluate(config, str(copy))
  assert 'opt.lr: 0.003 in config.json, 0.001 now' in str(e.value)
  assert 'seed: 0 in config.json, 1 now' in str(e.value)
  assert snapshot(copy) == before


# --- minor: Ctrl-C -------------------------------------------------------------------------
# SIGTERM is what a preemption sends (its own test in reliability_test kills during a save).
@pytest.mark.parametrize('signum', [
    signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.long)])
def test_ctrl_c_and_sigterm_checkpoint_the_step_and_exit(signum, corpus, tmp_path):
  """SIGINT is a preemption like SIGTERM: the step in progress is saved, one line says how
  to resume (SIGINT used to print a KeyboardInterrupt traceback and save nothing)."""
  proc = subprocess.Popen(
      [sys.executable, '-m', 'mla_jax.train', '--config=configs/mla.py:tiny',
       f'--workdir={tmp_path}', f'--config.data.files={corpus}', '--config.train.steps=100000',
       '--config.train.checkpoint_every=100000', '--config.train.eval_every=100000',
       '--config.opt.warmup_steps=2'],
      cwd=ROOT, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while time.time() < deadline and not (tmp_path / 'metrics.jsonl').exists():
    time.sleep(0.5)
  time.sleep(1)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  step = wd.manager(tmp_path / 'checkpoints').latest_step()
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # saved, but not finished
  assert step and step >= 1
  assert 'Traceback' not in err
  assert err.strip().splitlines()[-1] == (
      f'stopped at step {step} by {signal.Signals(signum).name}; run the same command to '
      'resume')
