r"""Loss curves of training runs, from their metrics.jsonl, as one PNG (loss_curves.png in --out,
default experiments/results/plot_loss/).

  python -m experiments.plot_loss --workdirs=runs/mha,runs/gqa,runs/mqa,runs/mla

Needs matplotlib (the `dev` extra).
"""

import json
import pathlib

from absl import flags

from experiments import common, report
from mla_jax import cli
from mla_jax.errors import InputError

FLAGS = flags.FLAGS
flags.DEFINE_list('workdirs', None, 'the training runs to plot')
flags.mark_flag_as_required('workdirs')


def main():
  missing = [w for w in FLAGS.workdirs if not (pathlib.Path(w) / 'metrics.jsonl').is_file()]
  if missing or not FLAGS.workdirs:
    raise InputError(f'--workdirs={",".join(FLAGS.workdirs)}: give training runs, each with a '
                     f'metrics.jsonl (none in {missing})')
  fig, ax = report.pyplot().subplots(figsize=(7, 4.5))
  for workdir in FLAGS.workdirs:
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').open()]
    train = [(r['step'], r['loss']) for r in rows if 'loss' in r]
    val = [(r['step'], r['val_loss']) for r in rows if 'val_loss' in r]
    line, = ax.plot(*zip(*train, strict=True), label=f'{pathlib.Path(workdir).name} train')
    if val:
      ax.plot(*zip(*val, strict=True), 'o', color=line.get_color(),
              label=f'{pathlib.Path(workdir).name} validation')
  ax.set_xlabel('optimizer step (8,192 byte tokens each)')
  ax.set_ylabel('cross-entropy (nats per byte)')
  ax.set_title('Byte-level Shakespeare, default config, 2-core CPU')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  out = common.out_dir('plot_loss')
  out.mkdir(parents=True, exist_ok=True)
  report.save(fig, out / 'loss_curves.png')
  print(f"wrote {out / 'loss_curves.png'}")


if __name__ == '__main__':
  cli.run(main)
