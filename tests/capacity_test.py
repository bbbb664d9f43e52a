"""The capacity-vs-cache experiment: its configs, its verdicts, and the whole pipeline (--quick)."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import DOC_VARIANT
from flax import nnx

from configs.ablations import capacity_vs_cache as ablation
from configs.ablations import recall_vs_cache as recall
from experiments import capacity_vs_cache as experiment
from experiments import report, runner, timing
from experiments.runner import cache_formula
from mla_jax import Transformer
from mla_jax import workdir as wd
from mla_jax.config import ModelConfig
from mla_jax.errors import InputError
from mla_jax.model import param_count

ROOT = pathlib.Path(__file__).resolve().parents[1]
# DeepSeek-V2 Table 1 by hand: l = 4, n_h = 8, d_h = 16, d_h^R = 8 (full); l = 2, d_h = 8 (quick).
FULL_CACHE = {'mha': 2 * 8 * 16 * 4, 'gqa4': 2 * 4 * 16 * 4, 'gqa2': 2 * 2 * 16 * 4,
              'mqa': 2 * 16 * 4, 'mla2': (32 + 8) * 4, 'mla4': (64 + 8) * 4,
              'mla8': (128 + 8) * 4, 'gta2': (2 * 16 + 8) * 4, 'gla2': (64 + 8) * 4,
              'tpa': (2 + 2) * (8 + 16) * 4}
QUICK_CACHE = {'mha': 2 * 8 * 8 * 2, 'gqa4': 2 * 4 * 8 * 2, 'gqa2': 2 * 2 * 8 * 2,
               'mqa': 2 * 8 * 2, 'mla2': (16 + 4) * 2, 'mla4': (32 + 4) * 2, 'mla8': (64 + 4) * 2,
               'gta2': (2 * 8 + 4) * 2, 'gla2': (32 + 4) * 2, 'tpa': (2 + 2) * (8 + 8) * 2}
# Geometry 'paper': l = 4, n_h = 4, d_h = 32, d_r = 16.
PAPER_CACHE = {'mha': 2 * 4 * 32 * 4, 'gqa2': 2 * 2 * 32 * 4, 'mqa': 2 * 32 * 4,
               'mla2': (64 + 16) * 4, 'mla4': (128 + 16) * 4, 'mla8': (256 + 16) * 4,
               'gta2': (2 * 32 + 16) * 4, 'gla2': (128 + 16) * 4, 'tpa': (2 + 2) * (4 + 32) * 4}
# An 8-bit cache's float32 scales (quick): per token, 2 arrays x G KV heads (MLA: 1) x 2 layers.
QUICK_SCALES = {'mha': 2 * 8 * 2, 'gqa4': 2 * 4 * 2, 'gqa2': 2 * 2 * 2, 'mqa': 2 * 2,
                'mla2': 2 * 2, 'mla4': 2 * 2, 'mla8': 2 * 2}


MODES = ['', ',quick', ',paper', ',paper,quick', ',moe', ',paper,quick,moe', ',125m,quick']


def _rows(mode):
  geometry = next((g for g in ('paper', '125m') if g in mode.split(',')), 'small')
  return ablation.GEOMETRIES[geometry][1]


@pytest.mark.parametrize('mode', MODES)
def test_rows_differ_only_in_attention_and_mlp_width(mode):
  configs = {row: ablation.get_config(row + mode) for row in _rows(mode)}
  reference = configs['mha']
  for row, c in configs.items():
    for section in ('data', 'opt', 'train', 'eval'):
      assert c[section].to_dict() == reference[section].to_dict(), (row, section)
    same = ('d_model', 'n_layers', 'n_heads', 'vocab_size', 'max_seq_len')
    assert {k: c.model[k] for k in same} == {k: reference.model[k] for k in same}


@pytest.mark.parametrize('mode', MODES)
def test_parameters_matched_within_two_percent(mode):
  counts = {row: param_count(ModelConfig.from_dict(ablation.get_config(row + mode).model))
            for row in _rows(mode)}
  for row, n in counts.items():
    assert abs(n / counts['mha'] - 1) < 0.02, (row, n, counts['mha'])
  width = lambda c: c.model[ablation.width_field(c.model)]  # d_ff, or the experts' width
  widths = {row: width(ablation.get_config(row + mode)) for row in _rows(mode)}
  assert widths['mqa'] > widths['gqa2'] > widths.get('gqa4', widths['mha']) >= widths['mha']
  assert widths['mha'] > widths['mla8']
  if 'moe' in mode:  # the dense first layer keeps its width; every row has the same experts
    moe = ablation.get_config('mla4' + mode).model
    assert {ablation.get_config(row + mode).model.d_ff for row in _rows(mode)} == {moe.d_ff}
    assert (moe.n_routed_experts, moe.num_experts_per_tok, moe.first_k_dense_replace) == (8, 2, 1)


@pytest.mark.parametrize('geometry', ['', ',paper'])
def test_mlp_matching_keeps_mhas_width_and_lets_parameters_differ(geometry):
  """',mlp': the control for the matching. Every row has MHA's d_ff, so a row whose attention
  has fewer parameters (MQA) is smaller than MHA and one with more (MLA here) larger."""
  configs = {row: ablation.get_config(f'{row}{geometry},mlp') for row in _rows(geometry)}
  mha_width = ablation.get_config('mha' + geometry).model.d_ff
  assert {c.model.d_ff for c in configs.values()} == {mha_width}
  counts = {row: param_count(ModelConfig.from_dict(c.model)) for row, c in configs.items()}
  assert counts['mqa'] < counts['gqa2'] < counts['mha'] < counts['mla4']
  matched = ablation.get_config(f'mla4{geometry}')
  assert {k: v for k, v in configs['mla4'].model.items() if k != 'd_ff'} == {
      k: v for k, v in matched.model.items() if k != 'd_ff'}


def test_report_names_say_the_geometry_the_matching_and_the_feed_forward():
  assert experiment.name('small') == 'capacity_vs_cache'
  assert experiment.name('paper') == 'capacity_vs_cache_paper'
  assert experiment.name('paper', 'mlp') == 'capacity_vs_cache_paper_mlp'
  assert experiment.name('paper', ffn='moe') == 'capacity_vs_cache_paper_moe'
  assert experiment.name('small', 'mlp') == 'capacity_vs_cache_mlp'


@pytest.mark.parametrize('geometry, expected', [('', FULL_CACHE), (',paper', PAPER_CACHE)])
def test_cache_formula_matches_table_1_by_hand(geometry, expected):
  assert list(expected) == list(_rows(geometry))
  for row, elements in expected.items():
    cfg = ModelConfig.from_dict(ablation.get_config(row + geometry).model)
    assert cache_formula(cfg)[1] == elements


def test_plot_legend_names_the_latent_widths_present():
  """The MLA line's label lists the d_c / d_h ratios of the rows run, not a fixed 2, 4, 8."""
  def row(name, geometry):
    c = ablation.get_config(name + (',paper' if geometry == 'paper' else ''))
    return {'attention': c.model.attention, 'model': c.model.to_dict()}
  labels = lambda names, geometry: [label for label, _, _ in report.families(
      {n: row(n, geometry) for n in names})]
  assert labels(['mha', 'mla4'], 'paper')[1] == 'MLA family (d_c = 4 d_h)'
  assert labels(['mha', 'mla8', 'mla2', 'mla4'], 'small')[1] == 'MLA family (d_c = 2, 4, 8 d_h)'
  assert labels(['mha', 'gqa2'], 'small')[0] == 'GQA family (MHA, GQA, MQA)'


