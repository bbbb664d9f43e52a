r"""Capacity vs KV-cache size: every row of configs/ablations/capacity_vs_cache.py, each at its
best learning rate, then 3 seeds (docs/results.md, "Capacity vs KV-cache size").

  python -m experiments.capacity_vs_cache --workdir=runs/capacity                  # 2-3.5 h
  python -m experiments.capacity_vs_cache --workdir=runs/capacity --geometry=paper # 6 rows: as long
  python -m experiments.capacity_vs_cache --workdir=/tmp/cvc --quick               # minutes
  python -m experiments.capacity_vs_cache --workdir=runs/capacity --geometry=paper --match=mlp \
      --rows=mha,gqa2,mqa,mla4 --lrs=6e-3   # the control: every row at MHA's MLP width

At ~125M parameters (GPT-2 small's shape, d_h = 64, a BPE vocabulary; an accelerator, and a
corpus tokenized by `python -m mla_jax.tokenize --tokenizer=tokenizer.json --out=corpus_tok`):

  python -m experiments.capacity_vs_cache --geometry=125m --workdir=runs/c125 \
      --data_files=corpus_tok --tokenizer=corpus_tok/tokenizer.json --out=runs/c125/report
  python -m experiments.capacity_vs_cache --geometry=125m ... --dry_run  # plan, H200-hours
  python -m experiments.capacity_vs_cache --geometry=125m --quick --workdir=/tmp/c125

The whole 125m protocol is ~49 H200-hours (42 runs of 2.49B tokens), one seed per row at one
rate (--lrs=6e-4 --seeds=1) ~8: --dry_run prints the estimate, scaled from the accelerator
report's measured rate (device_seconds). Its --quick is a stand-in: the real heads (12 of
d_h = 64: the same d_c, d_r and G) on a 2-layer d_model 384 model over bytes.

A sweep (experiments/sweep.py) whose cells are the rows, scored by validation loss
(mla_jax.perplexity); runs live in workdir/<geometry>[-mlp][-quick]/<row>/lr<rate>/seed<k>.
The report (capacity_vs_cache[_paper|_125m][_mlp].md / .json / .png, and _frontier.png: loss
against cache bytes, the Pareto-efficient rows named) goes to --out:
experiments/results/capacity_vs_cache/ for the full run, the workdir for --quick.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import statistics

from absl import flags

from configs.ablations import capacity_vs_cache as ablation
from experiments import common, report, sweep, timing
from mla_jax import cli, tasks, tokenizer
from mla_jax import workdir as wd
from mla_jax.config import ModelConfig
from mla_jax.errors import InputError
from mla_jax.model import param_count

NAME = 'capacity_vs_cache'
# --match -> (the plots' and titles' short name, the report's sentence).
MATCHING = {
    'params': ('parameters matched',
               'the SwiGLU width d_ff is set per row to match MHA\'s parameter count'),
    'mlp': ('MLP widths matched', 'every row has MHA\'s SwiGLU width d_ff, so the parameter '
            'counts differ (the control for the usual matching)'),
}
FLAGS = flags.FLAGS
flags.DEFINE_enum('geometry', 'small', list(ablation.GEOMETRIES),
                  'small: 8 heads of d_h = 16; paper: 4 heads of d_h = 32 (d_r = 16); 125m: '
                  'GPT-2 small (d_model 768, 12 layers, 12 heads of d_h = 64), needs --tokenizer')
flags.DEFINE_enum('match', 'params', list(MATCHING),
                  "params: each row's SwiGLU width matches MHA's parameter count; mlp: every "
                  "row has MHA's SwiGLU width (the control for what the matching gives)")
flags.DEFINE_string('data_files', '', 'a glob of text files instead of the Shakespeare corpus')
flags.DEFINE_enum('ffn', 'dense', ['dense', 'moe'], "every row's feed-forward layers: dense "
                  'SwiGLU, or DeepSeekMoE after the first (as DeepSeek-V2 Table 9 compared them)')
flags.DEFINE_string('tokenizer', 'byte', "every run's data.tokenizer: byte, train:N (a BPE of N "
                    'tokens trained on the corpus; the vocabulary follows) or a tokenizer.json')

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
    ('gta2', 'gqa2', 'GTA vs GQA with as many KV heads (Zadouri et al.: GTA matches GQA with '
     'about half its cache)'),
    ('gla2', 'mla4', 'GLA-2 vs MLA at the same cache (Zadouri et al.: GLA matches MLA)'),
    ('tpa', 'mha', 'TPA vs MHA (Zhang et al.: TPA beats MHA)'),
]


def _vocab_size(spec: str) -> int:
  """The vocabulary a --tokenizer needs: N of train:N, else the tokenizer file's."""
  trained = tokenizer.trained_size(spec)
  return trained if trained is not None else tokenizer.HFTokenizer.from_path(spec).vocab_size


