"""Tokenizers: text <-> token ids, one small interface over three kinds (docs/design.md#7-training).

  byte        UTF-8 bytes, vocab 256, no special tokens: the default, and every run before
              tokenizers existed
  a file      a Hugging Face tokenizer.json (or a folder holding one), read by the `tokenizers`
              library; its special tokens from tokenizer_config.json, special_tokens_map.json,
              generation_config.json or config.json beside it
  train:N     a byte-level BPE of N tokens trained on the run's training split by the library's
              own trainer (<|endoftext|> is id 0 and the eos; then the 256 bytes; then merges)

Each has encode(text) -> ids, decode(ids, skip_special=False) -> text, vocab_size, bos_id /
eos_id / pad_id (None when absent) and token_bytes(id), the UTF-8 bytes a token spells (b'' for
special tokens):
evaluate's bits per byte divides by the bytes of the text scored. A non-byte tokenizer carries
`files`, the texts of its Hugging Face files, which a workdir stores and an export writes, so
that a resumed run, evaluate and generate read the very tokenizer the run trained with.
The `tokenizers` library is imported only when a non-byte tokenizer is used.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Callable
from types import MappingProxyType

import numpy as np

from mla_jax.errors import Error

BYTE = 'byte'
TRAIN = 'train:'
END_OF_TEXT = '<|endoftext|>'
# The Hugging Face files that make a tokenizer, in the order their special tokens are read.
FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
         'generation_config.json')
SPECIAL = ('bos', 'eos', 'pad')
# The smallest trained vocabulary: <|endoftext|> and the 256 bytes (no merge yet).
MIN_TRAINED = 257


class TokenizerError(Error, ValueError):
  """A tokenizer that cannot be read, found or trained; the message says how to fix it."""


def trained_size(spec: str) -> int | None:
  """N of a 'train:N' spec, None for another spec; a malformed 'train:...' is one line."""
  if not spec.startswith(TRAIN):
    return None
  size = spec.removeprefix(TRAIN)
  if not size.isdigit() or int(size) < MIN_TRAINED:
    raise TokenizerError(f"data.tokenizer={spec!r} must be 'train:N' with N an integer >= "
                         f'{MIN_TRAINED} (<|endoftext|> and the 256 bytes), e.g. train:8192')
  return int(size)


class ByteTokenizer:
  """Tokens are UTF-8 bytes: exactly what data.encode / data.decode did before tokenizers."""

  kind = BYTE
  vocab_size = 256
  bos_id = eos_id = pad_id = None
  eos_ids = ()
  files = MappingProxyType({})  # no files to store

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), np.uint8)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(text) for text in texts]

  def decode(self, ids, skip_special: bool = False) -> str:
    return bytes(np.asarray(ids, np.uint8).tolist()).decode('utf-8', errors='replace')

  def token_bytes(self, token_id: int) -> bytes:
    return bytes([int(token_id)])


def _byte_alphabet() -> dict[str, int]:
  """GPT-2's byte-level alphabet, char -> byte: printable bytes stand for themselves, the rest
  for chr(256 + k). Only token_bytes reads it (the library does all encoding)."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


