r"""MHA / GQA converted to MLA (mla_jax.to_mla) against MLA trained from scratch, at equal cache.

  python -m experiments.to_mla --workdir=runs/to_mla              # the full run (see below)
  python -m experiments.to_mla --workdir=/tmp/to_mla --quick      # a pipeline check

Sources: configs/mha.py and configs/gqa.py at their defaults, trained into WORKDIR/mha and
WORKDIR/gqa unless already there (an interrupted one resumes). For each source and each cache
size 1/F of the source's (--fractions, default 2, 4, 8; SOURCE:F for one source only), with
d_r = the largest even number <= min(d_h / 2, cache / 4) and d_c = cache - d_r per layer:

  source     the source's validation perplexity; `exact`: its exact MLA embedding's (equal);
  2norm      converted with MHA2MLA's 2-norm pair selection and calibration statistics
             (--calibration_batches training batches), before and after fine-tuning;
  uniform    the same with evenly spaced pairs (the ordinary rope ladder), before and after;
  weights    2norm with statistics from the weights alone (no data), before fine-tuning;
  unit       2norm with the latent RMSNorm's scale left at 1, before fine-tuning;
  scratch    an MLA of the same config trained from scratch for the source's tokens plus the
             fine-tuning tokens (the same total), with the source's schedule.

Fine-tuning: python -m mla_jax.train --init_from on the conversion, configs/finetune.py's
schedule (peak lr 1e-3, warmup 2) for --finetune_fraction (5%) of the source's training tokens.

Every task is a worker process pinned to one core (experiments/runner.py) that writes
result.json last: a task with one is not redone, so an interrupted run resumes. The report
(to_mla.md / .json / .png) goes to --out (experiments/common.py); --report_only writes it
from the tasks finished so far, marked partial, and trains nothing.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import time

from absl import flags

from configs import finetune
from experiments import common, report, runner, to_mla_report
from mla_jax import cli, data, mla_conversion, perplexity, training, variants
from mla_jax import workdir as wd
from mla_jax.config import ModelConfig
from mla_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'where the runs live (one folder per task)')
flags.DEFINE_list('sources', ['mha', 'gqa'], 'source attentions (configs/<name>.py)')
flags.DEFINE_list('fractions', ['2', '4', '8'], 'cache sizes: 1/F of the source cache, for '
                  'every source (F) or one (SOURCE:F, e.g. gqa:2)')
flags.DEFINE_float('finetune_fraction', 0.05, "fine-tuning tokens as a fraction of the source's")
flags.DEFINE_integer('calibration_batches', 4, 'training batches for the conversion statistics')
flags.DEFINE_integer('jobs', 0, 'tasks at a time, one core each (0: one per available core)')
flags.DEFINE_string('data_files', '', 'a glob of text files instead of the Shakespeare corpus')
flags.DEFINE_bool('report_only', False, 'write the report from the tasks finished so far '
                  '(the others shown as -), training nothing')
flags.DEFINE_string('worker', None, 'internal: the task this process runs')
flags.mark_flag_as_required('workdir')

SOURCES = ('mha', 'gqa')  # configs/<name>.py
QUICK_STEPS = 40
# variant -> (rope_selection, calibrated statistics, latent_norm, fine-tuned)
VARIANTS = {'2norm': ('2norm', True, 'calibrated', True),
            'uniform': ('uniform', True, 'calibrated', True),
            'weights': ('2norm', False, 'calibrated', False),
            'unit': ('2norm', True, 'unit', False)}


# --- configs -----------------------------------------------------------------------------------
def source_config(name: str):
  config = common.load_config(name, 'tiny' if FLAGS.quick else '')
  if FLAGS.quick:
    config.train.update(steps=QUICK_STEPS, eval_every=10**9, checkpoint_every=20)
  if FLAGS.data_files:
    config.data.files = FLAGS.data_files
  return config


def finetune_steps(config) -> int:
  return max(1, round(FLAGS.finetune_fraction * config.train.steps))


def shape(cfg: ModelConfig, fraction: int) -> tuple[int, int]:
  """(d_c, d_r) of an MLA whose cache is 1/fraction of cfg's (per layer)."""
  cache = 2 * cfg.n_kv_heads * cfg.head_dim // fraction
  d_r = max(2, 2 * (min(cfg.head_dim // 2, cache // 4) // 2))
  return cache - d_r, d_r


def mla_model_section(name: str, fraction: int) -> dict:
  """The standard MLA a conversion at this cache makes (at the source's rope_theta)."""
  src = ModelConfig.from_dict(source_config(name).model)
  d_c, d_r = shape(src, fraction)
  fields = {**src.to_dict(), 'attention': 'mla', 'n_kv_heads': None, 'kv_lora_rank': d_c,
            'qk_rope_head_dim': d_r, 'qk_nope_head_dim': src.head_dim,
            'v_head_dim': src.head_dim}
  return ModelConfig.from_dict(fields).to_dict()


# --- tasks -------------------------------------------------------------------------------------
def path(*parts) -> pathlib.Path:
  return pathlib.Path(FLAGS.workdir).joinpath(*parts)


def scratch_folder(d_c: int, d_r: int) -> str:
  return f'scratch-c{d_c}-r{d_r}'


def grid() -> list[tuple[str, int]]:
  """(source, fraction) pairs from --sources and --fractions (F: every source; S:F: source S)."""
  pairs = []
  for item in FLAGS.fractions:
    source, _, fraction = item.rpartition(':')
    if not fraction.isdigit() or int(fraction) < 2 or (source and source not in FLAGS.sources):
      raise InputError(f'--fractions={item}: give F or SOURCE:F with F an integer >= 2 and '
                       f'SOURCE among --sources={FLAGS.sources}')
    pairs += [(s, int(fraction)) for s in ([source] if source else FLAGS.sources)]
  return [p for i, p in enumerate(pairs) if p not in pairs[:i]]


def tasks() -> list[runner.Task]:
  out = []
  shared = [f'--workdir={FLAGS.workdir}', f'--quick={FLAGS.quick}',
            f'--finetune_fraction={FLAGS.finetune_fraction}',
            f'--calibration_batches={FLAGS.calibration_batches}',
            f'--data_files={FLAGS.data_files}']

  def task(name, folder, after=()):
    out.append(runner.Task(name, ['experiments.to_mla', f'--worker={name}', *shared],
                           path(folder, 'log.txt'), path(folder, runner.RESULT), tuple(after)))

  for source in FLAGS.sources:
    task(f'{source}/source', source)
  shapes = set()  # the long trainings first: they need no source
  pairs = grid()
  for source, fraction in sorted(pairs, key=lambda p: p[1]):
    d_c, d_r = shape(ModelConfig.from_dict(source_config(source).model), fraction)
    if (d_c, d_r) not in shapes:  # one run per MLA: the sources' configs differ only there
      shapes.add((d_c, d_r))
      task(f'{source}/{fraction}/scratch', scratch_folder(d_c, d_r))
  for source in FLAGS.sources:
    task(f'{source}/exact', f'{source}-exact', [f'{source}/source'])
    for fraction in [f for s, f in pairs if s == source]:
      for variant in VARIANTS:
        task(f'{source}/{fraction}/{variant}', f'{source}-c{fraction}-{variant}',
             [f'{source}/source'])
  return out


def _cache(model, prompt) -> dict:
  elements, nbytes = runner.measure_decode_cache(model, prompt)
  return dict(cache_elements_formula=variants.cache_elements_per_token(model.cfg),
              cache_elements_measured=elements, cache_bytes_bf16_measured=nbytes)


def _evaluate(model, config, val) -> dict:
  e = config.eval
  start = time.perf_counter()
  result = perplexity.perplexity(model, val, e.seq_len, e.stride, e.batch_size)
  return {'loss': result['loss'], 'perplexity': result['perplexity'],
          'tokens': result['tokens'], 'eval_s': time.perf_counter() - start}


def _train(config, folder: pathlib.Path, init_from=None) -> dict:
  """Trains (or resumes) a run; -> its final validation (evaluated again if the run was
  already complete) and the training time of this invocation."""
  start = time.perf_counter()
  result = training.train_and_evaluate(config, str(folder), init_from=init_from)
  train_s = time.perf_counter() - start
  if not result:
    model, _ = wd.load_workdir(folder)
    result = perplexity.perplexity(model, data.load_splits(config.data)['val'],
                                  config.eval.seq_len, config.eval.stride,
                                  config.eval.batch_size)
  return {'loss': result['loss'], 'perplexity': result['perplexity'], 'train_s': train_s}


def _tokens(config) -> int:
  return config.train.steps * config.data.batch_size * config.data.seq_len


def run_task(name: str) -> None:
  """One task: trains, converts or fine-tunes its run, scores it, measures its cache; its
  result.json last."""
  source, *rest = name.split('/')
  config = source_config(source)
  val = data.load_splits(config.data)['val']
  kind, fraction = (rest[0], 1) if len(rest) == 1 else (rest[1], int(rest[0]))
  result = dict(task=name, source=source, kind=kind, fraction=fraction)
  if kind == 'source':
    folder = trained = path(source)
    result.update(after=_train(config, folder), train_tokens=_tokens(config))
  elif kind == 'exact':
    folder = path(f'{source}-exact')
    trained = _convert(folder / 'converted', path(source))
  else:
    d_c, d_r = shape(ModelConfig.from_dict(config.model), fraction)
    if kind == 'scratch':
      folder = trained = path(scratch_folder(d_c, d_r))
      config.model.update(mla_model_section(source, fraction))
      config.train.steps += finetune_steps(config)  # the source's tokens + the fine-tuning ones
      result.update(after=_train(config, folder), train_tokens=_tokens(config))
    else:
      folder = path(f'{source}-c{fraction}-{kind}')
      selection, calibrated, latent_norm, tuned = VARIANTS[kind]
      batches = FLAGS.calibration_batches if calibrated else 0
      start = time.perf_counter()
      trained = _convert(folder / 'converted', path(source), d_c, d_r, selection, batches,
                         latent_norm)
      result.update(rope_selection=selection, calibration_batches=batches,
                    latent_norm=latent_norm, convert_s=time.perf_counter() - start)
      if tuned:
        result.update(_finetune(trained, folder / 'finetuned', finetune_steps(config)))
  model, cfg = wd.load_workdir(trained)
  if 'after' not in result:  # a conversion that is not fine-tuned: scored as it comes out
    result['before'] = _evaluate(model, config, val)
  runner.write_result(folder, dict(result, model=cfg.to_dict(), **_cache(model, val[:64])))


def _finetune(converted: pathlib.Path, folder: pathlib.Path, steps: int) -> dict:
  """A conversion fine-tuned (--init_from) for `steps`: its validation before (the run's
  step-0 evaluation) and after, and the tokens it trained on."""
  ft = finetune.get_config(str(converted))
  ft.opt.warmup_steps = min(ft.opt.warmup_steps, steps - 1)
  ft.train.update(steps=steps, eval_every=10**9, checkpoint_every=steps, log_every=1)
  after = _train(ft, folder, init_from=str(converted))
  rows = [json.loads(line) for line in (folder / 'metrics.jsonl').open()]
  first = next(r for r in rows if r['step'] == 0 and 'val_loss' in r)
  return dict(after=after, finetune_tokens=_tokens(ft),
              before={'loss': first['val_loss'], 'perplexity': first['val_perplexity']})


def _convert(out: pathlib.Path, source: pathlib.Path, *args) -> pathlib.Path:
  """A conversion into `out`, redone from scratch if a previous attempt left it unfinished."""
  if out.exists() and not (out / 'checkpoints' / '0').exists():
    shutil.rmtree(out)
  if not out.exists():
    mla_conversion.to_mla_workdir(source, out, *args)
  return out


# --- main --------------------------------------------------------------------------------------
def main():
  if FLAGS.worker:
    runner.share_compilations(FLAGS.workdir)
    return run_task(FLAGS.worker)
  unknown = sorted(set(FLAGS.sources) - set(SOURCES))
  if unknown or not 0 < FLAGS.finetune_fraction <= 1:
    raise InputError(f'--sources must be among {SOURCES} (unknown: {unknown}), '
                     f'--finetune_fraction in (0, 1]')
  for source, fraction in grid():  # a cache too small to split is refused before anything runs
    mla_model_section(source, fraction)
  start = time.perf_counter()
  all_tasks = tasks()
  todo = [t for t in all_tasks if not t.done.exists()]
  print(f'{len(all_tasks) - len(todo)} of {len(all_tasks)} tasks already finished in '
        f"{FLAGS.workdir}; {'reporting those' if FLAGS.report_only else f'running {len(todo)}'}",
        flush=True)
  if FLAGS.report_only:
    finished = [t for t in all_tasks if t.done.exists()]
  else:
    runner.run_tasks(all_tasks, FLAGS.jobs)
    finished = all_tasks
  results = [json.loads(t.done.read_text()) for t in finished]
  out = common.out_dir(to_mla_report.NAME, FLAGS.workdir)
  wall_s = time.perf_counter() - start
  grid_setup = dict(quick=FLAGS.quick, sources=FLAGS.sources, fractions=grid(),
                    data=FLAGS.data_files or 'shakespeare',
                    finetune_fraction=FLAGS.finetune_fraction,
                    calibration_batches=FLAGS.calibration_batches)
  setup = common.setup(**grid_setup, jobs=FLAGS.jobs or len(common.available_cores()),
                       wall_s=wall_s, tasks_run=0 if FLAGS.report_only else len(todo),
                       tasks_finished=len(finished), tasks_total=len(all_tasks),
                       full_wall_s=runner.full_wall_s(
                           out / f'{to_mla_report.NAME}.json', wall_s,
                           len(todo) == len(all_tasks) and not FLAGS.report_only, grid_setup))
  report.write(out, to_mla_report.NAME, dict(setup=setup, results=results),
               to_mla_report.render, to_mla_report.plot)


if __name__ == '__main__':
  cli.run(main)
