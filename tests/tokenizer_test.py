"""Tokenizers (mla_jax.tokenizer): the byte tokenizer is today's bytes; a byte-level BPE trained
by the tokenizers library round-trips every string with the library's own ids; a run stores its
tokenizer and its commands read it; bits per byte divide by the UTF-8 bytes of the scored text;
a bad tokenizer or a too-small vocabulary is one line with nothing written."""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
from conftest import tiny_model

from configs import mha, mla
from mla_jax import data, perplexity, run_config, tokenizer
from mla_jax import workdir as wd
from mla_jax.run_config import DataConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / 'tests' / 'hf_fixtures' / 'llama_bpe'
STRINGS = ['', 'a', 'Thou art the king of night.\n', 'naïve café — Ærø, Straße, Ωμέγα',
           '日本語のテキスト 🎭🎉👩‍👩‍👧 emoji', '\n\n\r\n\t  trailing   ', ' leading space',
           '<|endoftext|> written out']


@pytest.fixture(scope='module')
def corpus_text(corpus) -> str:
  return ''.join(pathlib.Path(f).read_text() for f in sorted(pathlib.Path(corpus).parent.glob(
      '*.txt')))


@pytest.fixture(scope='module')
def bpe(corpus_text) -> tokenizer.HFTokenizer:
  return tokenizer.train_bpe(corpus_text + ''.join(STRINGS[3:5]), 320)


def _library(tok: tokenizer.HFTokenizer) -> tokenizers.Tokenizer:
  return tokenizers.Tokenizer.from_str(tok.files['tokenizer.json'])


def test_byte_tokenizer_is_the_utf8_bytes():
  tok = tokenizer.ByteTokenizer()
  for s in STRINGS:
    ids = tok.encode(s)
    assert ids.dtype == np.uint8 and ids.tobytes() == s.encode('utf-8')
    assert tok.decode(ids) == s
    assert b''.join(tok.token_bytes(i) for i in ids) == s.encode('utf-8')
  assert tok.vocab_size == 256 and tok.eos_id is None and not tok.files


@pytest.mark.parametrize('which', ['trained', 'fixture'])
def test_byte_level_bpe_round_trips_with_the_library_ids(which, bpe):
  tok = bpe if which == 'trained' else tokenizer.HFTokenizer.from_path(FIXTURE)
  library = _library(tok)
  for s in STRINGS:
    ids = tok.encode(s)
    assert ids.dtype == np.int32 and ids.tolist() == library.encode(s).ids, s
    assert tok.decode(ids) == s, s
    if tokenizer.END_OF_TEXT not in s:  # written out, it is the special token (no text)
      # every token spells its bytes: together they are the string's UTF-8, exactly
      assert sum(len(tok.token_bytes(i)) for i in ids) == len(s.encode('utf-8')), s
  batch = tok.encode_batch(list(STRINGS))  # the library's fast batch form: the same ids
  assert [ids.tolist() for ids in batch] == [library.encode(s).ids for s in STRINGS]
  assert tok.encode('').size == 0
  assert tok.encode(STRINGS[-1])[0] == tok.eos_id == 0  # as transformers encodes it too
  # merges were learnt: common words are fewer tokens than bytes
  assert len(tok.encode(' the king')) < len(' the king')


def test_a_trained_bpe_has_the_given_size_and_is_trained_the_same_twice(corpus_text, bpe):
  assert bpe.vocab_size == 320 and len(_library(bpe).get_vocab()) == 320
  assert bpe.eos_id == 0 and bpe.eos_ids == (0,) and bpe.bos_id is None and bpe.pad_id is None
  assert bpe.token_bytes(0) == b''  # <|endoftext|> is no text
  assert {bpe.token_bytes(i) for i in range(1, 257)} == {bytes([b]) for b in range(256)}
  again = tokenizer.train_bpe(corpus_text + ''.join(STRINGS[3:5]), 320)
  assert again.files == bpe.files
  small = tokenizer.train_bpe('abc abc abc', 300)  # runs out of pairs to merge
  assert 257 < small.vocab_size < 300