def _token_of(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A Hugging Face tokenizer.json, run by the `tokenizers` library (ids equal to its own)."""

  kind = 'file'

  def __init__(self, files: dict[str, str], source: str, hf_config: dict | None = None):
    """files: the texts of FILES present (tokenizer.json required); source names them in
    messages; hf_config: a model's config.json beside them, the last place ids are read."""
    from tokenizers import Tokenizer  # here: the byte path never needs the library
    self.files, self.source = dict(files), source
    try:
      self._tok = Tokenizer.from_str(files['tokenizer.json'])
    except Exception as e:  # the library raises its own Exception for any malformed file
      cause = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      raise TokenizerError(f'{source} is not a tokenizer.json the tokenizers library reads '
                           f'({cause}); give the tokenizer.json saved with the model') from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    configs = []
    for name in FILES[1:]:
      if name in files:
        try:
          configs.append((name, json.loads(files[name])))
        except ValueError as e:
          raise TokenizerError(f'{name} beside {source} is not valid JSON ({e})') from None
    ids = {kind: self._special(kind, [*configs, ('config.json', hf_config or {})])
           for kind in SPECIAL}
    self.bos_id, self.pad_id = (ids[k][0] if ids[k] else None for k in ('bos', 'pad'))
    self.eos_ids = tuple(ids['eos'])  # generation stops at any of them
    self.eos_id = self.eos_ids[0] if self.eos_ids else None
    if hf_config and 'generation_config.json' not in files and any(ids.values()):
      # Only config.json held the ids: keep them where a workdir and an export carry them.
      self.files['generation_config.json'] = json.dumps(
          {f'{k}_token_id': hf_config.get(f'{k}_token_id') for k in SPECIAL}, indent=1)
    decoder = json.loads(files['tokenizer.json']).get('decoder') or {}
    kinds = {d.get('type') for d in decoder.get('decoders', [decoder])}
    self._byte_level = _byte_alphabet() if 'ByteLevel' in kinds else None
    self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items()
                         if t.special}

  def _special(self, kind: str, configs: list[tuple[str, dict]]) -> list[int]:
    """The ids of a special token from the first file that names it: '<kind>_token_id' (an
    id or a list of ids) or '<kind>_token' (a token of the vocabulary)."""
    for name, config in configs:
      value = config.get(f'{kind}_token_id')
      if value is None and _token_of(config.get(f'{kind}_token')) is not None:
        token = _token_of(config[f'{kind}_token'])
        value = self._tok.token_to_id(token)
        if value is None:
          raise TokenizerError(f'{name} beside {self.source} names {kind}_token {token!r}, '
                               'which is not in tokenizer.json; give the files saved together')
      if value is None:
        continue
      values = value if isinstance(value, list) else [value]
      if not all(isinstance(v, int) and 0 <= v < self.vocab_size for v in values):
        raise TokenizerError(f'{name} beside {self.source} gives {kind}_token_id={value!r}, not '
                             f'an id of its {self.vocab_size}-token vocabulary')
      return values
    return []

  @classmethod
  def from_path(cls, path, hf_config: bool = True) -> HFTokenizer:
    """A tokenizer.json, or a folder holding one, with the FILES beside it; hf_config: also
    read the ids of a model's config.json there (not in a workdir, whose config.json is ours)."""
    path = pathlib.Path(path).expanduser()
    file = path / 'tokenizer.json' if path.is_dir() else path
    if not file.is_file():
      raise TokenizerError(f'{path} is not a tokenizer.json file or a folder holding one; give '
                           "the tokenizer of the model, 'byte' or 'train:N'")
    files = {}
    for name in FILES:
      candidate = file if name == 'tokenizer.json' else file.parent / name
      if candidate.is_file():
        try:
          files[name] = candidate.read_text(encoding='utf-8')
        except (OSError, UnicodeDecodeError) as e:
          raise TokenizerError(f'cannot read {candidate} ({e}); make it readable') from None
    config = {}
    if hf_config and (file.parent / 'config.json').is_file():
      try:
        config = json.loads((file.parent / 'config.json').read_text())
      except (OSError, ValueError):
        config = {}  # a model's config.json is read (and refused) by the model's import
    return cls(files, str(file), config if isinstance(config, dict) else {})

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    """encode of each text, by the library's batch encoding (its threads). The fast form skips
    the character offsets, which nothing here reads: twice the speed, the same ids."""
    return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch_fast(texts)]

  def decode(self, ids, skip_special: bool = False) -> str:
    """The text of ids; special tokens are written out unless skip_special (as transformers'
    decode), so that a text holding one literally round-trips."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=skip_special)

  def token_bytes(self, token_id: int) -> bytes:
    """The UTF-8 bytes a token spells: exact for byte-level tokenizers (a token may hold part
    of a character); otherwise its decoded text's."""
    token_id = int(token_id)
    if token_id in self._special_ids:
      return b''
    if self._byte_level is not None:
      token = self._tok.id_to_token(token_id)
      if all(c in self._byte_level for c in token):
        return bytes(self._byte_level[c] for c in token)
    return self.decode([token_id]).encode('utf-8')


Tokenizer = ByteTokenizer | HFTokenizer


def digest(tok: Tokenizer) -> str:
  """What a tokenized corpus records of its tokenizer (mla_jax.shards), and a run checks:
  'byte', or the sha256 of the tokenizer.json text."""
  if tok.kind == BYTE:
    return BYTE
  return hashlib.sha256(tok.files['tokenizer.json'].encode('utf-8')).hexdigest()


def train_bpe(text: str, vocab_size: int) -> HFTokenizer:
  """A byte-level BPE of vocab_size tokens (fewer if the text runs out of pairs to merge)
  trained on text by the `tokenizers` library; every string round-trips through it."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator([text], trainer)
  # tokenizer_class: transformers' AutoTokenizer then loads it whatever the model type.
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': END_OF_TEXT,
            'model_max_length': 1 << 30}
  return HFTokenizer({'tokenizer.json': tok.to_str(pretty=True),
                      'tokenizer_config.json': json.dumps(config, indent=1)},
                     f'train:{vocab_size}')


def for_run(spec: str, stored=None, train_text: Callable[[], str] | None = None) -> Tokenizer:
  """The tokenizer of a run whose data.tokenizer is spec. stored: the workdir of a run that
  resumes, whose saved copy is used (a trained BPE is trained once); train_text: the training
  split's text, read only when a BPE is trained."""
  if spec == BYTE:
    return ByteTokenizer()
  size = trained_size(spec)
  if stored is not None:
    if not (pathlib.Path(stored) / 'tokenizer.json').is_file():
      raise TokenizerError(f'{stored} holds a run trained with data.tokenizer={spec!r} but no '
                           'tokenizer.json; restore it from a copy of the run')
    saved = HFTokenizer.from_path(stored, hf_config=False)
    source = pathlib.Path(spec).expanduser()
    source = source / 'tokenizer.json' if source.is_dir() else source
    # The run's copy is what it trained with; a source that is gone is no reason to stop.
    if size is None and source.is_file() and HFTokenizer.from_path(spec).files[
        'tokenizer.json'] != saved.files['tokenizer.json']:
      raise TokenizerError(f'data.tokenizer={spec!r} differs from the tokenizer.json the run in '
                           f'{stored} was trained with; resume with that one or use a new '
                           '--workdir')
    return saved
  if size is not None:
    return train_bpe(train_text(), size)
  return HFTokenizer.from_path(spec)