def test_paper_geometry_has_the_papers_head_shape():
  """d_h >= 32, d_r = d_h / 2, d_c = 4 d_h: MLA's cache is GQA's with 2.25 groups."""
  m = ModelConfig.from_dict(ablation.get_config('mla4,paper').model)
  assert m.head_dim == 32 and m.qk_rope_head_dim == 16 and m.kv_lora_rank == 4 * 32
  assert cache_formula(m)[1] / (2 * m.head_dim * m.n_layers) == 2.25


@pytest.mark.parametrize('arg', ['mla3', 'gqa4,paper', 'mha,paper,paper', 'mha,big',
                                 'mqa,mlp,mlp', 'mha,paper,125m'])
def test_unknown_row_is_a_clear_error(arg):
  with pytest.raises(ValueError, match='unknown row'):
    ablation.get_config(arg)


def _row(losses, seeds=None):
  return dict(losses=losses, seeds=seeds or list(range(len(losses))))


@pytest.mark.parametrize('better, worse, verdict, agreeing', [
    ([1.00, 1.01, 1.02], [1.10, 1.11, 1.12], 'resolved, as the paper says', 3),
    ([1.10, 1.11, 1.12], [1.00, 1.01, 1.02], 'resolved, the opposite', 0),
    ([1.00, 1.05, 1.10], [1.02, 1.07, 1.08], 'not resolved', 2),
    ([1.00], [1.10], 'not resolved', 1),  # one seed has no spread to go beyond
    ([1.00, 1.01, 1.02], [1.50], 'not resolved', 1),  # nor has one side with one seed
])
def test_verdicts(better, worse, verdict, agreeing):
  c = experiment.compare({'a': _row(better), 'b': _row(worse)}, 'a', 'b')
  assert c['verdict'] == verdict and c['seeds_agreeing'] == agreeing
  assert math.isclose(c['gap'], np.mean(worse) - np.mean(better))


