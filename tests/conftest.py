"""Shared test setup: strict rank promotion, float32 matmuls at the precision they claim,
deterministic GPU reductions, tiny configs of every attention variant, and a small text corpus
that needs no network. The suite runs unchanged on a CPU, a GPU or a TPU."""

import atexit
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import shutil
import sys
import tempfile

# Before jax starts its backends (XLA reads XLA_FLAGS once): exact resume must hold on a GPU
# too (train.deterministic). Under this flag the fused path uses XLA's attention, not cuDNN's
# (mla_jax/flash.py); the device report's check part (experiments.device_check) compares
# cuDNN's with the einsum path.
FLAGS = ['--xla_gpu_deterministic_ops=true']
# The suite compiles hundreds of small programs and runs each for milliseconds, so on a CPU
# LLVM's optimisation passes are most of its time: at level 0 a tiny training run takes 21 s
# instead of 35 s (the suite in CI, with the cache below: 1,116 s -> 842 s). Results may differ
# from the default level's in the last bits (LLVM contracts multiply-adds differently), but
# every equality compares programs compiled at the same level in the same run. Accelerators
# keep their default: a GPU or TPU host has a jax plugin installed.
ACCELERATOR = (any(importlib.metadata.entry_points(group='jax_plugins'))
               or any(importlib.util.find_spec(name) for name in
                      ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu')))
if not ACCELERATOR:
  FLAGS.append('--xla_backend_optimization_level=0')
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *FLAGS]).strip()

# One persistent compilation cache for the whole run: the xdist workers and every subprocess
# the tests start (the CLIs, the killed and resumed trainers) compile many of the same
# programs (the tiny configs), and now compile each once. The process that makes the folder
# (pytest itself, before it starts its workers, which inherit the environment) removes it at
# exit. A JAX_COMPILATION_CACHE_DIR the user set is used as it is.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='mla_jax_test_xla_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# Imported after the environment above, which jax reads when it starts.
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import mla_jax  # noqa: E402
from configs import mla as mla_config  # noqa: E402
from mla_jax import variants  # noqa: E402
from mla_jax.attention_op import AttentionOp  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
# Float32 equalities at 1e-5 are claims about float32 arithmetic: on GPU and TPU the default
# matmul precision rounds operands to TF32 / bfloat16, which the tests must not inherit.
jax.config.update('jax_default_matmul_precision', 'highest')



def _doc_variant_module() -> str:
  """docs/extending.md's Python blocks, written out as the module shared_kv_doc on PYTHONPATH
  (for this process and the commands the tests start): the page's toy variant, registered the
  way a variant outside mla_jax is, by importing the module a config names."""
  doc = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'extending.md'
  code = '\n\n'.join(re.findall(r'```python\n(.*?)```', doc.read_text(), flags=re.S))
  folder = pathlib.Path(tempfile.gettempdir()) / (
      'mla_jax_doc_variant_' + hashlib.sha256(code.encode()).hexdigest()[:12])
  folder.mkdir(exist_ok=True)
  if not (folder / 'shared_kv_doc.py').exists():  # written once, whole (workers race here)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix='.py.tmp')
    with os.fdopen(fd, 'w') as f:
      f.write(code)
    os.replace(tmp, folder / 'shared_kv_doc.py')
  if str(folder) not in sys.path:
    sys.path.insert(0, str(folder))
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (str(folder), os.environ.get('PYTHONPATH')) if p)
  return 'shared_kv_doc:shared_kv'


DOC_VARIANT = _doc_variant_module()
# (name, overrides): the variants every cross-variant test runs over. Every built-in variant at
# its registry example, the docs' toy variant (registered from outside the package), and MLA's
# other paths.
VARIANTS = {name: dict(attention=name, **variants.get(name).example) for name in variants.names()}
VARIANTS['shared_kv'] = dict(attention=DOC_VARIANT, **variants.get(DOC_VARIANT).example)
VARIANTS.update(
    mla_q=dict(attention='mla', kv_lora_rank=32, q_lora_rank=24, qk_rope_head_dim=8),
    mla_naive=dict(attention='mla', kv_lora_rank=32, mla_decode='naive'),
    # the generalised MLA an exact GQA embedding uses (mla_jax.to_mla), G = 2 groups of 16
    mla_exact=dict(attention='mla', kv_lora_rank=32, qk_nope_head_dim=0, qk_rope_head_dim=32,
                   rope_block=16, kv_norm=False),
)


def tiny_config(**overrides) -> mla_jax.ModelConfig:
  """A small model on the einsum reference path (each kernel is tested against it by name)."""
  base = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128,
              attention_impl='einsum')
  return mla_jax.ModelConfig(**{**base, **overrides})


def tiny_run(corpus, **train):
  """configs/mla.py:tiny (a 10-step run) on the test corpus, with train overrides."""
  config = mla_config.get_config('tiny')
  config.data.files = corpus
  config.train.update(train)
  return config


def variant_of(name: str) -> variants.Variant:
  """The registry entry of a VARIANTS case: what it declares (8-bit cache, kernels) is what the
  shared tests ask of it."""
  return variants.get(VARIANTS[name]['attention'])


def kernels_op(name: str) -> AttentionOp:
  """The accelerator kernels as a CPU runs them (XLA's flash attention, the Pallas decode
  kernels interpreted) for the calls the variant declares; its other calls stay einsum."""
  variant = variant_of(name)
  flash = 'xla' if variant.flash_widths else 'einsum'
  decode = 'triton' if variant.decode_widths else 'einsum'
  return AttentionOp('cpu', whole=flash, prefill=flash, decode=decode,
                     interpret=decode != 'einsum')


def tiny_model(seed=0, **overrides):
  return mla_jax.Transformer(tiny_config(**overrides), rngs=nnx.Rngs(seed))


def variant_params(long: tuple[str, ...] = (), declares: str | None = None) -> list:
  """Every variant's name for parametrize, those in `long` run only with --long (CI's 20
  minutes); declares 'flash_widths' / 'decode_widths': only the variants whose spec does."""
  names = [n for n in sorted(VARIANTS) if declares is None or getattr(variant_of(n), declares)]
  return [pytest.param(name, marks=pytest.mark.long) if name in long else name
          for name in names]


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
  return VARIANTS[request.param]


WORDS = ('thou', 'art', 'the', 'king', 'of', 'night', 'and', 'my', 'love', 'doth', 'speak',
         'sweet', 'fair', 'Romeo', 'Juliet', 'death', 'to', 'be', 'or', 'not')


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  """Three small text files (~30 KB), as a glob for data.files."""
  folder = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  for i in range(3):
    lines = [' '.join(rng.choice(WORDS, size=8)) + '.' for _ in range(250)]
    (folder / f'part{i}.txt').write_text('\n'.join(lines))
  return str(folder / '*.txt')


def pytest_addoption(parser):
  parser.addoption('--long', action='store_true',
                   help='also run the tests marked long (whole experiment pipelines, random '
                   'kills: minutes each), which the default run and CI skip')


# The experiment pipelines are the longest tests in the default run (minutes each). Started
# first, they overlap the hundreds of short tests on the other workers instead of running on
# alone at the end; xdist hands tests out in collection order.
FIRST = ('capacity_test.py::test_quick_pipeline_end_to_end',
         'recall_test.py::test_quick_pipeline_end_to_end')


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(config, items):
  items.sort(key=lambda item: not item.nodeid.endswith(FIRST))  # stable: the rest keep order
  if config.getoption('--long'):
    return
  skip = pytest.mark.skip(reason='long: run with --long')
  for item in items:
    if 'long' in item.keywords:
      item.add_marker(skip)
