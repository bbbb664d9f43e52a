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
from mla_jax import variants
from mla_jax.config import ModelConfig

QUICK_NOTE = ' (QUICK: a pipeline check; the numbers mean nothing)'


def write(out: pathlib.Path, stem: str, payload: dict, render: Callable[[dict], str],
          plot: Callable[[dict, pathlib.Path], None] | None = None,
          frontier: Callable[[dict, pathlib.Path], None] | None = None) -> list[pathlib.Path]:
  """out/<stem>.json (with provenance), then .md rendered from what that file holds (so the
  markdown is the JSON's, to the bit), then .png and <stem>_frontier.png; prints and returns
  their paths."""
  path = common.write_json(out / f'{stem}.json', payload)
  paths = [out / f'{stem}.md', path]
  paths += render_files(out, stem, json.loads(path.read_text()), render,
                        {'': plot, '_frontier': frontier})
  print('wrote ' + ', '.join(map(str, paths)))
  return paths


def render_files(out: pathlib.Path, stem: str, payload: dict, render: Callable[[dict], str] | None,
                 plots: dict[str, Callable[[dict, pathlib.Path], None] | None]
                 ) -> list[pathlib.Path]:
  """out/<stem>.md (render given) and out/<stem><suffix>.png for each plot given: what a
  report's JSON regenerates (`python -m experiments.tables --rerender`); -> the PNGs' paths."""
  if render is not None:
    (out / f'{stem}.md').write_text(render(payload))
  paths = []
  for suffix, plot in plots.items():
    if plot is not None:
      paths.append(out / f'{stem}{suffix}.png')
      plot(payload, paths[-1])
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
  """(row, summary) in the tables' order: the GQA family by falling cache, then MLA likewise,
  then any other attention (by name) likewise."""
  order = {kind: i for i, (_, _, kinds) in enumerate(families(summary)) for kind in kinds}
  return sorted(summary.items(),
                key=lambda rs: (order[rs[1]['attention']], -rs[1]['elements_formula']))


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
              'token and array; per KV head for MHA / GQA / MQA); — where the variant has no 8-bit '
              'cache.')
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


# The paper's words for each mechanism's capability (DeepSeek-V2 Table 1), and plot markers;
# an attention without one of its own takes the next of OTHER_MARKERS (by name).
PAPER = {'mha': 'strong', 'gqa': 'moderate', 'mqa': 'weak', 'mla': 'stronger'}
MARKERS = {'mha': 'o', 'gqa': 's', 'mqa': '^', 'mla': 'D'}
OTHER_MARKERS = 'vPXhp*<>'
GQA_FAMILY = ('mha', 'gqa', 'mqa')


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


def _eight_bit(nbytes: int | None) -> str:
  return '—' if nbytes is None else f'{nbytes:,}'  # None: the variant has no 8-bit cache


def _width(s: dict) -> str:
  """A row's SwiGLU width: d_ff, and with MoE layers the experts' width beside it (what the
  parameter matching sets there; the first, dense layer keeps d_ff)."""
  experts = s['model'].get('n_routed_experts')
  return f"{s['d_ff']}" + (f" (experts {s['model']['moe_intermediate_size']})" if experts else '')


def cache_cells(summary: dict, s: dict) -> list:
  """A row's cells under CACHE_HEADER; its parameters' difference from MHA's where MHA ran."""
  mha = summary.get('mha', {}).get('params')
  return [s['formula'], f"{s['elements_formula']:,}", f"{s['elements_measured']:,}",
          f"{s['bytes_bf16']:,}", _eight_bit(s['bytes_int8']), _eight_bit(s['bytes_fp8']),
          _width(s),
          f"{s['params']:,}" + (f" ({100 * (s['params'] / mha - 1):+.1f}%)" if mha else '')]


