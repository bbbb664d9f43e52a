r"""Tokenizes a corpus into shards that training reads through memmaps (mla_jax.shards).

  python -m mla_jax.tokenize --files='corpus/**/*.txt' --tokenizer=byte --out=corpus_tok
  python -m mla_jax.tokenize --files='data/*.jsonl' --tokenizer=tokenizer.json --out=tok \
      --text_field=text --val_fraction=0.05
  python -m mla_jax.train --config=configs/mla.py --workdir=runs/mine \
      --config.data.files=corpus_tok --config.model.vocab_size=32000

A .jsonl file holds one document per line (the string at --text_field); any other file is one
document. Files are taken in sorted order, lines in file order. Encoding runs on every core
(batches of documents over a process pool, the order kept), with progress and an ETA on stderr.
Killed, the same command resumes after the last finished shard and ends with the same bytes as
a run never stopped. Bad input is one line, exit 1, and nothing written.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import multiprocessing
import os
import pathlib
import sys
import time

import numpy as np
from absl import flags

from mla_jax import cli, shards, tokenizer
from mla_jax.shards import ShardError

FLAGS = flags.FLAGS
flags.DEFINE_string('files', None, "a glob of the corpus's files (** recurses): .jsonl files "
                    'hold a document per line, any other file is one document')
flags.DEFINE_string('tokenizer', 'byte', "'byte' (UTF-8 bytes, 256 ids) or a Hugging Face "
                    'tokenizer.json')
flags.DEFINE_string('out', None, 'the folder of shards and manifest.json (made, or resumed)')
flags.DEFINE_string('text_field', 'text', "the field of a .jsonl line that holds its text")
flags.DEFINE_float('val_fraction', 0.1, 'the share of tokens held out for validation, as whole '
                   'documents from the end')
flags.DEFINE_integer('shard_tokens', 2**26, 'tokens per shard (128 MiB of uint16)',
                     lower_bound=1)
flags.DEFINE_integer('workers', None, 'encoding processes (default: the cores this process may '
                     'use)', lower_bound=1)
flags.mark_flags_as_required(['files', 'out'])

BATCH_BYTES = 1 << 20  # text per task sent to a worker: small enough to bound memory in flight


def _encoder(spec: str):
  """The tokenizer named by --tokenizer (mla_jax.tokenizer): (encode_batch, vocab_size, digest,
  description), where encode_batch maps a list of UTF-8 documents (bytes) to id arrays."""
  if tokenizer.trained_size(spec) is not None:
    raise ShardError(f"--tokenizer={spec}: a corpus is tokenized with a tokenizer.json (train "
                     "one on it with a run's data.tokenizer='train:N', then pass the run's "
                     'tokenizer.json), or byte')
  tok = tokenizer.ByteTokenizer() if spec == tokenizer.BYTE else tokenizer.HFTokenizer.from_path(
      spec)

  def encode_batch(docs):
    if tok.kind == tokenizer.BYTE:
      return [np.frombuffer(doc, np.uint8) for doc in docs]
    return tok.encode_batch([doc.decode('utf-8') for doc in docs])

  description = 'byte: UTF-8 bytes' if tok.kind == tokenizer.BYTE else f'tokenizer.json {spec}'
  return encode_batch, tok.vocab_size, tokenizer.digest(tok), description


# --- the input: files, then documents ------------------------------------------------------
def input_files(pattern: str) -> list[pathlib.Path]:
  """The files of --files, sorted; refuses a glob with none and a file it cannot read."""
  matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  files = [pathlib.Path(f) for f in matches if os.path.isfile(f)]
  if not files:
    raise ShardError(f"no files match --files={pattern!r}; give a glob of text or .jsonl "
                     "files, e.g. --files='corpus/**/*.txt'")
  for file in files:
    try:
      with open(file, 'rb'):
        pass
    except OSError as e:
      raise ShardError(f'cannot read {file} ({e.strerror}); make it readable or leave it '
                       'out of --files') from None
  if not any(f.stat().st_size for f in files):
    raise ShardError(f'the corpus is empty: the {len(files)} files of --files={pattern!r} '
                     'hold no bytes; give files that hold text')
  return files


def identity(files: list[pathlib.Path], digest: str) -> dict:
  """What the shards depend on. Files are known by path, size and mtime (a rerun must not
  read the corpus twice to learn it is the same one): a file edited since is another input."""
  h = hashlib.sha256()
  for f in files:
    st = f.stat()
    h.update(f'{f}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return {'input_sha256': h.hexdigest(), 'files': len(files), 'tokenizer_digest': digest,
          'text_field': FLAGS.text_field, 'val_fraction': FLAGS.val_fraction,
          'shard_tokens': FLAGS.shard_tokens}


def documents(files, skip: int):
  """(where, raw bytes, is_jsonl, size) per document after the first `skip`; size: the input
  bytes it stands for (progress)."""
  index = 0
  for file in files:
    if file.suffix != '.jsonl':
      if index >= skip:
        yield str(file), _read(file), False, file.stat().st_size
      index += 1
      continue
    with _open(file) as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue  # a blank line (the last newline's) is no document
        if index >= skip:
          yield f'{file}:{number}', line, True, len(line)
        index += 1


def _read(file):
  try:
    return file.read_bytes()
  except OSError as e:
    raise ShardError(f'cannot read {file} ({e.strerror}); make it readable') from None


def _open(file):
  try:
    return open(file, 'rb')
  except OSError as e:
    raise ShardError(f'cannot read {file} ({e.strerror}); make it readable') from None


# --- encoding, in worker processes -----------------------------------------------------------
_ENCODE = None


def _init_worker(spec: str) -> None:
  global _ENCODE
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'  # one core per process: the pool is the fan-out
  _ENCODE = _encoder(spec)[0]


def _text(where: str, raw: bytes, is_jsonl: bool, field: str) -> bytes:
  if not is_jsonl:
    return raw
  try:
    record = json.loads(raw)
  except ValueError as e:
    raise ShardError(f'{where} is not a JSON line ({e}); fix the line or leave the file out') \
        from None
  if not isinstance(record, dict) or not isinstance(record.get(field), str):
    raise ShardError(f'{where} has no string field {field!r}; give the field that holds the '
                     'text with --text_field')
  return record[field].encode('utf-8', errors='surrogatepass')


def encode(batch, field: str) -> list[np.ndarray]:
  """A batch of documents' ids (the worker's task)."""
  docs = [_text(where, raw, is_jsonl, field) for where, raw, is_jsonl, _ in batch]
  try:
    return _ENCODE(docs)
  except UnicodeDecodeError:
    for (where, *_), doc in zip(batch, docs, strict=True):
      try:
        doc.decode('utf-8')
      except UnicodeDecodeError as e:
        raise ShardError(f'{where} is not UTF-8 text ({e.reason} at byte {e.start}); '
                         'convert it or leave it out') from None
    raise


def batches(docs):
  batch, size = [], 0
  for doc in docs:
    batch.append(doc)
    size += len(doc[1])
    if size >= BATCH_BYTES:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


class Progress:
  """Input bytes done, the rate and an ETA on stderr: a line rewritten in place on a
  terminal, a line every 10 s in a log."""

  def __init__(self, total: int, done: int):
    self.total, self.done, self.start_done = total, done, done
    self.start = self.last = time.perf_counter()
    self.tty = sys.stderr.isatty()

  def add(self, n: int, shards_done: int, force: bool = False) -> None:
    self.done += n
    now = time.perf_counter()
    if not force and now - self.last < (1 if self.tty else 10):
      return
    self.last = now
    rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
    eta = (self.total - self.done) / rate if rate else float('inf')
    line = (f'tokenize: {self.done / 1e6:,.1f} / {self.total / 1e6:,.1f} MB, {rate / 1e6:.2f} '
            f'MB/s, {shards_done} shards, ETA {eta:,.0f} s')
    print(('\r' + line) if self.tty else line, end='' if self.tty else '\n', file=sys.stderr,
          flush=True)


def run(files, spec: str, out: str) -> dict:
  """Tokenizes files into out (or resumes); returns the manifest."""
  _, vocab_size, digest, description = _encoder(spec)  # a bad tokenizer: refused before --out
  dtype = shards.dtype_for(vocab_size)
  if not 0 < FLAGS.val_fraction < 1:
    raise ShardError(f'--val_fraction={FLAGS.val_fraction} must be in (0, 1)')
  writer = shards.Writer(out, identity(files, digest), dtype, FLAGS.shard_tokens)
  if writer.complete:
    writer.cleanup()  # a kill after the manifest may have left these
    return shards.read_manifest(out)
  skip, offset = writer.resume_point()
  total = sum(f.stat().st_size for f in files)
  progress = Progress(total, 0)
  workers = FLAGS.workers or len(os.sched_getaffinity(0))
  pool = multiprocessing.get_context('fork').Pool(workers, _init_worker, (spec,)) \
      if workers > 1 else None
  try:
    if pool is None:
      _init_worker(spec)
    pending = collections.deque()
    stream = batches(documents(files, skip))

    cut = [offset]  # the first document's tokens a shard already holds (a resumed run)

    def drain_one():
      batch, result = pending.popleft()
      for doc, ids in zip(batch, result.get() if pool else result, strict=True):
        writer.add(ids, skip=cut.pop() if cut else 0)
        progress.add(doc[3], len(writer.records))

    for batch in stream:
      result = pool.apply_async(encode, (batch, FLAGS.text_field)) if pool else \
          encode(batch, FLAGS.text_field)
      pending.append((batch, result))
      while len(pending) > 2 * workers:  # bounded: the corpus never sits in memory
        drain_one()
    while pending:
      drain_one()
    progress.add(0, len(writer.records), force=True)
    if progress.tty:
      print(file=sys.stderr)
    header = {'vocab_size': vocab_size,
              'tokenizer': {'description': description, 'digest': digest}}
    writer.finish(FLAGS.val_fraction, header)
  except ShardError:
    if pool:
      pool.terminate()
    writer.rollback()
    raise
  finally:
    if pool:
      pool.close()
  return shards.verify(out)  # read back: every shard's size and sha256


def main():
  files = input_files(FLAGS.files)
  manifest = run(files, FLAGS.tokenizer, FLAGS.out)
  s = manifest['splits']
  print(f"{FLAGS.out}: {manifest['tokens']:,} tokens ({manifest['dtype']}, vocab "
        f"{manifest['vocab_size']:,}) from {manifest['documents']:,} documents in "
        f"{len(manifest['shards'])} shards; train {s['train']['tokens']:,} tokens, val "
        f"{s['val']['tokens']:,} tokens ({s['val']['documents']:,} documents)")


if __name__ == '__main__':
  cli.run(main)
