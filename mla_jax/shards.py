"""Pre-tokenized corpora larger than memory: a folder of shard files and manifest.json
(docs/design.md#7-training). `python -m mla_jax.tokenize` writes one; `data.load_splits`
reads one when data.files names its folder.

Format. The corpus's documents, in a fixed order, are encoded and concatenated into one token
stream, cut into shards of exactly shard_tokens tokens (the last one shorter): raw
little-endian uint16 when the vocabulary fits in 65,536 ids, else uint32, no header. The
validation split is the last whole documents (the rule of data.text_file_splits, counted in
tokens: documents are held out from the end until val_fraction of the tokens, at least one
document each side; a single document holds out its tail), so the byte tokenizer gives the
ids the text path does. A split is a list of ranges of shards ({file, start, tokens}): the one
shard that holds the boundary is read by both splits, each its own range, and no shard is ever
copied or rewritten. manifest.json records the format version, dtype, vocab_size, the
tokenizer's description and digest, what the corpus was made from (its `identity`), every
shard with its token count and sha256, and the documents and tokens of each split.

Why a memmap, not ArrayRecord or another record format: training draws windows at random
positions that are a pure function of (seed, step) (data.WindowSampler), and every window is a
slice of the flat token stream that may cross document and shard boundaries. A memmap of raw
tokens gives that slice in O(1) (an offset into a file the page cache serves), with no
per-record framing, decoding or index to keep; records would cut the stream where the
sampler must not see cuts.

Kill safety and resume. Each shard is written under a temporary name and renamed into place
when complete; then its documents' token counts (a hidden sidecar) and progress.json (the
shards done and, for each, the documents consumed and how far into the next one it reached)
are each written whole and renamed. manifest.json is written last, by a rename, so a reader
never takes a half-written corpus. A rerun of the same command resumes after the last
recorded shard (re-encoding the one document it cut) and ends with the same bytes as a run
never killed. Another input, tokenizer or setting into an existing folder is refused, nothing
touched. Every file is fsynced before its rename, and the folder after it: a power loss leaves
the state a kill would.

ShardedTokens reads a split as a virtual concatenation of memmapped ranges, indexed like the
in-memory array. Opening checks every shard's size against the manifest (cheap); sha256 is
checked with verify=True (the tokenize command's last step), not at every open: it reads
every byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil

import numpy as np

from mla_jax import files
from mla_jax.errors import Error

FORMAT = 'mla_jax.shards'
VERSION = 1
MANIFEST = 'manifest.json'
PROGRESS = 'progress.json'
DTYPES = {'uint16': np.dtype('<u2'), 'uint32': np.dtype('<u4')}


class ShardError(Error):
  """A tokenized corpus that cannot be written or read; the message names the file and fix."""


def dtype_for(vocab_size: int) -> str:
  if vocab_size <= 2**16:
    return 'uint16'
  if vocab_size <= 2**32:
    return 'uint32'
  raise ShardError(f'a vocabulary of {vocab_size:,} ids does not fit in uint32; use a '
                   'tokenizer of at most 2**32 ids')


def shard_name(index: int) -> str:
  return f'shard-{index:05d}.bin'


def _sidecar(index: int) -> str:
  return f'.shard-{index:05d}.docs.npy'


def fault(phase: str) -> None:
  """MLA_JAX_FAULT=<phase> kills the writer at <phase>, for the kill tests (files.fault):
  'shard:<i>:written' (shard i renamed into place, not yet in progress.json),
  'shard:<i>:recorded' (in progress.json) and 'manifest' (manifest.json written, leftovers not
  yet removed)."""
  files.fault(phase)


def write_whole(path: pathlib.Path, payload: bytes) -> None:
  """files.write_whole: a reader sees the old file or the new one; a killed writer's temporary
  file is removed when the corpus is finished (_remove_leftovers)."""
  files.write_whole(path, payload, ShardError)


def _json(value) -> bytes:
  return (json.dumps(value, indent=1, sort_keys=True) + '\n').encode()


def validation_documents(lengths: np.ndarray, val_fraction: float) -> int:
  """How many documents, from the end, are held out: data.text_file_splits's rule in tokens
  (at least one, and never all)."""
  total, held, n_val = int(lengths.sum()), int(lengths[-1]), 1
  while n_val < len(lengths) - 1 and held < val_fraction * total:
    n_val += 1
    held += int(lengths[-n_val])
  return n_val


class Writer:
  """Appends documents' tokens to a folder of shards; finish() writes the manifest.

  identity: everything the shards depend on (input, tokenizer, settings); a folder holding
  another identity's progress or manifest is refused. resume_point() says where the input
  resumes: (documents consumed, tokens of the next document already written).
  """

  def __init__(self, out, identity: dict, dtype: str, shard_tokens: int):
    self.out, self.identity = pathlib.Path(out), identity
    self.dtype, self.shard_tokens = DTYPES[dtype], shard_tokens
    self.created = False
    self.complete = self._check_existing()
    self.records = [] if self.complete else self._read_progress()
    self.start_records = len(self.records)
    last = self.records[-1] if self.records else {'documents_done': 0, 'doc_offset': 0}
    self.docs_done, self.offset = last['documents_done'], last['doc_offset']
    self.file, self.count, self.hash, self.lengths = None, 0, None, []

  # --- opening ---------------------------------------------------------------------------
  def _read(self, name: str) -> dict | None:
    path = self.out / name
    if not path.exists():
      return None
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise ShardError(f'{path} cannot be read ({e}); give a new --out') from None

  def _refuse_other(self, recorded: dict, what: str) -> None:
    if recorded.get('identity') != self.identity:
      old, new = recorded.get('identity') or {}, self.identity
      diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
      why = (' (files are known by path, size and modification time: a moved, copied or '
             'touched corpus is another input)') if 'input_sha256' in diff else ''
      raise ShardError(f'--out={self.out} holds {what} of another input or tokenizer (differs '
                       f'in {", ".join(diff) or "format"}{why}); give a new --out (nothing was '
                       'touched)')

  def _check_existing(self) -> bool:
    """True if the folder holds this identity's finished corpus; refuses a foreign one."""
    if self.out.exists() and not self.out.is_dir():
      raise ShardError(f'--out={self.out} is a file; give a folder')
    manifest = self._read(MANIFEST)
    if manifest is not None:
      self._refuse_other(manifest, 'a tokenized corpus')
      return True
    progress = self._read(PROGRESS)
    if progress is not None:
      self._refuse_other(progress, 'a partly tokenized corpus')
    elif self.out.exists() and any(self.out.iterdir()):
      raise ShardError(f'--out={self.out} holds files that are not a tokenized corpus; give '
                       'a new or empty folder (nothing was touched)')
    return False

  def _read_progress(self) -> list[dict]:
    progress = self._read(PROGRESS)
    if progress is not None:
      return progress['shards']
    self.created = not self.out.exists()
    try:
      self.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise ShardError(f'cannot create --out={self.out} ({e.strerror}); give a writable '
                       'folder') from None
    self._write_progress([])  # from here on the folder is recognisably this run's
    return []

  def _write_progress(self, records: list[dict]) -> None:
    write_whole(self.out / PROGRESS, _json({'identity': self.identity, 'shards': records}))

  def resume_point(self) -> tuple[int, int]:
    return self.docs_done, self.offset

  # --- writing ---------------------------------------------------------------------------
  def add(self, tokens: np.ndarray, skip: int = 0) -> None:
    """One document's tokens (all of them: the first `skip` are already in a shard)."""
    n, pos = len(tokens), skip
    while True:
      take = min(n - pos, self.shard_tokens - self.count)
      if take:
        self._write(tokens[pos:pos + take])
        pos += take
      if pos == n:
        self.lengths.append(n)
        self.docs_done += 1
        if self.count == self.shard_tokens:
          self._close(0)
        return
      self._close(pos)  # the shard is full inside this document

  def _write(self, tokens: np.ndarray) -> None:
    if self.file is None:
      tmp = self.out / f'.{shard_name(len(self.records))}.tmp'
      self.file, self.hash = open(tmp, 'wb'), hashlib.sha256()  # noqa: SIM115 (closed in _close)
    data = np.ascontiguousarray(tokens, self.dtype).tobytes()
    self.file.write(data)
    self.hash.update(data)
    self.count += len(tokens)

  def _close(self, offset: int) -> None:
    """The open shard complete: renamed into place, its documents and progress recorded."""
    index = len(self.records)
    tmp = pathlib.Path(self.file.name)
    self.file.flush()
    os.fsync(self.file.fileno())
    self.file.close()
    files.replace_durably(tmp, self.out / shard_name(index))
    fault(f'shard:{index}:written')
    write_whole(self.out / _sidecar(index), _npy(np.asarray(self.lengths, np.int64)))
    self.records.append({'file': shard_name(index), 'tokens': self.count,
                         'sha256': self.hash.hexdigest(), 'documents_done': self.docs_done,
                         'doc_offset': offset})
    self._write_progress(self.records)
    fault(f'shard:{index}:recorded')
    self.file, self.count, self.hash, self.lengths = None, 0, None, []

  def rollback(self) -> None:
    """Undoes what this process wrote (bad input found midway): a folder it created is
    removed, else the shards it added are, and progress.json is put back."""
    if self.file is not None:
      self.file.close()
    if self.created:
      shutil.rmtree(self.out, ignore_errors=True)
      return
    for record in self.records[self.start_records:]:
      index = int(record['file'][6:11])
      for name in (record['file'], _sidecar(index)):
        with contextlib.suppress(OSError):
          (self.out / name).unlink()
    self._write_progress(self.records[:self.start_records])
    _remove_leftovers(self.out)

  def finish(self, val_fraction: float, header: dict) -> dict:
    """Closes the last shard, splits the documents and writes manifest.json (last)."""
    if self.count:
      self._close(0)
    lengths = np.concatenate([np.load(self.out / _sidecar(i)) for i in range(len(self.records))]
                             + [np.asarray(self.lengths, np.int64)])
    total = int(lengths.sum())
    if total == 0 or len(lengths) == 0:
      raise ShardError('the corpus is empty (no tokens in any document); give files that '
                       'hold text')
    counts = [r['tokens'] for r in self.records]
    assert sum(counts) == total, (sum(counts), total)
    if len(lengths) == 1:  # one document: its tail, as data.text_file_splits does
      n_val, boundary = 1, int(total * (1 - val_fraction))
    else:
      n_val = validation_documents(lengths, val_fraction)
      boundary = int(lengths[:-n_val].sum())
    if not 0 < boundary < total:
      raise ShardError(f'the corpus cannot be split: {total} tokens in {len(lengths)} '
                       f'documents leave the {"train" if boundary == 0 else "val"} split '
                       'empty; add text or change --val_fraction')
    shards = [{k: r[k] for k in ('file', 'tokens', 'sha256')} for r in self.records]
    splits, first = {}, 0
    for split, (lo, hi) in {'train': (0, boundary), 'val': (boundary, total)}.items():
      pieces, first = [], 0
      for shard in shards:
        a, b = max(lo, first), min(hi, first + shard['tokens'])
        if a < b:
          pieces.append({'file': shard['file'], 'start': a - first, 'tokens': b - a,
                         'sha256': shard['sha256']})
        first += shard['tokens']
      docs = len(lengths) - n_val if split == 'train' else n_val
      splits[split] = {'documents': max(docs, 1), 'tokens': hi - lo, 'shards': pieces}
    manifest = {'format': FORMAT, 'version': VERSION, 'dtype': self.dtype.name,
                'identity': self.identity, **header, 'shards': shards, 'splits': splits,
                'documents': len(lengths), 'tokens': total}
    write_whole(self.out / MANIFEST, _json(manifest))
    fault('manifest')
    self.cleanup()
    return manifest

  def cleanup(self) -> None:
    """Leftovers of the writing (progress, sidecars, temporary files) once the manifest is."""
    with contextlib.suppress(OSError):
      (self.out / PROGRESS).unlink()
    for path in self.out.glob('.shard-*.docs.npy'):
      path.unlink()
    _remove_leftovers(self.out)