def _tokenizer_tag() -> str:
  """Runs of another tokenizer are other models: '-train4096', or the file's digest."""
  if FLAGS.tokenizer == 'byte':
    return ''
  trained = tokenizer.trained_size(FLAGS.tokenizer)
  if trained is not None:
    return f'-train{trained}'
  text = tokenizer.HFTokenizer.from_path(FLAGS.tokenizer).files['tokenizer.json']
  return '-tok' + hashlib.sha256(text.encode()).hexdigest()[:12]


def name(geometry: str, match: str = 'params', ffn: str = 'dense') -> str:
  """The report's file name: the small geometry with parameters matched and dense feed-forward
  layers keeps the original."""
  return '_'.join([NAME] + [geometry] * (geometry != 'small') + [match] * (match != 'params')
                  + [ffn] * (ffn != 'dense'))


def best_rate(results: list[dict]) -> float:
  """The rate whose seed-0 run has the lowest validation loss; diverged runs are out."""
  return sweep.best_of(results, lambda r: -r['loss'], lambda r: r['row'])


class CapacityVsCache(sweep.Sweep):
  name = NAME

  def plan(self) -> sweep.Plan:
    for flag in ('data_files', 'tokenizer', 'ffn'):
      if getattr(FLAGS, flag) != FLAGS[flag].default and not (FLAGS.out or FLAGS.quick):
        raise InputError(f'--{flag} needs --out (and a workdir of its own): a report and ledger '
                         'on other data must not replace the committed byte-level ones')
    if FLAGS.geometry == '125m' and FLAGS.tokenizer == 'byte' and not FLAGS.quick:
      raise InputError('--geometry=125m needs --tokenizer: the tokenizer.json a tokenized '
                       '--data_files was made with (or train:N to train a BPE on text), and --out')
    rows, lrs, seeds = sweep.grid_flags(
        ablation.GEOMETRIES[FLAGS.geometry][1], ablation.LEARNING_RATES[FLAGS.geometry],
        ablation.QUICK_LEARNING_RATES, 3, f' of --geometry={FLAGS.geometry}')
    grid = dict(quick=FLAGS.quick, geometry=FLAGS.geometry, match=FLAGS.match, rows=rows,
                seeds=seeds, lrs=lrs, data=FLAGS.data_files or 'shakespeare')
    if FLAGS.tokenizer != 'byte':  # committed reports read bytes and record no tokenizer
      grid['tokenizer'] = FLAGS.tokenizer
    if FLAGS.ffn != 'dense':  # and are dense
      grid['ffn'] = FLAGS.ffn
    return sweep.Plan([(row,) for row in rows], lrs, seeds, grid,
                      f'{len(rows)} rows ({FLAGS.geometry} geometry)',
                      name(FLAGS.geometry, FLAGS.match, FLAGS.ffn))

  def config(self, run):
    row, lr, seed = run
    options = ''.join(f',{o}' for o, on in ((FLAGS.geometry, FLAGS.geometry != 'small'),
                                            ('mlp', FLAGS.match == 'mlp'),
                                            ('quick', FLAGS.quick),
                                            ('moe', FLAGS.ffn == 'moe')) if on)
    config = ablation.get_config(row + options)
    config.opt.lr, config.seed = lr, seed
    if FLAGS.data_files:
      config.data.files = FLAGS.data_files
    if FLAGS.tokenizer != 'byte':
      config.data.tokenizer = FLAGS.tokenizer
      config.model.vocab_size = _vocab_size(FLAGS.tokenizer)
    return config

  def path(self, run) -> pathlib.Path:
    """A --quick run is another model, so it never passes for a full one; --data_files takes
    its own --out."""
    row, lr, seed = run
    variant = (FLAGS.geometry + ('' if FLAGS.match == 'params' else f'-{FLAGS.match}')
               + _tokenizer_tag() + ('-moe' if FLAGS.ffn == 'moe' else '')
               + ('-quick' if FLAGS.quick else ''))
    return pathlib.Path(FLAGS.workdir) / variant / row / f'lr{lr:g}' / f'seed{seed}'

  def fields(self, run) -> dict:
    row, lr, seed = run
    return dict(row=row, lr=lr, seed=seed, geometry=FLAGS.geometry)

  def measure(self, run, config, model):
    # The trainer's own validation, with the tokenizer the run stored (bits per byte too).
    task = tasks.load(wd.read_config(self.path(run)), stored=self.path(run))
    return task.validate(model), task.splits['val'][:model.cfg.max_seq_len // 2]

  best = staticmethod(best_rate)

  def default_jobs(self) -> int:
    """125m: one run at a time, the accelerator's whole (each process would take most of its
    memory)."""
    return 1 if FLAGS.geometry == '125m' and not FLAGS.quick else super().default_jobs()

  def estimate(self, plan: sweep.Plan, left: int, upper: bool, jobs: int) -> str:
    """What is left to train; for the 125m geometry also the device-hours it takes
    (device_seconds), which a CPU cannot give."""
    words = super().estimate(plan, left, upper, jobs)
    if FLAGS.geometry != '125m' or FLAGS.quick or not left:
      return words
    rates = device_rates(json.loads(DEVICE_REPORT.read_text()))
    runs = [self.config((*cell, plan.lrs[0], 1)) for cell in plan.cells]
    seconds = statistics.fmean(device_seconds(c, rates) for c in runs)
    tokens = runs[0].train.steps * runs[0].data.batch_size * runs[0].data.seq_len
    return (f"{words}, ~{left * seconds / 3600:,.0f} H200-hours{' at most' if upper else ''} "
            f'(~{seconds / 3600:.1f} h a run of {tokens / 1e9:.2f}B tokens, '
            f'{tokens / seconds / 1e3:,.0f}k tokens/s: {DEVICE_BASIS})')

  def describe(self, r: dict) -> str:
    return f"val loss {r['loss']:.4f} (perplexity {r['perplexity']:.3f})"

  def report(self, results, swept, setup, out):
    summary = summarize(results)
    table = report.rate_table(swept, 'loss')
    for row, s in summary.items():
      if row in table:
        s['edge'] = edge(table[row], s['lr'])
    comparisons = [c for better, worse, claim in COMPARISONS
                   if (c := compare(summary, better, worse, claim))]
    payload = report.sweep_payload(setup, summary, comparisons, table, results, swept)
    payload['frontier'] = frontier(payload)
    stem = name(setup['geometry'], setup['match'], setup.get('ffn', 'dense'))
    return report.write(out, stem, payload, render, plot, frontier_plot)


# --- the 125m geometry's device-hours ------------------------------------------------------
# The accelerator report's training rows: bench_train's 'large' size (d_model 1024, 8 layers,
# 16 heads of 64, 32 x 1024 tokens a step), bfloat16, kernels, without deterministic ops.
DEVICE_REPORT = common.RESULTS / 'h200' / 'run2_train.json'
DEVICE_BASIS = ("the H200's measured tokens/s for the same attention (MHA's for GQA / MQA) "
                'at the large size, times its FLOPs per token over this model\'s: the same '
                'model FLOP rate (MFU) assumed at 125M')


def device_rates(device_report: dict) -> dict[str, float]:
  """attention -> the model FLOP rate the report measured for it: its tokens/s times its
  FLOPs per token (timing.flops_per_token). InputError if a row is not the model
  timing.large_config builds (the rate would be scaled from the wrong FLOPs)."""
  rates = {}
  for r in device_report['rows']:
    config = timing.large_config(r['variant'])
    cfg = ModelConfig.from_dict(config.model)
    if (param_count(cfg), config.data.seq_len) != (r['params'], r['seq_len']):
      raise InputError(f"{DEVICE_REPORT}: the {r['variant']} row has {r['params']:,} parameters "
                       f"at {r['seq_len']} tokens, not the large size's {param_count(cfg):,} at "
                       f'{config.data.seq_len}; rerun bench_train --size=large')
    rates[cfg.attention] = r['tokens_per_s'] * timing.flops_per_token(cfg, r['seq_len'])
  return rates


def device_seconds(config, rates: dict[str, float]) -> float:
  """Seconds one run of `config` trains on the report's device: its tokens times its FLOPs per
  token, at the rate measured for its attention (MHA's where the report has none)."""
  cfg = ModelConfig.from_dict(config.model)
  tokens = config.train.steps * config.data.batch_size * config.data.seq_len
  rate = rates.get(cfg.attention, rates['mha'])
  return tokens * timing.flops_per_token(cfg, config.data.seq_len) / rate


# --- the summary ---------------------------------------------------------------------------
def edge(rates: dict[str, float | None], lr: float) -> str | None:
  """'lowest' / 'highest' when the chosen rate lr is at that end of the rates a row's sweep
  tried (a diverged rate counts: it is worse), else None: the choice is bracketed."""
  tried = sorted(map(float, rates))
  if len(tried) < 2 or tried[0] < lr < tried[-1]:
    return None
  return 'lowest' if lr == tried[0] else 'highest'


def summarize(results: list[dict]) -> dict[str, dict]:
  """Per row: the seed-independent facts once, and loss / perplexity as mean and std over the
  seeds that trained to the end (`diverged` lists those a non-finite loss stopped)."""
  summary = {}
  groups = report.seed_groups(sorted(results, key=lambda r: r['seed']), lambda r: r['row'])
  for row, (runs, diverged) in groups.items():
    first = runs[0]
    loss, loss_std = report.mean_std([r['loss'] for r in runs])
    ppl, ppl_std = report.mean_std([r['perplexity'] for r in runs])
    speeds = [r['tokens_per_s'] for r in runs if r['tokens_per_s']]
    summary[row] = dict(
        row=row, **report.row_facts(first), lr=first['lr'], diverged=diverged,
        seeds=[r['seed'] for r in runs], losses=[r['loss'] for r in runs],
        loss=loss, loss_std=loss_std, perplexity=ppl, perplexity_std=ppl_std,
        tokens_per_s=statistics.fmean(speeds) if speeds else None,
        train_tokens=first['train_tokens'])
  return summary


def compare(summary: dict, better: str, worse: str, claim: str = '') -> dict | None:
  """Is `better` lower in validation loss than `worse`, beyond the seed spread?"""
  return report.compare(summary.get(better), summary.get(worse), 'losses', claim, False,
                        'resolved, as the paper says', better=better, worse=worse)


def frontier(payload: dict) -> dict[str, list[dict]]:
  """{geometry: every row by cache bytes, its mean loss and whether it is Pareto-efficient}
  (report.frontier): what the report's frontier section and plot show."""
  return {payload['setup']['geometry']: report.frontier(
      payload['rows'], lambda s: (s['loss'], s['loss_std']), higher_is_better=False)}


# --- the report ----------------------------------------------------------------------------
def _unit(setup: dict) -> str:
  """What a token is: a byte, or a token of the runs' tokenizer."""
  return 'byte' if setup.get('tokenizer', 'byte') == 'byte' else f"token ({setup['tokenizer']})"


def _held_out(setup: dict) -> str:
  data = setup.get('data', 'shakespeare')
  return 'three held-out plays' if data == 'shakespeare' else f'the held-out split of {data}'


def _setup_line(summary: dict, setup: dict) -> str:
  first = next(iter(summary.values()))
  m, tokens = first['model'], first['train_tokens']
  kind = 'bytes' if _unit(setup) == 'byte' else f"{setup['tokenizer']} tokens"
  return (f"{report.model_line(m)}, {tokens / 1e6:.2f}M training tokens ({kind}) per run, "
          f"{setup['seeds']} seeds")


def _protocol(setup: dict) -> str:
  lrs = setup['lrs']
  if len(lrs) == 1:
    return f'Every row at lr {lrs[0]:g} (one rate given: no sweep).'
  rates = ', '.join(f'{lr:g}' for lr in lrs)
  return (f'Each row at its own learning rate: seed 0 trained at each of {rates} '
          'and the rate with the lowest validation loss chosen (table below); the seeds '
          'reported are fresh ones (1, 2, ...) at that rate, never the run that chose it.')


def summary_table(payload: dict) -> list[str]:
  """The main table: one line per row, the GQA family by falling cache, then MLA."""
  summary = payload['rows']
  lines = []
  for _, s in report.by_cache(summary):
    speed = f"{s['tokens_per_s']:,.0f}" if s['tokens_per_s'] else 'n/a'
    lines.append([
        s['mechanism'], s['paper'], *report.cache_cells(summary, s),
        f"{s['lr']:g}",
        f"{s['loss']:.4f} ± {s['loss_std']:.4f}",
        f"{s['perplexity']:.3f} ± {s['perplexity_std']:.3f}", speed])
  return report.table(
      ['mechanism', 'paper', *report.CACHE_HEADER, 'lr', 'val loss',
       'val perplexity', 'train tokens/s'], 'lll' + 'r' * 11, lines)


def comparisons_table(payload: dict) -> list[str]:
  return report.comparisons_table(payload['comparisons'], 'loss gap (2nd − 1st)', 4)


def sweep_lines(payload: dict) -> list[str]:
  summary, table = payload['rows'], payload['sweep']
  rates = sorted({lr for by_rate in table.values() for lr in by_rate}, key=float)
  lines = ([s['mechanism'], *report.rate_cells(table.get(s['row'], {}), rates, s.get('lr'), 4)]
           for _, s in report.by_cache(summary))
  return report.table(['row', *(f'lr {lr}' for lr in rates)], 'l' + 'r' * len(rates), lines)


def frontier_section(payload: dict) -> list[str]:
  """The Pareto-efficient rows by cache, and every row's cache and loss."""
  return report.frontier_lines(payload['frontier'], 'loss', lambda g: f'{g} geometry', 4)


def render(payload: dict) -> str:
  summary, setup = payload['rows'], payload['setup']
  geometry, matching = setup['geometry'], MATCHING[setup['match']]
  if setup.get('ffn') == 'moe' and setup['match'] == 'params':
    matching = (matching[0], "the experts' SwiGLU width (every routed and shared expert's) is "
                "set per row to match MHA's parameter count, the first, dense layer keeping d_ff")
  lines = [
      '# Capacity vs KV-cache size (DeepSeek-V2 Table 1, Tables 8-9 in miniature)'
      + ('' if geometry == 'small' else f': {geometry} geometry')
      + ('' if setup['match'] == 'params' else f', {matching[0]}')
      + (', DeepSeekMoE feed-forward layers' if setup.get('ffn') == 'moe' else ''), '',
      report.header(setup),
      f'{_setup_line(summary, setup)}. Every row has the same width, depth, query heads, '
      'data order (per seed), tokens, optimizer and schedule; only the attention '
      f'differs, and {matching[1]}. {_protocol(setup)} '
      f'Validation: {_held_out(setup)}, every {_unit(setup).split()[0]} scored once. Loss is '
      f'nats per {_unit(setup)}, '
      'mean ± std (sample) over seeds.', '', *summary_table(payload), '',
      report.exact_cache(summary) + ' Tokens/s: each run on one core'
      + (' and the accelerator' if setup['geometry'] == '125m' else '') + ', '
      f"{setup['jobs']} runs at a time."
      + (f" The whole protocol (sweep and seeds) took {setup['full_wall_s'] / 60:.0f} minutes "
         'of wall time.' if setup.get('full_wall_s') else ''), '',
      '## Which orderings are resolved', '',
      report.RESOLVED_NOTE.format(' order', 'has the lower loss'), '',
      *comparisons_table(payload),
  ]
  diverged = {row: s['diverged'] for row, s in summary.items() if s.get('diverged')}
  if diverged:
    lines += ['', 'Seeds stopped by a non-finite loss at the chosen rate (not in the means): '
              + ', '.join(f'{row} {seeds}' for row, seeds in diverged.items()) + '.']
  if 'frontier' in payload:
    lines += ['', '## Frontier: validation loss against cache bytes', '',
              *frontier_section(payload)]
  if payload['sweep']:
    ends = [f"{s['mechanism']} at {s['lr']:g} (the {s['edge']} rate)"
            for _, s in report.by_cache(summary) if s.get('edge')]
    lines += ['', '## Learning-rate sweep (seed 0, validation loss; the chosen rate in bold)',
              '', *sweep_lines(payload), '',
              f"**Not bracketed** (chosen at an end of the sweep: a better rate may lie "
              f"beyond it): {'; '.join(ends)}." if ends else
              "Every row's chosen rate has a worse rate on each side in the sweep (bracketed)."]
  return '\n'.join(lines) + '\n'


def plot(payload: dict, path: pathlib.Path) -> None:
  summary, setup = payload['rows'], payload['setup']
  fig, ax = report.pyplot().subplots(figsize=(7.5, 5))
  report.cache_lines(ax, summary, lambda s: (s['loss'], s['loss_std'], None), annotate=True)
  report.marker_legend(ax, summary)
  n_layers = next(iter(summary.values()))['model']['n_layers']
  ax.set_xlabel(f'KV cache per token (elements, all {n_layers} layers; log scale)')
  ax.set_ylabel(f'validation loss (nats per {_unit(setup)}), mean ± std over seeds')
  ax.set_title(_plot_title(setup), fontsize=10)
  ax.text(0.01, 0.01, _setup_line(summary, setup), transform=ax.transAxes, fontsize=7,
          color='gray')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize=8)
  report.save(fig, path)


