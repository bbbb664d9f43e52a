"""End to end: train -> checkpoint -> resume -> evaluate -> generate, and bad input at the CLI."""

import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_run

from configs import base
from mla_jax import attention_op, run_config, training
from mla_jax import workdir as wd
from mla_jax.kernels import cpu_attention
from mla_jax.training import step as training_step

ROOT = pathlib.Path(__file__).resolve().parents[1]


def losses(workdir):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]
  return [r['loss'] for r in rows if 'loss' in r], [r for r in rows if 'val_loss' in r]


def cli(module, *args):
  return subprocess.run([sys.executable, '-m', f'mla_jax.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def trained(corpus, tmp_path_factory):
  """A 10-step run done in one go, and the same run stopped after 5 steps and resumed, with
  train.deterministic as a user asks for bit-exact resume (conftest sets its XLA flag)."""
  whole = tmp_path_factory.mktemp('whole')
  training.train_and_evaluate(tiny_run(corpus, deterministic=True), str(whole))
  split = tmp_path_factory.mktemp('split')
  training.train_and_evaluate(tiny_run(corpus, stop_after_steps=5, deterministic=True), str(split))
  assert wd.manager(split / 'checkpoints').latest_step() == 5
  last = training.train_and_evaluate(tiny_run(corpus, deterministic=True), str(split))
  return whole, split, last


def test_resumed_run_continues_exactly(trained):
  whole, split, _ = trained
  whole_losses, whole_val = losses(whole)
  split_losses, split_val = losses(split)
  assert len(whole_losses) == 10
  assert split_losses == whole_losses  # bit for bit: same data, same state
  assert [v['val_loss'] for v in split_val] == [v['val_loss'] for v in whole_val]
  assert whole_losses[-1] < whole_losses[0] - 0.5  # it learns


def test_the_attention_kernels_are_recorded_in_config_json(trained):
  """The kernels the model resolved are what config.json records: on this CPU the tiny
  config's 'auto' takes the C++ kernel for whole sequences where it builds, einsum for the
  rest (attention_op.resolve); the resume check ignores the record."""
  whole, split, _ = trained
  recorded = json.loads((whole / 'config.json').read_text())['kernels']
  cfg = wd.read_config(whole).model
  assert recorded == attention_op.resolve(cfg).to_dict()
  want = 'cpu_kernel' if cpu_attention.available() else 'einsum'
  assert (recorded['whole'], recorded['prefill'], recorded['decode']) == (want, 'einsum',
                                                                           'einsum')
  assert json.loads((split / 'config.json').read_text())['kernels'] == recorded


def test_evaluate_matches_the_trainers_last_validation(trained):
  _, split, last = trained
  result = cli('evaluate', f'--workdir={split}')
  assert result.returncode == 0, result.stderr
  saved = json.loads((split / 'eval.json').read_text())
  assert saved['perplexity'] == last['perplexity']
  assert saved['tokens'] == last['tokens'] > 0
  assert f"perplexity {last['perplexity']:.4f}" in result.stdout


def test_greedy_generation_from_a_trained_run_is_deterministic(trained):
  whole, _, _ = trained
  runs = [cli('generate', f'--workdir={whole}', '--prompt=the king', '--max_new_tokens=24')
          for _ in range(2)]
  assert runs[0].returncode == 0, runs[0].stderr
  assert runs[0].stdout == runs[1].stdout
  assert runs[0].stdout.startswith('the king') and len(runs[0].stdout.strip()) > 20


def _snapshot(folder: pathlib.Path) -> dict:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def _corrupt_latest(workdir: pathlib.Path):
  step = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  for f in (workdir / 'checkpoints' / str(step) / 'params').rglob('*'):
    if f.is_file() and f.stat().st_size > 100:
      f.write_bytes(b'\0' * 64)


BAD = {
    'unknown config key': (
        'train', ['--config=configs/mla.py:tiny', '--config.model.bogus=1'], 'bogus'),
    'wrong type': (
        'train', ['--config=configs/mla.py:tiny', '--config.model.d_model=wide'], 'd_model'),
    'invalid model': (
        'train', ['--config=configs/gqa.py:tiny', '--config.model.n_kv_heads=3'],
        'n_heads=4 is not divisible by n_kv_heads=3'),
    'empty data glob': (
        'train', ['--config=configs/mla.py:tiny', '--config.data.files=/nonexistent/*.txt'],
        'no files match data.files'),
    'non-finite loss': (
        'train', ['--config=configs/mla.py:tiny', '--config.opt.lr=1e30'],
        'non-finite loss or gradient'),
    'changed config on resume': (
        'train', ['--config=configs/mla.py:tiny', '--config.model.d_model=64'],
        'model.d_model: 32 in config.json, 64 now'),
    'missing workdir': ('evaluate', [], 'config.json missing'),
    'missing checkpoint': ('evaluate', [], 'has no checkpoint'),
    'corrupt checkpoint': ('evaluate', [], 'is damaged (checksum mismatch)'),
    'prompt longer than the cache': (
        'generate', ['--prompt=' + 'x' * 130, '--max_new_tokens=5'], 'exceeds the cache'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_input_is_one_clear_line(case, trained, corpus, tmp_path):
  module, args, message = BAD[case]
  workdir = tmp_path / 'run'
  if case in ('changed config on resume', 'corrupt checkpoint', 'prompt longer than the cache'):
    subprocess.run(['cp', '-r', str(trained[0]), str(workdir)], check=True)
  if case == 'missing checkpoint':
    workdir.mkdir()
    (workdir / 'config.json').write_text((trained[0] / 'config.json').read_text())
  if case == 'corrupt checkpoint':
    _corrupt_latest(workdir)
  before = _snapshot(workdir) if workdir.exists() else {}
  data_flag = [f'--config.data.files={corpus}'] if module == 'train' and \
      'data.files' not in ' '.join(args) else []
  result = cli(module, f'--workdir={workdir}', *args, *data_flag)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  if before:
    after = _snapshot(workdir)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing destroyed
    if case != 'non-finite loss':
      assert after == before


@pytest.mark.long
def test_gradient_accumulation_matches_one_big_batch(corpus, tmp_path):
  """Two microbatches of 4 average to the gradient of the batch of 8: same losses."""
  one = tiny_run(corpus, steps=4, eval_every=100, checkpoint_every=100)
  two = tiny_run(corpus, steps=4, eval_every=100, checkpoint_every=100)
  two.opt.grad_accum_steps = 2
  training.train_and_evaluate(one, str(tmp_path / 'one'), final_eval=False)
  training.train_and_evaluate(two, str(tmp_path / 'two'), final_eval=False)
  a, b = losses(tmp_path / 'one')[0], losses(tmp_path / 'two')[0]
  np.testing.assert_allclose(a, b, rtol=2e-5)
  assert a[0] != a[-1]


@pytest.mark.long
def test_bfloat16_compute_trains_like_float32(corpus, tmp_path):
  f32 = tiny_run(corpus, steps=6, eval_every=100, checkpoint_every=100)
  bf16 = tiny_run(corpus, steps=6, eval_every=100, checkpoint_every=100)
  bf16.model.dtype = 'bfloat16'
  training.train_and_evaluate(f32, str(tmp_path / 'f32'), final_eval=False)
  training.train_and_evaluate(bf16, str(tmp_path / 'bf16'), final_eval=False)
  a, b = losses(tmp_path / 'f32')[0], losses(tmp_path / 'bf16')[0]
  assert all(np.isfinite(b)) and b[-1] < b[0] - 0.3
  np.testing.assert_allclose(a, b, atol=0.05)
  assert a != b  # really computed in bfloat16


def test_a_run_recorded_before_newer_config_fields_still_resumes():
  """config.json written before model fields, data.task and its settings existed: the same
  run resumes (they take their defaults); a real change is still refused, by field."""
  config = base.get_config()
  recorded = json.loads(config.to_json_best_effort())
  for field in ('rope_block', 'kv_norm', 'cache_dtype'):
    del recorded['model'][field]
  del recorded['data']['task'], recorded['data']['mqar']
  recorded = run_config.RunConfig.from_dict(recorded)
  assert run_config.changes(recorded, run_config.parse(config)) == []
  config.model.n_layers += 1
  assert run_config.changes(recorded, run_config.parse(config)) == [
      'model.n_layers: 4 in config.json, 5 now']
  config = base.get_config()
  config.data.task = 'mqar'
  assert "data.task: 'text' in config.json, 'mqar' now" in run_config.changes(
      recorded, run_config.parse(config))


def test_cpu_compiler_options_leave_out_what_xla_lacks(monkeypatch):
  """The trainer's XLA:CPU options are experimental: one that this jax's XLA lacks is left
  out, and the step compiles with the others."""
  monkeypatch.setattr(training_step, 'CPU_COMPILER_OPTIONS',  # XLA has had fast math for years
                      {'xla_cpu_enable_fast_math': False, 'xla_cpu_no_such_option': 1})
  training_step._cpu_options_taken.cache_clear()
  try:
    assert training.cpu_compiler_options() == {'xla_cpu_enable_fast_math': False}
  finally:
    training_step._cpu_options_taken.cache_clear()
