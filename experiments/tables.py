r"""Every table the docs quote, rendered from its committed JSON, and the generated blocks in
docs/*.md and README.md kept equal to it.

  python -m experiments.tables                      # the table names
  python -m experiments.tables capacity_vs_cache/summary   # one table
  python -m experiments.tables --write              # rewrite every block in the docs
  python -m experiments.tables --check              # exit 1 if a block differs (tests run it)
  python -m experiments.tables --rerender           # the sweep reports' frontier, .md and
                                                    # frontier .png afresh from their JSON

A doc holds a generated table between two markers; --write replaces what lies between them:

  <!-- table: capacity_vs_cache/summary -->
  | mechanism | ... |
  <!-- end table -->

A table's name is <report>/<part>: <report> is a JSON file's stem under experiments/results/
(capacity_vs_cache_paper, bench_decode, ...), <part> a table of it; <report>/report is the
whole markdown report of the experiments that write one (its committed .md). This module
imports no experiment's flags: the benchmarks import their table functions from here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from collections.abc import Callable

from experiments import common
from experiments.report import render_files, table

DOCS = [common.ROOT / 'README.md', *sorted((common.ROOT / 'docs').glob('*.md'))]
BLOCK = re.compile(r'(<!-- table: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- end table -->)',
                   re.DOTALL)


# --- the tables of the benchmarks and the quantization experiment ----------------------------
def cache_quantization_table(payload: dict) -> list[str]:
  return table(
      ['variant', 'cache dtype', 'bytes/token', 'val perplexity', 'vs reference',
       'argmax agreement', 'greedy leading tokens (per prompt)'], 'llrrrrl',
      ([variant, r['cache_dtype'], f"{r['bytes_per_token']:,}", f"{r['perplexity']:.4f}",
        f"{r['perplexity_change_pct']:+.3f}%", f"{100 * r['argmax_agreement']:.2f}%",
        ', '.join(map(str, r['greedy_leading']))]
       for variant, rows in payload['results'].items() for r in rows))


def cache_quantization_report(payload: dict) -> str:
  results, setup = payload['results'], payload['setup']
  o, quick = setup['options'], setup['quick']
  measure_s = sum(r['perplexity_s'] + r['generate_s'] for rows in results.values() for r in rows)
  lines = [
      '# What an 8-bit decode cache costs', '',
      f"`{setup['command']}` on {setup['machine']}, {setup['date']}: the measurements took "
      f"{measure_s / 60:.0f} minutes (summed over variants; a variant measured by an "
      'earlier invocation is read back, not measured again)'
      f"{' (QUICK: tiny models, a pipeline check; the numbers mean nothing)' if quick else ''}.",
      '',
      f"Validation perplexity computed through the decode cache: {o['window']}-token windows "
      f"(stride {o['window']}), each prefilled with {o['prefill']} tokens and then decoded one "
      f"token per step, {o['batch']} windows at a time, over "
      + (f"the first {o['max_windows']} windows of the validation split" if o['max_windows']
         else 'the whole validation split')
      + f" ({next(iter(results.values()))[0]['tokens']:,} tokens scored). Argmax agreement: "
      'the share of scored tokens whose next-token argmax equals the reference cache\'s '
      '(teacher-forced). Greedy: '
      f"{o['gen_tokens']} tokens from each of {o['prompts']} fixed {o['prompt_len']}-token "
      'validation prompts; the leading tokens that equal the reference cache\'s generation, per '
      'prompt. Bytes per token: all layers, the 8-bit caches\' float32 scales included. '
      f"Reference: the {setup['cache_dtypes'][0]} cache.", '',
      *cache_quantization_table(payload), '',
      'Check: the reference rows\' perplexity through the cache vs a full forward '
      '(mla_jax.perplexity, same windows): ' + '; '.join(
          f"{v} {rows[0]['perplexity']:.6f} vs {rows[0]['full_forward_perplexity']:.6f}"
          for v, rows in results.items()) + '.']
  return '\n'.join(lines) + '\n'


def bench_decode_table(payload: dict) -> list[str]:
  return table(['variant', 'batch', 'context', 'ms/token', 'tokens/s',
                'cache elem/token (formula)', 'cache B/token (with scales)', 'cache MiB',
                'limit ms', 'fraction of limit'], 'l' + 'R' * 9,
               ([r['variant'], r['batch'], r['context'], f"{r['ms_per_token']:.2f}",
                 f"{r['tokens_per_s']:.1f}",
                 f"{r['cache_elements_per_token']} ({r['cache_elements_per_token_formula']})",
                 r['cache_bytes_per_token'], f"{r['cache_mib']:.0f}", f"{r['limit_ms']:.2f}",
                 f"{r['fraction_of_limit']:.2f}"] for r in payload['rows']))


def bench_decode_report(payload: dict) -> list[str]:
  """The bandwidth and matmul rate the benchmark measured (timing.machine_limits), then its
  rows: what bench_decode prints and the accelerator report shows."""
  limits = payload['machine']
  return [f"bandwidth {limits['stream_bytes_per_s'] / 1e9:.1f} GB/s (read-only sum "
          f"{limits['read_bytes_per_s'] / 1e9:.1f}, in-place copy "
          f"{limits['copy_bytes_per_s'] / 1e9:.1f} read + write), "
          f"matmul {limits['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s ({limits['dtype']})", '',
          *bench_decode_table(payload)]


def bench_train_table(payload: dict) -> list[str]:
  """One line per row; '-' where a row lacks the entry (a file from before bench_train timed
  it: the 2026-11-27 default-size run has neither impl, dtype, MFU nor torch)."""
  def opt(r, key, fmt):
    return format(r[key], fmt) if r.get(key) is not None else '-'

  def impl(r):
    kernel = r.get('attention_kernel')
    # rows before 2026-12-07 say 'fused' (the kernels' old name) and whether it ran
    return r.get('impl', '-') + (f' ({kernel})' if kernel and r.get('fused', True) else '')
  return table(
      ['variant', 'impl', 'params', 'dtype', 'compile (s)', 'step alone (tokens/s)', 'MFU',
       'loop (tokens/s)', 'loop / alone', 'torch (tokens/s)', 'ours / torch'], 'llRlRRRRRRR',
      ([r['variant'], impl(r), _params(r), r.get('dtype', '-'),
        f"{r['compile_s']:.1f}", f"{r.get('tokens_per_s', r.get('direct_tokens_per_s')):.0f}",
        opt(r, 'mfu', '.1%'), opt(r, 'loop_tokens_per_s', '.0f'),
        opt(r, 'loop_vs_direct', '.2f'), opt(r, 'torch_tokens_per_s', '.0f'),
        opt(r, 'ratio_vs_torch', '.2f')] for r in payload['rows']))


def _params(r: dict) -> str:
  """'6.77M', and the parameters a token passes through where fewer (an MoE model's)."""
  active = r.get('active_params', r['params'])
  return f"{r['params'] / 1e6:.2f}M" + (f' ({active / 1e6:.2f}M active)'
                                        if active != r['params'] else '')


# bench_train --moe: what each timed step of a row is
MOE_STEPS = {'dropless': 'ours, dropless (auto)', 'ragged': 'ours, dropless (ragged_dot)',
             'dense': 'ours, dense reference',
             'torch_grouped_mm': 'transformers, grouped_mm', 'torch_eager': 'transformers, eager',
             'blocks': "ours: the blocks' expert products alone",
             'one': 'the same rows as one product per projection'}


def _moe_label(r: dict) -> str:
  return (f"{r['name']}: E={r['n_routed_experts']}, K={r['num_experts_per_tok']}, shared "
          f"{r['n_shared_experts']}, f={r['moe_intermediate_size']}, {r['batch']} x {r['seq_len']}")


def bench_train_moe_table(payload: dict) -> list[str]:
  """bench_train --moe: one line per timed step of each row (alternated within the row)."""
  def line(r, name):
    s, ratio = r['steps'][name], r['ratios'].get(name)
    loss = r['loss_init'].get('torch' if name.startswith('torch') else name)
    return [_moe_label(r), _params(r), MOE_STEPS[name], f'{loss:.5f}',
            f"{s['step_s_min']:.2f} / {s['step_s']:.2f}", f"{s['tokens_per_s']:.0f}",
            f"{s['mfu']:.1%}", f"{ratio['ratio']:.2f} ({ratio['block_min']:.2f}-"
            f"{ratio['block_max']:.2f})" if ratio else '-']
  return table(['model', 'params', 'step', 'loss at init', 'step s (min / median)', 'tokens/s',
                'MFU (active)', 'ours / it (blocks)'], 'lllRRRRR',
               (line(r, name) for r in payload['rows'] for name in r['steps']))


def bench_train_moe_flops_table(payload: dict) -> list[str]:
  """bench_train --moe: per row, the train step's flops per token when the routed experts run
  dropless (the model's), on every expert (the dense reference) and as XLA lowers ragged_dot
  on a CPU, and the dense reference's step time over the dropless one: expected (flops) and
  measured."""
  def line(r):
    f = r['flops_per_token']
    lowered = f.get('ragged_as_lowered')
    measured = r['steps']['dense']['step_s'] / r['steps']['dropless']['step_s']
    return [_moe_label(r), f"{f['model'] / 1e6:.1f}", f"{f['dense'] / 1e6:.1f}",
            f'{lowered / 1e6:.1f}' if lowered else '-', f"{f['dense'] / f['model']:.2f}",
            f'{f["dense"] / lowered:.2f}' if lowered else '-', f'{measured:.2f}']
  return table(['model', 'MFLOP/token: dropless', 'dense reference', 'ragged_dot as lowered',
                'dense / dropless: flops', 'dense / as lowered: flops',
                'dense / dropless: step time'], 'lRRRRRR',
               (line(r) for r in payload['rows'] if 'dense' in r['steps']))


def bench_train_moe_layer_table(payload: dict) -> list[str]:
  """bench_train --moe with the peer: the row's first MoE layer alone, forward and backward,
  ours and transformers' on the same weights and input (alternated), and ours / it."""
  def line(r, name):
    s, ratio = r['layer']['steps'][name], r['layer']['ratios'].get(name)
    return [_moe_label(r), str(r['layer']['index']), MOE_STEPS[name],
            f"{s['step_s_min'] * 1e3:.0f} / {s['step_s'] * 1e3:.0f}", f"{s['tokens_per_s']:.0f}",
            f"{ratio['ratio']:.2f} ({ratio['block_min']:.2f}-{ratio['block_max']:.2f})"
            if ratio else '-']
  return table(['model', 'layer', 'experts', 'ms (min / median)', 'tokens/s',
                'ours / it (blocks)'], 'lRlRRR',
               (line(r, name) for r in payload['rows'] if 'layer' in r
                for name in r['layer']['steps']))


def decode_pivot_table(payload: dict, points=((8, 16384), (32, 65536))) -> list[str]:
  """One line per variant: its cache bytes per token, the ms per token at each (batch,
  context) of `points`, and at the last point the cache read rate and the fraction of the
  bandwidth limit (the accelerator report's summary of its decode rows)."""
  rows = {(r['variant'], r['batch'], r['context']): r for r in payload['rows']}
  variants = list(dict.fromkeys(r['variant'] for r in payload['rows']))
  (b, t) = points[-1]
  lines = []
  for v in variants:
    last = rows.get((v, b, t))
    first = next(r for r in payload['rows'] if r['variant'] == v)
    lines.append([v, f"{first['cache_bytes_per_token']:,}",
                  *(f"{rows[(v, *p)]['ms_per_token']:.2f}" if (v, *p) in rows else '-'
                    for p in points),
                  f"{b * t * last['cache_bytes_per_token'] / last['ms_per_token'] / 1e9:.2f}"
                  if last else '-', f"{last['fraction_of_limit']:.2f}" if last else '-'])
  return table(['variant', 'cache B/token', *(f'b={pb}, {pt // 1024}k: ms' for pb, pt in points),
                f'cache read at b={b}, {t // 1024}k (TB/s)', 'fraction of the limit'],
               'l' + 'r' * (len(points) + 3), lines)


# The device check's bounds (experiments/device_check.py): float32 agreement, and how much
# larger the kernels' bfloat16 error may be than the einsum path's.
FLOAT32_ATOL = 1e-5
BF16_RATIO = 2.0


def device_check_table(payload: dict) -> list[str]:
  def row(r):
    if 'error' in r:
      return [r['variant'], f"failed: {r['error'][:120]}", '', '', '', '', 'NO']
    return [r['variant'], f"{r['f32_logits']:.1e}", f"{r['f32_cache']:.1e}",
            f"{r['bf16_einsum']:.1e}", f"{r['bf16_kernels']:.1e}", f"{r['bf16_ratio']:.2f}",
            'yes' if r['ok'] else 'NO']
  ok = f'ok (f32 <= {FLOAT32_ATOL:g}, ratio <= {BF16_RATIO:g})'
  return table(['variant', 'f32 logits', 'f32 through cache', 'bf16 einsum err',
                'bf16 kernels err', 'ratio', ok], 'lRRRRRl', map(row, payload['rows']))


def bench_mesh_table(payload: dict) -> list[str]:
  def row(r):
    c = r['collectives']
    return [r['variant'], tuple(r['mesh'].values()), f"{r['step_s']:.2f}",
            f"{r['vs_data_parallel']:.2f}", c['all-gather'], c['reduce-scatter'],
            c['all-reduce'], c['collective-permute'] + c['all-to-all'],
            f"{r['gathered_vs_params']:.2f}"]
  return table(['variant', 'mesh (data, fsdp, tensor)', 'step (s)', 'vs data parallel',
                'all-gather', 'reduce-scatter', 'all-reduce', 'other', 'gathered / param bytes'],
               'll' + 'r' * 7, map(row, payload['rows']))


MOE_COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')


def bench_moe_collectives_table(payload: dict) -> list[str]:
  mib = lambda x: f'{x / 2**20:.1f}'

  def row(r):
    c, s = r['collectives'], r['sent_bytes']
    counts = '/'.join(str(c[op]['count']) for op in MOE_COLLECTIVES)
    return [','.join(str(v) for v in r['mesh'].values()), r['path'], counts,
            mib(s['expert weights']), mib(s['other weights']), mib(s['moe activations']),
            mib(s['other']), mib(r['sent_total']), mib(r['all_to_all_bytes']),
            f"{r['step_s']:.2f}"]
  return table(
      ['mesh d,f,t,e', 'MoE path', 'AG/RS/AR/A2A/CP', 'expert w. MiB', 'other w. MiB',
       'MoE act. MiB', 'other MiB', 'total MiB', 'ideal A2A MiB', 'step (s)'],
      'll' + 'r' * 8, map(row, payload['rows']))


def _scaling_label(r: dict) -> str:
  """' + YaRN' / ' + Llama 3' after the rope layout; results recorded before Llama 3 RoPE carry
  only the flag 'yarn'."""
  kind = r.get('rope_scaling', 'yarn' if r['yarn'] else None)
  return {None: '', 'yarn': ' + YaRN', 'llama3': ' + Llama 3'}[kind]


def hf_equality_table(payload: dict) -> list[str]:
  def fmt(r, k):
    return f'{r[k]:.1e}' if k in r else '-'

  def greedy(r):
    return ' / '.join(('yes' if r[k] else 'NO') for k in (
        'absorbed_greedy_equal', 'naive_greedy_equal', 'cache_greedy_equal') if k in r)
  return table(
      ['fixture', 'attention', 'rope', 'forward', 'cache (absorbed)', 'cache (naive)', 'greedy',
       'perplexity mla_jax / transformers'], 'lllRRRlR',
      ([r['fixture'], r['attention'], r['rope_layout'] + _scaling_label(r),
        fmt(r, 'forward_err'), fmt(r, 'cache_err') if 'cache_err' in r else fmt(r, 'absorbed_err'),
        fmt(r, 'naive_err'), greedy(r), f"{r['ppl_mla_jax']:.4f} / {r['ppl_transformers']:.4f}"]
       for r in payload['rows']))


def hf_trained_table(payload: dict) -> list[str]:
  return table(['run', 'exported as', 'attention', 'max logit error',
                'perplexity mla_jax / transformers'], 'lllRR',
               ([r['workdir'], r['architecture'], f"{r['attention']} ({r['rope_layout']})",
                 f"{r['max_err']:.1e}", f"{r['ppl_mla_jax']:.4f} / {r['ppl_transformers']:.4f}"]
                for r in payload.get('trained', [])))


def cpu_ab_table(payload: dict) -> list[str]:
  """Per build of the train step: tokens/s (wall) and CPU seconds per step, per variant; the
  last row is the last build before torch (what `train` runs) over torch: tokens/s, and
  torch's CPU seconds over ours."""
  results = payload['results']
  variants = list(results)
  builds = [b for b in results[variants[0]] if not b.startswith('ratio_')]
  ours = builds[builds.index('torch') - 1] if 'torch' in builds[1:] else None
  lines = [[b] + [x for v in variants for x in (f"{results[v][b]['tokens_per_s']:,.0f}",
                                                f"{results[v][b]['cpu_s']:.2f}")]
           for b in builds]
  if ours:
    lines.append([f'{ours} / torch'] + [x for v in variants for x in (
        f"{results[v][ours]['tokens_per_s'] / results[v]['torch']['tokens_per_s']:.2f}",
        f"{results[v]['torch']['cpu_s'] / results[v][ours]['cpu_s']:.2f}")])
  header = ['build'] + [f'{v} {what}' for v in variants for what in ('tokens/s', 'CPU s/step')]
  return table(header, 'l' + 'R' * (2 * len(variants)), lines)


def cpu_attention_bench_table(payload: dict) -> list[str]:
  calls = payload['calls']
  names = list(next(iter(calls.values())))
  return table(['', *names], 'l' + 'R' * len(names),
               ([variant, *(f"{row[n]['ms']:.1f}" for n in names)]
                for variant, row in calls.items()))


# --- the registry ----------------------------------------------------------------------------
def _lazy(module: str, function: str, *args) -> Callable[[dict], list[str] | str]:
  """A renderer of an experiment module (imported when the table is rendered: it defines
  flags, which the benchmarks that import this module must not get)."""
  return lambda payload: getattr(importlib.import_module(f'experiments.{module}'),
                                 function)(payload, *args)


def _sweep_parts(module: str) -> dict:
  parts = {'summary': 'summary_table', 'comparisons': 'comparisons_table', 'sweep': 'sweep_lines',
           'frontier': 'frontier_section', 'report': 'render'}
  if module == 'recall_vs_cache':
    parts['per_seed'] = 'per_seed_table'
  return {part: _lazy(module, function) for part, function in parts.items()}


# capacity_vs_cache's reports -> their folder under experiments/results (--ffn=moe keeps a
# ledger of its own, so a folder of its own)
CAPACITY_REPORTS = {stem: 'capacity_vs_cache' for stem in (
    'capacity_vs_cache', 'capacity_vs_cache_paper', 'capacity_vs_cache_paper_mlp')} | {
    'capacity_vs_cache_paper_moe': 'capacity_vs_cache_moe'}
# report -> (its JSON under experiments/results, {part: renderer}). A report's name is its
# file's stem, or <folder>_<stem> for the device records in h200/.
REPORTS: dict[str, tuple[str, dict]] = {
    **{stem: (f'{folder}/{stem}.json', _sweep_parts('capacity_vs_cache'))
       for stem, folder in CAPACITY_REPORTS.items()},
    'recall_vs_cache': ('recall_vs_cache/recall_vs_cache.json', _sweep_parts('recall_vs_cache')),
    'to_mla': ('to_mla/to_mla.json', {'report': _lazy('to_mla_report', 'render'),
                                      **{source: _lazy('to_mla_report', 'source_table', source)
                                         for source in ('mha', 'gqa')}}),
    **{stem: (f'cache_quantization/{stem}.json', {'summary': cache_quantization_table,
                                                  'report': cache_quantization_report})
       for stem in ('cache_quantization', 'cache_quantization_mla_full')},
    'bench_decode': ('bench_decode/bench_decode.json', {'table': bench_decode_table}),
    'bench_train': ('bench_train/bench_train.json', {'table': bench_train_table}),
    'bench_train_moe': ('bench_train/bench_train_moe.json', {'table': bench_train_moe_table,
                                                             'flops': bench_train_moe_flops_table,
                                                             'layer': bench_train_moe_layer_table}),
    'bench_mesh': ('bench_mesh/bench_mesh.json', {'table': bench_mesh_table}),
    'bench_moe_collectives': ('bench_moe_collectives/bench_moe_collectives.json',
                              {'table': bench_moe_collectives_table}),
    'hf_equality': ('hf_equality/hf_equality.json', {'fixtures': hf_equality_table,
                                                     'trained': hf_trained_table}),
    # cpu_ab.json: today's cpu_ab (builds by attention_impl), once a run is committed
    **{stem: (f'cpu_ab/{stem}.json', {'table': cpu_ab_table})
       for stem in ('cpu_ab', 'cpu_ab_kernel', 'cpu_ab_kernel_1core', 'cpu_ab_kernel_repeat')
       if (common.RESULTS / 'cpu_ab' / f'{stem}.json').exists()},
    'cpu_attention_bench': ('cpu_attention_bench/cpu_attention_bench.json',
                            {'table': cpu_attention_bench_table}),
    **{f'h200_{stem}': (f'h200/{stem}.json', {'table': bench_train_table})
       for stem in ('run1_train', 'run1_train_nondeterministic', 'run2_train')},
    'h200_decode': ('h200/decode.json', {'table': bench_decode_table,
                                         'summary': decode_pivot_table}),
}


# report -> its experiment, for the reports whose JSON holds a section computed from its rows
# (the Pareto frontier): --rerender computes it afresh into the JSON (nothing else in it
# changes) and writes the markdown and the frontier plot from that JSON.
RERENDER = {**{stem: 'capacity_vs_cache' for stem in CAPACITY_REPORTS},
            'recall_vs_cache': 'recall_vs_cache'}


def rerender(stem: str) -> list:
  """Report `stem`'s derived sections, markdown and frontier plot, from its committed JSON."""
  module = importlib.import_module(f'experiments.{RERENDER[stem]}')
  path = json_path(stem)
  payload = json.loads(path.read_text())
  payload['frontier'] = module.frontier(payload)
  path.write_text(json.dumps(payload, indent=1))
  return [path.with_suffix('.md'), path, *render_files(
      path.parent, stem, json.loads(path.read_text()), module.render,
      {'_frontier': module.frontier_plot})]


def names() -> list[str]:
  return [f'{stem}/{part}' for stem, (_, parts) in REPORTS.items() for part in parts]


def json_path(stem: str):
  return common.RESULTS / REPORTS[stem][0]


def render(name: str) -> str:
  """Table `name` from its committed JSON, as markdown (no trailing newline for a table)."""
  stem, _, part = name.partition('/')
  if stem not in REPORTS or part not in REPORTS[stem][1]:
    raise KeyError(f'no table {name!r}; the tables are {names()}')
  out = REPORTS[stem][1][part](json.loads(json_path(stem).read_text()))
  return out if isinstance(out, str) else '\n'.join(out)


def blocks(text: str) -> list[tuple[str, str]]:
  """(name, body) of every generated block in a doc's text."""
  return [(m['name'], m['body']) for m in BLOCK.finditer(text)]


def regenerate(text: str) -> str:
  """text with every generated block's body rendered afresh."""
  def fill(m):
    return m.group(1) + render(m['name']).rstrip('\n') + '\n' + m.group(4)
  return BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('name', nargs='?', help='a table to print')
  parser.add_argument('--write', action='store_true', help="rewrite the docs' blocks")
  parser.add_argument('--check', action='store_true', help='exit 1 if a block differs')
  parser.add_argument('--rerender', action='store_true', help='rewrite the sweep reports\' '
                      'frontier, markdown and frontier plot from their JSON (then --write)')
  args = parser.parse_args(argv)
  if args.rerender:
    for stem in RERENDER:
      print('wrote ' + ', '.join(str(p.relative_to(common.ROOT)) for p in rerender(stem)))
  if args.name:
    try:
      print(render(args.name))
    except KeyError as e:
      sys.exit(f'error: {e.args[0]}')
    return 0
  if not (args.write or args.check or args.rerender):
    print('\n'.join(names()))
    return 0
  stale = []
  for doc in DOCS:
    text = doc.read_text()
    fresh = regenerate(text)
    if fresh != text:
      stale.append(doc.relative_to(common.ROOT).as_posix())
      if args.write:
        doc.write_text(fresh)
  if stale:
    print(('rewrote ' if args.write else 'stale tables in ') + ', '.join(stale))
  return 1 if stale and args.check else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