def mechanism(r: dict) -> str:
  """A row's name in the tables: its attention and what sets its cache (a run's result, or a
  row's summary). An attention the reports know no more of is named with its row."""
  m = r['model']
  if r['attention'] == 'gqa':
    return f"GQA (G={m['n_kv_heads']})"
  if r['attention'] == 'mla':
    return f"MLA (d_c={m['kv_lora_rank'] // m['head_dim']}·d_h={m['kv_lora_rank']})"
  if r['attention'] in ('mha', 'mqa'):
    return {'mha': f"MHA (G={m['n_heads']})", 'mqa': 'MQA (G=1)'}[r['attention']]
  if r['attention'] == 'gta':
    return f"GTA (G={m['n_kv_heads']} tied)"
  if r['attention'] == 'gla':
    return f"GLA-{m['latent_heads']} (d_c={m['kv_lora_rank']})"
  if r['attention'] == 'tpa':
    return f"TPA (R={m['tpa_q_rank']},{m['tpa_k_rank']},{m['tpa_v_rank']})"
  return f"{r['attention'].upper()} ({r['row']})"


def marker(summary: dict, kind: str) -> str:
  """kind's plot marker: its own, or the next of OTHER_MARKERS among the summary's others."""
  others = sorted({s['attention'] for s in summary.values()} - set(MARKERS))
  return MARKERS.get(kind) or OTHER_MARKERS[others.index(kind) % len(OTHER_MARKERS)]


def families(summary: dict) -> tuple:
  """(legend label, colour, attention kinds) of the plots' lines: the GQA family, MLA (its
  label names the latent widths the summary has, as multiples of d_h), then one per other
  attention in the summary, by name."""
  kinds = {s['attention'] for s in summary.values()}
  ratios = sorted({s['model']['kv_lora_rank'] // (s['model']['head_dim'] or
                                                    s['model']['d_model'] // s['model']['n_heads'])
                   for s in summary.values() if s['attention'] == 'mla'})
  others = sorted(kinds - {*GQA_FAMILY, 'mla'})
  colors = [c for c in (f'C{i}' for i in range(10)) if c not in ('C0', 'C3')]
  return (('GQA family (MHA, GQA, MQA)', 'C0', GQA_FAMILY),
          (f"MLA family (d_c = {', '.join(map(str, ratios))} d_h)", 'C3', ('mla',)),
          *((kind.upper(), colors[i % len(colors)], (kind,)) for i, kind in enumerate(others)))


def family_color(summary: dict, kind: str) -> str:
  return next(color for _, color, kinds in families(summary) if kind in kinds)


