"""The recall-vs-cache report: tables with a reading of them (markdown), JSON, and a plot.

Every number comes from the runs' result.json files; nothing here trains or measures.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import textwrap

from experiments import stats
from experiments.capacity_report import MARKERS, PAPER, families, mechanism

NAME = 'recall_vs_cache'
# Summary key -> result key of the per-row facts every run of a row must agree on.
ROW_FACTS = {'params': 'params', 'elements_measured': 'cache_elements_measured',
             'bytes_bf16': 'cache_bytes_bf16_measured', 'bytes_int8': 'cache_bytes_int8_measured',
             'bytes_fp8': 'cache_bytes_fp8_measured'}
# (row expected to recall better, row expected to recall worse, why).
COMPARISONS = [
    ('mha', 'mqa', 'MHA (G=8) vs MQA (G=1): 8x the cache'),
    ('gqa2', 'mqa', 'GQA (G=2) vs MQA: 2x the cache'),
    ('mla2', 'mqa', 'MLA d_c = 2 d_h vs MQA: 1.25x the cache'),
    ('mla4', 'gqa2', 'MLA d_c = 4 d_h vs GQA (G=2): a similar cache'),
    ('mla8', 'mla2', 'MLA with a larger latent (d_c = 8 d_h vs 2 d_h)'),
    ('mha', 'mla4', 'MHA vs MLA d_c = 4 d_h: 3.6x the cache'),
]


def summarize(results: list[dict]) -> dict[str, dict]:
  """Per row: the seed- and N-independent facts once, and per N the test recall over the
  seeds that trained to the end (`diverged` lists those stopped by a non-finite loss)."""
  summary: dict[str, dict] = {}
  finished = [r for r in results if not r.get('diverged')]
  for r in sorted(finished, key=lambda r: (r['row'], r['kv_pairs'], r['seed'])):
    s = summary.setdefault(r['row'], dict(
        mechanism=mechanism(r), attention=r['attention'], paper=PAPER[r['attention']],
        formula=r['cache_formula'], elements_formula=r['cache_elements_formula'],
        **{short: r[key] for short, key in ROW_FACTS.items()}, d_ff=r['d_ff'],
        model=r['model'], steps=r['steps'], train_tokens=r['train_tokens'], seq_len=r['seq_len'],
        test_examples=r['test_examples'], by_kv={}))
    differ = [short for short, key in ROW_FACTS.items() if s[short] != r[key]]
    if differ or (s['steps'], s['seq_len']) != (r['steps'], r['seq_len']):
      raise ValueError(f"{r['row']}: {differ or 'steps or seq_len'} differ between runs")
    cell = s['by_kv'].setdefault(str(r['kv_pairs']), dict(lr=r['lr'], seeds=[], accuracies=[],
                                                          losses=[], diverged=[]))
    if cell['lr'] != r['lr']:
      raise ValueError(f"{r['row']} kv{r['kv_pairs']}: seeds trained at different rates")
    cell['seeds'].append(r['seed'])
    cell['accuracies'].append(r['accuracy'])
    cell['losses'].append(r['loss'])
  for r in results:
    if r.get('diverged'):
      cell = summary.get(r['row'], {}).get('by_kv', {}).get(str(r['kv_pairs']))
      if cell is None:
        raise ValueError(f"{r['row']} kv{r['kv_pairs']}: every seed diverged at lr {r['lr']:g} "
                         '(non-finite loss); rerun with lower --lrs')
      cell['diverged'].append(r['seed'])
  for s in summary.values():
    for cell in s['by_kv'].values():
      cell['accuracy'], cell['accuracy_std'] = stats.mean_std(cell['accuracies'])
      cell['loss'], cell['loss_std'] = stats.mean_std(cell['losses'])
  return summary


def best_rate(results: list[dict]) -> float:
  """The rate whose run has the best validation recall (then the lower validation loss);
  runs that diverged are out."""
  finished = [r for r in results if not r.get('diverged')]
  if not finished:
    r = results[0]
    raise ValueError(f"{r['row']} kv{r['kv_pairs']}: every rate diverged (non-finite loss); "
                     'rerun with lower --lrs')
  return max(finished, key=lambda r: (r['val_accuracy'], -r['val_loss']))['lr']


def sweep_table(sweep: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
  """row -> N -> {rate: validation recall of seed 0}."""
  table: dict = {}
  for r in sweep:
    table.setdefault(r['row'], {}).setdefault(str(r['kv_pairs']), {})[f"{r['lr']:g}"] = \
        None if r.get('diverged') else r['val_accuracy']
  return table


def compare(summary: dict, better: str, worse: str, kv: str) -> dict | None:
  """Does `better` recall more than `worse` at N = kv, beyond the seed spread? Resolved means
  the mean ± std intervals do not overlap; seeds are paired (same data order per seed)."""
  if better not in summary or worse not in summary:
    return None
  a, b = summary[better]['by_kv'].get(kv), summary[worse]['by_kv'].get(kv)
  if a is None or b is None:
    return None
  return dict(better=better, worse=worse, kv_pairs=int(kv), **stats.beyond_spread(
      dict(zip(a['seeds'], a['accuracies'], strict=True)),
      dict(zip(b['seeds'], b['accuracies'], strict=True)), higher_is_better=True,
      as_expected='resolved, as expected'))


def _order(summary: dict) -> list[tuple[str, dict]]:
  """(row, summary) in the table's order: the GQA family by falling cache, then MLA."""
  return sorted(summary.items(),
                key=lambda rs: (rs[1]['attention'] == 'mla', -rs[1]['elements_formula']))


