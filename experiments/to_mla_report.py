"""The to_mla report: a table per source (markdown), JSON, and a plot of perplexity vs cache.

Every number comes from the tasks' result.json files; nothing here trains or measures.
"""

from __future__ import annotations

import pathlib

from experiments import report

NAME = 'to_mla'
LABELS = {'2norm': 'converted, 2-norm pairs', 'uniform': 'converted, uniform pairs',
          'weights': '2-norm, weight statistics', 'unit': '2-norm, unit latent norm',
          'scratch': 'MLA from scratch'}


def _ppl(result: dict, key: str) -> str:
  return f"{result[key]['perplexity']:.3f}" if key in result else '-'


def _shape(r: dict) -> tuple[int, int]:
  return r['model']['kv_lora_rank'], r['model']['qk_rope_head_dim']


def _by_source(results: list[dict]) -> dict[str, dict]:
  """{source: {'source': r, 'exact': r, fraction: {kind: r}}}; a scratch run belongs to every
  (source, fraction) whose conversions have its MLA shape (d_c, d_r)."""
  out: dict[str, dict] = {}
  scratch = {_shape(r): r for r in results if r['kind'] == 'scratch'}
  for r in results:
    entry = out.setdefault(r['source'], {})
    if r['kind'] in ('source', 'exact'):
      entry[r['kind']] = r
    elif r['kind'] != 'scratch':
      row = entry.setdefault(r['fraction'], {})
      row[r['kind']] = r
      if _shape(r) in scratch:
        row['scratch'] = scratch[_shape(r)]
  return out


def _cache(r: dict) -> str:
  same = r['cache_elements_formula'] == r['cache_elements_measured']
  return f"{r['cache_elements_measured']:,}" + ('' if same else
                                                 f" (formula {r['cache_elements_formula']:,}!)")


def _fraction_table(entry: dict) -> list[str]:
  """One source's table: a line per cache size, a column per conversion (- : not run)."""
  lines = []
  for fraction in sorted(k for k in entry if isinstance(k, int)):
    row = entry[fraction]
    first = next(iter(row.values()))
    m = first['model']
    cells = [f"1/{fraction}: {_cache(first)}", f"{m['kv_lora_rank']}, {m['qk_rope_head_dim']}"]
    for kind, key in (('2norm', 'before'), ('2norm', 'after'), ('uniform', 'before'),
                      ('uniform', 'after'), ('weights', 'before'), ('unit', 'before'),
                      ('scratch', 'after')):
      cells.append(_ppl(row[kind], key) if kind in row else '-')
    lines.append(cells)
  return report.table(['cache', 'd_c, d_r', '2-norm before', '2-norm after', 'uniform before',
                       'uniform after', 'weight stats before', 'unit norm before', 'scratch'],
                      'll' + 'r' * 7, lines)


def source_table(payload: dict, source: str) -> list[str]:
  return _fraction_table(_by_source(payload['results']).get(source, {}))


def render(payload: dict) -> str:
  results, setup = payload['results'], payload['setup']
  lines = [
      '# MHA / GQA -> MLA: conversion (mla_jax.to_mla) vs MLA from scratch, at equal cache', '',
      report.header(setup),
      'Validation perplexity (bytes) on the held-out split of the source\'s corpus, every byte '
      'scored once. "before" is the conversion as it comes out of mla_jax.to_mla; "after" '
      f"is it fine-tuned (--init_from) on {100 * setup['finetune_fraction']:g}% of the "
      "source's training tokens; the scratch MLA has the conversion's config and trains for "
      'the source\'s tokens plus the fine-tuning tokens. Conversions use '
      f"{setup['calibration_batches']} calibration batches of training data unless the "
      'column says weight statistics. Cache = elements per token over all layers, measured '
      'from the arrays a bfloat16 prefill and decode step return.', '']
  for source, entry in _by_source(results).items():
    src, exact = entry.get('source'), entry.get('exact')
    lines += [f'## {source.upper()}', '']
    if src:
      lines.append(f"Source: perplexity {src['after']['perplexity']:.3f} (loss "
                   f"{src['after']['loss']:.4f}) after {src['train_tokens'] / 1e6:.2f}M "
                   f"tokens, cache {_cache(src)}.")
    if exact:
      gap = abs(exact['before']['loss'] - src['after']['loss']) if src else float('nan')
      lines.append(f"Exact MLA embedding: perplexity {exact['before']['perplexity']:.3f} "
                   f"(|loss difference| {gap:.1e}), cache {_cache(exact)}.")
    lines += ['', *_fraction_table(entry), '']
  all_exact = all(r['cache_elements_formula'] == r['cache_elements_measured'] for r in results
                  if r['kind'] not in ('source', 'exact'))
  lines += [f"Measured cache = formula everywhere: **{'yes' if all_exact else 'NO'}**."]
  if setup.get('tasks_finished', 0) < setup.get('tasks_total', 0):
    lines.append(f"**Partial report**: {setup['tasks_finished']} of {setup['tasks_total']} tasks "
                 'had finished (--report_only); a - marks a cell not yet run.')
  if setup.get('full_wall_s'):
    lines.append(f"The whole run took {setup['full_wall_s'] / 60:.0f} minutes of wall time "
                 f"({setup['jobs']} tasks at a time, one core each).")
  return '\n'.join(lines) + '\n'


def plot(payload: dict, path: pathlib.Path) -> None:
  results, setup = payload['results'], payload['setup']
  sources = _by_source(results) or {'(nothing finished yet)': {}}
  fig, axes = report.pyplot().subplots(1, len(sources), figsize=(6 * len(sources), 4.5),
                                       squeeze=False)
  styles = {('2norm', 'before'): ('C1', ':', 'o'), ('2norm', 'after'): ('C1', '-', 'o'),
            ('uniform', 'before'): ('C2', ':', 's'), ('uniform', 'after'): ('C2', '-', 's'),
            ('scratch', 'after'): ('C3', '-', 'D')}
  for ax, (source, entry) in zip(axes[0], sources.items(), strict=True):
    fractions = sorted(k for k in entry if isinstance(k, int))
    for (kind, key), (color, line, marker) in styles.items():
      points = [(entry[f][kind]['cache_elements_measured'], entry[f][kind][key]['perplexity'])
                for f in fractions if kind in entry[f] and key in entry[f][kind]]
      if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, line, color=color, marker=marker, label=f'{LABELS[kind]} ({key})'
                if kind != 'scratch' else LABELS[kind])
    if 'source' in entry:
      src = entry['source']
      ax.plot([src['cache_elements_measured']], [src['after']['perplexity']], '*', color='k',
              markersize=12, label=f'{source.upper()} source (= exact MLA)')
    ax.set_xscale('log', base=2)
    ax.set_xlabel('KV cache per token (elements, all layers; log scale)')
    ax.set_ylabel('validation perplexity')
    ax.set_title(f"{'QUICK: ' if setup['quick'] else ''}{source.upper()} -> MLA", fontsize=10)
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  report.save(fig, path)

