"""Tokenized corpora (mla_jax.shards, python -m mla_jax.tokenize): the reader equals the
in-memory array, training on shards is bit for bit training on the same ids in memory, a killed
tokenize resumes to the same bytes, a corpus larger than the process's memory limit tokenizes
and is sampled, and bad input is one line with nothing written."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import tiny_run

from mla_jax import data, shards, tasks, training
from mla_jax.config import ConfigError
from mla_jax.run_config import RunConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tokenize(*args, env=None, preexec_fn=None):
  return subprocess.run([sys.executable, '-m', 'mla_jax.tokenize', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def files_of(folder: pathlib.Path) -> dict[str, str]:
  """Every file under folder (hidden ones included) and its sha256."""
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def write_corpus(tmp_path, tokens: np.ndarray, sizes, shard_tokens: int) -> pathlib.Path:
  """tokens cut into documents of `sizes` and written by shards.Writer."""
  out = tmp_path / 'tok'
  writer = shards.Writer(out, {'test': 1}, 'uint16', shard_tokens)
  for doc in np.split(tokens, np.cumsum(sizes)[:-1]):
    writer.add(doc)
  writer.finish(0.3, {'vocab_size': 1000, 'tokenizer': {'description': 't', 'digest': 't'}})
  return out


def test_the_reader_indexes_like_the_concatenated_array(tmp_path):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 1000, 5000).astype(np.uint16)
  sizes = [700, 1, 2299, 1000, 1000]
  splits = shards.open_splits(write_corpus(tmp_path, tokens, sizes, shard_tokens=333))
  assert len(splits['train']) + len(splits['val']) == 5000
  cut = len(splits['train'])
  assert cut == 3000  # two documents held out: 1,000 < 30% of 5,000 <= 2,000
  for split, ref in (('train', tokens[:cut]), ('val', tokens[cut:])):
    sharded = splits[split]
    assert len(sharded) == len(ref)
    # windows that cross shard boundaries (every 333 tokens), random ones and a 2-D gather
    starts = np.concatenate([np.arange(0, len(ref) - 40, 333) + 320,
                             rng.integers(0, len(ref) - 40, 200)])
    starts = starts[starts < len(ref) - 40]
    idx = starts[:, None] + np.arange(40)
    np.testing.assert_array_equal(sharded[idx], ref[idx])
    assert sharded[idx].dtype == np.uint16
    for a, b in ((0, len(ref)), (330, 700), (5, 5), (-50, None), (100, 90)):
      np.testing.assert_array_equal(sharded[a:b], ref[a:b])
    np.testing.assert_array_equal(sharded[10:900:7], ref[10:900:7])
    assert sharded[-1] == ref[-1] and sharded[333] == ref[333]
    np.testing.assert_array_equal(np.asarray(sharded), ref)
    with pytest.raises(IndexError):
      sharded[np.array([len(ref)])]
  # the sampler and eval_windows read it as they read the array
  sampler = data.WindowSampler(splits['train'], seq_len=64, batch=8, seed=3, accum=2)
  np.testing.assert_array_equal(sampler[5], data.WindowSampler(tokens[:cut], 64, 8, 3, 2)[5])
  for (w1, *r1), (w2, *r2) in zip(data.eval_windows(splits['val'], 64, 32),
                                  data.eval_windows(tokens[cut:], 64, 32), strict=True):
    np.testing.assert_array_equal(w1, w2)
    assert r1 == r2


def test_the_split_holds_out_whole_documents_like_the_text_path():
  lengths = np.array([500, 400, 100, 60])  # data_test's files: the last two held out
  assert shards.validation_documents(lengths, 0.1) == 2
  assert shards.validation_documents(np.array([10, 10]), 0.99) == 1  # never all


@pytest.mark.slow
def test_tokenize_then_train_is_training_on_the_same_ids_in_memory(corpus, tmp_path):
  """The byte tokenizer's shards are the text path's arrays, so training on them gives the same
  losses, bit for bit; a run on shards stopped and resumed too."""
  out = tmp_path / 'tok'
  result = tokenize(f'--files={corpus}', '--tokenizer=byte', f'--out={out}',
                    '--shard_tokens=4096')
  assert result.returncode == 0, result.stderr
  text, sharded = data.text_file_splits(corpus, 0.1), shards.open_splits(out, verify=True)
  for split in ('train', 'val'):
    np.testing.assert_array_equal(np.asarray(sharded[split]), text[split])
  assert len(json.loads((out / 'manifest.json').read_text())['shards']) > 3

  def losses(workdir):
    rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').open()]
    return [r['loss'] for r in rows if 'loss' in r], [r['val_loss'] for r in rows
                                                     if 'val_loss' in r]

  runs = {}
  for name, files, train in (('text', corpus, {}), ('shards', str(out), {}),
                             ('resumed', str(out), {'stop_after_steps': 5})):
    runs[name] = tmp_path / name
    training.train_and_evaluate(tiny_run(files, deterministic=True, **train), str(runs[name]))
  training.train_and_evaluate(tiny_run(str(out), deterministic=True), str(runs['resumed']))
  assert len(losses(runs['text'])[0]) == 10
  assert losses(runs['shards']) == losses(runs['text'])
  assert losses(runs['resumed']) == losses(runs['text'])


def test_a_killed_tokenize_resumes_to_the_same_bytes(tmp_path):
  """SIGKILL after a shard is renamed but not recorded, after one is recorded, and after the
  manifest: each rerun ends with the files of a run never killed. Documents of 1,000 bytes in
  shards of 700 tokens: shards cut documents, so resume re-encodes a cut one."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  rng = np.random.default_rng(1)
  for i in range(12):
    lines = [json.dumps({'text': ''.join(rng.choice(list('abcdé '), 999)), 'id': j})
             for j in range(3)]
    (corpus / f'{i:02d}.jsonl').write_text('\n'.join(lines) + '\n\n')
  args = [f'--files={corpus}/*.jsonl', '--shard_tokens=700', '--workers=2']
  whole = tmp_path / 'whole'
  assert tokenize(*args, f'--out={whole}').returncode == 0
  reference = files_of(whole)
  assert len([f for f in reference if f.endswith('.bin')]) > 40
  assert set(reference) == {'manifest.json', *(f'shard-{i:05d}.bin' for i in
                                               range(len(reference) - 1))}
  for phase in ('shard:3:written', 'shard:17:recorded', 'manifest'):
    out = tmp_path / phase.replace(':', '_')
    killed = tokenize(*args, f'--out={out}', env={'MLA_JAX_FAULT': phase})
    assert killed.returncode == -9, killed.stderr
    assert files_of(out) != reference
    rerun = tokenize(*args, f'--out={out}')
    assert rerun.returncode == 0, rerun.stderr
    assert files_of(out) == reference, phase
  again = tokenize(*args, f'--out={whole}')  # a finished corpus: nothing to do, nothing changed
  assert again.returncode == 0 and files_of(whole) == reference