def _npy(array: np.ndarray) -> bytes:
  import io

  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def _remove_leftovers(folder: pathlib.Path) -> None:
  for path in folder.glob('.*.tmp'):
    with contextlib.suppress(OSError):
      path.unlink()


# --- reading -------------------------------------------------------------------------------
def read_manifest(folder) -> dict:
  folder = pathlib.Path(folder)
  path = folder / MANIFEST
  rerun = f'rerun `python -m mla_jax.tokenize ... --out={folder}`'
  if not path.is_file():
    partly = ' (progress.json: its tokenize run did not finish)' if (
        folder / PROGRESS).exists() else ''
    raise ShardError(f'{path} is missing{partly}; {rerun} to finish or make it')
  try:
    manifest = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ShardError(f'{path} cannot be parsed ({e}); {rerun} into a new folder') from None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise ShardError(f'{path} is not a tokenized corpus manifest; {rerun}')
  if manifest.get('version') != VERSION:
    raise ShardError(f'{path} has format version {manifest.get("version")!r}, this mla_jax '
                     f'reads {VERSION}; {rerun} into a new folder')
  try:
    dtype, vocab = manifest['dtype'], manifest['vocab_size']
    if dtype not in DTYPES or dtype_for(vocab) != dtype:
      raise ShardError(f'{path} says dtype {dtype!r} for vocab_size {vocab}, which needs '
                       f'{dtype_for(vocab)}; {rerun} into a new folder')
    for split in ('train', 'val'):
      pieces = manifest['splits'][split]['shards']
      if sum(p['tokens'] for p in pieces) != manifest['splits'][split]['tokens'] or not pieces:
        raise ShardError(f'{path}: the {split} split\'s token count does not match its shards; '
                         f'{rerun} into a new folder')
  except (KeyError, TypeError) as e:
    raise ShardError(f'{path} lacks {e} or has the wrong type; {rerun} into a new folder') \
        from None
  return manifest


