"""The experiments' shared machinery: every committed report regenerates from its JSON, the
docs' generated tables equal the generator's, results record their provenance, the flags are
defined once, the A/B timer's arithmetic, and the experiments use only mla_jax's public names."""

import ast
import importlib
import json
import pathlib
import re
import time

import pytest
from absl import flags
from absl.testing import flagsaver

from experiments import common, report, tables, timing
from mla_jax import variants
from mla_jax.config import ModelConfig
from mla_jax.errors import InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / 'experiments').glob('*.py'))


@pytest.mark.parametrize('stem', [s for s, (_, parts) in tables.REPORTS.items()
                                  if 'report' in parts])
def test_every_committed_report_regenerates_from_its_json(stem):
  """The committed markdown is what the generator renders from the committed JSON, byte for
  byte: no number in a report was edited by hand, and a refactor of the generator changed
  no table."""
  committed = tables.json_path(stem).with_suffix('.md').read_text()
  assert tables.render(f'{stem}/report') == committed


@pytest.mark.parametrize('name', tables.names())
def test_every_table_renders_from_its_committed_json(name):
  lines = tables.render(name).splitlines()
  rows = [line for line in lines if line.startswith('|')]
  if name.endswith('/report'):
    assert lines[0].startswith('# ') and len(rows) >= 4
  else:  # a header, its alignment line, and at least one row, all with as many cells
    assert len(rows) >= 3 and re.fullmatch(r'\|(-+:?\|)+', rows[1])
    assert len({row.count(' | ') for row in rows if row != rows[1]}) == 1, name


def test_docs_generated_blocks_equal_what_the_generator_renders():
  """Every `<!-- table: NAME -->` block in README.md and docs/*.md holds the table NAME as
  `python -m experiments.tables` renders it from the committed JSON now (--write fixes it)."""
  for doc in tables.DOCS:
    text = doc.read_text()
    for name, _ in tables.blocks(text):
      assert name in tables.names(), f'{doc.name}: no table {name!r}'
    assert tables.regenerate(text) == text, f'{doc.name}: run python -m experiments.tables --write'


def test_a_block_is_refilled_and_a_stale_one_is_found():
  name = 'cpu_attention_bench/table'
  fresh = f'before\n<!-- table: {name} -->\n{tables.render(name)}\n<!-- end table -->\nafter\n'
  assert tables.regenerate(fresh) == fresh and tables.blocks(fresh)[0][0] == name
  stale = fresh.replace('| mha |', '| MHA |')
  assert stale != fresh and tables.regenerate(stale) == fresh
  with pytest.raises(KeyError, match='no table'):
    tables.regenerate('<!-- table: nothing/here -->\nx\n<!-- end table -->\n')


def test_written_json_records_its_provenance(tmp_path):
  path = common.write_json(tmp_path / 'a' / 'x.json', {'rows': [1]})
  payload = json.loads(path.read_text())
  prov = payload['provenance']
  assert payload['rows'] == [1] and next(iter(payload)) == 'provenance'
  assert prov['command'].startswith('python ') and re.fullmatch(r'[0-9a-f]{40}(\+dirty)?',
                                                                prov['commit'])
  assert prov['date'] == time.strftime('%Y-%m-%d') and 'cores available' in prov['machine']
  assert {'python', 'jax', 'jaxlib', 'flax', 'numpy'} <= set(prov['versions'])
  assert 'cpu' in prov['device']
  assert not list((tmp_path / 'a').glob('.*tmp'))  # written whole, no temporary left


def test_out_is_a_folder_and_quick_never_writes_the_committed_results(tmp_path):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(out=None, quick=False):
    assert common.out_dir('capacity_vs_cache') == common.RESULTS / 'capacity_vs_cache'
  with flagsaver.flagsaver(out=None, quick=True):
    assert common.out_dir('capacity_vs_cache', str(tmp_path)) == tmp_path
    assert common.RESULTS not in common.out_dir('bench_decode').parents
  with flagsaver.flagsaver(out=str(tmp_path / 'mine'), quick=True):
    assert common.out_dir('bench_decode', 'elsewhere') == tmp_path / 'mine'


def test_out_and_quick_are_defined_once():
  for path in EXPERIMENTS:
    found = re.findall(r"DEFINE_\w+\(\s*'(out|quick)'", path.read_text())
    assert not found or path.name == 'common.py', (path.name, found)
  assert flags.FLAGS['out'].default is None and flags.FLAGS['quick'].default is False


