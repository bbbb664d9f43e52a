"""The recall-vs-cache experiment: its configs, its rate choice, the whole pipeline (--quick)."""

import json
import pathlib
import statistics
import subprocess
import sys

import pytest

from configs.ablations import capacity_vs_cache as capacity
from configs.ablations import recall_vs_cache as ablation
from experiments import recall_vs_cache as experiment
from experiments.runner import cache_formula
from mla_jax import mqar
from mla_jax.config import ModelConfig
from mla_jax.model import param_count

ROOT = pathlib.Path(__file__).resolve().parents[1]
# DeepSeek-V2 Table 1 by hand: l = 2, n_h = 8, d_h = 16, d_h^R = 8 (full); d_h = 8, d_h^R = 4
# (quick).
FULL_CACHE = {'mha': 2 * 8 * 16 * 2, 'gqa4': 2 * 4 * 16 * 2, 'gqa2': 2 * 2 * 16 * 2,
              'mqa': 2 * 16 * 2, 'mla2': (32 + 8) * 2, 'mla4': (64 + 8) * 2,
              'mla8': (128 + 8) * 2, 'gta2': (2 * 16 + 8) * 2, 'gla2': (64 + 8) * 2,
              'tpa': (2 + 2) * (8 + 16) * 2}
QUICK_CACHE = {'mha': 2 * 8 * 8 * 2, 'gqa4': 2 * 4 * 8 * 2, 'gqa2': 2 * 2 * 8 * 2,
               'mqa': 2 * 8 * 2, 'mla2': (16 + 4) * 2, 'mla4': (32 + 4) * 2, 'mla8': (64 + 4) * 2,
               'gta2': (2 * 8 + 4) * 2, 'gla2': (32 + 4) * 2, 'tpa': (2 + 2) * (8 + 8) * 2}
# An 8-bit cache's float32 scales (quick): per token, 2 arrays x G KV heads (MLA: 1) x 2 layers.
QUICK_SCALES = {'mha': 2 * 8 * 2, 'gqa4': 2 * 4 * 2, 'gqa2': 2 * 2 * 2, 'mqa': 2 * 2,
                'mla2': 2 * 2, 'mla4': 2 * 2, 'mla8': 2 * 2}


@pytest.mark.parametrize('mode', ['', ',quick', ',seq256'])
def test_rows_differ_only_in_attention_and_mlp_width_and_match_parameters(mode):
  configs = {row: ablation.get_config(f'{row},kv8{mode}') for row in capacity.ROWS}
  reference = configs['mha']
  counts = {row: param_count(ModelConfig.from_dict(c.model)) for row, c in configs.items()}
  for row, c in configs.items():
    for section in ('data', 'opt', 'train', 'eval'):
      assert c[section].to_dict() == reference[section].to_dict(), (row, section)
    same = ('d_model', 'n_layers', 'n_heads', 'head_dim', 'vocab_size', 'max_seq_len')
    assert {k: c.model[k] for k in same} == {k: reference.model[k] for k in same}
    assert abs(counts[row] / counts['mha'] - 1) < 0.02, (row, counts)
  assert reference.data.task == 'mqar' and reference.data.mqar.num_kv_pairs == 8
  seq_len = {'': ablation.SEQ_LEN, ',quick': ablation.QUICK_SEQ_LEN, ',seq256': 256}[mode]
  assert reference.data.seq_len == reference.model.max_seq_len == seq_len
  assert reference.eval.seq_len == reference.eval.stride == seq_len


def test_every_default_difficulty_is_a_valid_task_and_steps_set_the_warmup():
  for kv in ablation.KV_PAIRS:
    c = ablation.get_config(f'mha,kv{kv}')
    mqar.MQAR(c.model.vocab_size, c.data.seq_len, kv)
  c = ablation.set_steps(ablation.get_config('mha,kv8'), 600)
  assert (c.train.steps, c.opt.warmup_steps) == (600, 60)


def test_cache_formula_matches_table_1_by_hand():
  for row, expected in FULL_CACHE.items():
    cfg = ModelConfig.from_dict(ablation.get_config(f'{row},kv8').model)
    assert cache_formula(cfg)[1] == expected, row
    if cfg.attention == 'mla':
      assert cfg.qk_rope_head_dim == cfg.head_dim // 2 == 8


def test_unknown_row_is_a_clear_error():
  for arg in ('mla3,kv8', 'mla4', 'mla4,kvx', 'mla4,kv8,fast', 'mla4,kv8,kv4', 'mla4,kv8,seq'):
    with pytest.raises(ValueError, match='unknown row'):
      ablation.get_config(arg)