def _plot_title(setup: dict) -> str:
  level = 'byte-level' if _unit(setup) == 'byte' else setup['tokenizer']
  corpus = 'Shakespeare' if setup.get('data', 'shakespeare') == 'shakespeare' else setup['data']
  return (f"{'QUICK pipeline check: ' if setup['quick'] else ''}{level} {corpus}, "
          + MATCHING[setup['match']][0]
          + (', DeepSeekMoE feed-forward' if setup.get('ffn') == 'moe' else ''))


def frontier_plot(payload: dict, path: pathlib.Path) -> None:
  """Validation loss against cache bytes per token, every row, the Pareto frontier ringed."""
  summary, setup = payload['rows'], payload['setup']
  fig, ax = report.pyplot().subplots(figsize=(7.5, 5))
  report.frontier_axes(ax, summary, payload['frontier'][setup['geometry']])
  report.marker_legend(ax, summary)
  ax.set_xlabel('KV cache per token (bytes of a bfloat16 cache, all layers; log scale)')
  ax.set_ylabel(f'validation loss (nats per {_unit(setup)}), mean ± std over seeds')
  ax.set_title(f"Frontier: {_plot_title(setup)}, {setup['geometry']} geometry", fontsize=10)
  ax.legend(fontsize=8)
  report.save(fig, path)


if __name__ == '__main__':
  cli.run(lambda: sweep.main(CapacityVsCache()))
