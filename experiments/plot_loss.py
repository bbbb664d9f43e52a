r"""Loss curves of training runs, from their metrics.jsonl, as one PNG.

  python -m experiments.plot_loss runs/mha runs/gqa runs/mqa runs/mla \
      --out=experiments/results/loss_curves.png

Needs matplotlib (the `dev` extra).
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--out', default='loss_curves.png')
  args = parser.parse_args()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for workdir in args.workdirs:
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
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