def test_best_rate_is_the_best_validation_recall_then_the_lower_loss():
  runs = [dict(lr=1e-3, val_accuracy=0.5, val_loss=1.0),
          dict(lr=2e-3, val_accuracy=0.9, val_loss=0.4),
          dict(lr=4e-3, val_accuracy=0.9, val_loss=0.3),
          dict(lr=8e-3, val_accuracy=0.1, val_loss=0.1),
          dict(lr=2e-2, diverged='non-finite loss')]
  assert experiment.best_rate(runs) == 4e-3
  with pytest.raises(ValueError, match='every rate diverged'):
    experiment.best_rate([dict(row='mha', kv_pairs=8, lr=2e-2, diverged='non-finite')])


def _result(seed, accuracy, lr=4e-3, kv=8, params=1000):
  return dict(row='mqa', attention='mqa', model={'n_heads': 8}, kv_pairs=kv, lr=lr, seed=seed,
              accuracy=accuracy, loss=1 - accuracy, params=params, d_ff=64, steps=10,
              train_tokens=100, seq_len=64, test_examples=16, cache_formula='2·d_h·l',
              cache_elements_formula=64, cache_elements_measured=64,
              cache_bytes_bf16_measured=128, cache_bytes_int8_measured=72,
              cache_bytes_fp8_measured=72)


def test_summary_is_mean_and_std_over_seeds_at_one_rate():
  summary = experiment.summarize([_result(2, 0.5), _result(1, 0.7), _result(3, 0.9),
                                     _result(1, 0.1, kv=16)])
  cell = summary['mqa']['by_kv']['8']
  assert cell['seeds'] == [1, 2, 3] and cell['accuracies'] == [0.7, 0.5, 0.9]
  assert cell['accuracy'] == pytest.approx(0.7) and cell['accuracy_std'] == pytest.approx(0.2)
  assert summary['mqa']['by_kv']['16']['accuracy'] == 0.1
  diverged = dict(row='mqa', kv_pairs=8, lr=4e-3, seed=4, diverged='non-finite loss')
  summary = experiment.summarize([_result(1, 0.7), diverged, _result(2, 0.5)])
  cell = summary['mqa']['by_kv']['8']
  assert cell['seeds'] == [1, 2] and cell['diverged'] == [4]
  assert cell['accuracy'] == pytest.approx(0.6)
  with pytest.raises(ValueError, match='every seed diverged'):
    experiment.summarize([diverged])
  with pytest.raises(ValueError, match='different rates'):
    experiment.summarize([_result(1, 0.5), _result(2, 0.5, lr=1e-3)])
  with pytest.raises(ValueError, match='params'):
    experiment.summarize([_result(1, 0.5), _result(2, 0.5, params=999)])


def test_compare_resolves_only_beyond_the_seed_spread():
  cell = lambda accs: dict(seeds=[1, 2, 3], accuracies=accs, accuracy=sum(accs) / 3,
                           accuracy_std=statistics.stdev(accs))
  summary = {'a': {'by_kv': {'8': cell([0.9, 0.92, 0.94])}},
             'b': {'by_kv': {'8': cell([0.5, 0.52, 0.54])}},
             'c': {'by_kv': {'8': cell([0.6, 0.95, 0.9])}}}
  assert experiment.compare(summary, 'a', 'b', '8')['verdict'] == 'resolved, as expected'
  assert experiment.compare(summary, 'b', 'a', '8')['verdict'] == 'resolved, the opposite'
  assert experiment.compare(summary, 'a', 'c', '8')['verdict'] == 'not resolved'
  assert experiment.compare(summary, 'a', 'b', '8')['seeds_agreeing'] == 3


