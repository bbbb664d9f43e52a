"""The capacity-vs-cache report: a table with a reading of it (markdown), JSON, and a plot.

Every number comes from the runs' result.json files; nothing here trains or measures.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import statistics

from experiments import stats

NAME = 'capacity_vs_cache'
# The paper's words for each mechanism's capability (DeepSeek-V2 Table 1).
PAPER = {'mha': 'strong', 'gqa': 'moderate', 'mqa': 'weak', 'mla': 'stronger'}
MARKERS = {'mha': 'o', 'gqa': 's', 'mqa': '^', 'mla': 'D'}
# 8-bit caches' measured bytes per token (scales included): result key -> summary key. Runs
# from before they were measured have none (shown as n/a).
BYTES_8BIT = {'cache_bytes_int8_measured': 'bytes_int8', 'cache_bytes_fp8_measured': 'bytes_fp8'}
# (row expected to be better, row expected to be worse, what the paper says).
COMPARISONS = [
    ('mha', 'gqa4', 'MHA "strong" vs GQA "moderate" (Table 8: MHA beats GQA with 8 groups)'),
    ('mha', 'gqa2', 'MHA "strong" vs GQA with 2 groups (the paper geometry\'s GQA row)'),
    ('gqa4', 'gqa2', 'GQA with more groups vs fewer (more cache, more capacity)'),
    ('gqa2', 'mqa', 'GQA "moderate" vs MQA "weak" (Table 8: GQA beats MQA)'),
    ('mha', 'mqa', 'MHA "strong" vs MQA "weak" (Table 8)'),
    ('mla4', 'mha', 'MLA "stronger" vs MHA "strong" (Table 9: MLA beats MHA)'),
    ('mla4', 'gqa2', 'MLA vs GQA at a similar cache (Table 1: MLA = GQA with 2.25 groups)'),
    ('mla8', 'mla4', 'MLA with a larger latent (d_c = 8 d_h vs 4 d_h)'),
    ('mla4', 'mla2', 'MLA with a larger latent (d_c = 4 d_h vs 2 d_h)'),
]


def name(geometry: str, match: str = 'params') -> str:
  """The report's file name: the small geometry with parameters matched keeps the original."""
  return '_'.join([NAME] + [geometry] * (geometry != 'small') + [match] * (match != 'params'))


# --match -> (the plots' and titles' short name, the report's sentence).
MATCHING = {
    'params': ('parameters matched',
               'the SwiGLU width d_ff is set per row to match MHA\'s parameter count'),
    'mlp': ('MLP widths matched', 'every row has MHA\'s SwiGLU width d_ff, so the parameter '
            'counts differ (the control for the usual matching)'),
}


def _matching(setup: dict) -> tuple[str, str]:
  return MATCHING[setup.get('match', 'params')]


def best_rate(results: list[dict]) -> float:
  """The rate whose seed-0 run has the lowest validation loss; diverged runs are out."""
  finished = [r for r in results if not r.get('diverged')]
  if not finished:
    raise ValueError(f"{results[0]['row']}: every rate diverged (non-finite loss); rerun with "
                     'lower --lrs')
  return min(finished, key=lambda r: r['loss'])['lr']


def sweep_table(sweep: list[dict]) -> dict[str, dict[str, float | None]]:
  """row -> {rate: validation loss of seed 0 (None: diverged)}."""
  table: dict = {}
  for r in sweep:
    table.setdefault(r['row'], {})[f"{r['lr']:g}"] = None if r.get('diverged') else r['loss']
  return table


def edge(rates: dict[str, float | None], lr: float) -> str | None:
  """'lowest' / 'highest' when the chosen rate lr is at that end of the rates a row's sweep
  tried (a diverged rate counts: it is worse), else None: the choice is bracketed."""
  tried = sorted(map(float, rates))
  if len(tried) < 2 or tried[0] < lr < tried[-1]:
    return None
  return 'lowest' if lr == tried[0] else 'highest'


def mechanism(r: dict) -> str:
  m = r['model']
  if r['attention'] == 'gqa':
    return f"GQA (G={m['n_kv_heads']})"
  if r['attention'] == 'mla':
    return f"MLA (d_c={m['kv_lora_rank'] // m['head_dim']}·d_h={m['kv_lora_rank']})"
  return {'mha': f"MHA (G={m['n_heads']})", 'mqa': 'MQA (G=1)'}[r['attention']]