def _cli(workdir, *args):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.capacity_vs_cache', f'--workdir={workdir}', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=600)


QUICK_ROWS = ('mha', 'mla4')


@pytest.mark.slow
def test_quick_pipeline_end_to_end(corpus, tmp_path):
  """Rates swept on seed 0, seed 1 at each row's lowest-loss rate: cache measured = formula,
  params matched, report written outside the repo; a run removed (folder and ledger line)
  and redone gives the same loss bit for bit, and nothing else is redone; a fresh workdir
  with only the ledger trains nothing and reports the same."""
  committed = ROOT / 'experiments' / 'results' / 'capacity_vs_cache' / 'capacity_vs_cache.json'
  before = committed.stat().st_mtime_ns if committed.exists() else None
  args = ('--quick', f"--rows={','.join(QUICK_ROWS)}", '--seeds=1', f'--data_files={corpus}')
  run = _cli(tmp_path, *args)
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads((tmp_path / 'capacity_vs_cache.json').read_text())
  assert (tmp_path / 'capacity_vs_cache.png').stat().st_size > 10_000
  assert 'capacity_vs_cache.md' in run.stdout
  assert (committed.stat().st_mtime_ns if committed.exists() else None) == before
  rows = report['rows']
  assert set(rows) == set(QUICK_ROWS) == set(report['sweep'])
  for row, r in rows.items():
    assert r['elements_measured'] == r['elements_formula'] == QUICK_CACHE[row], row
    assert r['bytes_bf16'] == 2 * r['elements_measured']
    assert r['bytes_int8'] == r['bytes_fp8'] == QUICK_CACHE[row] + 4 * QUICK_SCALES[row], row
    assert abs(r['params'] / rows['mha']['params'] - 1) < 0.02
    assert r['seeds'] == [1] and 0 < r['loss'] < math.log(256)
    swept = report['sweep'][row]
    assert set(swept) == {f'{lr:g}' for lr in ablation.QUICK_LEARNING_RATES}
    assert swept[f"{r['lr']:g}"] == min(swept.values())
  assert len(report['sweep_runs']) == len(QUICK_ROWS) * len(ablation.QUICK_LEARNING_RATES)
  assert [(c['better'], c['worse']) for c in report['comparisons']] == [('mla4', 'mha')]

  chosen = f"{rows['mla4']['lr']:g}"
  redo = tmp_path / 'small-quick' / 'mla4' / f'lr{chosen}' / 'seed1'
  kept = tmp_path / 'small-quick' / 'mha' / 'lr0.003' / 'seed0' / 'result.json'
  kept_mtime = kept.stat().st_mtime_ns
  old = json.loads((redo / 'result.json').read_text())
  for path in sorted(redo.rglob('*'), reverse=True):
    path.unlink() if path.is_file() else path.rmdir()
  ledger = tmp_path / 'capacity_vs_cache.ledger.jsonl'
  lines = ledger.read_text().splitlines()
  assert len(lines) == 6  # every run, once
  gone = (redo / 'result.json').relative_to(tmp_path).as_posix()
  ledger.write_text(''.join(f'{line}\n' for line in lines if json.loads(line)['file'] != gone))
  run = _cli(tmp_path, *args)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '4 of 4 runs already finished' in run.stdout  # the sweep
  assert '1 of 2 runs already finished' in run.stdout  # the seeds at the chosen rates
  new = json.loads((redo / 'result.json').read_text())
  assert new['loss'] == old['loss'] and new['cache_elements_measured'] == 72
  assert kept.stat().st_mtime_ns == kept_mtime

  fresh = tmp_path / 'fresh'  # another machine: a clone holding only the committed ledger
  fresh.mkdir()
  (fresh / ledger.name).write_text(ledger.read_text())
  run = _cli(fresh, *args)
  assert run.returncode == 0, run.stderr[-3000:]
  assert '6 finished runs restored' in run.stdout and 'training 0' in run.stdout
  again = json.loads((fresh / 'capacity_vs_cache.json').read_text())
  assert again['runs'] == json.loads((tmp_path / 'capacity_vs_cache.json').read_text())['runs']