def cache_lines(ax, summary: dict, point, annotate: bool = False, markersize: int = 8) -> None:
  """Every family on a log cache axis: a line through each family's rows by measured cache,
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
      ax.errorbar(x, y, yerr=err, color=color, marker=marker(summary, s['attention']),
                  markersize=markersize, capsize=4, linestyle='none')
      if annotate:
        ax.annotate(s['mechanism'], (x, y), fontsize=8, xytext=(6, 6), textcoords='offset points')
  ax.set_xscale('log')
  ticks = sorted({s['elements_measured'] for s in summary.values()})
  ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7, rotation=45)
  ax.minorticks_off()


def marker_legend(ax, summary: dict | None = None) -> None:
  """Legend entries of the markers: the four of DeepSeek-V2's Table 1, and every other
  attention in `summary`."""
  summary = summary or {}
  kinds = [*MARKERS, *sorted({s['attention'] for s in summary.values()} - set(MARKERS))]
  for kind in kinds:
    ax.plot([], [], marker(summary, kind), color='gray', linestyle='none', label=kind.upper())


# --- the frontier: quality against cache bytes -----------------------------------------------
def cache_bytes(s: dict) -> int:
  """A row's cache bytes per token over all layers, stored bfloat16: the
  mla_jax.variants.cache_bytes_per_token of its model with cache_dtype fixed, so the number is
  the same on every machine (dtype 'auto' computes float32 on a CPU, bfloat16 elsewhere)."""
  return variants.cache_bytes_per_token(
      ModelConfig.from_dict({**s['model'], 'cache_dtype': 'bfloat16'}))


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
  """The Pareto-efficient names of {name: (cost, badness)}, lower better in both, by cost: those
  no other point dominates. A point dominates another when it is no worse in both and better in
  one, so of equal costs only the least bad is efficient, and points equal in both are all
  efficient (neither dominates)."""
  def dominated(p):
    return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points.values())
  return sorted((name for name, p in points.items() if not dominated(p)),
                key=lambda name: (points[name], name))


def frontier(summary: dict, value: Callable[[dict], tuple[float, float] | None],
             higher_is_better: bool) -> list[dict]:
  """Every row that value(s) -> (mean, std) scores (None: not run), by cache bytes: its cache
  (cache_bytes), the mean and std, and whether it is Pareto-efficient in (cache, mean)."""
  points = {row: (cache_bytes(s), *v) for row, s in summary.items() if (v := value(s))}
  sign = -1 if higher_is_better else 1
  efficient = pareto({row: (b, sign * mean) for row, (b, mean, _) in points.items()})
  return [dict(row=row, mechanism=summary[row]['mechanism'], attention=summary[row]['attention'],
               cache_bytes=b, value=mean, std=std, efficient=row in efficient)
          for row, (b, mean, std) in sorted(points.items(), key=lambda rp: (rp[1][0], rp[0]))]


FRONTIER_NOTE = ('Cache: bytes per token over all layers of a bfloat16 cache '
                 '(`mla_jax.variants.cache_bytes_per_token`). A row is **Pareto-efficient** when '
                 'no other row has no more cache and a {} no worse, better in one; the others '
                 'are dominated. On the means: a dominated row within the seeds\' spread of the '
                 'frontier is not resolved off it.')


def frontier_lines(frontiers: dict[str, list[dict]], what: str, label: Callable[[str], str],
                   digits: int) -> list[str]:
  """The frontier section's body: each setting's efficient rows by cache, and every row."""
  lines = [FRONTIER_NOTE.format(what), '']
  for setting, points in frontiers.items():
    names = [f"{p['mechanism']} ({p['cache_bytes']:,} B)" for p in points if p['efficient']]
    lines.append(f"- {label(setting)}: " + ' → '.join(names))
  return [*lines, '', *table(
      ['setting', 'mechanism', 'cache bytes / token (bf16)', f'{what} (mean ± std)',
       'Pareto-efficient'], 'llrrl',
      ([label(setting), p['mechanism'], f"{p['cache_bytes']:,}",
        f"{p['value']:.{digits}f} ± {p['std']:.{digits}f}", 'yes' if p['efficient'] else '']
       for setting, points in frontiers.items() for p in points))]


def frontier_axes(ax, summary: dict, points: list[dict]) -> None:
  """One setting's frontier on a log cache-bytes axis: every row (its family's colour and
  marker, mean ± std), the efficient ones ringed, joined by a step line and named."""
  best = [p for p in points if p['efficient']]
  for p in points:
    color = family_color(summary, p['attention'])
    ax.errorbar(p['cache_bytes'], p['value'], yerr=p['std'], color=color, capsize=3,
                marker=marker(summary, p['attention']), markersize=7, linestyle='none',
                alpha=1.0 if p['efficient'] else 0.45)
    if p['efficient']:
      ax.plot(p['cache_bytes'], p['value'], 'o', markersize=15, markerfacecolor='none',
              markeredgecolor='k', markeredgewidth=1.2)
      right = best.index(p) % 2 == 0  # neighbours' names below right and above left
      ax.annotate(p['mechanism'], (p['cache_bytes'], p['value']), fontsize=7,
                  xytext=(8, -12) if right else (-8, 8), ha='left' if right else 'right',
                  textcoords='offset points', fontweight='bold')
  ax.step([p['cache_bytes'] for p in best], [p['value'] for p in best], where='post', color='k',
          linewidth=1, alpha=0.6, label='Pareto frontier (ringed)')
  ax.set_xscale('log')
  ax.margins(x=0.15)  # room for the names of the largest caches
  ticks = sorted({p['cache_bytes'] for p in points})
  ax.set_xticks(ticks, [f'{t:,}' for t in ticks], fontsize=7, rotation=45)
  ax.minorticks_off()
  ax.grid(alpha=0.3)