def summarize(results: list[dict]) -> dict[str, dict]:
  """Per row: the seed-independent facts once, and loss / perplexity as mean and std over the
  seeds that trained to the end (`diverged` lists those a non-finite loss stopped)."""
  rows: dict[str, list[dict]] = {}
  diverged: dict[str, list[int]] = {}
  for r in sorted(results, key=lambda r: r['seed']):
    if r.get('diverged'):
      diverged.setdefault(r['row'], []).append(r['seed'])
    else:
      rows.setdefault(r['row'], []).append(r)
  if set(diverged) - set(rows):
    raise ValueError(f'{sorted(set(diverged) - set(rows))}: every seed diverged at the chosen '
                     'rate (non-finite loss); rerun with lower --lrs')
  summary = {}
  for row, runs in rows.items():
    first = runs[0]
    if len({r['lr'] for r in runs}) > 1:
      raise ValueError(f"{row}: seeds trained at different rates: {[r['lr'] for r in runs]}")
    for key in ('params', 'cache_elements_measured', 'cache_bytes_bf16_measured',
                *BYTES_8BIT):
      if any(r.get(key) != first.get(key) for r in runs):
        raise ValueError(f'{row}: {key} differs between seeds: {[r[key] for r in runs]}')
    loss, loss_std = stats.mean_std([r['loss'] for r in runs])
    ppl, ppl_std = stats.mean_std([r['perplexity'] for r in runs])
    speeds = [r['tokens_per_s'] for r in runs if r['tokens_per_s']]
    summary[row] = dict(
        row=row, mechanism=mechanism(first), attention=first['attention'],
        paper=PAPER.get(first['attention'], '-'), formula=first['cache_formula'],
        elements_formula=first['cache_elements_formula'],
        elements_measured=first['cache_elements_measured'],
        bytes_bf16=first['cache_bytes_bf16_measured'], params=first['params'],
        **{short: first.get(key) for key, short in BYTES_8BIT.items()},
        d_ff=first['d_ff'], lr=first.get('lr'), diverged=diverged.get(row, []),
        seeds=[r['seed'] for r in runs], losses=[r['loss'] for r in runs],
        loss=loss, loss_std=loss_std, perplexity=ppl, perplexity_std=ppl_std,
        tokens_per_s=statistics.fmean(speeds) if speeds else None,
        train_tokens=first['train_tokens'], model=first['model'])
  return summary


def compare(summary: dict, better: str, worse: str) -> dict | None:
  """Is `better` lower in validation loss than `worse`, beyond the seed spread (stats)?"""
  if better not in summary or worse not in summary:
    return None
  a, b = summary[better], summary[worse]
  return dict(better=better, worse=worse, **stats.beyond_spread(
      dict(zip(a['seeds'], a['losses'], strict=True)),
      dict(zip(b['seeds'], b['losses'], strict=True)), higher_is_better=False,
      as_expected='resolved, as the paper says'))


def _setup_line(summary: dict, setup: dict) -> str:
  first = next(iter(summary.values()))
  m, tokens = first['model'], first['train_tokens']
  return (f"d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} query heads of "
          f"d_h = {m['head_dim']}, {tokens / 1e6:.2f}M training tokens (bytes) per run, "
          f"{setup.get('seeds', len(first['seeds']))} seeds")


def _order(summary: dict) -> list[dict]:
  """The GQA family by cache, largest first, then MLA likewise."""
  return sorted(summary.values(), key=lambda s: (s['attention'] == 'mla', -s['elements_formula']))


def _protocol(setup: dict) -> str:
  lrs = setup.get('lrs')
  if not lrs:  # a report from before the sweep: one rate for every row
    return 'Every row at base.py\'s learning rate (3e-3); no row is tuned.'
  if len(lrs) == 1:
    return f'Every row at lr {lrs[0]:g} (one rate given: no sweep).'
  rates = ', '.join(f'{lr:g}' for lr in lrs)
  return (f'Each row at its own learning rate: seed 0 trained at each of {rates} '
          'and the rate with the lowest validation loss chosen (table below); the seeds '
          'reported are fresh ones (1, 2, ...) at that rate, never the run that chose it.')