def test_configs_load_one_way():
  assert common.load_config('mla', 'tiny').model.attention == 'mla'
  with pytest.raises(InputError, match=r'no config configs/nope\.py; use one of \[.*mha'):
    common.load_config('nope')
  for path in EXPERIMENTS:  # nobody else imports configs/<variant>.py another way
    text = path.read_text() if path.name != 'common.py' else ''
    assert not re.search(r"import_module\(f?'configs\.|from configs import (mha|gqa|mqa|mla)",
                         text), path.name


def test_benchmark_rows_keep_the_others_when_one_fails(tmp_path):
  """A row that raises is listed under failures (and, for a check, as a row not ok); the
  file holds every row measured so far; finishing with a failure exits non-zero."""
  rows = timing.Rows(tmp_path / 'b.json', device='cpu')
  assert rows.add(lambda: {'variant': 'a', 'ms': 1.0}, variant='a') == {'variant': 'a', 'ms': 1.0}
  assert rows.add(lambda: 1 / 0, {'ok': False}, variant='b') is None
  saved = json.loads((tmp_path / 'b.json').read_text())
  assert saved['device'] == 'cpu' and [r['variant'] for r in saved['rows']] == ['a', 'b']
  assert saved['rows'][1]['ok'] is False
  assert saved['failures'] == [{'variant': 'b', 'error': 'ZeroDivisionError: division by zero'}]
  with pytest.raises(SystemExit, match='1 rows failed'):
    rows.finish()


def test_ab_timer_measures_the_ratio_of_two_steps():
  """Two steps of 10 ms and 40 ms, alternated: the first is ~4x faster in tokens/s (a sleep
  overshoots by a few ms on a loaded machine, which only brings the ratio down a little)."""
  steps = {'fast': lambda: time.sleep(0.01), 'slow': lambda: time.sleep(0.04)}
  result = timing.compare(steps, tokens=100, blocks=3, block_steps=3, warmup=1)
  assert result['fast']['steps'] == result['slow']['steps'] == 9
  ratio = result['ratio_fast_over_slow']
  assert 2.5 < ratio['ratio'] < 4.5 and ratio['block_min'] <= ratio['block_max']
  assert result['fast']['tokens_per_s'] == pytest.approx(100 / result['fast']['step_s'])


@pytest.mark.slow  # torch and transformers only (CI skips it); ~100 s on a busy 2-core host
def test_torch_peer_holds_our_weights_and_computes_our_loss(tmp_path):
  """bench_train --moe's peer: transformers' DeepseekV3 under each experts implementation,
  holding our initial weights (exported by hf.save) on our fixed batch, gives our loss at init;
  a loss 1e-3 away is refused (the check that the two are the same model can fail)."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import jax
  from flax import nnx

  from experiments import torch_peer
  from mla_jax import sharding, tasks, training
  config = common.load_config('mla_moe', 'tiny')
  config.data.update(batch_size=2, seq_len=16)
  mesh = sharding.make_mesh(config.mesh)
  with jax.set_mesh(mesh):
    graphdef, state, _ = training.init_state(config, mesh)
  model = nnx.merge(graphdef, state)[0]
  assert model.cfg.n_routed_experts and model.cfg.topk_method == 'noaux_tc'
  windows = timing.fixed_windows(training.batch_layout(config, mesh)[1])[0]
  ours = float(training.loss_fn(model, tasks.text_batch(windows)))
  steps, theirs = torch_peer.same_weights_peers(config, tmp_path / 'a', ours)
  assert set(steps) == {'torch_grouped_mm', 'torch_eager'}
  assert abs(theirs - ours) <= torch_peer.LOSS_ATOL and abs(ours - 5.5) < 1  # ~ln 256 at init
  with pytest.raises(AssertionError, match='losses at init differ'):
    torch_peer.same_weights_peers(config, tmp_path / 'b', ours + 1e-3)
  # the first MoE layer alone: ours (dropless and dense) and theirs agree, then each step runs
  layer = config.model.first_k_dense_replace
  layers = torch_peer.moe_layer_steps(config, steps, {'dropless': 'auto', 'dense': 'dense'}, layer)
  assert set(layers) == {'dropless', 'dense', 'torch_grouped_mm', 'torch_eager'}
  for step in layers.values():
    step()
  import torch
  with torch.no_grad():  # the routed experts' down projections changed: refused
    steps['torch_eager'].model.model.layers[layer].mlp.experts.down_proj.mul_(2.0)
  with pytest.raises(AssertionError, match=f'layer {layer} differs'):
    torch_peer.moe_layer_steps(config, steps, {'dropless': 'auto'}, layer)


def _mla_jax_modules(tree: ast.Module) -> set[str]:
  """Local names bound to mla_jax modules (`from mla_jax import workdir as wd` -> wd)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('mla_jax'):
      names |= {a.asname or a.name for a in node.names if a.name[:1].islower()}
    if isinstance(node, ast.Import):
      names |= {a.asname or a.name for a in node.names if a.name.startswith('mla_jax')}
  return names


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: p.name)
def test_experiments_use_only_public_names_and_never_patch_the_library(path):
  tree = ast.parse(path.read_text())
  modules = _mla_jax_modules(tree)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('mla_jax'):
      assert not any(a.name.startswith('_') for a in node.names), (path.name, node.lineno)
      assert node.module != 'mla_jax.trainer', (path.name, 'use mla_jax.training')
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
       node.value.id in modules:
      assert not node.attr.startswith('_'), (path.name, node.lineno, node.attr)
      assert not isinstance(node.ctx, ast.Store), (path.name, node.lineno, 'patches mla_jax')


