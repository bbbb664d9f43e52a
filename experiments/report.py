"""The one report writer: every report is rendered from the JSON it is saved as, so a committed
result regenerates its markdown (and the tables docs quote) from its JSON alone
(`python -m experiments.tables`, tests/experiments_test.py).

An experiment gives `write` its payload (JSON-able), a `render(payload) -> markdown` and
optionally a `plot(payload, path)`; the pieces below are what the reports' tables share, and
their statistics: mean ± std over seeds, and whether one row beats another beyond the spread.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from collections.abc import Callable, Iterable

from experiments import common

QUICK_NOTE = ' (QUICK: a pipeline check; the numbers mean nothing)'


def write(out: pathlib.Path, stem: str, payload: dict, render: Callable[[dict], str],
          plot: Callable[[dict, pathlib.Path], None] | None = None) -> list[pathlib.Path]:
  """out/<stem>.json (with provenance), then .md rendered from what that file holds (so the
  markdown is the JSON's, to the bit), then .png; prints and returns their paths."""
  path = common.write_json(out / f'{stem}.json', payload)
  payload = json.loads(path.read_text())
  paths = [out / f'{stem}.md', path]
  paths[0].write_text(render(payload))
  if plot is not None:
    paths.append(out / f'{stem}.png')
    plot(payload, paths[-1])
  print('wrote ' + ', '.join(map(str, paths)))
  return paths


def sweep_payload(setup: dict, summary: dict, comparisons: list[dict], sweep_table: dict,
                  results: list[dict], swept: list[dict]) -> dict:
  """A sweep experiment's report JSON: the runs kept whole but for their model section
  (in the summary once per row)."""
  strip = lambda runs: [{k: v for k, v in r.items() if k != 'model'} for r in runs]
  return dict(setup=setup, rows=summary, comparisons=comparisons, sweep=sweep_table,
              runs=strip(results), sweep_runs=strip(swept))


def header(setup: dict) -> str:
  """The line under a report's title: the command that wrote it, where and when."""
  return (f"`{setup['command']}` on {setup['machine']}, {setup['date']}"
          f"{QUICK_NOTE if setup['quick'] else ''}.")


def rate_table(swept: list[dict], score: str, *keys: str) -> dict:
  """A sweep's seed-0 scores: row [-> r[key] ...] -> {rate: r[score] (None: diverged)}."""
  out: dict = {}
  for r in swept:
    node = out.setdefault(r['row'], {})
    for key in keys:
      node = node.setdefault(str(r[key]), {})
    node[f"{r['lr']:g}"] = None if r.get('diverged') else r[score]
  return out


def rate_cells(scores: dict, rates: list[str], chosen: float | None, digits: int) -> list[str]:
  """A sweep table's cells: each rate's seed-0 score ('diverged', 'n/a': not run), the chosen
  rate's in bold."""
  cells = []
  for lr in rates:
    value = scores.get(lr, 'n/a')
    text = 'diverged' if value is None else value if value == 'n/a' else f'{value:.{digits}f}'
    cells.append(f'**{text}**' if chosen and f'{chosen:g}' == lr else text)
  return cells


def model_line(m: dict) -> str:
  """A model section's shape, as the reports' setup lines start."""
  return (f"d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} query heads of "
          f"d_h = {m['head_dim']}")


def table(header: Iterable[str], align: str, rows: Iterable[Iterable]) -> list[str]:
  """Markdown table lines; align has one letter per column: l (---), r (--:), R (---:)."""
  marks = {'l': '---', 'r': '--:', 'R': '---:'}
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(marks[a] for a in align) + '|']
  return lines + ['| ' + ' | '.join(map(str, row)) + ' |' for row in rows]


def by_cache(summary: dict) -> list[tuple[str, dict]]:
  """(row, summary) in the tables' order: the GQA family by falling cache, then MLA likewise."""
  return sorted(summary.items(),
                key=lambda rs: (rs[1]['attention'] == 'mla', -rs[1]['elements_formula']))


def comparisons_table(comparisons: list[dict], gap: str, digits: int,
                      extra: tuple = ()) -> list[str]:
  """The "which orderings are resolved" table; `extra`: (header, key) columns after the claim."""
  return table(
      ['comparison', *(h for h, _ in extra), gap, 'spread (std + std)', 'seeds agreeing',
       'verdict'], 'l' + 'r' * (len(extra) + 3) + 'l',
      ([c['claim'], *(c[k] for _, k in extra), f"{c['gap']:+.{digits}f}",
        f"{c['spread']:.{digits}f}", f"{c['seeds_agreeing']}/{c['seeds']}", c['verdict']]
       for c in comparisons))