def markdown(summary: dict, sweep: dict, comparisons: list[dict], setup: dict) -> str:
  geometry = setup.get('geometry', 'small')
  lines = [
      '# Capacity vs KV-cache size (DeepSeek-V2 Table 1, Tables 8-9 in miniature)'
      + ('' if geometry == 'small' else f': {geometry} geometry')
      + ('' if setup.get('match', 'params') == 'params' else f', {_matching(setup)[0]}'), '',
      f"`{setup['command']}` on {setup['machine']}, {setup['date']}"
      f"{' (QUICK: a pipeline check; the numbers mean nothing)' if setup['quick'] else ''}.",
      f'{_setup_line(summary, setup)}. Every row has the same width, depth, query heads, '
      'data order (per seed), tokens, optimizer and schedule; only the attention '
      f'differs, and {_matching(setup)[1]}. '
      f'{_protocol(setup)} '
      'Validation: three held-out plays, every byte scored once. Loss is nats per byte, '
      'mean ± std (sample) over seeds.', '',
      '| mechanism | paper | KV cache per token | elements (formula) | elements (measured) '
      '| bytes bf16 | bytes int8 | bytes fp8 | d_ff | params | lr | val loss | val perplexity '
      '| train tokens/s |',
      '|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|',
  ]
  mha_params = summary.get('mha', {}).get('params')
  for s in _order(summary):
    params = f"{s['params']:,}"
    if mha_params:
      params += f" ({100 * (s['params'] / mha_params - 1):+.1f}%)"
    speed = f"{s['tokens_per_s']:,.0f}" if s['tokens_per_s'] else 'n/a'
    int8, fp8 = (f'{s[k]:,}' if s.get(k) else 'n/a' for k in ('bytes_int8', 'bytes_fp8'))
    lr = f"{s['lr']:g}" if s.get('lr') else '3e-3'
    lines.append(
        f"| {s['mechanism']} | {s['paper']} | {s['formula']} | {s['elements_formula']:,} | "
        f"{s['elements_measured']:,} | {s['bytes_bf16']:,} | {int8} | {fp8} | {s['d_ff']} | "
        f"{params} | {lr} | {s['loss']:.4f} ± {s['loss_std']:.4f} | {s['perplexity']:.3f} ± "
        f"{s['perplexity_std']:.3f} | {speed} |")
  exact = all(s['elements_formula'] == s['elements_measured'] for s in summary.values())
  lines += [
      '', f"Measured cache = formula for every row: **{'yes' if exact else 'NO'}** (elements "
      'per token of the caches a bfloat16 prefill and decode step return, counted from the '
      'arrays). Bytes int8 / fp8: the same caches stored 8-bit (ModelConfig.cache_dtype), '
      'their float32 per-token scales included (one per token and array; per KV head for '
      'MHA / GQA / MQA). Tokens/s: each run on one core, '
      f"{setup['jobs']} runs at a time."
      + (f" The whole protocol (sweep and seeds) took {setup['full_wall_s'] / 60:.0f} minutes "
         'of wall time.' if setup.get('full_wall_s') else ''), '',
      '## Which orderings are resolved', '',
      'Resolved = the two rows\' mean ± std intervals do not overlap. "Seeds agreeing" counts '
      'the seeds (same data order for both rows) where the first row has the lower loss.', '',
      '| comparison | loss gap (2nd − 1st) | spread (std + std) | seeds agreeing | verdict |',
      '|---|--:|--:|--:|---|',
  ]
  for c in comparisons:
    lines.append(f"| {c['claim']} | {c['gap']:+.4f} | {c['spread']:.4f} | "
                 f"{c['seeds_agreeing']}/{c['seeds']} | {c['verdict']} |")
  diverged = {row: s['diverged'] for row, s in summary.items() if s.get('diverged')}
  if diverged:
    lines += ['', 'Seeds stopped by a non-finite loss at the chosen rate (not in the means): '
              + ', '.join(f'{row} {seeds}' for row, seeds in diverged.items()) + '.']
  if sweep:
    rates = sorted({lr for by_rate in sweep.values() for lr in by_rate}, key=float)
    lines += ['', '## Learning-rate sweep (seed 0, validation loss; the chosen rate in bold)',
              '', '| row | ' + ' | '.join(f'lr {lr}' for lr in rates) + ' |',
              '|---|' + '--:|' * len(rates)]
    for s in _order(summary):
      cells = []
      for lr in rates:
        loss = sweep.get(s['row'], {}).get(lr, 'n/a')
        text = 'diverged' if loss is None else loss if loss == 'n/a' else f'{loss:.4f}'
        cells.append(f'**{text}**' if s.get('lr') and f"{s['lr']:g}" == lr else text)
      lines.append(f"| {s['mechanism']} | " + ' | '.join(cells) + ' |')
    ends = [f"{s['mechanism']} at {s['lr']:g} (the {s['edge']} rate)"
            for s in _order(summary) if s.get('edge')]
    lines += ['', f"**Not bracketed** (chosen at an end of the sweep: a better rate may lie "
              f"beyond it): {'; '.join(ends)}." if ends else
              "Every row's chosen rate has a worse rate on each side in the sweep (bracketed)."]
  return '\n'.join(lines) + '\n'