def test_a_bpe_tokenizer_and_a_model_too_small_for_it(tmp_path, corpus):
  """tokenizer.json encodes as the library does; a model with fewer ids is refused at start."""
  tokenizers = pytest.importorskip('tokenizers')
  bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
  bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  bpe.decoder = tokenizers.decoders.ByteLevel()
  bpe.train([str(p) for p in sorted(pathlib.Path(corpus).parent.glob('*.txt'))],
            tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  bpe.save(str(tmp_path / 'tokenizer.json'))
  out = tmp_path / 'tok'
  result = tokenize(f'--files={corpus}', f'--tokenizer={tmp_path / "tokenizer.json"}',
                    f'--out={out}')
  assert result.returncode == 0, result.stderr
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['vocab_size'] == bpe.get_vocab_size() > 256
  assert manifest['tokenizer']['digest'] == hashlib.sha256(
      (tmp_path / 'tokenizer.json').read_bytes()).hexdigest()
  files = sorted(pathlib.Path(corpus).parent.glob('*.txt'))
  ids = np.concatenate([bpe.encode(f.read_text()).ids for f in files])
  splits = shards.open_splits(out)
  np.testing.assert_array_equal(np.concatenate([splits['train'][:], splits['val'][:]]), ids)
  # the run must name the tokenizer the corpus was made with, and hold its ids
  with pytest.raises(data.DataError, match=r"tokenized with tokenizer\.json .*, not "
                     r"data\.tokenizer='byte'; give the tokenizer\.json it was made with"):
    tasks.load(RunConfig.from_dict(tiny_run(str(out))).trainable())
  config = tiny_run(str(out))
  config.data.tokenizer = str(tmp_path / 'tokenizer.json')
  with pytest.raises(ConfigError, match=r"model\.vocab_size=256 is smaller than the "
                     r"tokenizer's 300 tokens"):
    tasks.load(RunConfig.from_dict(config).trainable())
  config.model.vocab_size = 300
  text = tasks.load(RunConfig.from_dict(config).trainable())
  np.testing.assert_array_equal(text.splits['val'][:], splits['val'][:])
  # bits per byte divide by the UTF-8 bytes the scored ids (all but the first) spell
  assert text.val_bytes == len(bpe.decode([int(i) for i in splits['val'][1:]]).encode())


def _limit(kind: str, limit: int):
  def apply():
    import resource
    resource.setrlimit(getattr(resource, kind), (limit, limit))
  return apply


READER = """
import numpy as np, sys
from mla_jax import data, shards
s = shards.open_splits(sys.argv[1])
if sys.argv[2] == 'whole':
  np.asarray(s['train'])
w = data.WindowSampler(s['train'], 1024, 32, 0)
b = [w[k] for k in range(50)]
print(len(s['train']), b[-1].shape, int(b[-1].max()))
"""


@pytest.mark.slow
def test_a_corpus_larger_than_the_memory_limit_tokenizes_and_is_sampled(tmp_path):
  """700 MiB of text (1.4 GB of shards). tokenize runs (one process: the pool's workers would
  each need their own share) with its address space capped at 640 MiB: measured here, it peaks
  at 490 MiB of address space (210 MiB resident), nearly all of it the package's import of jax.
  The reader maps every shard, which takes address space but not memory, so an address-space
  cap cannot express its budget; it runs with RLIMIT_DATA (heap and anonymous maps, not a
  file's pages) at 640 MiB, above the 190 MiB that importing mla_jax.data takes here and below
  the 1.3 GB the train split would take in memory: reading it whole under that limit fails,
  drawing batches does not."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  block = b'thou art the king of night and my love doth speak sweet and fair\n' * 16 * 1024
  for i in range(700):
    (corpus / f'{i:03d}.txt').write_bytes(block[:len(block) - i])  # 1 MiB each
  limit = 640 << 20
  out = tmp_path / 'tok'
  result = tokenize(f'--files={corpus}/*.txt', f'--out={out}', '--workers=1',
                    '--shard_tokens=50000000', preexec_fn=_limit('RLIMIT_AS', limit))
  assert result.returncode == 0, result.stderr
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['tokens'] * 2 > 2 * limit and len(manifest['shards']) == 15

  def read(mode):
    return subprocess.run([sys.executable, '-c', READER, str(out), mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit('RLIMIT_DATA', limit))

  sampled = read('windows')
  assert sampled.returncode == 0, sampled.stderr
  assert sampled.stdout.split() == [str(manifest['splits']['train']['tokens']), '(1,', '32,',
                                    '1025)', str(ord('y'))]
  whole = read('whole')
  assert whole.returncode != 0 and 'MemoryError' in whole.stderr  # the limit binds


def _bad_tokenizer(tmp_path):
  (tmp_path / 'tokenizer.json').write_text('{"version": "1.0", "model": 3')
  return [f'--tokenizer={tmp_path / "tokenizer.json"}']


def _jsonl_without_field(tmp_path):
  (tmp_path / 'c' / 'a.jsonl').write_text('{"text": "ok"}\n{"body": "no text"}\n')
  return []


@pytest.mark.parametrize('case,expected', [
    ('empty', r'the corpus is empty'),
    ('nothing', r'no files match --files='),
    ('jsonl', r'a\.jsonl:2 has no string field .text.; give the field'),
    ('tokenizer', r'is not a tokenizer\.json the tokenizers library reads'),
])
def test_bad_input_is_one_line_and_writes_nothing(case, expected, tmp_path):
  (tmp_path / 'c').mkdir()
  files, extra = f'{tmp_path}/c/*', []
  if case == 'empty':
    (tmp_path / 'c' / 'a.txt').write_text('')
  elif case == 'nothing':
    files = f'{tmp_path}/none/*.txt'
  elif case == 'jsonl':
    extra = _jsonl_without_field(tmp_path)
    (tmp_path / 'c' / 'b.txt').write_text('x' * 100)
  else:
    (tmp_path / 'c' / 'a.txt').write_text('text')
    extra = _bad_tokenizer(tmp_path)
  out = tmp_path / 'out'
  result = tokenize(f'--files={files}', f'--out={out}', *extra)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert pytest.importorskip('re').search(expected, lines[0]), lines[0]
  assert not out.exists()


def test_another_input_into_a_corpus_folder_is_refused_untouched(tmp_path, corpus):
  out = tmp_path / 'tok'
  assert tokenize(f'--files={corpus}', f'--out={out}').returncode == 0
  before = files_of(out)
  result = tokenize(f'--files={corpus}', f'--out={out}', '--val_fraction=0.2')
  assert result.returncode == 1 and 'another input or tokenizer (differs in val_fraction)' in \
      result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert files_of(out) == before


def test_a_touched_corpus_is_another_input_and_the_line_says_why(tmp_path, corpus):
  own = tmp_path / 'corpus'
  own.mkdir()
  for f in pathlib.Path(corpus).parent.glob('*.txt'):
    shutil.copy(f, own / f.name)
  out = tmp_path / 'tok'
  assert tokenize(f'--files={own}/*.txt', f'--out={out}').returncode == 0
  before = files_of(out)
  os.utime(own / 'part1.txt', ns=(0, 0))  # same bytes, another modification time
  result = tokenize(f'--files={own}/*.txt', f'--out={out}')
  assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
  assert 'differs in input_sha256 (files are known by path, size and modification time' in \
      result.stderr
  assert files_of(out) == before


@pytest.mark.parametrize('damage,expected', [
    ('truncate', r'shard-00001\.bin has 8,190 bytes but manifest\.json lists 4,096 uint16'),
    ('missing', r'shard-00002\.bin is missing'),
    ('dtype', r"says dtype 'uint32' for vocab_size 256, which needs uint16"),
    ('count', r'shard-00000\.bin has 8,192 bytes but manifest\.json lists 4,000 uint16'),
    ('manifest', r'manifest\.json cannot be parsed'),
    ('unfinished', r'manifest\.json is missing \(progress\.json'),
])
def test_a_damaged_corpus_is_refused_by_name(damage, expected, tmp_path, corpus):
  out = tmp_path / 'tok'
  assert tokenize(f'--files={corpus}', f'--out={out}', '--shard_tokens=4096').returncode == 0
  manifest = json.loads((out / 'manifest.json').read_text())
  if damage == 'truncate':
    with open(out / 'shard-00001.bin', 'r+b') as f:
      f.truncate(8190)
  elif damage == 'missing':
    (out / 'shard-00002.bin').unlink()
  elif damage in ('dtype', 'count'):
    if damage == 'dtype':
      manifest['dtype'] = 'uint32'
    else:
      manifest['shards'][0]['tokens'] = 4000
    (out / 'manifest.json').write_text(json.dumps(manifest))
  elif damage == 'manifest':
    (out / 'manifest.json').write_text('{"format": ')
  else:
    (out / 'manifest.json').rename(out / 'progress.json')
  with pytest.raises(shards.ShardError, match=expected) as e:
    data.load_splits(tiny_run(str(out)).data)
  assert '\n' not in str(e.value)
  if damage == 'truncate':  # the command line says it in one line too
    result = subprocess.run(
        [sys.executable, '-m', 'mla_jax.train', '--config=configs/mla.py:tiny',
         f'--workdir={tmp_path / "run"}', f'--config.data.files={out}'],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
        'error: ') and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_verify_finds_a_changed_byte(tmp_path, corpus):
  out = tmp_path / 'tok'
  assert tokenize(f'--files={corpus}', f'--out={out}').returncode == 0
  with open(out / 'shard-00000.bin', 'r+b') as f:
    f.seek(10)
    f.write(b'\xff')
  shards.open_splits(out)  # sizes only: opens
  with pytest.raises(shards.ShardError, match=r"shard-00000\.bin's sha256 differs"):
    shards.open_splits(out, verify=True)
