r"""Recall vs KV-cache size: every row of configs/ablations/recall_vs_cache.py trained on MQAR at
several numbers of key-value pairs, each at its best learning rate, over seeds.

  python -m experiments.recall_vs_cache --workdir=runs/recall      # the CPU grid: ~2 h, 2 cores
  python -m experiments.recall_vs_cache --workdir=/tmp/rvc --quick # the pipeline, minutes
  python -m experiments.recall_vs_cache --workdir=runs/zoology --seq_len=256 \
      --kv_pairs=8,16,32,64 --lrs=2.2e-3,4.6e-3,1e-2,2.2e-2       # Zoology's grid (accelerator)

A sweep (experiments/sweep.py; Zoology's best of up to four rates, then seeds) whose cells are
(row, N): the rate with the best recall on the validation set (the trainer's held-out set,
val_seed 0) is kept, and the seeds are reported on a separate test set (val_seed TEST_SEED).
Runs live in workdir/<row>/seq<T>_kv<N>_steps<S>[_quick]/lr<rate>/seed<k>, so runs of other
settings sit beside them without mixing. --dry_run prints the plan and an estimate of the CPU
time left. The report (recall_vs_cache.md / .json / .png, and _frontier.png: recall against
cache bytes per N, the Pareto-efficient rows named) goes to --out:
experiments/results/recall_vs_cache/ for the full protocol, the workdir for --quick.
"""

from __future__ import annotations

import copy
import pathlib
import statistics
import textwrap

from absl import flags

from configs.ablations import capacity_vs_cache as capacity
from configs.ablations import recall_vs_cache as ablation
from experiments import report, sweep
from mla_jax import cli, tasks
from mla_jax.errors import InputError

NAME = 'recall_vs_cache'
FLAGS = flags.FLAGS
flags.DEFINE_integer('seq_len', None, 'tokens per example (default: the config\'s SEQ_LEN; '
                     'with --quick, its QUICK_SEQ_LEN)')
flags.DEFINE_list('kv_pairs', None, 'difficulties: key-value pairs per example (default: the '
                  'config\'s KV_PAIRS; with --quick, QUICK_KV_PAIRS)')
flags.DEFINE_integer('steps', None, 'training steps per run (default: the config\'s STEPS; '
                     'with --quick, QUICK_STEPS)')

# CPU seconds of one training step of the full-size rows at batch 32, T tokens per example:
# 32 T (A + B T) (attention makes it quadratic in T), fitted to one core of this project's
# CPU (0.14 s at T = 64, 1.15 s at T = 256); plus the rest of a run (start-up, compiling,
# scoring 2 x 1024 held-out examples, three cache measurements: ~45 s for a row's first run,
# less once the compilation cache holds its programs). Only for the estimate printed
# before training: once runs of a setting have finished, their measured CPU time is used.
STEP_A_S, STEP_B_S, RUN_OVERHEAD_S = 4.4e-5, 3.75e-7, 30.0
# (row expected to recall better, row expected to recall worse, why).
COMPARISONS = [
    ('mha', 'mqa', 'MHA (G=8) vs MQA (G=1): 8x the cache'),
    ('gqa2', 'mqa', 'GQA (G=2) vs MQA: 2x the cache'),
    ('mla2', 'mqa', 'MLA d_c = 2 d_h vs MQA: 1.25x the cache'),
    ('mla4', 'gqa2', 'MLA d_c = 4 d_h vs GQA (G=2): a similar cache'),
    ('mla8', 'mla2', 'MLA with a larger latent (d_c = 8 d_h vs 2 d_h)'),
    ('mha', 'mla4', 'MHA vs MLA d_c = 4 d_h: 3.6x the cache'),
]


def setting_name(seq_len: int, kv_pairs: int | str, steps: int) -> str:
  """The folder of one difficulty; a --quick run is another model, so it never passes for a
  full one."""
  return f"seq{seq_len}_kv{kv_pairs}_steps{steps}{'_quick' if FLAGS.quick else ''}"