@pytest.mark.slow
def test_quick_mlp_matching_runs_apart_from_the_matched_runs(corpus, tmp_path):
  """--match=mlp: its runs and report sit beside the matched ones', never in their place."""
  run = _cli(tmp_path, '--quick', '--match=mlp', '--rows=mqa', '--lrs=3e-3', '--seeds=1',
             f'--data_files={corpus}')
  assert run.returncode == 0, run.stderr[-3000:]
  assert (tmp_path / 'small-mlp-quick' / 'mqa' / 'lr0.003' / 'seed1' / 'result.json').exists()
  assert not (tmp_path / 'small-quick').exists()
  assert not (tmp_path / 'capacity_vs_cache.json').exists()
  report = json.loads((tmp_path / 'capacity_vs_cache_mlp.json').read_text())
  mqa = report['rows']['mqa']
  assert mqa['d_ff'] == ablation.get_config('mha,quick').model.d_ff
  assert mqa['params'] == param_count(ModelConfig.from_dict(
      ablation.get_config('mqa,mlp,quick').model))
  md = (tmp_path / 'capacity_vs_cache_mlp.md').read_text()
  assert 'MLP widths matched' in md and "every row has MHA's SwiGLU width" in md


@pytest.mark.slow
def test_quick_runs_with_a_trained_bpe_sit_apart_and_report_per_token(corpus, tmp_path):
  """--tokenizer=train:300: each run trains (once) and stores a 300-token BPE, is scored with
  it (bits per byte of the same text besides), and sits beside the byte runs' folders."""
  run = _cli(tmp_path, '--quick', '--rows=mha', '--lrs=3e-3', '--seeds=1',
             f'--data_files={corpus}', '--tokenizer=train:300', f'--out={tmp_path / "out"}')
  assert run.returncode == 0, run.stderr[-3000:]
  folder = tmp_path / 'small-train300-quick' / 'mha' / 'lr0.003' / 'seed1'
  result = json.loads((folder / 'result.json').read_text())
  assert (folder / 'tokenizer.json').is_file() and not (tmp_path / 'small-quick').exists()
  tok = wd.load_tokenizer(folder)
  assert tok.vocab_size <= 300 and 0 < result['loss'] < math.log(300)
  # bits per byte of the held-out text: fewer tokens than bytes, so more bits per token
  assert result['bytes'] > result['tokens']
  assert result['bits_per_byte'] == pytest.approx(
      result['loss'] * result['tokens'] / (math.log(2) * result['bytes']), rel=1e-12)
  md = (tmp_path / 'out' / 'capacity_vs_cache.md').read_text()
  assert 'Loss is nats per token (train:300)' in md and '(train:300 tokens) per run' in md