def _cli(workdir, *args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.recall_vs_cache', f'--workdir={workdir}', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=1200)


# MHA and MLA (every reported run checks its cache against its formula).
QUICK_ROWS = ('mha', 'mla4')


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
  """Learning rates swept on seed 0, seed 1 at the chosen rate, cache measured = formula,
  report outside the repository; a removed run (and the ledger) is redone bit for bit, nothing
  else, and the ledger is written again from the workdir; one rate
  trains no sweep and reuses a finished run."""
  committed = ROOT / 'experiments' / 'results' / 'recall_vs_cache' / 'recall_vs_cache.json'
  before = committed.stat().st_mtime_ns if committed.exists() else None
  rows_flag = f"--rows={','.join(QUICK_ROWS)}"
  run = _cli(tmp_path, '--quick', rows_flag)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '6 to train, at most ~' in run.stdout and 'recall_vs_cache.md' in run.stdout
  assert (committed.stat().st_mtime_ns if committed.exists() else None) == before
  report = json.loads((tmp_path / 'recall_vs_cache.json').read_text())
  assert (tmp_path / 'recall_vs_cache.png').stat().st_size > 10_000
  rows, kv = report['rows'], str(ablation.QUICK_KV_PAIRS[0])
  assert set(rows) == set(QUICK_ROWS) and report['setup']['kv_pairs'] == [int(kv)]
  for row, r in rows.items():
    assert r['elements_measured'] == r['elements_formula'] == QUICK_CACHE[row], row
    assert r['bytes_bf16'] == 2 * QUICK_CACHE[row]
    assert r['bytes_int8'] == r['bytes_fp8'] == QUICK_CACHE[row] + 4 * QUICK_SCALES[row], row
    assert abs(r['params'] / rows['mha']['params'] - 1) < 0.02
    cell = r['by_kv'][kv]
    assert cell['seeds'] == [1] and 0 <= cell['accuracy'] <= 1
    swept = report['sweep'][row][kv]
    assert set(swept) == {f'{lr:g}' for lr in ablation.QUICK_LEARNING_RATES}
    assert swept[f"{cell['lr']:g}"] == max(swept.values())
  assert len(report['sweep_runs']) == len(QUICK_ROWS) * len(ablation.QUICK_LEARNING_RATES)
  markdown = (tmp_path / 'recall_vs_cache.md').read_text()
  for r in rows.values():  # the per-seed table: each reported run's own recall
    cell = r['by_kv'][kv]
    assert f"| {r['mechanism']} | {kv} | {cell['lr']:g} | {cell['accuracies'][0]:.3f} |" in markdown

  setting = f'seq{ablation.QUICK_SEQ_LEN}_kv{kv}_steps{ablation.QUICK_STEPS}_quick'
  chosen = f"{rows['mla4']['by_kv'][kv]['lr']:g}"
  redo = tmp_path / 'mla4' / setting / f'lr{chosen}' / 'seed1'
  kept = next((tmp_path / 'mha').rglob('result.json'))
  kept_mtime = kept.stat().st_mtime_ns
  old = json.loads((redo / 'result.json').read_text())
  for path in sorted(redo.rglob('*'), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  (tmp_path / 'recall_vs_cache.ledger.jsonl').unlink()  # else the run would be restored from it
  run = _cli(tmp_path, '--quick', rows_flag)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '4 of 4 runs already finished' in run.stdout  # the sweep
  assert '1 of 2 runs already finished' in run.stdout  # the seeds at the chosen rates
  new = json.loads((redo / 'result.json').read_text())
  assert (new['accuracy'], new['val_accuracy']) == (old['accuracy'], old['val_accuracy'])
  assert kept.stat().st_mtime_ns == kept_mtime
  assert len((tmp_path / 'recall_vs_cache.ledger.jsonl').read_text().splitlines()) == 6

  run = _cli(tmp_path, '--quick', '--rows=mla4', f'--lrs={chosen}', f'--out={tmp_path}/one')
  assert run.returncode == 0, run.stderr[-3000:]
  assert '0 sweep runs' in run.stdout and '1 of 1 runs already finished' in run.stdout
  one = json.loads((tmp_path / 'one' / 'recall_vs_cache.json').read_text())
  assert one['sweep'] == {} and one['rows']['mla4']['by_kv'][kv]['accuracies'] == [
      new['accuracy']]


@pytest.mark.parametrize('args, message', [
    (['--rows=mha,mla3'], 'error: unknown rows'),
    (['--quick', '--kv_pairs=64'], 'error: --kv_pairs=64'),
    (['--quick', '--lrs=fast'], 'error: --lrs takes'),
    (['--quick', '--kv_pairs=many'], 'error: --kv_pairs takes'),
    (['--quick', '--steps=0'], 'error: --steps=0 must be >= 1'),
])
def test_bad_flags_are_one_line_and_write_nothing(args, message, tmp_path):
  run = _cli(tmp_path, *args)
  assert run.returncode == 1, run.stderr[-500:]
  assert run.stderr.strip().splitlines() == [run.stderr.strip()], run.stderr[-500:]
  assert run.stderr.startswith(message), run.stderr[-500:]
  assert not any(tmp_path.iterdir())
