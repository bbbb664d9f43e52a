"""What a run learns from and how it validates: config.data.task (a RunConfig's sections).

  text  next-token prediction on a corpus (data.py); every position is scored (weights 1);
        validation is perplexity over the held-out split (perplexity.perplexity)
  mqar  multi-query associative recall (mqar.py, config.data.mqar); only the answers are
        scored; validation is recall accuracy and loss on a fixed held-out set

Either way a training batch is {'inputs', 'targets', 'weights'}, each [accum, rows, seq_len]
(int32, int32, float32), served by grain from a sampler that is a function of (seed, step):
the trainer's loss is sum(weights * NLL) / sum(weights) per microbatch for every task.
"""

from __future__ import annotations

import numpy as np

from mla_jax import data, mqar, perplexity, shards, tokenizer
from mla_jax.config import ConfigError
from mla_jax.run_config import TASKS


def text_batch(windows: np.ndarray) -> dict:
  """Windows [..., seq_len + 1] -> inputs, next-token targets, and weights 1 everywhere."""
  return {'inputs': windows[..., :-1], 'targets': windows[..., 1:],
          'weights': np.ones(windows[..., 1:].shape, np.float32)}


def scored_bytes(tok, tokens, chunk: int = 1 << 22) -> int:
  """The UTF-8 bytes that tokens[1:] spell (the text perplexity scores), by a table of each
  id's length, in chunks: a tokenized split is never read whole."""
  lengths = np.array([len(tok.token_bytes(i)) for i in range(tok.vocab_size)], np.int64)
  return sum(int(lengths[tokens[i:i + chunk]].sum()) for i in range(1, len(tokens), chunk))


class Text:
  """The corpus of config.data and the run's tokenizer, loaded here (a bad corpus or
  tokenizer, or ids the model's vocabulary cannot hold, fail before a run is written).
  stored: the workdir of a run that resumes, whose saved tokenizer it reads."""

  logged = ('loss', 'perplexity', 'bits_per_byte')  # validation metrics, in log order

  def __init__(self, config, stored=None):
    self.config = config
    vocab_size, spec = config.model.vocab_size, config.data.tokenizer
    tokenized = data.is_tokenized(config.data)
    if tokenized and tokenizer.trained_size(spec) is not None:
      raise ConfigError(f'data.tokenizer={spec!r} trains a BPE on text, but data.files names a '
                        'tokenized corpus; give the tokenizer.json it was tokenized with')
    corpus = None if tokenized else data.corpus_bytes(config.data)
    self.tokenizer = tokenizer.for_run(spec, stored, lambda: data.split_text(corpus, 'train'))
    if spec != tokenizer.BYTE and self.tokenizer.vocab_size > vocab_size:
      raise ConfigError(f'model.vocab_size={vocab_size} is smaller than the tokenizer\'s '
                        f'{self.tokenizer.vocab_size} tokens (data.tokenizer={spec!r}); set '
                        f'--config.model.vocab_size={self.tokenizer.vocab_size}')
    self.splits = data.load_splits(config.data, self.tokenizer, corpus)
    self.corpus = corpus  # the text's bytes (None for a tokenized corpus)
    self.val_bytes = self.scored_bytes('val')
    for split, tokens in self.splits.items():
      if isinstance(tokens, shards.ShardedTokens):  # its manifest bounds its ids: no full pass
        tokens.check_vocab(vocab_size)
      elif tokens.max() >= vocab_size:
        raise ConfigError(f'the {split} split has token id {tokens.max()} but model.vocab_size='
                          f'{vocab_size}; raise vocab_size (bytes need 256)')

  def train_batches(self, start_step: int, rows: slice):
    d = self.config.data
    sampler = data.WindowSampler(self.splits['train'], d.seq_len, d.batch_size,
                                 self.config.seed, self.config.opt.grad_accum_steps, rows)
    return data.prefetched(sampler, start_step, text_batch)

  def scored_bytes(self, split: str) -> int:
    """What bits per byte divide by: the UTF-8 bytes of the split's text but its first token."""
    tokens = self.splits[split]
    if self.corpus is None:
      return scored_bytes(self.tokenizer, tokens)
    return len(self.corpus[split]) - len(self.tokenizer.token_bytes(tokens[0]))

  def validate(self, model, mesh=None) -> dict:
    e = self.config.eval
    return perplexity.perplexity(model, self.splits['val'], e.seq_len, e.stride, e.batch_size,
                                 mesh, scored_bytes=self.val_bytes)

  @staticmethod
  def describe(result: dict) -> str:
    return (f"perplexity {result['perplexity']:.4f}, {result['bits_per_byte']:.4f} bits per "
            f"byte over {result['tokens']} tokens")


class MQAR:
  """MQAR over the model's vocabulary at data.seq_len; the held-out set (data.mqar.val_examples
  from the HELDOUT stream of data.mqar.val_seed) is the same for every training seed."""

  logged = ('loss', 'accuracy')

  def __init__(self, config, stored=None):  # stored: a text run's tokenizer; unused
    self.config, m = config, config.data.mqar
    self.task = mqar.MQAR(config.model.vocab_size, config.data.seq_len, m.num_kv_pairs,
                          m.power_a)
    if m.val_examples < 1:
      raise mqar.MQARError(f'data.mqar.val_examples={m.val_examples} must be >= 1')
    self.heldout = self.task.heldout(m.val_examples, min(config.eval.batch_size,
                                                         m.val_examples), m.val_seed)

  def train_batches(self, start_step: int, rows: slice):
    c = self.config
    sampler = mqar.Sampler(self.task, c.data.batch_size, c.seed, c.opt.grad_accum_steps, rows)
    return data.prefetched(sampler, start_step)

  def validate(self, model, mesh=None) -> dict:
    return mqar.evaluate(model, self.heldout, mesh)

  @staticmethod
  def describe(result: dict) -> str:
    return (f"recall accuracy {result['accuracy']:.4f} over {result['answers']} answers, "
            f"loss {result['loss']:.4f}")


def task_class(config) -> type[Text] | type[MQAR]:
  name = config.data.task
  if name not in TASKS:
    raise ConfigError(f'data.task={name!r} is unknown; use one of {TASKS}')
  return Text if name == 'text' else MQAR


def load(config, stored=None) -> Text | MQAR:
  """The task of config.data.task (config: a RunConfig), its data loaded (or its held-out set
  drawn); stored: the workdir of a run that resumes (its saved tokenizer is read)."""
  return task_class(config)(config, stored)