@pytest.mark.slow
def test_quick_runs_with_moe_feed_forward_layers_sit_apart_and_say_so(corpus, tmp_path):
  """--ffn=moe: the rows' layers after the first are DeepSeekMoE, parameters still matched to
  MHA's (by the experts' width), in folders and a report of their own."""
  run = _cli(tmp_path, '--quick', '--rows=mha,mla4', '--lrs=3e-3', '--seeds=1', '--ffn=moe',
             f'--data_files={corpus}', f'--out={tmp_path / "out"}')
  assert run.returncode == 0, run.stderr[-3000:]
  rows = json.loads((tmp_path / 'out' / 'capacity_vs_cache_moe.json').read_text())['rows']
  assert abs(rows['mla4']['params'] / rows['mha']['params'] - 1) < 0.02
  assert rows['mla4']['elements_measured'] == rows['mla4']['elements_formula']
  folder = tmp_path / 'small-moe-quick' / 'mla4' / 'lr0.003' / 'seed1'
  model = wd.read_config(folder).model
  assert model.n_routed_experts == 8 and model.is_moe_layer(1) and not model.is_moe_layer(0)
  assert 'moe_imbalance' in (folder / 'metrics.jsonl').read_text()
  md = (tmp_path / 'out' / 'capacity_vs_cache_moe.md').read_text()
  assert md.startswith('# Capacity vs KV-cache size') and 'DeepSeekMoE feed-forward' in md
  widths = {row: wd.read_config(tmp_path / 'small-moe-quick' / row / 'lr0.003' / 'seed1')
            .model.moe_intermediate_size for row in ('mha', 'mla4')}
  assert all(f'(experts {w})' in md for w in widths.values())


def test_ledger_restores_a_fresh_workdir_and_records_only_what_it_lacks(tmp_path):
  trained, fresh, path = tmp_path / 'a', tmp_path / 'b', tmp_path / 'results' / 'x.jsonl'
  run = trained / 'small' / 'mha' / 'lr0.006' / 'seed1'
  run.mkdir(parents=True)
  (run / 'result.json').write_text(json.dumps(dict(loss=1.8163, seed=1)))
  assert runner.Ledger(path, trained).sync() == 0
  assert runner.Ledger(path, fresh).sync() == 1
  restored = fresh / 'small' / 'mha' / 'lr0.006' / 'seed1' / 'result.json'
  assert json.loads(restored.read_text()) == dict(loss=1.8163, seed=1)
  assert runner.Ledger(path, fresh).sync() == 0 and len(path.read_text().splitlines()) == 1
  (fresh / 'small' / 'mqa').mkdir()
  (fresh / 'small' / 'mqa' / 'result.json').write_text('{"loss": 2.0}')
  runner.Ledger(path, fresh).record(fresh / 'small' / 'mqa' / 'result.json')
  assert runner.Ledger(path, fresh).sync() == 0 and len(path.read_text().splitlines()) == 2
  path.write_text(path.read_text() + '\n')  # a blank line, as a hand edit leaves one, is fine
  assert runner.Ledger(path, fresh).sync() == 0
  good = path.read_text()
  for bad in ('{"file": "small/gqa2/result.json"',  # cut short
              '{"file": "../../x/result.json", "result": {}}',  # outside the workdir
              '{"file": "small/gqa2/result.json", "result": null}'):
    path.write_text(good + bad + '\n')
    with pytest.raises(InputError, match=r'x\.jsonl line 4 is not a ledger entry'):
      runner.Ledger(path, fresh).sync()
  assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('args, message', [
    (['--rows=mha,mla3'], 'error: unknown rows'),
    (['--geometry=paper', '--rows=gqa4'], 'error: unknown rows'),
    (['--lrs=fast'], 'error: --lrs takes'),
    (['--lrs=1e-3,0.001'], 'error: --lrs takes'),
    (['--lrs=1e-3,1.0000001e-3'], 'error: --lrs takes'),  # one run folder for both
    (['--lrs=-1e-3'], 'error: --lrs takes'),
    (['--seeds=0'], 'error: unknown rows [] or --seeds=0'),
    (['--data_files=plays/*.txt'], 'error: --data_files needs --out'),
    (['--tokenizer=train:300'], 'error: --tokenizer needs --out'),
    (['--ffn=moe'], 'error: --ffn needs --out'),
    (['--geometry=125m', '--out=elsewhere'], 'error: --geometry=125m needs --tokenizer'),
])
def test_bad_flags_are_one_line_and_write_nothing(args, message, tmp_path):
  run = _cli(tmp_path, *args)
  assert run.returncode != 0
  assert run.stderr.strip().splitlines()[-1].startswith(message), run.stderr
  assert not any(tmp_path.iterdir())