# --- the Pareto frontier the sweep reports draw ------------------------------------------------
@pytest.mark.parametrize('points, efficient', [
    ({'a': (1, 5.0)}, ['a']),  # a single point is its own frontier
    ({'a': (1, 5.0), 'b': (2, 4.0), 'c': (3, 4.5), 'd': (4, 1.0)}, ['a', 'b', 'd']),  # c: by b
    ({'a': (2, 3.0), 'b': (1, 3.0)}, ['b']),  # as good for less cache: a is dominated
    ({'a': (2, 3.0), 'b': (2, 2.0)}, ['b']),  # the same cache, worse: dominated
    ({'a': (2, 3.0), 'b': (2, 3.0), 'c': (1, 9.0)}, ['c', 'a', 'b']),  # equal points: both kept
    ({'a': (3, 1.0), 'b': (2, 2.0), 'c': (1, 3.0)}, ['c', 'b', 'a']),  # none dominated; by cost
    ({'a': (1, 1.0), 'b': (2, 2.0), 'c': (3, 3.0)}, ['a']),  # one point dominates every other
])
def test_pareto_keeps_exactly_the_points_no_other_dominates(points, efficient):
  assert report.pareto(points) == efficient


def _summary_row(row, attention, loss, **model):
  base = dict(n_heads=8, n_kv_heads=8, head_dim=16, d_model=128, n_layers=4, attention=attention)
  m = {**base, **model}
  return dict(row=row, attention=attention, mechanism=row, loss=loss, loss_std=0.01,
              elements_formula=variants.cache_elements_per_token(ModelConfig(**m)), model=m)


def test_frontier_takes_cache_bytes_from_the_registry_and_the_better_direction():
  """Cache bytes are the registry's for a bfloat16 cache whatever the run computed in; lower
  loss is better, and with higher_is_better the same numbers give the opposite frontier."""
  summary = {'mha': _summary_row('mha', 'mha', 1.80),
             'mqa': _summary_row('mqa', 'mqa', 1.85, n_kv_heads=1),
             'mla4': _summary_row('mla4', 'mla', 1.90, kv_lora_rank=64, qk_rope_head_dim=8)}
  lower = report.frontier(summary, lambda s: (s['loss'], s['loss_std']), False)
  assert [(p['row'], p['cache_bytes'], p['efficient']) for p in lower] == [
      ('mqa', 2 * 2 * 16 * 4, True), ('mla4', 2 * (64 + 8) * 4, False),
      ('mha', 2 * 2 * 8 * 16 * 4, True)]
  higher = report.frontier(summary, lambda s: (s['loss'], s['loss_std']), True)
  assert [p['row'] for p in higher if p['efficient']] == ['mqa', 'mla4']
  skipped = report.frontier(summary, lambda s: None if s['row'] == 'mqa' else (s['loss'], 0), 0)
  assert [p['row'] for p in skipped if p['efficient']] == ['mla4', 'mha']


@pytest.mark.parametrize('stem', sorted(tables.RERENDER))
def test_committed_frontiers_are_their_rows_and_their_measured_caches(stem):
  """The frontier in each committed sweep report is what its rows give now (--rerender wrote
  it), and every point's cache, from the registry, is the bfloat16 cache its runs measured."""
  payload = json.loads(tables.json_path(stem).read_text())
  module = importlib.import_module(f'experiments.{tables.RERENDER[stem]}')
  assert payload['frontier'] == module.frontier(payload)
  for points in payload['frontier'].values():
    assert sum(p['efficient'] for p in points) >= 1
    for p in points:
      assert p['cache_bytes'] == payload['rows'][p['row']]['bytes_bf16'], (stem, p['row'])
  assert (tables.json_path(stem).parent / f'{stem}_frontier.png').stat().st_size > 10_000