def test_special_tokens_come_from_the_files_beside_tokenizer_json(tmp_path, bpe):
  (tmp_path / 'tokenizer.json').write_text(bpe.files['tokenizer.json'])
  (tmp_path / 'config.json').write_text(json.dumps({'bos_token_id': 1, 'eos_token_id': 2}))
  tok = tokenizer.HFTokenizer.from_path(tmp_path / 'tokenizer.json')
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)
  # config.json is not carried into a workdir: its ids move into generation_config.json
  assert json.loads(tok.files['generation_config.json'])['eos_token_id'] == 2
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': [5, 6]}))
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'bos_token': '<|endoftext|>'}))
  tok = tokenizer.HFTokenizer.from_path(tmp_path)
  assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (0, 5, (5, 6))
  assert not tokenizer.HFTokenizer.from_path(tmp_path, hf_config=False).files.keys() - set(
      tokenizer.FILES)
  bad = {'tokenizer_config.json': ({'eos_token': '<nope>'}, "names eos_token '<nope>'"),
         'generation_config.json': ({'eos_token_id': 320}, 'eos_token_id=320, not an id')}
  for name, (content, message) in bad.items():
    (tmp_path / name).write_text(json.dumps(content))
    with pytest.raises(tokenizer.TokenizerError, match=message) as e:
      tokenizer.HFTokenizer.from_path(tmp_path)
    assert '\n' not in str(e.value)
    (tmp_path / name).unlink()


def test_a_bad_tokenizer_file_is_one_line(tmp_path):
  cases = {'garbage.json': ('{"model": 3}', 'is not a tokenizer.json the tokenizers library'),
           'cut.json': (FIXTURE.joinpath('tokenizer.json').read_text()[:500], 'is not a tok'),
           'missing.json': (None, 'is not a tokenizer.json file or a folder holding one')}
  for name, (content, message) in cases.items():
    if content is not None:
      (tmp_path / name).write_text(content)
    with pytest.raises(tokenizer.TokenizerError, match=message) as e:
      tokenizer.for_run(str(tmp_path / name))
    assert '\n' not in str(e.value)


def test_a_single_file_is_cut_before_a_character_for_a_tokenizer(tmp_path):
  text = 'a' * 89 + 'é' * 10  # 109 bytes; the 10% cut (byte 98) falls inside an é
  (tmp_path / 'one.txt').write_text(text)
  raw = data.text_file_splits(str(tmp_path / 'one.txt'), 0.1)
  assert len(raw['train']) == 98  # bytes: cut where it always was
  whole = data.text_file_splits(str(tmp_path / 'one.txt'), 0.1, whole_chars=True)
  assert len(whole['train']) == 97
  assert whole['train'].tobytes().decode() + whole['val'].tobytes().decode() == text


def _data_cfg(files: str, tok: str) -> DataConfig:
  return DataConfig(corpus='shakespeare', files=files, val_fraction=0.3, cache_dir='',
                    seq_len=16, batch_size=4, tokenizer=tok)


def test_splits_are_the_bytes_or_the_tokenizer_ids_of_each_split(corpus, bpe):
  byte = data.load_splits(_data_cfg(corpus, 'byte'))
  files = sorted(pathlib.Path(corpus).parent.glob('*.txt'))
  assert byte['train'].dtype == np.uint8
  assert byte['train'].tobytes() == b''.join(f.read_bytes() for f in files[:2])
  ids = data.load_splits(_data_cfg(corpus, 'train:320'), bpe)
  for split, raw in byte.items():
    assert ids[split].tolist() == _library(bpe).encode(raw.tobytes().decode()).ids
  with pytest.raises(data.DataError, match=r'pass workdir\.load_tokenizer'):
    data.load_splits(_data_cfg(corpus, 'train:320'))


def test_bits_per_byte_divide_by_the_utf8_bytes_of_the_scored_text(tmp_path, bpe):
  model = tiny_model(vocab_size=320)
  text = 'Thou art the king — naïve 🎭 of night.\n' * 3
  (tmp_path / 'text.txt').write_text(text)
  # byte model: bits per byte = mean NLL / ln 2, every bit of it
  tokens, n_bytes = perplexity.read_tokens(str(tmp_path / 'text.txt'), 'run', 320,
                                           tokenizer.ByteTokenizer())
  assert n_bytes == len(tokens) - 1 == len(text.encode()) - 1
  result = perplexity.perplexity(model, tokens, 128, 64, 2, scored_bytes=n_bytes)
  assert result['bits_per_byte'] == result['loss'] / math.log(2)
  assert result == perplexity.perplexity(model, tokens, 128, 64, 2)
  # BPE: the summed NLL over the bytes the scored tokens (all but the first) spell
  ids, n_bytes = perplexity.read_tokens(str(tmp_path / 'text.txt'), 'run', 320, bpe)
  assert ids.tolist() == bpe.encode(text).tolist() and len(ids) < len(text.encode())
  assert n_bytes == len(text.encode()) - len(bpe.token_bytes(ids[0]))
  result = perplexity.perplexity(model, ids, 128, 64, 2, scored_bytes=n_bytes)
  total = result['loss'] * result['tokens']
  assert result['bits_per_byte'] == pytest.approx(total / (math.log(2) * n_bytes), rel=1e-12)
  with pytest.raises(data.DataError, match='gives id 319 but the model has 300 tokens'):
    perplexity.read_tokens(str(tmp_path / 'text.txt'), 'run', 300, _Fixed(319))