def _result(row, seed, lr, loss=None):
  """A run's result.json as the worker writes it (loss None: diverged)."""
  if loss is None:
    return dict(row=row, seed=seed, lr=lr, diverged='non-finite loss at step 3', cpu_s=1.0)
  return dict(row=row, seed=seed, lr=lr, loss=loss, perplexity=math.exp(loss),
              attention='mha', model=dict(n_heads=8, head_dim=16, d_model=128, n_layers=4),
              params=1000, d_ff=384, cache_formula='2·n_h·d_h·l', cache_elements_formula=1024,
              cache_elements_measured=1024, cache_bytes_bf16_measured=2048,
              cache_bytes_int8_measured=1280, cache_bytes_fp8_measured=1280, tokens_per_s=1.0,
              train_tokens=100)


def test_best_rate_is_the_lowest_validation_loss_among_runs_that_finished():
  sweep = [_result('mha', 0, 1.5e-3, 2.0), _result('mha', 0, 3e-3, 1.9),
           _result('mha', 0, 6e-3)]
  assert experiment.best_rate(sweep) == 3e-3
  with pytest.raises(ValueError, match='every rate diverged'):
    experiment.best_rate([_result('mha', 0, 6e-3)])


def test_summary_leaves_diverged_seeds_out_and_names_them():
  runs = [_result('mha', 1, 3e-3, 1.9), _result('mha', 2, 3e-3), _result('mha', 3, 3e-3, 2.1)]
  s = experiment.summarize(runs)['mha']
  assert s['seeds'] == [1, 3] and s['diverged'] == [2] and s['lr'] == 3e-3
  assert math.isclose(s['loss'], 2.0)
  with pytest.raises(ValueError, match='every seed diverged'):
    experiment.summarize([_result('mqa', 1, 3e-3)])


def test_report_marks_the_chosen_rate_and_a_diverged_one():
  sweep = [_result('mha', 0, 3e-3, 1.9), _result('mha', 0, 6e-3)]
  summary = experiment.summarize([_result('mha', 1, 3e-3, 1.95)])
  md = experiment.render(dict(rows=summary, sweep=report.rate_table(sweep, 'loss'), comparisons=[],
                              setup=dict(command='x', machine='m', date='d', quick=False, jobs=2,
                                         lrs=[3e-3, 6e-3], seeds=1, geometry='small',
                                         match='params')))
  assert '| MHA (G=8) | **1.9000** | diverged |' in md
  assert '| 3e-3 |' not in md and '| 0.003 | 1.9500 ± 0.0000 |' in md


def test_report_flags_a_chosen_rate_at_an_end_of_the_sweep(tmp_path):
  assert experiment.edge({'0.003': 1.9, '0.006': 1.8, '0.012': 1.85}, 6e-3) is None
  assert experiment.edge({'0.003': 1.9, '0.006': 1.8}, 6e-3) == 'highest'
  assert experiment.edge({'0.003': 1.9, '0.006': None}, 3e-3) == 'lowest'
  sweep = [_result('mha', 0, 3e-3, 1.9), _result('mha', 0, 6e-3, 1.8)]
  runs = [_result('mha', 1, 6e-3, 1.85)]
  setup = dict(command='x', machine='m', date='d', quick=False, jobs=2, lrs=[3e-3, 6e-3],
               seeds=1, geometry='small', match='params')
  md_path, json_path, *pngs = experiment.CapacityVsCache().report(runs, sweep, setup, tmp_path)
  md, report = md_path.read_text(), json.loads(json_path.read_text())
  assert [p.name for p in pngs] == ['capacity_vs_cache.png', 'capacity_vs_cache_frontier.png']
  assert [p['row'] for p in report['frontier']['small'] if p['efficient']] == ['mha']
  assert '- small geometry: MHA (G=8) (' in md
  assert '**Not bracketed**' in md and 'MHA (G=8) at 0.006 (the highest rate)' in md
  assert report['rows']['mha']['edge'] == 'highest'