class ShardedTokens:
  """A split of a tokenized corpus: a read-only virtual concatenation of memmapped shard
  ranges, with len() and numpy indexing (an int, a slice, an integer array of any shape)
  returning what the concatenated array would. Windows may cross shards."""

  def __init__(self, folder, split: str = 'train', verify: bool = False,
               manifest: dict | None = None):
    folder = pathlib.Path(folder)
    manifest = manifest or read_manifest(folder)
    self.folder, self.split, self.manifest = folder, split, manifest
    self.dtype = DTYPES[manifest['dtype']]
    self.vocab_size = manifest['vocab_size']
    sizes = {s['file']: s['tokens'] for s in manifest['shards']}
    self.pieces, starts = [], [0]
    maps = {}
    for piece in manifest['splits'][split]['shards']:
      name = piece['file']
      path = folder / name
      if name not in sizes or '/' in name:
        raise ShardError(f'{folder / MANIFEST} lists {name!r} in {split} but not among its '
                         'shards; rerun tokenize into a new folder')
      if name not in maps:
        maps[name] = self._open(path, sizes[name], verify and next(
            s['sha256'] for s in manifest['shards'] if s['file'] == name))
      if piece['start'] < 0 or piece['start'] + piece['tokens'] > sizes[name]:
        raise ShardError(f'{folder / MANIFEST}: {split} reads past the end of {name}; rerun '
                         'tokenize into a new folder')
      self.pieces.append(maps[name][piece['start']:piece['start'] + piece['tokens']])
      starts.append(starts[-1] + piece['tokens'])
    self.starts = np.asarray(starts, np.int64)  # piece p holds [starts[p], starts[p + 1])
    self.length = int(starts[-1])

  def _open(self, path: pathlib.Path, tokens: int, sha256: str | bool) -> np.memmap:
    check_shard(path, tokens, self.dtype, sha256)
    return np.memmap(path, self.dtype, mode='r', shape=(tokens,))

  def __len__(self) -> int:
    return self.length

  @property
  def shape(self) -> tuple[int]:
    return (self.length,)

  def __array__(self, dtype=None, copy=None):
    """The whole split in memory (for small corpora and tests; training never asks)."""
    out = self[0:self.length]
    return out if dtype is None else out.astype(dtype)

  def __getitem__(self, key):
    if isinstance(key, slice):
      start, stop, step = key.indices(self.length)
      if step != 1:
        return self[np.arange(start, stop, step)]
      return self._range(start, max(stop, start))
    if isinstance(key, (int, np.integer)):
      index = int(key) + (self.length if key < 0 else 0)
      if not 0 <= index < self.length:
        raise IndexError(f'index {key} is out of bounds for {self.length} tokens')
      return self._range(index, index + 1)[0]
    index = np.asarray(key)
    if not np.issubdtype(index.dtype, np.integer):
      raise IndexError(f'ShardedTokens takes ints, slices and integer arrays, not {index.dtype}')
    flat = index.reshape(-1).astype(np.int64)
    flat = np.where(flat < 0, flat + self.length, flat)
    if flat.size and (flat.min() < 0 or flat.max() >= self.length):
      raise IndexError(f'an index is out of bounds for {self.length} tokens')
    piece = np.searchsorted(self.starts, flat, side='right') - 1
    out = np.empty(flat.shape, self.dtype)
    first, last = (piece.min(), piece.max()) if flat.size else (0, -1)
    if first == last:  # every index in one shard: the common case, one gather
      out[:] = self.pieces[first][flat - self.starts[first]]
    else:
      for p in range(first, last + 1):
        mask = piece == p
        if mask.any():
          out[mask] = self.pieces[p][flat[mask] - self.starts[p]]
    return out.reshape(index.shape)

  def _range(self, start: int, stop: int) -> np.ndarray:
    """tokens[start:stop], copied out of the shards it spans."""
    out = np.empty(stop - start, self.dtype)
    p = int(np.searchsorted(self.starts, start, side='right') - 1)
    at = start
    while at < stop:
      end = min(stop, int(self.starts[p + 1]))
      out[at - start:end - start] = self.pieces[p][at - self.starts[p]:end - self.starts[p]]
      at, p = end, p + 1
    return out

  def check_vocab(self, vocab_size: int) -> None:
    """Refuses a corpus whose tokenizer has more ids than the model (its manifest says so: no
    pass over the tokens)."""
    if self.vocab_size > vocab_size:
      raise ShardError(f'{self.folder} was tokenized with {self.vocab_size:,} ids but '
                       f'model.vocab_size={vocab_size:,}; raise model.vocab_size to at least '
                       f'{self.vocab_size:,} or tokenize with a smaller vocabulary')