def best_rate(results: list[dict]) -> float:
  """The rate whose run has the best validation recall (then the lower validation loss);
  runs that diverged are out."""
  return sweep.best_of(results, lambda r: (r['val_accuracy'], -r['val_loss']),
                       lambda r: f"{r['row']} kv{r['kv_pairs']}")


class RecallVsCache(sweep.Sweep):
  name = NAME

  def plan(self) -> sweep.Plan:
    seq_len = sweep.default(FLAGS.seq_len, ablation.SEQ_LEN, ablation.QUICK_SEQ_LEN)
    steps = sweep.default(FLAGS.steps, ablation.STEPS, ablation.QUICK_STEPS)
    try:
      kv_pairs = [int(k) for k in sweep.default(FLAGS.kv_pairs, ablation.KV_PAIRS,
                                                ablation.QUICK_KV_PAIRS)]
    except ValueError as e:
      raise InputError(f'--kv_pairs takes comma-separated numbers ({e})') from None
    rows, lrs, seeds = sweep.grid_flags(capacity.ROWS, ablation.LEARNING_RATES,
                                        ablation.QUICK_LEARNING_RATES, 1)
    if steps < 1 or not kv_pairs:
      raise InputError(f'--steps={steps} must be >= 1 and --kv_pairs={kv_pairs} not empty')
    # An impossible N fails here, before anything is trained. (The shared config, not a row's:
    # matching a row's parameters starts jax, and the workers are forked from this process.)
    for kv in kv_pairs:
      try:
        tasks.MQAR(ablation.shared(kv, seq_len, FLAGS.quick))
      except ValueError as e:
        raise InputError(f'--kv_pairs={kv} at --seq_len={seq_len}: {e}') from None
    grid = dict(quick=FLAGS.quick, rows=rows, seq_len=seq_len, steps=steps, seeds=seeds, lrs=lrs,
                kv_pairs=kv_pairs, test_seed=ablation.TEST_SEED)
    return sweep.Plan([(row, seq_len, kv, steps) for kv in kv_pairs for row in rows], lrs, seeds,
                      grid, f'{len(rows)} rows x N = {kv_pairs} at {seq_len} tokens, {steps} steps',
                      NAME)

  def config(self, run):
    row, seq_len, kv, steps, lr, seed = run
    config = ablation.get_config(f'{row},kv{kv},seq{seq_len}' + (',quick' if FLAGS.quick else ''))
    ablation.set_steps(config, steps)
    config.opt.lr, config.seed = lr, seed
    return config

  def path(self, run) -> pathlib.Path:
    row, seq_len, kv, steps, lr, seed = run
    return (pathlib.Path(FLAGS.workdir) / row / setting_name(seq_len, kv, steps)
            / f'lr{lr:g}' / f'seed{seed}')

  def fields(self, run) -> dict:
    row, seq_len, kv, steps, lr, seed = run
    return dict(row=row, seq_len=seq_len, kv_pairs=kv, steps=steps, lr=lr, seed=seed)

  def measure(self, run, config, model):
    """Recall on the validation set (which chose the rate) and on the test set (reported)."""
    val_task = tasks.MQAR(config)
    val = val_task.validate(model)
    test_config = copy.deepcopy(config)
    test_config.data.mqar.val_seed = ablation.TEST_SEED
    test = tasks.MQAR(test_config).validate(model)
    mqar = config.data.mqar
    scores = dict(power_a=mqar.power_a, val_accuracy=val['accuracy'], val_loss=val['loss'],
                  accuracy=test['accuracy'], loss=test['loss'], answers=test['answers'],
                  test_examples=mqar.val_examples)
    return scores, val_task.heldout[0]['inputs'][0][:model.cfg.max_seq_len // 2]

  best = staticmethod(best_rate)

  def describe(self, r: dict) -> str:
    return f"recall {r['val_accuracy']:.3f} (validation), {r['accuracy']:.3f} (test)"

  def estimate(self, plan: sweep.Plan, left: int, upper: bool, jobs: int) -> str:
    """The CPU time left to train (an upper bound while the rates are not chosen): from the
    finished runs of this setting in the workdir if there are any, else from the step-time
    model above."""
    if not left:
      return 'nothing left to train'
    _, seq_len, _, steps = plan.cells[0]
    measured = [r['cpu_s'] for r in map(self.read, self.runs_of_setting(seq_len, steps)) if r]
    if measured:
      seconds, basis = left * statistics.median(measured), (f'the median of {len(measured)} '
                                                            'finished runs')
    else:
      per_step = 32 * seq_len * (STEP_A_S + STEP_B_S * seq_len)
      seconds, basis = left * (steps * per_step + RUN_OVERHEAD_S), ('a step-time model of the '
                                                                    'full-size rows')
    return (f"{left} to train, {'at most ' if upper else ''}~{seconds / 60:.0f} CPU minutes "
            f'(~{seconds / 60 / jobs:.0f} min on {jobs} cores; {basis})')

  def runs_of_setting(self, seq_len: int, steps: int) -> list[tuple]:
    """Every run in the workdir at this seq_len and steps (any row, N, rate, seed)."""
    out = []
    pattern = f"*/{setting_name(seq_len, '*', steps)}/lr*/seed*"
    for path in pathlib.Path(FLAGS.workdir).glob(pattern):
      row, setting, lr, seed = path.parts[-4:]
      kv = int(setting.split('_kv')[1].split('_')[0])
      out.append((row, seq_len, kv, steps, float(lr[2:]), int(seed[4:])))
    return out

  def report(self, results, swept, setup, out):
    summary = summarize(results)
    comparisons = [c for kv in setup['kv_pairs'] for better, worse, claim in COMPARISONS
                   if (c := compare(summary, better, worse, str(kv), claim))]
    payload = report.sweep_payload(setup, summary, comparisons,
                                   report.rate_table(swept, 'val_accuracy', 'kv_pairs'), results,
                                   swept)
    payload['frontier'] = frontier(payload)
    return report.write(out, NAME, payload, render, plot, frontier_plot)


# --- the summary ---------------------------------------------------------------------------
def summarize(results: list[dict]) -> dict[str, dict]:
  """Per row: the seed- and N-independent facts once, and per N the test recall over the
  seeds that trained to the end (`diverged` lists those stopped by a non-finite loss)."""
  summary: dict[str, dict] = {}
  for runs, diverged in report.seed_groups(
      sorted(results, key=lambda r: (r['row'], r['kv_pairs'], r['seed'])),
      lambda r: f"{r['row']} kv{r['kv_pairs']}", ('steps', 'seq_len')).values():
    r = runs[0]
    s = summary.setdefault(r['row'], dict(
        **report.row_facts(r), steps=r['steps'], train_tokens=r['train_tokens'],
        seq_len=r['seq_len'], test_examples=r['test_examples'], by_kv={}))
    accuracies, losses = [x['accuracy'] for x in runs], [x['loss'] for x in runs]
    cell = s['by_kv'][str(r['kv_pairs'])] = dict(
        lr=r['lr'], seeds=[x['seed'] for x in runs], accuracies=accuracies, losses=losses,
        diverged=diverged)
    cell['accuracy'], cell['accuracy_std'] = report.mean_std(accuracies)
    cell['loss'], cell['loss_std'] = report.mean_std(losses)
  return summary


def compare(summary: dict, better: str, worse: str, kv: str, claim: str = '') -> dict | None:
  """Does `better` recall more than `worse` at N = kv, beyond the seed spread?"""
  cell = lambda row: summary.get(row, {}).get('by_kv', {}).get(kv)
  return report.compare(cell(better), cell(worse), 'accuracies', claim, True,
                        'resolved, as expected', better=better, worse=worse, kv_pairs=int(kv))


def frontier(payload: dict) -> dict[str, list[dict]]:
  """{N: every row run at N by cache bytes, its mean test recall and whether it is
  Pareto-efficient} (report.frontier): the report's frontier section and plot."""
  return {str(kv): report.frontier(
      payload['rows'], lambda s, k=str(kv): (c := s['by_kv'].get(k)) and (
          c['accuracy'], c['accuracy_std']), higher_is_better=True)
      for kv in payload['setup']['kv_pairs']}


# --- the report ----------------------------------------------------------------------------
def _setup_line(summary: dict, setup: dict) -> str:
  first = next(iter(summary.values()))
  m = first['model']
  return (f"{report.model_line(m)}, vocabulary {m['vocab_size']} (chance recall "
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


def summary_table(payload: dict) -> list[str]:
  summary, kvs = payload['rows'], [str(k) for k in payload['setup']['kv_pairs']]
  lines = []
  for _, s in report.by_cache(summary):
    cells = []
    for k in kvs:
      c = s['by_kv'].get(k)
      diverged = f"; {len(c['diverged'])} diverged" if c and c['diverged'] else ''
      cells.append('n/a' if c is None else
                   f"{c['accuracy']:.3f} ± {c['accuracy_std']:.3f} (lr {c['lr']:g}{diverged})")
    lines.append([s['mechanism'], *report.cache_cells(summary, s), *cells])
  return report.table(['mechanism', *report.CACHE_HEADER, *(f'recall, N={k}' for k in kvs)],
                      'll' + 'r' * (7 + len(kvs)), lines)


def per_seed_table(payload: dict) -> list[str]:
  summary, setup = payload['rows'], payload['setup']
  seeds = list(range(1, setup['seeds'] + 1))
  lines = []
  for _, s in report.by_cache(summary):
    for k in map(str, setup['kv_pairs']):
      c = s['by_kv'].get(k)
      if c is None:
        continue
      by_seed = dict(zip(c['seeds'], c['accuracies'], strict=True))
      lines.append([s['mechanism'], k, f"{c['lr']:g}", *(
          f'{by_seed[seed]:.3f}' if seed in by_seed else
          'diverged' if seed in c['diverged'] else 'n/a' for seed in seeds)])
  return report.table(['mechanism', 'N', 'lr', *(f'seed {seed}' for seed in seeds)],
                      'lrr' + 'r' * len(seeds), lines)


def sweep_lines(payload: dict) -> list[str]:
  summary, setup, table = payload['rows'], payload['setup'], payload['sweep']
  rates = [f'{lr:g}' for lr in setup['lrs']]
  lines = ([s['mechanism'], k, *report.rate_cells(table.get(row, {}).get(k, {}), rates,
                                                   s['by_kv'].get(k, {}).get('lr'), 3)]
           for row, s in report.by_cache(summary) for k in map(str, setup['kv_pairs']))
  return report.table(['mechanism', 'N', *(f'lr {lr}' for lr in rates)], 'lr' + 'r' * len(rates),
                      lines)


def comparisons_table(payload: dict) -> list[str]:
  return report.comparisons_table(payload['comparisons'], 'recall gap (1st − 2nd)', 3,
                                  (('N', 'kv_pairs'),))


def frontier_section(payload: dict) -> list[str]:
  """The Pareto-efficient rows by cache, and every row's cache and recall."""
  return report.frontier_lines(payload['frontier'], 'recall', lambda k: f'N = {k}', 3)


def render(payload: dict) -> str:
  summary, setup = payload['rows'], payload['setup']
  test_examples = next(iter(summary.values()))['test_examples']
  wall = (f"; the whole grid took {setup['full_wall_s'] / 60:.0f} minutes of wall time"
          if setup.get('full_wall_s') else '')
  lines = [
      '# Recall vs KV-cache size: multi-query associative recall (Zoology) per attention', '',
      report.header(setup),
      f'{_setup_line(summary, setup)}. Every row has the same width, depth, query heads, '
      'data (per seed) and schedule; only the attention differs, and the SwiGLU width d_ff '
      f"is set per row to match MHA's parameter count. {_protocol(setup)} Recall = "
      f'exact-match accuracy at the answer positions of {test_examples} test examples (a '
      'held-out stream, not the validation set that chose the rate), mean ± std (sample) over '
      'those seeds. A model that finds the N values in its context but not which key each '
      'belongs to recalls about 1/N: recall well above 1/N, not above chance, is the evidence '
      'of recall by association.', '', *summary_table(payload), '',
      report.exact_cache(summary) + f" {setup['runs_total']} runs, each on "
      f"one core, {setup['jobs']} at a time, {setup['cpu_s'] / 60:.0f} CPU minutes in "
      f'all{wall}.', '',
      '## Recall per seed', '',
      'Test recall of every reported run, at its row\'s chosen rate: a mean ± std of a few seeds '
      'hides whether every seed recalls a little or some recall fully and others not at all.',
      '', *per_seed_table(payload), '',
  ]
  if payload['sweep']:
    lines += ['## Learning-rate sweep (seed 0, validation recall; the chosen rate in bold)', '',
              *sweep_lines(payload), '']
  lines += ['## Which orderings are resolved', '',
            report.RESOLVED_NOTE.format('', 'recalls more'), '', *comparisons_table(payload)]
  if 'frontier' in payload:
    lines += ['', '## Frontier: test recall against cache bytes', '',
              *frontier_section(payload)]
  return '\n'.join(lines) + '\n'


def plot(payload: dict, path: pathlib.Path) -> None:
  summary, setup = payload['rows'], payload['setup']
  kvs = [str(k) for k in setup['kv_pairs']]
  fig, axes = report.pyplot().subplots(1, len(kvs), figsize=(max(7.5, 4.2 * len(kvs)), 5.2),
                                       sharey=True, squeeze=False)
  chance = 2 / next(iter(summary.values()))['model']['vocab_size']
  for ax, k in zip(axes[0], kvs, strict=True):
    report.cache_lines(ax, summary, lambda s, k=k: (c := s['by_kv'].get(k)) and (
        c['accuracy'], c['accuracy_std'], c['accuracies']), markersize=7)
    ax.axhline(chance, color='gray', linestyle=':', linewidth=1)
    ax.axhline(1 / int(k), color='gray', linestyle='--', linewidth=1)
    ax.set_title(f'N = {k} key-value pairs', fontsize=10)
    ax.set_xlabel('KV cache per token (elements; log scale)', fontsize=8)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel('test recall (exact match): mean ± std and each seed (dots)')
  axes[0][0].set_ylim(-0.03, 1.03)
  report.marker_legend(axes[0][0], summary)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=len(labels), fontsize=7)
  fig.suptitle(f"{'QUICK pipeline check: ' if setup['quick'] else ''}MQAR recall vs KV cache, "
               'parameters matched (dotted: chance; dashed: 1/N, the values without their keys)',
               fontsize=10)
  fig.text(0.5, 0.075, textwrap.fill(_setup_line(summary, setup), 120), ha='center',
           va='center', fontsize=7, color='gray')
  report.save(fig, path, rect=(0, 0.1, 1, 1))


def frontier_plot(payload: dict, path: pathlib.Path) -> None:
  """Test recall against cache bytes per token, a panel per N, the Pareto frontier ringed."""
  summary, setup = payload['rows'], payload['setup']
  kvs = list(payload['frontier'])
  fig, axes = report.pyplot().subplots(1, len(kvs), figsize=(max(7.5, 4.6 * len(kvs)), 5),
                                       sharey=True, squeeze=False)
  for ax, k in zip(axes[0], kvs, strict=True):
    report.frontier_axes(ax, summary, payload['frontier'][k])
    ax.axhline(1 / int(k), color='gray', linestyle='--', linewidth=1)
    ax.set_title(f'N = {k} key-value pairs', fontsize=10)
    ax.set_xlabel('KV cache per token (bytes, bfloat16, all layers; log scale)', fontsize=8)
  axes[0][0].set_ylabel('test recall (exact match), mean ± std over seeds')
  axes[0][0].set_ylim(-0.03, 1.1)  # room for the names above the highest points
  report.marker_legend(axes[0][0], summary)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='lower center', ncol=len(labels), fontsize=7)
  fig.suptitle(f"{'QUICK pipeline check: ' if setup['quick'] else ''}MQAR recall vs KV cache "
               'bytes: the Pareto frontier (ringed; dashed: 1/N)', fontsize=10)
  report.save(fig, path, rect=(0, 0.07, 1, 1))


if __name__ == '__main__':
  cli.run(lambda: sweep.main(RecallVsCache()))