@pytest.mark.parametrize('lrs, chosen', [([3e-3], 3e-3), ([3e-3, 6e-3], 6e-3)])
def test_reported_runs_are_fresh_seeds_at_the_chosen_rate(lrs, chosen):
  from experiments import sweep
  losses = {3e-3: 2.0, 6e-3: 1.9}
  read = lambda run: _result(run[0], run[2], run[1], losses[run[1]])
  assert sweep.sweep_runs([('mha',)], lrs) == ([] if len(lrs) == 1 else
                                               [('mha', 3e-3, 0), ('mha', 6e-3, 0)])
  final = sweep.final_runs([('mha',)], lrs, 3, read, experiment.best_rate)
  assert final == [('mha', chosen, 1), ('mha', chosen, 2), ('mha', chosen, 3)]


# --- the 125m geometry ---------------------------------------------------------------------
def test_125m_geometry_is_gpt2_small_with_every_row_matched():
  """d_model 768, 12 layers, 12 heads of d_h = 64 (d_r = 32, mla4's d_c = 256), a BPE
  vocabulary, ~135M parameters at 32k tokens (85M in the layers, GPT-2 small's), 2.49B
  tokens; MHA and the row furthest from it (mla8) matched within 2% through d_ff alone."""
  mha, mla8 = (ablation.get_config(f'{row},125m') for row in ('mha', 'mla8'))
  m = ModelConfig.from_dict(mha.model)
  assert (m.d_model, m.n_layers, m.n_heads, m.head_dim, m.d_ff) == (768, 12, 12, 64, 2048)
  assert mha.data.tokenizer == f'train:{m.vocab_size}' and m.vocab_size == 32768
  params = param_count(m)
  assert 130e6 < params < 140e6 and 84e6 < params - 2 * 32768 * 768 < 86e6
  d = mha.data
  assert mha.train.steps * d.batch_size * d.seq_len == 38_000 * 64 * 1024
  assert d.batch_size // mha.opt.grad_accum_steps == 32  # the device report's batch
  mla = ModelConfig.from_dict(mla8.model)
  assert (mla.kv_lora_rank, mla.qk_rope_head_dim) == (8 * 64, 32)
  assert abs(param_count(mla) / params - 1) < 0.02 and mla.d_ff < m.d_ff
  assert cache_formula(mla)[1] == (512 + 32) * 12


def test_125m_quick_is_the_real_heads_on_a_narrow_model():
  full, quick = (ModelConfig.from_dict(ablation.get_config(f'mla4,125m{q}').model)
                 for q in ('', ',quick'))
  shape = lambda m: (m.n_heads, m.head_dim, m.kv_lora_rank, m.qk_rope_head_dim)
  assert shape(quick) == shape(full) == (12, 64, 256, 32)
  assert (quick.d_model, quick.n_layers, quick.vocab_size) == (384, 2, 256)


def test_device_hours_scale_the_measured_rate_by_flops_per_token():
  """Scaled to the measured model itself, a run takes its tokens over the measured tokens/s;
  GQA takes MHA's rate; a device report of another model is refused."""
  device = json.loads(experiment.DEVICE_REPORT.read_text())
  rates = experiment.device_rates(device)
  for r in device['rows']:
    config = timing.large_config(r['variant'])
    config.train.steps = 1000
    assert experiment.device_seconds(config, rates) == pytest.approx(
        1000 * 32 * 1024 / r['tokens_per_s'], rel=1e-12)
  gqa = timing.large_config('gqa')
  cfg = ModelConfig.from_dict(gqa.model)
  assert experiment.device_seconds(gqa, rates) == pytest.approx(
      gqa.train.steps * 32 * 1024 * timing.flops_per_token(cfg, 1024) / rates['mha'])
  device['rows'][0]['params'] += 1
  with pytest.raises(InputError, match='rerun bench_train --size=large'):
    experiment.device_rates(device)