def families(summary: dict) -> tuple:
  """(legend label, colour, attention kinds) of the plots' two lines; the MLA label names the
  latent widths the summary has, as multiples of d_h."""
  ratios = sorted({s['model']['kv_lora_rank'] // (s['model']['head_dim'] or
                                                    s['model']['d_model'] // s['model']['n_heads'])
                   for s in summary.values() if s['attention'] == 'mla'})
  return (('GQA family (MHA, GQA, MQA)', 'C0', ('mha', 'gqa', 'mqa')),
          (f"MLA family (d_c = {', '.join(map(str, ratios))} d_h)", 'C3', ('mla',)))


def plot(summary: dict, setup: dict, path: pathlib.Path) -> None:
  try:
    import matplotlib
  except ImportError:
    raise SystemExit("error: the plot needs matplotlib; pip install -e '.[dev]'") from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.5, 5))
  for label, color, kinds in families(summary):
    rows = sorted((s for s in summary.values() if s['attention'] in kinds),
                  key=lambda s: s['elements_measured'])
    if not rows:
      continue
    ax.plot([s['elements_measured'] for s in rows], [s['loss'] for s in rows], '-',
            color=color, alpha=0.6, label=label)
    for s in rows:
      ax.errorbar(s['elements_measured'], s['loss'], yerr=s['loss_std'], color=color,
                  marker=MARKERS[s['attention']], markersize=8, capsize=4, linestyle='none')
      ax.annotate(s['mechanism'], (s['elements_measured'], s['loss']), fontsize=8,
                  xytext=(6, 6), textcoords='offset points')
  for kind, marker in MARKERS.items():
    ax.plot([], [], marker, color='gray', linestyle='none', label=kind.upper())
  ax.set_xscale('log')
  ticks = sorted({s['elements_measured'] for s in summary.values()})
  ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7, rotation=45)
  ax.minorticks_off()
  n_layers = next(iter(summary.values()))['model']['n_layers']
  ax.set_xlabel(f'KV cache per token (elements, all {n_layers} layers; log scale)')
  ax.set_ylabel('validation loss (nats per byte), mean ± std over seeds')
  ax.set_title(f"{'QUICK pipeline check: ' if setup['quick'] else ''}byte-level Shakespeare, "
               + _matching(setup)[0], fontsize=10)
  ax.text(0.01, 0.01, _setup_line(summary, setup), transform=ax.transAxes, fontsize=7,
          color='gray')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(results: list[dict], sweep: list[dict], setup: dict,
          out: pathlib.Path) -> list[pathlib.Path]:
  """Writes capacity_vs_cache[_<geometry>][_<match>].{md,json,png} into `out` (name());
  returns their paths."""
  setup = {**setup, 'date': datetime.date.today().isoformat()}
  summary = summarize(results)
  table = sweep_table(sweep)
  for row, s in summary.items():
    if row in table:
      s['edge'] = edge(table[row], s['lr'])
  comparisons = []
  for better, worse, claim in COMPARISONS:
    c = compare(summary, better, worse)
    if c:
      comparisons.append({**c, 'claim': claim})
  out.mkdir(parents=True, exist_ok=True)
  stem = name(setup.get('geometry', 'small'), setup.get('match', 'params'))
  paths = [out / f'{stem}.{ext}' for ext in ('md', 'json', 'png')]
  paths[0].write_text(markdown(summary, table, comparisons, setup))
  strip = lambda runs: [{k: v for k, v in r.items() if k != 'model'} for r in runs]
  paths[1].write_text(json.dumps(dict(setup=setup, rows=summary, comparisons=comparisons,
                                      sweep=table, runs=strip(results),
                                      sweep_runs=strip(sweep)), indent=1))
  plot(summary, setup, paths[2])
  return paths