def check_shard(path: pathlib.Path, tokens: int, dtype: np.dtype, sha256: str | bool) -> None:
  """Refuses a shard that is missing or of the wrong size, and with sha256 given one whose
  bytes differ (read in chunks: no mapping, so a process whose address space is capped can
  check a corpus larger than the cap)."""
  if not path.is_file():
    raise ShardError(f'{path} is missing (listed in {MANIFEST}); rerun tokenize into a new '
                     'folder, or restore the file')
  size, want = path.stat().st_size, tokens * dtype.itemsize
  if size != want:
    raise ShardError(f'{path} has {size:,} bytes but {MANIFEST} lists {tokens:,} '
                     f'{dtype.name} tokens ({want:,} bytes): truncated, or not this '
                     "manifest's shard; rerun tokenize into a new folder")
  if sha256:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
      while chunk := f.read(1 << 24):
        digest.update(chunk)
    if digest.hexdigest() != sha256:
      raise ShardError(f"{path}'s sha256 differs from {MANIFEST}'s: the shard is damaged; "
                       'rerun tokenize into a new folder')


def verify(folder) -> dict:
  """The manifest, after every shard's size and sha256 is checked against it."""
  folder = pathlib.Path(folder)
  manifest = read_manifest(folder)
  for shard in manifest['shards']:
    check_shard(folder / shard['file'], shard['tokens'], DTYPES[manifest['dtype']],
                shard['sha256'])
  return manifest


def open_splits(folder, verify: bool = False) -> dict[str, ShardedTokens]:
  """{'train', 'val'} of a tokenized corpus folder, read through memmaps."""
  manifest = read_manifest(folder)
  return {split: ShardedTokens(folder, split, verify, manifest) for split in ('train', 'val')}


def is_corpus(path: str) -> bool:
  """A folder tokenize wrote (finished or not): data.files names it to read its shards."""
  folder = pathlib.Path(os.path.expanduser(path))
  return folder.is_dir() and ((folder / MANIFEST).exists() or (folder / PROGRESS).exists())