class _Fixed(tokenizer.ByteTokenizer):
  kind = 'file'

  def __init__(self, token: int):
    self.token = token

  def encode(self, text):
    return np.array([1, self.token], np.int32)


# --- the commands -------------------------------------------------------------------------
def _run(module: str, *args):
  return subprocess.run([sys.executable, '-m', f'mla_jax.{module}', *args], cwd=ROOT,
                        capture_output=True, text=True)


def _sha(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_run_trains_its_bpe_once_stores_it_and_its_commands_read_it(corpus, tmp_path):
  work = tmp_path / 'run'
  train = ['--config=configs/mla.py:tiny', f'--workdir={work}', f'--config.data.files={corpus}',
           '--config.data.tokenizer=train:320', '--config.model.vocab_size=320']
  first = _run('train', *train, '--config.train.stop_after_steps=5')
  assert first.returncode == 0, first.stderr
  stored = _sha(work / 'tokenizer.json')
  tok = wd.load_tokenizer(work)
  assert tok.vocab_size == 320 and tok.files['tokenizer.json'] == (
      work / 'tokenizer.json').read_text()
  # the resumed run reads the stored tokenizer, which stays as it was, bit for bit
  (tmp_path / 'more.txt').write_text('unseen words change nothing')
  second = _run('train', *train)
  assert second.returncode == 0, second.stderr
  assert 'resuming from step 5' in second.stderr and _sha(work / 'tokenizer.json') == stored
  text = tmp_path / 'eval.txt'
  text.write_text(pathlib.Path(sorted(pathlib.Path(corpus).parent.glob('*.txt'))[0])
                  .read_text()[:2000])
  out = _run('evaluate', f'--workdir={work}', f'--data={text}')
  assert out.returncode == 0, out.stderr
  result = json.loads((work / 'eval.json').read_text())
  ids = tok.encode(text.read_text())
  assert result['tokens'] == len(ids) - 1 and result['tokenizer'] == 'file'
  assert result['bytes'] == len(text.read_bytes()) - len(tok.token_bytes(ids[0]))
  assert result['bits_per_byte'] == pytest.approx(
      result['loss'] * result['tokens'] / (math.log(2) * result['bytes']), rel=1e-12)
  assert result['perplexity'] == pytest.approx(math.exp(result['loss']), rel=1e-12)
  assert 'bits per byte' in out.stdout and 'nats per token' in out.stdout
  gen = _run('generate', f'--workdir={work}', '--prompt=thou art the', '--max_new_tokens=12')
  assert gen.returncode == 0, gen.stderr
  assert gen.stdout.startswith('thou art the')


def test_the_bpe_config_trains_a_4k_bpe_beside_the_byte_default():
  for module in (mla, mha):
    byte, bpe = module.get_config(''), module.get_config('bpe')
    assert (byte.data.tokenizer, byte.model.vocab_size) == ('byte', 256)
    assert (bpe.data.tokenizer, bpe.model.vocab_size) == ('train:4096', 4096)
    tiny = run_config.RunConfig.from_dict(module.get_config('tiny,bpe'))
    assert tiny.data.trained_vocab() == tiny.model.vocab_size == 4096
    assert tiny.model.d_model == module.get_config('tiny').model.d_model
  with pytest.raises(ValueError, match="unknown config argument 'bpe,huge'"):
    mla.get_config('bpe,huge')


def test_a_bad_tokenizer_or_a_small_vocabulary_is_one_line_and_writes_nothing(corpus, tmp_path,
                                                                              bpe):
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  (tmp_path / 'tok').mkdir()
  (tmp_path / 'tok' / 'tokenizer.json').write_text(bpe.files['tokenizer.json'])
  cases = {
      'bad file': ([f'--config.data.tokenizer={tmp_path / "bad.json"}'],
                   'is not a tokenizer.json the tokenizers library reads'),
      'too small': ([f'--config.data.tokenizer={tmp_path / "tok"}'],
                    "model.vocab_size=256 is smaller than the tokenizer's 320 tokens"),
      'train too big': (['--config.data.tokenizer=train:512'],
                        "makes 512 tokens but model.vocab_size=256"),
  }
  for case, (flags, message) in cases.items():
    work = tmp_path / case.replace(' ', '_')
    r = _run('train', '--config=configs/mla.py:tiny', f'--workdir={work}',
             f'--config.data.files={corpus}', *flags)
    assert r.returncode != 0 and message in r.stderr, (case, r.stderr)
    assert r.stderr.strip().count('\n') == 0, (case, r.stderr)
    assert not work.exists() or not any(work.iterdir()), case
  shutil.rmtree(tmp_path / 'tok')