def mean_std(xs: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def compare(ahead: dict | None, behind: dict | None, values: str, claim: str,
            higher_is_better: bool, as_expected: str, /, **extra) -> dict | None:
  """A comparison row: is cell `ahead` ahead of cell `behind` beyond the seed spread? A cell is
  a summary's entry with its 'seeds' and the seeds' scores under `values`; None (no row) where
  one did not run.

  Resolved means the two mean ± std intervals do not overlap (never with fewer than two
  seeds). Seeds are paired (seed k gives both rows the same data order), so the per-seed
  differences are counted too. gap > 0 means `ahead` is ahead.
  """
  if ahead is None or behind is None:
    return None
  ahead, behind = (dict(zip(c['seeds'], c[values], strict=True)) for c in (ahead, behind))
  sign = 1 if higher_is_better else -1
  (a, a_std), (b, b_std) = mean_std(list(ahead.values())), mean_std(list(behind.values()))
  gap, spread = sign * (a - b), a_std + b_std
  diffs = [sign * (ahead[s] - behind[s]) for s in behind if s in ahead]
  if min(len(ahead), len(behind)) < 2 or abs(gap) <= spread:
    verdict = 'not resolved'
  else:
    verdict = as_expected if gap > 0 else 'resolved, the opposite'
  return dict(**extra, gap=gap, spread=spread, verdict=verdict,
              seeds_agreeing=sum(d > 0 for d in diffs), seeds=len(diffs),
              paired_mean=statistics.fmean(diffs) if diffs else math.nan,
              paired_std=statistics.stdev(diffs) if len(diffs) > 1 else 0.0, claim=claim)


_CACHE_NOTE = ('(elements per token of the caches a bfloat16 prefill and decode step return, '
              'counted from the arrays). Bytes int8 / fp8: the same caches stored 8-bit '
              '(ModelConfig.cache_dtype), their float32 per-token scales included (one per '
              'token and array; per KV head for MHA / GQA / MQA).')
RESOLVED_NOTE = ('Resolved = the two rows\' mean ± std intervals do not overlap. "Seeds '
                 'agreeing" counts the seeds (same data{} for both rows) where the first row '
                 '{}.')


def exact_cache(summary: dict) -> str:
  """Whether every row's measured cache is its formula's, and what the cache columns count."""
  exact = all(s['elements_formula'] == s['elements_measured'] for s in summary.values())
  return f"Measured cache = formula for every row: **{'yes' if exact else 'NO'}** " + _CACHE_NOTE


def pyplot():
  """matplotlib's pyplot, headless; one line if the dev extra is missing."""
  try:
    import matplotlib
  except ImportError:
    raise SystemExit("error: the plot needs matplotlib; pip install -e '.[dev]'") from None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def save(fig, path: pathlib.Path, **layout) -> None:
  """fig, laid out tightly (tight_layout's **layout), as a 120-dpi PNG at path; then closed."""
  fig.tight_layout(**layout)
  fig.savefig(path, dpi=120)
  pyplot().close(fig)


# The paper's words for each mechanism's capability (DeepSeek-V2 Table 1), and plot markers.
PAPER = {'mha': 'strong', 'gqa': 'moderate', 'mqa': 'weak', 'mla': 'stronger'}
MARKERS = {'mha': 'o', 'gqa': 's', 'mqa': '^', 'mla': 'D'}


# Summary key -> result key of the facts every run of a row shares (its size, its cache).
ROW_FACTS = {'params': 'params', 'elements_measured': 'cache_elements_measured',
             'bytes_bf16': 'cache_bytes_bf16_measured', 'bytes_int8': 'cache_bytes_int8_measured',
             'bytes_fp8': 'cache_bytes_fp8_measured'}
CACHE_HEADER = ['KV cache per token', 'elements (formula)', 'elements (measured)', 'bytes bf16',
                'bytes int8', 'bytes fp8', 'd_ff', 'params']


def row_facts(r: dict) -> dict:
  """A row's summary entries that do not depend on the seed (from one of its runs, r)."""
  return dict(mechanism=mechanism(r), attention=r['attention'],
              paper=PAPER.get(r['attention'], '-'), formula=r['cache_formula'],
              elements_formula=r['cache_elements_formula'],
              **{short: r[key] for short, key in ROW_FACTS.items()}, d_ff=r['d_ff'],
              model=r['model'])


def seed_groups(results: list[dict], cell: Callable[[dict], str],
                shared: tuple[str, ...] = ()) -> dict[str, tuple[list[dict], list[int]]]:
  """The reported runs by cell(run), in the order of `results`: (those that trained to the
  end, the seeds a non-finite loss stopped). ValueError where every seed of a cell diverged,
  its seeds trained at different rates, or a row's runs differ in ROW_FACTS or `shared`."""
  groups: dict[str, tuple[list[dict], list[int]]] = {}
  for r in results:
    runs, diverged = groups.setdefault(cell(r), ([], []))
    if r.get('diverged'):
      diverged.append(r['seed'])
    else:
      runs.append(r)
  for name, (runs, _) in groups.items():
    if not runs:
      raise ValueError(f'{name}: every seed diverged at the chosen rate (non-finite loss); '
                       'rerun with lower --lrs')
    if len({r['lr'] for r in runs}) > 1:
      raise ValueError(f"{name}: seeds trained at different rates: {[r['lr'] for r in runs]}")
  rows: dict[str, list[dict]] = {}
  for runs, _ in groups.values():
    rows.setdefault(runs[0]['row'], []).extend(runs)
  for row, runs in rows.items():
    for key in (*ROW_FACTS.values(), *shared):
      if any(r[key] != runs[0][key] for r in runs):
        raise ValueError(f'{row}: {key} differs between runs: {[r[key] for r in runs]}')
  return groups


def cache_cells(summary: dict, s: dict) -> list:
  """A row's cells under CACHE_HEADER; its parameters' difference from MHA's where MHA ran."""
  mha = summary.get('mha', {}).get('params')
  return [s['formula'], f"{s['elements_formula']:,}", f"{s['elements_measured']:,}",
          f"{s['bytes_bf16']:,}", f"{s['bytes_int8']:,}", f"{s['bytes_fp8']:,}", s['d_ff'],
          f"{s['params']:,}" + (f" ({100 * (s['params'] / mha - 1):+.1f}%)" if mha else '')]


def mechanism(r: dict) -> str:
  m = r['model']
  if r['attention'] == 'gqa':
    return f"GQA (G={m['n_kv_heads']})"
  if r['attention'] == 'mla':
    return f"MLA (d_c={m['kv_lora_rank'] // m['head_dim']}·d_h={m['kv_lora_rank']})"
  return {'mha': f"MHA (G={m['n_heads']})", 'mqa': 'MQA (G=1)'}[r['attention']]


def families(summary: dict) -> tuple:
  """(legend label, colour, attention kinds) of the plots' two lines; the MLA label names the
  latent widths the summary has, as multiples of d_h."""
  ratios = sorted({s['model']['kv_lora_rank'] // (s['model']['head_dim'] or
                                                    s['model']['d_model'] // s['model']['n_heads'])
                   for s in summary.values() if s['attention'] == 'mla'})
  return (('GQA family (MHA, GQA, MQA)', 'C0', ('mha', 'gqa', 'mqa')),
          (f"MLA family (d_c = {', '.join(map(str, ratios))} d_h)", 'C3', ('mla',)))


def cache_lines(ax, summary: dict, point, annotate: bool = False, markersize: int = 8) -> None:
  """Both families on a log cache axis: a line through each family's rows by measured cache,
  each row's mean ± std (and its seeds, dotted under it), the markers' legend entries.
  point(s) -> (mean, std, each seed's value or None), or None to leave the row out."""
  for label, color, kinds in families(summary):
    rows = sorted((s for s in summary.values() if s['attention'] in kinds and point(s)),
                  key=lambda s: s['elements_measured'])
    if rows:
      ax.plot([s['elements_measured'] for s in rows], [point(s)[0] for s in rows], '-',
              color=color, alpha=0.6, label=label)
    for s in rows:
      x, (y, err, each) = s['elements_measured'], point(s)
      if each:
        ax.plot([x] * len(each), each, '.', color=color, alpha=0.35, markersize=5)
      ax.errorbar(x, y, yerr=err, color=color, marker=MARKERS[s['attention']],
                  markersize=markersize, capsize=4, linestyle='none')
      if annotate:
        ax.annotate(s['mechanism'], (x, y), fontsize=8, xytext=(6, 6), textcoords='offset points')
  ax.set_xscale('log')
  ticks = sorted({s['elements_measured'] for s in summary.values()})
  ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7, rotation=45)
  ax.minorticks_off()


def marker_legend(ax) -> None:
  for kind, marker in MARKERS.items():
    ax.plot([], [], marker, color='gray', linestyle='none', label=kind.upper())