def _setup_line(summary: dict, setup: dict) -> str:
  first = next(iter(summary.values()))
  m = first['model']
  return (f"d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} query heads of "
          f"d_h = {m['head_dim']}, vocabulary {m['vocab_size']} (chance recall "
          f"{2 / m['vocab_size']:.3f}), {first['seq_len']} tokens per example, "
          f"{first['steps']} steps ({first['train_tokens'] / 1e6:.2f}M tokens) per run, "
          f"{setup['seeds']} seed{'s' if setup['seeds'] > 1 else ''} per point")


def _protocol(setup: dict) -> str:
  if len(setup['lrs']) == 1:
    return (f"Every run was trained at lr {setup['lrs'][0]:g} (one rate given: no sweep); "
            f"the reported seeds are 1 .. {setup['seeds']}.")
  return (f"For each row and N (key-value pairs per example), seed 0 was trained at each rate "
          f"of {setup['lrs']} and the rate with the best validation recall was kept; the "
          f"reported seeds (1 .. {setup['seeds']}) were then trained at that rate.")


def markdown(summary: dict, sweep: dict, comparisons: list[dict], setup: dict) -> str:
  kvs = [str(k) for k in setup['kv_pairs']]
  test_examples = next(iter(summary.values()))['test_examples']
  lines = [
      '# Recall vs KV-cache size: multi-query associative recall (Zoology) per attention', '',
      f"`{setup['command']}` on {setup['machine']}, {setup['date']}"
      f"{' (QUICK: a pipeline check; the numbers mean nothing)' if setup['quick'] else ''}.",
      f'{_setup_line(summary, setup)}. Every row has the same width, depth, query heads, '
      'data (per seed) and schedule; only the attention differs, and the SwiGLU width d_ff '
      f"is set per row to match MHA's parameter count. {_protocol(setup)} Recall = "
      f'exact-match accuracy at the answer positions of {test_examples} test examples (a '
      'held-out stream, not the validation set that chose the rate), mean ± std (sample) over '
      'those seeds. A model that finds the N values in its context but not which key each '
      'belongs to recalls about 1/N: recall well above 1/N, not above chance, is the evidence '
      'of recall by association.', '',
      '| mechanism | KV cache per token | elements (formula) | elements (measured) | '
      'bytes bf16 | bytes int8 | bytes fp8 | d_ff | params | '
      + ' | '.join(f'recall, N={k}' for k in kvs) + ' |',
      '|---|---|--:|--:|--:|--:|--:|--:|--:|' + '--:|' * len(kvs),
  ]
  mha_params = summary.get('mha', {}).get('params')
  for _, s in _order(summary):
    params = f"{s['params']:,}"
    if mha_params:
      params += f" ({100 * (s['params'] / mha_params - 1):+.1f}%)"
    cells = []
    for k in kvs:
      c = s['by_kv'].get(k)
      diverged = f"; {len(c['diverged'])} diverged" if c and c['diverged'] else ''
      cells.append('n/a' if c is None else
                   f"{c['accuracy']:.3f} ± {c['accuracy_std']:.3f} (lr {c['lr']:g}{diverged})")
    lines.append(f"| {s['mechanism']} | {s['formula']} | {s['elements_formula']:,} | "
                 f"{s['elements_measured']:,} | {s['bytes_bf16']:,} | {s['bytes_int8']:,} | "
                 f"{s['bytes_fp8']:,} | {s['d_ff']} | {params} | " + ' | '.join(cells) + ' |')
  exact = all(s['elements_formula'] == s['elements_measured'] for s in summary.values())
  wall = (f"; the whole grid took {setup['full_wall_s'] / 60:.0f} minutes of wall time"
          if setup.get('full_wall_s') else '')
  lines += [
      '', f"Measured cache = formula for every row: **{'yes' if exact else 'NO'}** (elements "
      'per token of the caches a bfloat16 prefill and decode step return, counted from the '
      'arrays). Bytes int8 / fp8: the same caches stored 8-bit (ModelConfig.cache_dtype), '
      'their float32 per-token scales included (one per token and array; per KV head for '
      f"MHA / GQA / MQA). {setup['runs_total']} runs, each on one core, {setup['jobs']} at a "
      f"time, {setup['cpu_s'] / 60:.0f} CPU minutes in all{wall}.", '',
  ]
  seeds = list(range(1, setup['seeds'] + 1))
  lines += [
      '## Recall per seed', '',
      'Test recall of every reported run, at its row\'s chosen rate: a mean ± std of a few seeds '
      'hides whether every seed recalls a little or some recall fully and others not at all.',
      '', '| mechanism | N | lr | ' + ' | '.join(f'seed {seed}' for seed in seeds) + ' |',
      '|---|--:|--:|' + '--:|' * len(seeds),
  ]
  for _, s in _order(summary):
    for k in kvs:
      c = s['by_kv'].get(k)
      if c is None:
        continue
      by_seed = dict(zip(c['seeds'], c['accuracies'], strict=True))
      cells = [f'{by_seed[seed]:.3f}' if seed in by_seed else
               'diverged' if seed in c['diverged'] else 'n/a' for seed in seeds]
      lines.append(f"| {s['mechanism']} | {k} | {c['lr']:g} | " + ' | '.join(cells) + ' |')
  lines.append('')
  if sweep:
    lines += [
        '## Learning-rate sweep (seed 0, validation recall; the chosen rate in bold)', '',
        '| mechanism | N | ' + ' | '.join(f'lr {lr:g}' for lr in setup['lrs']) + ' |',
        '|---|--:|' + '--:|' * len(setup['lrs']),
    ]
    for row, s in _order(summary):
      for k in kvs:
        got = sweep.get(row, {}).get(k, {})
        chosen = s['by_kv'].get(k, {}).get('lr')
        cells = []
        for lr in setup['lrs']:
          value = got.get(f'{lr:g}', 'n/a')
          text = 'diverged' if value is None else value if value == 'n/a' else f'{value:.3f}'
          cells.append(f'**{text}**' if chosen is not None and f'{lr:g}' == f'{chosen:g}'
                       else text)
        lines.append(f"| {s['mechanism']} | {k} | " + ' | '.join(cells) + ' |')
    lines.append('')
  lines += [
      '## Which orderings are resolved', '',
      'Resolved = the two rows\' mean ± std intervals do not overlap. "Seeds agreeing" counts '
      'the seeds (same data for both rows) where the first row recalls more.', '',
      '| comparison | N | recall gap (1st − 2nd) | spread (std + std) | seeds agreeing | '
      'verdict |', '|---|--:|--:|--:|--:|---|',
  ]
  for c in comparisons:
    lines.append(f"| {c['claim']} | {c['kv_pairs']} | {c['gap']:+.3f} | {c['spread']:.3f} | "
                 f"{c['seeds_agreeing']}/{c['seeds']} | {c['verdict']} |")
  return '\n'.join(lines) + '\n'


