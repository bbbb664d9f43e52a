"""Training runs that kills, damaged files, concurrent processes and bad input cannot break.

Kill tests run `python -m mla_jax.train` in subprocesses and kill them with SIGKILL, at named
points (MLA_JAX_FAULT, see mla_jax.workdir.fault) or at random instants, then resume; the run
must end bit for bit where an uninterrupted one ends. Subprocesses share a JAX compilation
cache so that each life does not compile again (the same executables, so the same numbers).
"""

import contextlib
import hashlib
import json
import math
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mla_jax
from configs import mla as mla_config
from mla_jax import perplexity, training
from mla_jax import workdir as wd
from tests.commands_defects_test import advised_flags, flags_of

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAULT = 'MLA_JAX_FAULT'  # see mla_jax.workdir.fault


def tiny(corpus, **train):
  config = mla_config.get_config('tiny')
  config.data.files = corpus
  config.train.update(train)
  return config


def run(module, *args, env=None, **kwargs):
  return subprocess.run([sys.executable, '-m', f'mla_jax.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env, **kwargs)


def train_args(workdir, corpus, **train):
  return ['--config=configs/mla.py:tiny', f'--workdir={workdir}',
          f'--config.data.files={corpus}', *(f'--config.train.{k}={v}' for k, v in train.items())]


def child_env(fault=None):
  """The children share the suite's compilation cache (conftest) through the environment."""
  env = dict(os.environ)
  env.pop(FAULT, None)
  if fault:
    env[FAULT] = fault
  return env


def saved_steps(folder) -> list[int]:
  """The finished checkpoints in a checkpoints/ or best/ folder."""
  return sorted(int(p.name) for p in pathlib.Path(folder).glob('*') if p.name.isdigit())


def run_to_the_end(workdir, corpus, **train):
  """An uninterrupted run by the same command as the killed ones (the pytest process sets
  its own jax options)."""
  result = run('train', *train_args(workdir, corpus, **train), env=child_env())
  assert result.returncode == 0, result.stderr[-3000:]


def rows(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]


def history(workdir):
  """Every metric but the timing, per step and kind (training or validation)."""
  return [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rows(workdir)]


def arrays(step_folder) -> dict:
  """Every array of a checkpoint (parameters and, if saved, optimizer state) by path."""
  out = {}
  for item in ('params', 'opt'):
    if (step_folder / item).exists():
      out.update(flatten(ocp.PyTreeCheckpointer().restore(step_folder / item), item))
  return out


def flatten(tree, prefix='') -> dict:
  if not isinstance(tree, dict):
    return {prefix: np.asarray(tree)}
  return {k: v for key, sub in tree.items() for k, v in flatten(sub, f'{prefix}/{key}').items()}


def assert_same_run(workdir, reference):
  """Bit for bit: each step logged once with the same numbers, the same checkpoints and the
  same arrays in the latest checkpoint and in best/."""
  got, want = history(workdir), history(reference)
  assert [r['step'] for r in got if 'loss' in r] == [r['step'] for r in want if 'loss' in r]
  assert got == want
  for folder in ('checkpoints', 'best'):
    steps = saved_steps(workdir / folder)
    assert steps[-1:] == saved_steps(reference / folder)[-1:], folder
    a, b = arrays(workdir / folder / str(steps[-1])), arrays(reference / folder / str(steps[-1]))
    assert a.keys() == b.keys() and a
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def snapshot(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def one_error_line(result) -> str:
  """The one `error: ...` line a refused command prints (and nothing else on stderr), whose
  advice names only flags of that command."""
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  module = next((a for a in result.args if a.startswith('mla_jax.')), None)
  if module:
    command = module.removeprefix('mla_jax.')
    assert advised_flags(lines[0]) <= flags_of(command), (command, lines[0])
  return lines[0]


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
  """The tiny run (10 steps, checkpoints and validation at 5 and 10), never interrupted."""
  folder = tmp_path_factory.mktemp('reference')
  training.train_and_evaluate(tiny(corpus), str(folder))
  return folder


# --- 1. kills ---------------------------------------------------------------------------

@pytest.mark.long
def test_leftovers_of_a_kill_between_the_two_saves_do_not_block_resuming(corpus, reference,
                                                                          tmp_path):
  """A run killed after saving best/5 but before checkpoints/5 had been written (the old
  order of the saves), by a version without checksums: resuming from checkpoint 4 repeats
  step 5 and must save best/5 and checkpoints/5 again over what is left of them."""
  training.train_and_evaluate(tiny(corpus, checkpoint_every=2, stop_after_steps=5),
                             str(tmp_path))
  ckpt = tmp_path / 'checkpoints' / '5'
  ckpt.rename(tmp_path / 'checkpoints' / '5.orbax-checkpoint-tmp')  # killed mid-save
  (tmp_path / 'best' / '5' / 'checksums.json').unlink(missing_ok=True)
  training.train_and_evaluate(tiny(corpus, checkpoint_every=2), str(tmp_path))
  assert_same_run(tmp_path, reference)
  assert wd.intact(tmp_path / 'best' / '10')


PHASES = ('start', 'checkpoints:before', 'checkpoints:during', 'checkpoints:written',
          'checkpoints:after', 'best:before', 'best:during', 'best:written', 'best:after')
# Validation (and best/) every 2 steps, checkpoints every 3 and 2 kept: the lives below kill
# at each phase of the first save they reach (see the comments in the test).
CHAIN = dict(steps=12, eval_every=2, checkpoint_every=3, keep_checkpoints=2)


@pytest.mark.long
@pytest.mark.slow
def test_a_kill_at_every_phase_of_a_save_resumes_exactly(corpus, tmp_path):
  """One life killed with SIGKILL at each phase in turn, each resuming the last: start-up;
  the save of checkpoints/3 (best/2 saved before it each time, since no checkpoint is left
  to resume from); after it (checkpoints/3, left without checksums by the life before, is not
  loaded: this life starts again from 0 and saves 3 anew); then best/4 four times (resumed
  from 3). The last life finds best/4 saved and intact."""
  reference = tmp_path / 'reference'
  run_to_the_end(reference, corpus, **CHAIN)
  workdir = tmp_path / 'run'
  for phase in PHASES:
    result = run('train', *train_args(workdir, corpus, **CHAIN),
                 env=child_env(phase))
    assert result.returncode == -signal.SIGKILL, (phase, result.stderr[-3000:])
    if phase.endswith(':during'):  # really killed in mid-save
      folder = workdir / phase.split(':')[0]
      assert list(folder.glob('*.orbax-checkpoint-tmp*')), phase
  assert saved_steps(workdir / 'checkpoints') == [3]
  assert wd.intact(workdir / 'checkpoints' / '3')  # recomputed, with its checksums
  result = run('train', *train_args(workdir, corpus, **CHAIN), env=child_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from step 3' in result.stderr
  assert_same_run(workdir, reference)
  assert wd.intact(workdir / 'best' / '12') and wd.intact(workdir / 'checkpoints' / '12')


RANDOM = dict(steps=40, eval_every=4, checkpoint_every=3, keep_checkpoints=2)


def _latest_logged_step(workdir: pathlib.Path) -> int:
  try:
    text = (workdir / 'metrics.jsonl').read_text()
  except FileNotFoundError:
    return 0
  steps = [0]
  for line in text.splitlines():
    with contextlib.suppress(ValueError, KeyError):  # a row being written
      steps.append(json.loads(line)['step'])
  return max(steps)


@pytest.mark.slow
@pytest.mark.long
def test_random_kills_end_bit_for_bit_like_an_uninterrupted_run(corpus, tmp_path):
  """Seven lives killed with SIGKILL, each resuming the last: five at random instants of the
  training loop (once a random step is logged, after a random delay, which lands in a step,
  a validation or a save) and two in the middle of a save (of best/, then checkpoints/). The
  run ends as if it had never been interrupted."""
  rng = random.Random(1234)
  reference = tmp_path / 'reference'
  run_to_the_end(reference, corpus, **RANDOM)
  workdir = tmp_path / 'run'
  args = train_args(workdir, corpus, **RANDOM)
  mid_save = {1: 'best:during', 3: 'checkpoints:during'}
  for life in range(7):
    fault = mid_save.get(life)
    proc = subprocess.Popen([sys.executable, '-m', 'mla_jax.train', *args], cwd=ROOT,
                            env=child_env(fault), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    if not fault:
      start = max(saved_steps(workdir / 'checkpoints'), default=0)
      target = rng.randint(start + 1, start + 8)
      deadline = time.time() + 300
      while (proc.poll() is None and _latest_logged_step(workdir) < target
             and time.time() < deadline):
        time.sleep(0.002)
      time.sleep(rng.uniform(0, 0.3))
      proc.kill()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (life, fault, err[-3000:])
    assert max(saved_steps(workdir / 'checkpoints'), default=0) < RANDOM['steps']
    if fault:  # really killed in mid-save
      assert list((workdir / fault.split(':')[0]).glob('*.orbax-checkpoint-tmp*'))
  result = run('train', *args, env=child_env())
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_run(workdir, reference)


# --- 2, 3, 8. bad settings are refused before anything is written -------------------------

def test_failed_starts_leave_nothing_and_the_corrected_command_runs(corpus, reference,
                                                                   tmp_path):
  """Each bad setting is refused by name (not as a non-finite loss or a numpy error) before
  anything is written; then the corrected command runs in the same workdir."""
  for field, value, message in [
      ('train.keep_checkpoints', 0, 'train.keep_checkpoints=0 must be an integer >= 1'),
      ('data.batch_size', -1, 'data.batch_size=-1 must be an integer >= 1'),
      ('data.batch_size', 0, 'data.batch_size=0 must be an integer >= 1'),
      ('model.vocab_size', 100, 'the train split has token id 121 but model.vocab_size=100')]:
    config = tiny(corpus)
    section, name = field.split('.')
    config[section][name] = value
    with pytest.raises(mla_jax.ConfigError) as e:
      training.train_and_evaluate(config, str(tmp_path / 'run'))
    assert message in str(e.value)
    assert not (tmp_path / 'run').exists()
  training.train_and_evaluate(tiny(corpus), str(tmp_path / 'run'))
  assert_same_run(tmp_path / 'run', reference)


@pytest.mark.long
def test_a_workdir_without_a_checkpoint_holds_no_run(corpus, reference, tmp_path):
  """What a start killed before its first save leaves (another config, metrics rows, a
  best/ checkpoint) does not hold back a new command: it starts afresh over it."""
  other = tiny(corpus, steps=5, checkpoint_every=100, eval_every=2)
  other.data.batch_size = 4
  training.train_and_evaluate(other, str(tmp_path), final_eval=False)
  shutil.rmtree(tmp_path / 'checkpoints')  # as a start killed before its first save leaves it
  (tmp_path / 'checkpoints').mkdir()
  assert saved_steps(tmp_path / 'best') and rows(tmp_path)
  training.train_and_evaluate(tiny(corpus), str(tmp_path))
  assert json.loads((tmp_path / 'config.json').read_text())['data']['batch_size'] == 8
  assert_same_run(tmp_path, reference)


# --- 4. damaged checkpoints --------------------------------------------------------------

def _flip_bytes(step_folder: pathlib.Path) -> pathlib.Path:
  """Flips 16 bytes in the middle of the largest parameter file; its size is unchanged."""
  target = max((p for p in (step_folder / 'params').rglob('*') if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
  size = target.stat().st_size
  target.write_bytes(bytes(data))
  assert target.stat().st_size == size
  return target


def test_a_damaged_checkpoint_is_refused_by_name(corpus, reference, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  _flip_bytes(workdir / 'checkpoints' / '10')
  folder = workdir / 'checkpoints'
  unlocked = lambda files: {k: v for k, v in files.items() if k != '.lock'}
  before = unlocked(snapshot(workdir))
  result = run('evaluate', f'--workdir={workdir}')
  assert result.returncode == 1
  assert one_error_line(result) == (
      f'error: checkpoint 10 in {folder} is damaged (checksum mismatch); move it aside, or '
      'pass --step=5')
  with pytest.raises(wd.WorkdirError) as e:
    training.train_and_evaluate(tiny(corpus), str(workdir))
  assert str(e.value) == (f'checkpoint 10 in {folder} is damaged (checksum mismatch); move '
                          'it aside to resume from step 5')
  assert unlocked(snapshot(workdir)) == before  # nothing trained, logged or written
  (folder / '10').rename(tmp_path / 'aside')  # as told: then it resumes from step 5
  training.train_and_evaluate(tiny(corpus), str(workdir))
  assert_same_run(workdir, reference)


def test_a_checkpoint_missing_files_is_damaged_and_one_without_checksums_is_not_loaded(
    reference, tmp_path):
  shutil.copytree(reference, tmp_path / 'run')
  step5, step10 = (tmp_path / 'run' / 'checkpoints' / s for s in ('5', '10'))
  next(p for p in (step5 / 'opt').rglob('*') if p.is_file()).unlink()  # half deleted
  assert wd.intact(step5) is False and wd.intact(step10) is True
  with pytest.raises(wd.WorkdirError, match=r'checkpoint 5 in .* is damaged'):
    wd.load_workdir(tmp_path / 'run', step=5)
  model, _ = wd.load_workdir(tmp_path / 'run')
  want = arrays(reference / 'checkpoints' / '10')
  got = flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)), 'params')
  assert got.keys() == {k for k in want if k.startswith('params/')}
  for name, value in got.items():
    np.testing.assert_array_equal(value, want[name])
  # Without checksums (killed before them, or from before them) nothing proves it intact:
  # asked for, it is refused by name; by default the newest complete one is taken (here the
  # damaged 5, refused by name too).
  (step10 / 'checksums.json').unlink()
  assert wd.intact(step10) is None
  with pytest.raises(wd.WorkdirError, match=r'checkpoint 10 in .* is incomplete \(no '
                     r'checksums.json: its save was killed'):
    wd.load_workdir(tmp_path / 'run', step=10)
  with pytest.raises(wd.WorkdirError, match=r'checkpoint 5 in .* is damaged'):
    wd.load_workdir(tmp_path / 'run')


# --- 5. one trainer per workdir ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.long
def test_a_second_trainer_on_a_workdir_is_refused(corpus, tmp_path):
  first = subprocess.Popen(
      [sys.executable, '-m', 'mla_jax.train',
       *train_args(tmp_path, corpus, steps=100000, checkpoint_every=100000,
                   eval_every=100000)],
      cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  try:
    deadline = time.time() + 300
    while first.poll() is None and not rows_exist(tmp_path) and time.time() < deadline:
      time.sleep(0.2)
    assert first.poll() is None
    first.send_signal(signal.SIGSTOP)  # frozen: the workdir cannot change under the check
    before = snapshot(tmp_path)
    second = run('train', *train_args(tmp_path, corpus, steps=100000, checkpoint_every=100000,
                                      eval_every=100000))
    assert second.returncode == 1
    assert one_error_line(second) == (
        f'error: {tmp_path} is being trained by process {first.pid} on '
        f'{socket.gethostname()}; wait for it or use another --workdir')
    assert snapshot(tmp_path) == before
  finally:
    first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
  assert first.returncode == 128 + signal.SIGTERM, err[-3000:]  # stopped, saved, not finished
  step = saved_steps(tmp_path / 'checkpoints')[-1]
  assert [r['step'] for r in rows(tmp_path) if 'loss' in r] == list(range(1, step + 1))


def rows_exist(workdir):
  path = workdir / 'metrics.jsonl'
  return path.exists() and path.stat().st_size > 0


# --- 6. one line, not a traceback --------------------------------------------------------

def _read_only(path: pathlib.Path) -> list[str]:
  """Makes path read-only; -> a command prefix under which it stays read-only for root too
  (root ignores permissions unless it drops CAP_DAC_OVERRIDE)."""
  path.chmod(0o555)
  if os.geteuid() != 0:
    return []
  if not shutil.which('setpriv'):
    pytest.skip('running as root without setpriv: cannot make a folder read-only')
  return ['setpriv', '--bounding-set=-dac_override,-dac_read_search', '--']


TRAIN = ['train', '--config=configs/mla.py:tiny']
ONE_LINE = {
    # (command and flags, words the line must hold); {corpus} is the corpus glob, {dir} its
    # folder, {tmp} a scratch folder.
    'missing config file': (['train', '--config=configs/nope.py'], 'configs/nope.py'),
    'config syntax error': (['train', '--config={tmp}/bad.py'], 'syntax error'),
    'unknown config argument': (['train', '--config=configs/mla.py:huge'], "'huge'"),
    'data glob matches a folder': ([*TRAIN, '--config.data.files={dir}'], 'only the folders'),
    'workdir is a file': (TRAIN, 'is a file'),
    'read-only workdir': (TRAIN, 'Permission denied'),
    'keep_checkpoints=0': ([*TRAIN, '--config.train.keep_checkpoints=0'],
                           'train.keep_checkpoints=0 must be'),
    'checkpoint_every=0': ([*TRAIN, '--config.train.checkpoint_every=0'],
                           'train.checkpoint_every=0 must be'),
    'eval_every=0': ([*TRAIN, '--config.train.eval_every=0'], 'train.eval_every=0 must be'),
    'log_every=0': ([*TRAIN, '--config.train.log_every=0'], 'train.log_every=0 must be'),
    'grad_accum_steps=0': ([*TRAIN, '--config.opt.grad_accum_steps=0'],
                           'opt.grad_accum_steps=0 must be'),
    'batch_size=-1': ([*TRAIN, '--config.data.batch_size=-1'], 'data.batch_size=-1 must be'),
    'batch_size=0': ([*TRAIN, '--config.data.batch_size=0'], 'data.batch_size=0 must be'),
    'vocab_size below the data': ([*TRAIN, '--config.model.vocab_size=100'],
                                  'model.vocab_size=100'),
    'evaluate --batch_size=0': (['evaluate', '--batch_size=0'], '--batch_size'),
}


@pytest.mark.parametrize('case', sorted(ONE_LINE))
def test_bad_input_is_one_error_line_and_touches_nothing(case, corpus, reference, tmp_path):
  (module, *args), words = ONE_LINE[case]
  (tmp_path / 'bad.py').write_text('def get_config(:\n')
  workdir, prefix = tmp_path / 'run', []
  if case == 'workdir is a file':
    workdir.write_text('not a folder')
  if case == 'read-only workdir':
    workdir.mkdir()
    (workdir / 'notes.txt').write_text('mine')
    prefix = _read_only(workdir)
  if case == 'evaluate --batch_size=0':
    shutil.copytree(reference, workdir)
  before = snapshot(workdir) if workdir.is_dir() else workdir.read_bytes() \
      if workdir.exists() else None
  fill = dict(corpus=corpus, dir=str(pathlib.Path(corpus).parent), tmp=tmp_path)
  args = [a.format(**fill) for a in args]
  if module == 'train' and not any(a.startswith('--config.data.files') for a in args):
    args.append(f'--config.data.files={corpus}')
  result = subprocess.run(
      [*prefix, sys.executable, '-m', f'mla_jax.{module}', f'--workdir={workdir}', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  if workdir.is_dir():
    workdir.chmod(0o755)
  assert result.returncode != 0
  assert words in one_error_line(result)
  after = snapshot(workdir) if workdir.is_dir() else workdir.read_bytes() \
      if workdir.exists() else None
  assert after == before


# --- 7. silent wrong results are refused -------------------------------------------------

@contextlib.contextmanager
def refused(match: str):
  """A bad argument: an mla_jax.Error (and a ValueError) whose message matches."""
  with pytest.raises(ValueError, match=match) as e:
    yield
  assert isinstance(e.value, mla_jax.Error)


@pytest.fixture(scope='module')
def small_model():
  return mla_jax.Transformer(mla_jax.ModelConfig(vocab_size=64, d_model=32, n_layers=1,
                                                 n_heads=2, max_seq_len=32),
                             rngs=nnx.Rngs(0))


@pytest.mark.parametrize('bad', [-1, 64])
def test_token_ids_outside_the_vocabulary_are_refused(bad, small_model):
  tokens = np.array([[1, 2, bad, 3]])
  with refused(r'ids must lie in \[0, 64\)'):
    small_model(tokens)
  with refused(r'ids must lie in \[0, 64\)'):
    perplexity.perplexity(small_model, tokens[0], seq_len=4, stride=2, batch_size=1)
  with refused(r'ids must lie in \[0, 64\)'):
    mla_jax.generate(small_model, tokens, max_new_tokens=2)


@pytest.mark.parametrize('settings', [dict(temperature=math.nan), dict(temperature=1.0,
                                                                       top_p=math.nan)])
def test_nan_sampling_settings_are_refused(settings, small_model):
  with refused('need a finite temperature'):
    mla_jax.generate(small_model, np.array([[1, 2]]), max_new_tokens=2, **settings)


def test_prompt_lengths_must_be_integers(small_model):
  with refused('prompt_lengths must be'):
    mla_jax.generate(small_model, np.array([[1, 2, 3]]), prompt_lengths=[2.5],
                     max_new_tokens=2)


@pytest.mark.parametrize('field, value', [('norm_eps', math.nan), ('rope_theta', math.nan),
                                          ('tie_embeddings', 'no')])
def test_model_config_refuses_nan_and_non_booleans(field, value):
  with refused(field):
    mla_jax.ModelConfig(**{field: value})


def test_save_hf_never_overwrites(small_model, tmp_path):
  (tmp_path / 'keep.txt').write_text('mine')
  with refused('already exists and is not empty'):
    mla_jax.save_hf(small_model, tmp_path)
  assert [p.name for p in tmp_path.iterdir()] == ['keep.txt']


@pytest.mark.parametrize('args, words', [
    (['--prompt=ROMEO', 'and', 'JULIET'], 'unexpected arguments'),
    (['--prompt=ROMEO', '--max_new_tokens=4', '--temperature=nan'],
     'need a finite temperature'),
])
def test_generate_refuses_what_it_would_get_wrong(args, words, reference):
  result = run('generate', f'--workdir={reference}', *args)
  assert result.returncode != 0 and result.stdout == ''
  assert words in one_error_line(result)


# --- 9. metrics and SIGTERM --------------------------------------------------------------

@pytest.mark.long
def test_a_resumed_run_logs_each_step_once(corpus, reference, tmp_path):
  """Rows a killed run logged after its last checkpoint (and one it was cut off writing)
  are dropped when the run resumes, not repeated."""
  training.train_and_evaluate(tiny(corpus, stop_after_steps=5), str(tmp_path))
  with (tmp_path / 'metrics.jsonl').open('a') as f:
    f.write('{"step": 6, "loss": 1.0}\n{"step": 7, "loss": 1.0}\n{"step": 8, "lo')
  training.train_and_evaluate(tiny(corpus), str(tmp_path))
  assert_same_run(tmp_path, reference)


def test_sigterm_during_a_save_stops_after_the_next_step_saved(corpus, tmp_path):
  """SIGTERM arriving while step 3 saves best/3 (after validating): the run finishes step 4,
  saves it and says how to resume; it neither skips the save nor prints step 3's validation
  as if it were final."""
  result = run('train', *train_args(tmp_path, corpus, steps=1000, checkpoint_every=1000,
                                    eval_every=3),
               env=child_env('best:before:TERM'))
  assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
  assert saved_steps(tmp_path / 'checkpoints') == [4]
  assert result.stderr.strip().splitlines()[-1] == (
      'stopped at step 4 by SIGTERM; run the same command to resume')
  assert result.stdout == ''  # no "validation: ..." line


def test_a_preempted_run_raises_so_no_caller_takes_it_for_finished(corpus, monkeypatch,
                                                                     tmp_path):
  """In the library, SIGTERM checkpoints the step and raises Preempted (an experiment worker
  that returned normally would record a half-trained run as its result)."""
  monkeypatch.setenv(FAULT, 'checkpoints:before:TERM')  # SIGTERM while step 2 is being saved
  with pytest.raises(mla_jax.errors.Preempted, match='stopped at step 3 by SIGTERM'):
    training.train_and_evaluate(tiny(corpus, checkpoint_every=2), str(tmp_path))
  assert saved_steps(tmp_path / 'checkpoints') == [2, 3]


def test_a_sigterm_read_in_the_last_step_completes_the_run(corpus, monkeypatch, tmp_path):
  """SIGTERM while step 5 saves is read in step 6, the last: the run is complete, not
  preempted, and says so by returning."""
  monkeypatch.setenv(FAULT, 'checkpoints:before:TERM')
  training.train_and_evaluate(tiny(corpus, steps=6, checkpoint_every=5), str(tmp_path))
  assert saved_steps(tmp_path / 'checkpoints') == [5, 6]


def test_sigterm_during_start_up_says_there_is_nothing_to_save(corpus, tmp_path):
  result = run('train', *train_args(tmp_path, corpus), env=child_env('start:TERM'))
  assert result.returncode == 128 + signal.SIGTERM
  assert result.stderr.strip().splitlines()[-1] == (
      'SIGTERM before the first step: nothing to save')
  assert not saved_steps(tmp_path / 'checkpoints')