@pytest.mark.slow  # ~35 s of CPU: the worker compiles training, validation and three caches
def test_quick_125m_runs_end_to_end(corpus, tmp_path):
  """The 125m geometry's pipeline (its stand-in: the real heads, 2 narrow layers): one row,
  one rate, one seed; the report with its frontier, beside the other geometries' folders."""
  run = _cli(tmp_path, '--quick', '--geometry=125m', '--rows=mla4', '--lrs=3e-3', '--seeds=1',
             f'--data_files={corpus}')
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads((tmp_path / 'capacity_vs_cache_125m.json').read_text())
  mla4 = report['rows']['mla4']
  assert mla4['elements_measured'] == mla4['elements_formula'] == (256 + 32) * 2
  assert 0 < mla4['loss'] < math.log(256)
  assert [p['row'] for p in report['frontier']['125m'] if p['efficient']] == ['mla4']
  assert (tmp_path / 'capacity_vs_cache_125m_frontier.png').stat().st_size > 10_000
  assert (tmp_path / '125m-quick' / 'mla4' / 'lr0.003' / 'seed1' / 'result.json').exists()


def test_a_row_of_another_variant_is_one_entry(monkeypatch):
  """A variant registered outside mla_jax (docs/extending.md's shared_kv, cache d_h per layer)
  as one ROWS entry: its config is matched like every row, the recall experiment builds it
  too, and the reports name it, order it, draw it and place it on the frontier by the
  registry's cache."""
  monkeypatch.setitem(ablation.ROWS, 'skv', (DOC_VARIANT, lambda d_h: {}))
  monkeypatch.setitem(ablation.GEOMETRIES, 'small', (8, tuple(ablation.ROWS)))
  c = ablation.get_config('skv')
  mha = ablation.get_config('mha')
  counts = [param_count(ModelConfig.from_dict(x.model)) for x in (c, mha)]
  assert c.model.attention == DOC_VARIANT and abs(counts[0] / counts[1] - 1) < 0.02
  assert recall.get_config('skv,kv4,quick').model.attention == DOC_VARIANT
  runs = [dict(_result(row, 1, 3e-3, loss), row=row, attention=x.model.attention,
               model=x.model.to_dict(), cache_elements_formula=cache_formula(
                   ModelConfig.from_dict(x.model))[1])
          for row, x, loss in (('mha', mha, 1.8), ('skv', c, 1.9))]
  summary = experiment.summarize(runs)
  assert summary['skv']['mechanism'] == f'{DOC_VARIANT.upper()} (skv)'
  assert [row for row, _ in report.by_cache(summary)] == ['mha', 'skv']
  payload = dict(rows=summary, setup=dict(geometry='small'))
  points = experiment.frontier(payload)['small']
  assert [(p['row'], p['cache_bytes'], p['efficient']) for p in points] == [
      ('skv', 2 * 16 * 4, True), ('mha', 2 * 2 * 8 * 16 * 4, True)]
  fig, ax = report.pyplot().subplots()
  report.frontier_axes(ax, summary, points)
  report.marker_legend(ax, summary)
  assert [t.get_text() for t in ax.texts] == [summary['skv']['mechanism'], 'MHA (G=8)']
  assert ax.get_legend_handles_labels()[1][-1] == DOC_VARIANT.upper()
  report.pyplot().close(fig)


@pytest.mark.parametrize('row', ['gta2', 'tpa', 'mla4'])
def test_rows_without_an_8bit_cache_report_none_and_render_a_dash(row):
  """GTA, GLA and TPA have no 8-bit cache: their rows say so instead of failing the run."""
  cfg = ModelConfig.from_dict(ablation.get_config(row + ',quick').model)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  cache = runner.measure_caches(model, list(range(1, 9)))
  assert cache['cache_elements_measured'] == QUICK_CACHE[row]
  assert cache['cache_bytes_bf16_measured'] == 2 * QUICK_CACHE[row]
  if row == 'mla4':
    assert cache['cache_bytes_int8_measured'] == QUICK_CACHE[row] + 4 * QUICK_SCALES[row]
  else:
    assert cache['cache_bytes_int8_measured'] is cache['cache_bytes_fp8_measured'] is None
    summary = {'formula': 'f', 'elements_formula': 1, 'elements_measured': 1, 'bytes_bf16': 2,
               'bytes_int8': None, 'bytes_fp8': None, 'd_ff': 8, 'params': 10,
               'model': cfg.to_dict()}
    assert report.cache_cells({}, summary)[4:6] == ['—', '—']