def plot(summary: dict, setup: dict, path: pathlib.Path) -> None:
  try:
    import matplotlib
  except ImportError:
    raise SystemExit("error: the plot needs matplotlib; pip install -e '.[dev]'") from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  kvs = [str(k) for k in setup['kv_pairs']]
  fig, axes = plt.subplots(1, len(kvs), figsize=(max(7.5, 4.2 * len(kvs)), 5.2),
                           sharey=True, squeeze=False)
  ticks = sorted({s['elements_measured'] for s in summary.values()})
  chance = 2 / next(iter(summary.values()))['model']['vocab_size']
  for ax, k in zip(axes[0], kvs, strict=True):
    for label, color, kinds in families(summary):
      rows = sorted((s for s in summary.values() if s['attention'] in kinds and k in s['by_kv']),
                    key=lambda s: s['elements_measured'])
      if not rows:
        continue
      xs = [s['elements_measured'] for s in rows]
      ax.plot(xs, [s['by_kv'][k]['accuracy'] for s in rows], '-', color=color, alpha=0.6,
              label=label)
      for s in rows:
        c = s['by_kv'][k]
        ax.plot([s['elements_measured']] * len(c['accuracies']), c['accuracies'], '.',
                color=color, alpha=0.35, markersize=5)  # each seed, under its mean
        ax.errorbar(s['elements_measured'], c['accuracy'], yerr=c['accuracy_std'], color=color,
                    marker=MARKERS[s['attention']], markersize=7, capsize=4, linestyle='none')
    ax.axhline(chance, color='gray', linestyle=':', linewidth=1)
    ax.axhline(1 / int(k), color='gray', linestyle='--', linewidth=1)
    ax.set_xscale('log')
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7, rotation=45)
    ax.minorticks_off()
    ax.set_title(f'N = {k} key-value pairs', fontsize=10)
    ax.set_xlabel('KV cache per token (elements; log scale)', fontsize=8)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel('test recall (exact match): mean ± std and each seed (dots)')
  axes[0][0].set_ylim(-0.03, 1.03)
  for kind, marker in MARKERS.items():
    axes[0][0].plot([], [], marker, color='gray', linestyle='none', label=kind.upper())
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=len(labels), fontsize=7)
  fig.suptitle(f"{'QUICK pipeline check: ' if setup['quick'] else ''}MQAR recall vs KV cache, "
               'parameters matched (dotted: chance; dashed: 1/N, the values without their keys)',
               fontsize=10)
  fig.text(0.5, 0.075, textwrap.fill(_setup_line(summary, setup), 120), ha='center',
           va='center', fontsize=7, color='gray')
  fig.tight_layout(rect=(0, 0.1, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(results: list[dict], sweep: list[dict], setup: dict,
          out: pathlib.Path) -> list[pathlib.Path]:
  """Writes recall_vs_cache.{md,json,png} into `out`; returns their paths."""
  setup = {**setup, 'date': datetime.date.today().isoformat()}
  summary = summarize(results)
  comparisons = []
  for kv in setup['kv_pairs']:
    for better, worse, claim in COMPARISONS:
      c = compare(summary, better, worse, str(kv))
      if c:
        comparisons.append({**c, 'claim': claim})
  table = sweep_table(sweep)
  out.mkdir(parents=True, exist_ok=True)
  paths = [out / f'{NAME}.{ext}' for ext in ('md', 'json', 'png')]
  paths[0].write_text(markdown(summary, table, comparisons, setup))
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'model'} for r in rs]
  paths[1].write_text(json.dumps(dict(setup=setup, rows=summary, sweep=table,
                                      comparisons=comparisons, runs=strip(results),
                                      sweep_runs=strip(sweep)), indent=1))
  plot(summary, setup, paths[2])
  return paths
