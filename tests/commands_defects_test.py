"""The commands and the workdir under the defects a 259-case probe found (2026-12-07, commit
4b9ed11): each test failed on the code before its fix. Commands run as subprocesses on one
tiny trained run (as a user runs them); checks that need no command call the library."""

import errno
import functools
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from flax import nnx

import mla_jax
from mla_jax import mla_conversion
from mla_jax import workdir as wd
from mla_jax.attention_op import AttentionOp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(module, *args, env=None):
  return subprocess.run([sys.executable, '-m', f'mla_jax.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env)


def one_error_line(result) -> str:
  """The one `error: ...` line a refused command prints (and nothing else on stderr), whose
  advice names only flags that the command has (defect 14: "pass --step=5" to train)."""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  assert result.returncode != 0
  if result.args[1] == '-m':
    command = result.args[2].removeprefix('mla_jax.')
    assert advised_flags(lines[0]) <= flags_of(command), (command, lines[0])
  return lines[0]


def advised_flags(line: str) -> set[str]:
  """The flags a line tells its reader to pass, but those of a command it cites in full
  (python -m mla_jax.X --a=... --b=...), which are that command's."""
  own = re.sub(r'python -m mla_jax\.\w+[^;)]*', '', line).replace('--name=value', '')
  return set(re.findall(r'(?<![\w-])--(\w+)', own))


@functools.cache
def flags_of(command: str) -> frozenset[str]:
  """Every flag `python -m mla_jax.<command>` accepts (absl's --helpfull included)."""
  listed = subprocess.run(
      [sys.executable, '-c', 'from absl import flags; import mla_jax.' + command +
       '; print(" ".join(flags.FLAGS))'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert listed.returncode == 0, listed.stderr[-3000:]
  return frozenset(listed.stdout.split()) | {'help', 'helpfull', 'helpshort', 'flagfile'}


def train_args(workdir, corpus, *extra):
  return ['--config=configs/mla.py:tiny', f'--workdir={workdir}',
          f'--config.data.files={corpus}', *extra]


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
  """The tiny run (10 steps, checkpoints 5 and 10), trained by the command."""
  folder = tmp_path_factory.mktemp('reference')
  result = run('train', *train_args(folder, corpus))
  assert result.returncode == 0, result.stderr[-3000:]
  # The attention kernels are printed once at start-up, as config.json records them.
  kernels = json.loads((folder / 'config.json').read_text())['kernels']
  assert result.stderr.count('attention on ') == 1
  assert str(AttentionOp(**kernels)) in result.stderr
  return folder


@pytest.fixture
def copy(reference, tmp_path):
  """A copy of the reference run to damage."""
  shutil.copytree(reference, tmp_path / 'run')
  return tmp_path / 'run'


def flip_bytes(step_folder: pathlib.Path) -> None:
  """Flips 16 bytes in the middle of the largest parameter file; its size is unchanged."""
  target = max((p for p in (step_folder / 'params').rglob('*') if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  target.write_bytes(bytes(data))


def eval_json(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / 'eval.json').read_text())


# --- 3, 6. a checkpoint without checksums is never loaded ----------------------------------

@pytest.mark.slow
def test_a_damaged_checkpoint_without_checksums_is_never_loaded(copy, corpus, reference):
  """Defect 3: checkpoint 10 damaged and without checksums.json. evaluate scores checkpoint 5
  (the newest complete one) instead of reporting perplexity nan; asked for step 10 it refuses
  by name; train resumes from 5 and recomputes 10 exactly, replacing the damaged one."""
  step10 = copy / 'checkpoints' / '10'
  (step10 / wd.CHECKSUMS).unlink()
  flip_bytes(step10)
  result = run('evaluate', f'--workdir={copy}')
  assert result.returncode == 0, result.stderr[-3000:]
  scored = eval_json(copy)
  at5 = next(r for r in map(json.loads, (copy / 'metrics.jsonl').open())
             if r['step'] == 5 and 'val_perplexity' in r)
  assert scored['perplexity'] == pytest.approx(at5['val_perplexity'], rel=1e-5)
  assert scored['step'] == 5
  line = one_error_line(run('evaluate', f'--workdir={copy}', '--step=10'))
  assert 'checkpoint 10' in line and 'incomplete' in line and '--step=5' in line
  result = run('train', *train_args(copy, corpus))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from step 5' in result.stderr
  assert wd.intact(step10) is True
  got, want = (nnx.to_pure_dict(nnx.state(wd.load_workdir(w)[0], nnx.Param))
               for w in (copy, reference))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)  # recomputed bit for bit


@pytest.mark.slow
def test_readers_skip_a_checkpoint_being_written(copy):
  """Defect 6: while train saves checkpoint 10 (orbax's folder renamed, checksums not yet
  written: its process holds .lock), generate uses checkpoint 5; asked for 10 it says the
  save is in progress and never advises moving a folder."""
  (copy / 'checkpoints' / '10' / wd.CHECKSUMS).unlink()
  with wd.lock(copy):  # as the train that saves holds it
    result = run('generate', f'--workdir={copy}', '--prompt=KING', '--max_new_tokens=4')
    assert result.returncode == 0 and result.stdout.startswith('KING'), result.stderr[-3000:]
    line = one_error_line(run('generate', f'--workdir={copy}', '--prompt=KING', '--step=10',
                              '--max_new_tokens=4'))
    assert f'process {os.getpid()} on {socket.gethostname()} is in progress' in line
    assert 'wait' in line and 'aside' not in line
  _, _, step = wd.load_checkpoint(copy)
  assert step == 5
  with pytest.raises(wd.WorkdirError, match='its save was killed'):  # no one holds the lock
    wd.load_checkpoint(copy, step=10)


def test_a_checkpoint_deleted_while_read_gives_way_to_the_next(copy, monkeypatch):
  """Defect 6: a train keeps keep_checkpoints, deleting the oldest while a reader reads it:
  the reader takes the newest complete checkpoint again instead of failing."""
  real, calls = wd.restore, []

  def restore(mngr, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 1:  # the first read races a deletion of its step and a new save
      shutil.rmtree(copy / 'checkpoints' / str(step))
    return real(mngr, step, *args, **kwargs)

  monkeypatch.setattr(wd, 'restore', restore)
  shutil.copytree(copy / 'checkpoints' / '10', copy / 'checkpoints' / '15')
  wd.load_workdir(copy)
  assert calls == [15, 10]


@pytest.mark.long
@pytest.mark.slow
def test_readers_beside_a_train_that_saves_every_step(corpus, tmp_path):
  """Defect 6 as the probe ran it: generate and evaluate again and again while train saves
  (and deletes, keeping 2) a checkpoint every step. Each reader succeeds on a complete
  checkpoint, or, before the first save, says so in one line."""
  workdir = tmp_path / 'run'
  trainer = subprocess.Popen(
      [sys.executable, '-m', 'mla_jax.train',
       *train_args(workdir, corpus, '--config.train.steps=80', '--config.train.eval_every=1000',
                   '--config.train.checkpoint_every=1', '--config.train.keep_checkpoints=2')],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    results = []
    while trainer.poll() is None and len(results) < 12:
      results.append(run('generate' if len(results) % 2 else 'evaluate', f'--workdir={workdir}',
                         *(['--prompt=KING', '--max_new_tokens=2'] if len(results) % 2 else [])))
  finally:
    trainer.kill()
    trainer.communicate()
  assert len(results) >= 4
  for result in results:
    if result.returncode:
      assert 'no checkpoint yet' in one_error_line(result) or 'no run in' in result.stderr, \
          result.stderr[-3000:]
    else:
      assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert sum(r.returncode == 0 for r in results) >= 2


# --- 4. calibration batches are bounded and streamed ----------------------------------------

def test_calibration_batches_are_bounded_and_streamed(reference):
  config = wd.read_config(reference)
  with pytest.raises(mla_jax.Error, match=r'--calibration_batches=100000000 exceeds the \d+ '
                     r'batches .* give at most \d+'):
    mla_conversion.calibration_batches(config, 100_000_000)
  batches = mla_conversion.calibration_batches(config, 3)
  assert not isinstance(batches, list)  # made one at a time, as to_mla uses them
  shapes = [b.shape for b in batches]
  assert shapes == [(config.data.batch_size, config.data.seq_len)] * 3


# --- 7. concurrent writers of eval.json ----------------------------------------------------

def test_concurrent_writers_never_share_a_temporary_file(tmp_path):
  """Defect 7: three writers of eval.json at once and a reader: no write fails, the reader
  never sees half a file, and no temporary file is left."""
  errors, seen = [], []
  wd.write_json(tmp_path, 'eval.json', {'writer': -1, 'n': -1})

  def write(i):
    try:
      for j in range(150):
        wd.write_json(tmp_path, 'eval.json', {'writer': i, 'n': j, 'pad': 'x' * 4000})
    except Exception as e:
      errors.append(e)

  writers = [threading.Thread(target=write, args=(i,)) for i in range(3)]
  for t in writers:
    t.start()
  while any(t.is_alive() for t in writers):
    try:
      seen.append(json.loads((tmp_path / 'eval.json').read_text())['writer'])
    except (OSError, ValueError) as e:
      errors.append(e)
  for t in writers:
    t.join()
  assert not errors, errors[:3]
  assert seen and json.loads((tmp_path / 'eval.json').read_text())['n'] == 149
  assert [p.name for p in tmp_path.iterdir()] == ['eval.json']  # no temporary file left


# --- 8. a full disk ------------------------------------------------------------------------

def test_a_full_disk_keeps_the_old_file_and_names_the_folder(tmp_path, monkeypatch):
  wd.write_json(tmp_path, 'eval.json', {'old': 1})

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'replace', full)
  with pytest.raises(wd.WorkdirError, match=f'no space left on {tmp_path}'):
    wd.write_json(tmp_path, 'eval.json', {'new': 1})
  assert json.loads((tmp_path / 'eval.json').read_text()) == {'old': 1}
  assert [p.name for p in tmp_path.iterdir()] == ['eval.json']


def test_a_full_disk_during_a_checkpoint_save_names_the_folder(tmp_path, monkeypatch,
                                                              small_model):
  """orbax reports a full disk in its own exception types: the save says it in one line."""
  def full(*args, **kwargs):
    try:
      raise OSError(errno.ENOSPC, 'No space left on device')
    except OSError as e:
      raise ValueError('tensorstore: write failed') from e

  mngr = wd.manager(tmp_path / 'checkpoints')
  monkeypatch.setattr(type(mngr), 'save', full)
  with pytest.raises(wd.WorkdirError, match=f'no space left on {tmp_path / "checkpoints"} '
                     r'\(saving checkpoint 3\)'):
    wd.save(mngr, 3, nnx.state(small_model, nnx.Param))


def test_a_full_disk_anywhere_is_one_line(tmp_path):
  """A full disk met in library code (orbax and tensorstore wrap the OSError in their own
  exception types) ends the command with one line and exit 1, not a traceback per thread."""
  script = tmp_path / 'full.py'
  script.write_text(
      'import errno\nfrom mla_jax import cli\n\n\ndef main():\n  try:\n'
      "    raise OSError(errno.ENOSPC, 'No space left on device', '/data/run/checkpoints')\n"
      '  except OSError as e:\n    raise RuntimeError("tensorstore write failed") from e\n\n\n'
      'cli.run(main)\n')
  result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'PYTHONPATH': str(ROOT)})
  assert result.returncode == 1
  assert one_error_line(result).startswith(
      'error: no space left on /data/run/checkpoints; free some space')


# --- 9. config.json cut short or not an object ---------------------------------------------

@pytest.mark.parametrize('command, content', [
    ('generate', '[]'), ('generate', 'cut'), pytest.param('train', '[]', marks=pytest.mark.slow),
    pytest.param('train', 'cut', marks=pytest.mark.slow)])
def test_a_broken_config_json_is_one_line(command, content, copy, corpus):
  path = wd.config_path(copy)
  path.write_text('[]' if content == '[]' else path.read_text()[:200])
  args = (['--prompt=KING', '--max_new_tokens=2'] if command == 'generate'
          else train_args(copy, corpus)[:1] + train_args(copy, corpus)[2:])
  line = one_error_line(run(command, f'--workdir={copy}', *args))
  assert str(path) in line and 'restore it from a copy' in line


# --- 10, 19, minor: the library refuses bad arguments by name ------------------------------

@pytest.fixture(scope='module')
def small_model():
  return mla_jax.Transformer(mla_jax.ModelConfig(vocab_size=64, d_model=32, n_layers=1,
                                                 n_heads=2, max_seq_len=32),
                             rngs=nnx.Rngs(0))


@pytest.mark.parametrize('call, words', [
    (lambda m: m(np.array([[1.0, 2.0]])), r'token ids must be an int array \[batch, time\]'),
    (lambda m: m(np.array([1, 2])), r'token ids must be an int array \[batch, time\]'),
    (lambda m: m(np.array([[[1, 2]]])), r'token ids must be an int array \[batch, time\]'),
    (lambda m: mla_jax.logits_through_cache(m, np.array([[1, 2, 3]])),
     r'token ids must be an int array \[time\]'),
    (lambda m: mla_jax.generate(m, np.array([[1, 2]]), max_new_tokens=2, chunk=0),
     r'chunk \(prefill tokens per step\) must be >= 1'),
    (lambda m: mla_jax.generate(m, np.array([[1, 2]]), max_new_tokens=2, temperature=1.0,
                                top_k=1000), r'top_k=1000 exceeds the vocabulary \(64'),
    (lambda m: mla_jax.generate(m, np.array([[1, 2]]), max_new_tokens=2, eos_id=64),
     r'eos_id=64 must be a token id in \[0, 64\)'),
    (lambda m: mla_jax.generate(m, np.array([[1, 2]]), max_new_tokens=2, pad_id=-1),
     r'pad_id=-1 must be a token id'),
])
def test_bad_arguments_are_input_errors(call, words, small_model):
  with pytest.raises(mla_jax.errors.InputError, match=words):
    call(small_model)


def test_generate_top_k_above_the_vocabulary_is_one_line(reference):
  result = run('generate', f'--workdir={reference}', '--prompt=KING', '--temperature=1',
               '--top_k=1000', '--max_new_tokens=2')
  assert 'top_k=1000 exceeds the vocabulary (256 tokens)' in one_error_line(result)


@pytest.mark.slow
def test_generate_fits_its_default_length_to_the_cache(reference):
  """The default length may not exceed a tiny run's cache of 128 (it was 200)."""
  prompt = 'ROMEO and JULIET ' * 5  # 85 bytes: 43 fit after it
  result = run('generate', f'--workdir={reference}', f'--prompt={prompt}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(result.stdout.encode()) - 1 >= len(prompt)


# --- 12. a config file that fails ----------------------------------------------------------

@pytest.mark.parametrize('text, words', [
    ('def get_config():\n  return undefined_name\n',
     "could not be loaded (NameError at line 2: name 'undefined_name' is not defined)"),
    ('x = 1\n', 'has no get_config function'),
])
def test_a_config_file_that_fails_is_one_line_exit_2(text, words, tmp_path):
  (tmp_path / 'cfg.py').write_text(text)
  result = run('train', f'--config={tmp_path / "cfg.py"}', f'--workdir={tmp_path / "run"}',
               '--config.seed=1')
  assert result.returncode == 2
  assert words in one_error_line(result)
  assert not (tmp_path / 'run').exists()


# --- 13. a model mismatch is not a damaged checkpoint ----------------------------------------

def test_a_model_mismatch_names_the_field(copy):
  path = wd.config_path(copy)
  config = json.loads(path.read_text())
  config['model']['n_layers'] = 3
  path.write_text(json.dumps(config))
  line = one_error_line(run('generate', f'--workdir={copy}', '--prompt=KING',
                            '--max_new_tokens=2'))
  assert 'holds another model' in line and 'model.n_layers is 3' in line, line
  assert 'saved with 2' in line and 'aside' not in line


# --- 14. advice names the flags of the command that gives it ---------------------------------

@pytest.mark.slow
def test_init_from_a_damaged_checkpoint_advises_train_flags(copy, corpus, tmp_path):
  flip_bytes(copy / 'checkpoints' / '10')
  result = run('train', *train_args(tmp_path / 'new', corpus), f'--init_from={copy}')
  line = one_error_line(result)
  assert 'checkpoint 10' in line and 'damaged' in line
  flags_named = set(re.findall(r'--(\w+)', line))
  assert flags_named and flags_named <= {'init_from', 'config', 'workdir'}, line


# --- 15. a killed convert blocks nothing ------------------------------------------------------

@pytest.mark.slow
def test_a_killed_convert_leaves_nothing_that_blocks_the_rerun(reference, tmp_path):
  hf_dir, target = tmp_path / 'hf', tmp_path / 'imported'
  result = run('convert', f'--workdir={reference}', f'--to_hf={hf_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  env = {**os.environ, wd.FAULT: 'checkpoints:written'}  # killed before its checksums
  killed = run('convert', f'--hf_dir={hf_dir}', f'--workdir={target}', env=env)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not target.exists()
  result = run('convert', f'--hf_dir={hf_dir}', f'--workdir={target}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert wd.intact(target / 'checkpoints' / '0') is True
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # swept


@pytest.mark.parametrize('record, words', [
    (None, 'python -m mla_jax.train --config=configs/mla.py --workdir='),
    ('conversion', 'the convert that wrote'),
    pytest.param('incomplete', 'run the convert command again', marks=pytest.mark.slow),
])
def test_a_workdir_without_checkpoints_advises_a_complete_command(record, words, copy):
  """Defect 15: a workdir that a killed convert (before it wrote into a temporary folder)
  left, or that never trained: the advice is a command that runs."""
  if record == 'incomplete':  # killed between its checkpoint and the checksums
    shutil.rmtree(copy / 'checkpoints' / '5')
    (copy / 'checkpoints' / '10' / wd.CHECKSUMS).unlink()
    record = 'source'
  else:
    shutil.rmtree(copy / 'checkpoints')
  if record:
    path = wd.config_path(copy)
    path.write_text(json.dumps({**json.loads(path.read_text()), record: {'exact': True}}))
  line = one_error_line(run('generate', f'--workdir={copy}', '--prompt=KING'))
  assert words in line


# --- minor: a refused run leaves .lock as it was ----------------------------------------------

def test_a_refused_resume_leaves_the_lock_file_as_it_was(copy, corpus):
  flip_bytes(copy / 'checkpoints' / '10')
  wd.lock_path(copy).write_text('process 1 on elsewhere')
  result = run('train', *train_args(copy, corpus))
  assert result.returncode == 1 and 'damaged' in result.stderr.strip().splitlines()[-1]
  assert wd.lock_path(copy).read_text() == 'process 1 on elsewhere'
