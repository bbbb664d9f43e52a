"""Hugging Face checkpoints in and out: Llama and Qwen2 (MHA / GQA / MQA) and DeepSeek-V2/V3
(MLA, dense or DeepSeekMoE layers).

The layouts are in docs/design.md#9-hugging-face-layouts. A Hugging Face folder is config.json
plus safetensors: model.safetensors, or the shards model.safetensors.index.json lists. torch is
never imported.

A torch Linear weight is [out, in]. Ours are [in, out] with head axes split out of one side
(w_q [d, h, k] splits out, w_o [h, k, d] splits in), so every linear weight converts as
W.T.reshape(ours) and back as ours.reshape(in, out).T. DeepSeek's kv_b_proj stacks W_UK and
W_UV per head: [h * (d_n + d_v), d_c] -> w_uk [c, h, n] and w_uv [c, h, v].

RoPE layouts are kept as stored: Llama rotates half-split pairs ('half'); DeepSeek-V3 with
rope_interleave and V2 (complex RoPE) rotate adjacent pairs ('interleaved'). Exporting an
'interleaved' GQA model to Llama permutes each head's q and k rows (rope.interleaved_to_half):
q and k move together, so every score is unchanged. Qwen2 is Llama's layout plus q/k/v biases
(ModelConfig.qkv_bias; [h * k] in torch, b_q [h, k] here), whose q/k rows permute alike.

A DeepSeekMoE layer (mla_jax.moe) is stored as save_pretrained writes it: mlp.gate.weight
[E, d] float32 (our router [d, E], float32 whatever param_dtype), V3's
mlp.gate.e_score_correction_bias [E] (a moe.RouterBias, not a parameter), one
mlp.experts.{j}.{gate,up,down}_proj.weight per routed expert (rows of our stacked
w_gate / w_up [E, d, f] and w_down [E, f, d]) and mlp.shared_experts.* (our mlp.shared).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from mla_jax import rope, tokenizer, variants
from mla_jax import workdir as wd
from mla_jax.config import ConfigError, Llama3Scaling, ModelConfig, RopeScaling, YarnScaling
from mla_jax.errors import Error
from mla_jax.model import Transformer, abstract, with_params

LLAMA = ('LlamaForCausalLM',)
QWEN2 = ('Qwen2ForCausalLM',)
GQA_ARCHS = LLAMA + QWEN2  # the MHA / GQA / MQA layouts: q/k/v/o projections
DEEPSEEK = ('DeepseekV2ForCausalLM', 'DeepseekV3ForCausalLM')
# DeepSeek builds q_a_layernorm and kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says;
# mla_jax has one eps, so only that value converts exactly.
DEEPSEEK_LATENT_EPS = 1e-6


class HFError(Error, ValueError):
  """An unsupported or damaged Hugging Face checkpoint; the message says what and why."""


# --- safetensors ---------------------------------------------------------------------------
# A 20-line reader and writer instead of the `safetensors` package: its numpy backend cannot
# read bfloat16, the dtype of nearly every released checkpoint. The format: an 8-byte
# little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the bytes.
_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
           'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
           'BOOL': np.bool_}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file, memory-mapped (nothing is read until used)."""
  path = pathlib.Path(path)
  try:
    with path.open('rb') as f:
      n = int.from_bytes(f.read(8), 'little')
      header = json.loads(f.read(n))
    header.pop('__metadata__', None)
    data = np.memmap(path, np.uint8, 'r', offset=8 + n) if path.stat().st_size > 8 + n else (
        np.zeros(0, np.uint8))
    tensors = {}
    for name, info in header.items():
      if info['dtype'] not in _DTYPES:
        raise HFError(f'{path.name}: tensor {name} is {info["dtype"]}, which mla_jax does not '
                      'read (a quantized checkpoint?); save the model in bfloat16 or float32')
      dtype, shape = np.dtype(_DTYPES[info['dtype']]), tuple(info['shape'])
      begin, end = info['data_offsets']
      if end - begin != math.prod(shape) * dtype.itemsize or end > data.size:
        raise ValueError(f'tensor {name} runs past the end of the file')
      tensors[name] = data[begin:end].view(dtype).reshape(shape)
  except (OSError, ValueError, KeyError, TypeError) as e:
    if isinstance(e, HFError):
      raise
    raise HFError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}); '
                  'copy it again or re-save the model with save_pretrained') from None
  return tensors


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> None:
  header, arrays, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    header[name] = {'dtype': _DTYPE_NAMES[a.dtype], 'shape': list(a.shape),
                    'data_offsets': [offset, offset + a.nbytes]}
    arrays.append(a)
    offset += a.nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # the data starts 8-byte aligned
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + '.tmp')  # renamed when whole: never a half-written file
  with tmp.open('wb') as f:
    f.write(len(blob).to_bytes(8, 'little') + blob)
    for a in arrays:
      f.write(a.tobytes())
  tmp.replace(path)


def read_folder(hf_dir) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, every tensor by name) of a Hugging Face model folder."""
  folder = pathlib.Path(hf_dir)
  if not (folder / 'config.json').is_file():
    raise HFError(f'{hf_dir} has no config.json; give a Hugging Face model folder '
                  '(config.json and *.safetensors, as save_pretrained writes)')
  try:
    hf = json.loads((folder / 'config.json').read_text())
  except (OSError, ValueError) as e:
    raise HFError(f'{folder / "config.json"} is not valid JSON ({e})') from None
  if not isinstance(hf, dict):
    raise HFError(f'{folder / "config.json"} holds a {type(hf).__name__}, not a config object')
  index = folder / 'model.safetensors.index.json'
  if index.is_file():
    try:
      files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise HFError(f'{index} is not a valid shard index ({e})') from None
  elif (folder / 'model.safetensors').is_file():
    files = ['model.safetensors']
  else:
    pickles = sorted(p.name for p in folder.glob('*.bin')) + sorted(
        p.name for p in folder.glob('*.pt*'))
    raise HFError(f'{hf_dir} has no model.safetensors or model.safetensors.index.json' + (
        f' (only {pickles[0]}: pickle checkpoints are never loaded; re-save the model with '
        'save_pretrained, which writes safetensors)' if pickles else ''))
  tensors = {}
  for name in files:
    if not (folder / name).is_file():
      raise HFError(f'{index.name} lists {name}, which is not in {hf_dir}; copy every shard')
    tensors.update(read_safetensors(folder / name))
  return hf, tensors


# --- config.json <-> ModelConfig -------------------------------------------------------------
def _require(hf: dict, key: str):
  if hf.get(key) is None:
    raise HFError(f'config.json has no {key!r}; it is needed to build the model')
  return hf[key]


def _rope(hf: dict, arch: str) -> tuple[float, RopeScaling | None]:
  """(rope_theta, YaRN or Llama 3 scaling) from either transformers 5's rope_parameters or 4's
  rope_scaling."""
  params = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind == 'default':
    return theta, None
  if kind == 'llama3':
    missing = [k for k in ('factor', 'low_freq_factor', 'high_freq_factor',
                           'original_max_position_embeddings') if params.get(k) is None]
    if missing:
      raise HFError(f'rope type llama3 needs {missing} in config.json (transformers needs them)')
    if params.get('partial_rotary_factor', 1) != 1:
      raise HFError('llama3 RoPE with partial_rotary_factor is not supported')
    try:
      return theta, Llama3Scaling(
          factor=float(params['factor']), low_freq_factor=float(params['low_freq_factor']),
          high_freq_factor=float(params['high_freq_factor']),
          original_max_position_embeddings=int(params['original_max_position_embeddings']))
    except ConfigError as e:
      raise HFError(f'config.json describes a model mla_jax cannot build: {e}') from None
  if kind != 'yarn' or arch in GQA_ARCHS:
    raise HFError(f'{arch} with rope type {kind!r} is not supported: mla_jax has plain RoPE, '
                  "Llama 3's (Llama, Qwen2) and DeepSeek's YaRN")
  if params.get('truncate', True) is not True or params.get('partial_rotary_factor', 1) != 1:
    raise HFError('YaRN with truncate=false or partial_rotary_factor is not supported')
  orig = int(params.get('original_max_position_embeddings') or _require(
      hf, 'max_position_embeddings'))
  factor = float(params.get('factor') or _require(hf, 'max_position_embeddings') / orig)
  mscale, mscale_all_dim = params.get('mscale'), params.get('mscale_all_dim')
  yarn = YarnScaling(factor=factor, original_max_position_embeddings=orig,
                     beta_fast=float(params.get('beta_fast') or 32),
                     beta_slow=float(params.get('beta_slow') or 1),
                     mscale=1.0 if mscale is None else float(mscale),
                     mscale_all_dim=float(mscale_all_dim or 0.0))
  # transformers' cos/sin factor; it differs from DeepSeek's when an mscale is 0 or missing.
  reference = params.get('attention_factor')
  if reference is None:
    reference = (rope.get_mscale(factor, mscale) / rope.get_mscale(factor, mscale_all_dim)
                 if mscale and mscale_all_dim else rope.get_mscale(factor))
  if rope.cos_sin_mscale(yarn) != reference:
    yarn = dataclasses.replace(yarn, attention_factor=float(reference))
  return theta, yarn


# transformers' defaults for the MoE keys a DeepSeek config.json may leave out.
_MOE_DEFAULTS = {
    DEEPSEEK[0]: dict(first_k_dense_replace=0, n_routed_experts=64, n_shared_experts=2,
                      moe_intermediate_size=1407, routed_scaling_factor=1.0, n_group=None,
                      topk_group=None, topk_method='greedy', norm_topk_prob=False,
                      scoring_func='softmax'),
    DEEPSEEK[1]: dict(first_k_dense_replace=3, n_routed_experts=256, n_shared_experts=1,
                      moe_intermediate_size=2048, routed_scaling_factor=2.5, n_group=8,
                      topk_group=4, num_experts_per_tok=8, topk_method='noaux_tc',
                      norm_topk_prob=True, scoring_func='sigmoid'),
}


def _moe_from_hf(hf: dict, arch: str, n_layers: int) -> dict:
  """The ModelConfig MoE fields of a DeepSeek config.json ({} for a dense model), as
  transformers builds it: every layer from first_k_dense_replace on is MoE; V2 routes by
  softmax ('greedy' or 'group_limited_greedy') and never normalises the chosen weights; V3 by
  sigmoid with 'noaux_tc', whatever topk_method and scoring_func say. Aux-loss settings only
  train the router and are ignored."""
  get = lambda key: hf[key] if hf.get(key) is not None else _MOE_DEFAULTS[arch].get(key)
  first = get('first_k_dense_replace')
  if first >= n_layers:
    return {}
  v2 = arch == DEEPSEEK[0]
  method, scoring = get('topk_method'), get('scoring_func')
  allowed = ('greedy', 'group_limited_greedy') if v2 else ('noaux_tc',)
  if method not in allowed:
    raise HFError(f"topk_method={method!r} is not supported for {arch} (transformers' "
                  f'{arch} routes by {" or ".join(allowed)})')
  if scoring != ('softmax' if v2 else 'sigmoid'):
    raise HFError(f"scoring_func={scoring!r} is not supported for {arch} (transformers' "
                  f'{arch} scores by {"softmax" if v2 else "sigmoid"})')
  if (hf.get('moe_layer_freq') or 1) != 1:
    raise HFError(f"moe_layer_freq={hf['moe_layer_freq']} is not supported: transformers makes "
                  'every layer from first_k_dense_replace on MoE, which is moe_layer_freq=1')
  if v2 and get('norm_topk_prob'):
    raise HFError("norm_topk_prob=true is not supported for DeepseekV2ForCausalLM: transformers' "
                  "DeepseekV2 ignores it and DeepSeek's code does not, so the model is ambiguous")
  if get('num_experts_per_tok') is None:
    raise HFError("config.json has no 'num_experts_per_tok'; it is needed to build the model")
  return dict(n_routed_experts=get('n_routed_experts'),
              n_shared_experts=get('n_shared_experts') or 0,
              num_experts_per_tok=get('num_experts_per_tok'),
              moe_intermediate_size=get('moe_intermediate_size'), first_k_dense_replace=first,
              moe_layer_freq=1, scoring_func=scoring, topk_method=method,
              n_group=get('n_group') or 1, topk_group=get('topk_group') or 1,
              norm_topk_prob=bool(get('norm_topk_prob')),
              routed_scaling_factor=float(get('routed_scaling_factor')))


def config_from_hf(hf: dict, dtype: str = 'float32', param_dtype: str = 'float32') -> ModelConfig:
  """The ModelConfig of a Hugging Face config.json, or HFError naming what is unsupported."""
  arch = (hf.get('architectures') or [hf.get('model_type')])[0]
  if arch not in GQA_ARCHS + DEEPSEEK:
    raise HFError(f'architecture {arch!r} is not supported; mla_jax converts '
                  f'{", ".join(GQA_ARCHS + DEEPSEEK)}')
  if hf.get('quantization_config'):
    raise HFError('the checkpoint is quantized (quantization_config); dequantize it to '
                  'bfloat16 first')
  for key, want in (('hidden_act', 'silu'), ('attention_bias', False), ('mlp_bias', False)):
    if hf.get(key, want) != want:
      raise HFError(f'{key}={hf[key]!r} is not supported (mla_jax: {key}={want!r})')
  if arch in QWEN2 and hf.get('use_sliding_window'):
    raise HFError('use_sliding_window=true is not supported: mla_jax attends over the whole '
                  'context in every layer')
  theta, yarn = _rope(hf, arch)
  d, h = _require(hf, 'hidden_size'), _require(hf, 'num_attention_heads')
  fields = dict(vocab_size=_require(hf, 'vocab_size'), d_model=d,
                n_layers=_require(hf, 'num_hidden_layers'), n_heads=h,
                d_ff=_require(hf, 'intermediate_size'),
                norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
                tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
                max_seq_len=_require(hf, 'max_position_embeddings'), rope_theta=theta,
                rope_scaling=yarn, dtype=dtype, param_dtype=param_dtype)
  if arch in GQA_ARCHS:
    g = hf.get('num_key_value_heads') or h
    fields.update(attention='mha' if g == h else 'mqa' if g == 1 else 'gqa', n_kv_heads=g,
                  head_dim=hf.get('head_dim') or d // h, rope_layout='half',
                  qkv_bias=arch in QWEN2)
  else:
    fields.update(_moe_from_hf(hf, arch, fields['n_layers']))
    if fields['norm_eps'] != DEEPSEEK_LATENT_EPS:
      raise HFError(f"rms_norm_eps={fields['norm_eps']} is not supported: DeepSeek's latent "
                    f'norms use {DEEPSEEK_LATENT_EPS} whatever it says, mla_jax one eps')
    interleaved = arch == DEEPSEEK[0] or hf.get('rope_interleave', True)
    fields.update(attention='mla', kv_lora_rank=_require(hf, 'kv_lora_rank'),
                  q_lora_rank=hf.get('q_lora_rank') or 0,
                  qk_nope_head_dim=_require(hf, 'qk_nope_head_dim'),
                  qk_rope_head_dim=_require(hf, 'qk_rope_head_dim'),
                  v_head_dim=_require(hf, 'v_head_dim'),
                  head_dim=_require(hf, 'qk_nope_head_dim'),
                  rope_layout='interleaved' if interleaved else 'half')
  try:
    return ModelConfig(**fields)
  except (ConfigError, TypeError) as e:
    raise HFError(f'config.json describes a model mla_jax cannot build: {e}') from None


def architecture(cfg: ModelConfig) -> str:
  """The Hugging Face class a model exports to, as its variant's registry entry says
  (Qwen2's for a Llama with q/k/v biases)."""
  arch = variants.get(cfg.attention).hf_architecture
  if arch is None:
    raise HFError(f'attention={cfg.attention!r} has no Hugging Face architecture: transformers '
                  'has no model class for it, so it cannot be exported; keep the workdir, or '
                  f'train a variant that exports ({", ".join(GQA_ARCHS + DEEPSEEK)})')
  if arch not in LLAMA + DEEPSEEK:
    raise HFError(f'attention={cfg.attention!r} has no Hugging Face architecture mla_jax can '
                  f'write (it writes {", ".join(GQA_ARCHS + DEEPSEEK)})')
  if arch in DEEPSEEK and cfg.n_routed_experts and cfg.scoring_func == 'softmax':
    return DEEPSEEK[0]  # V2's softmax router; V3's is sigmoid
  return QWEN2[0] if arch in LLAMA and cfg.qkv_bias else arch


def config_to_hf(cfg: ModelConfig) -> dict:
  """config.json for our model: LlamaForCausalLM or Qwen2ForCausalLM (MHA / GQA / MQA) or
  DeepseekV3ForCausalLM (DeepseekV2ForCausalLM for a softmax-routed MoE).

  RoPE is written both as transformers 5 reads it (rope_parameters) and as 4 does
  (rope_theta, rope_scaling)."""
  arch = architecture(cfg)
  if arch in GQA_ARCHS and isinstance(cfg.rope_scaling, YarnScaling):
    raise HFError("a GQA-family model with YaRN has no Hugging Face equivalent (Llama's YaRN "
                  "has no softmax mscale); export it without rope_scaling")
  if arch in DEEPSEEK and (cfg.rope_block is not None or not cfg.kv_norm
                          or not cfg.qk_nope_head_dim):
    raise HFError(f'rope_block={cfg.rope_block}, kv_norm={cfg.kv_norm}, qk_nope_head_dim='
                  f'{cfg.qk_nope_head_dim}: transformers\' DeepSeek rotates its rope key with one '
                  'frequency ladder, always normalises the latent and needs a nope part, so this '
                  '(exact-embedding) model has no Hugging Face equivalent; compress it with '
                  'mla_jax.to_mla(..., kv_lora_rank=R) to export')
  if arch in DEEPSEEK and cfg.norm_eps != DEEPSEEK_LATENT_EPS:
    raise HFError(f"norm_eps={cfg.norm_eps}: DeepSeek's latent norms always use "
                  f'{DEEPSEEK_LATENT_EPS}, so this model has no DeepSeek equivalent')
  if cfg.n_routed_experts and cfg.moe_layer_freq != 1:
    raise HFError(f'moe_layer_freq={cfg.moe_layer_freq}: transformers makes every layer from '
                  'first_k_dense_replace on MoE, so this model has no Hugging Face equivalent')
  if arch == DEEPSEEK[0] and (cfg.norm_topk_prob or cfg.rope_layout != 'interleaved'):
    raise HFError(f'norm_topk_prob={cfg.norm_topk_prob}, rope_layout={cfg.rope_layout!r}: '
                  "transformers' DeepseekV2 (softmax routing) never normalises the chosen "
                  "weights and rotates adjacent pairs, so this model has no equivalent")
  rope_parameters = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling is not None:
    scaling = {k: v for k, v in dataclasses.asdict(cfg.rope_scaling).items()
               if k != 'type' and v is not None}
    rope_parameters.update(scaling, rope_type=cfg.rope_scaling.type)
  common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, hidden_act='silu',
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
                rope_theta=cfg.rope_theta, rope_parameters=rope_parameters,
                rope_scaling=None if cfg.rope_scaling is None else {
                    **rope_parameters, 'type': cfg.rope_scaling.type},
                bos_token_id=None, eos_token_id=None, pad_token_id=None,
                dtype=cfg.param_dtype, torch_dtype=cfg.param_dtype)
  if arch in LLAMA:
    return dict(common, architectures=[arch], model_type='llama',
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, mlp_bias=False)
  if arch in QWEN2:  # every layer full attention (no sliding window); no attention_bias key
    common.pop('attention_bias')
    return dict(common, architectures=[arch], model_type='qwen2',
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  mla = dict(num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
             kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
             qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
             first_k_dense_replace=cfg.n_layers)
  if cfg.n_routed_experts:
    mla.update({k: getattr(cfg, k) for k in (
        'first_k_dense_replace', 'n_routed_experts', 'n_shared_experts', 'num_experts_per_tok',
        'moe_intermediate_size', 'moe_layer_freq', 'scoring_func', 'topk_method', 'n_group',
        'topk_group', 'norm_topk_prob', 'routed_scaling_factor')})
  if arch == DEEPSEEK[0]:
    return dict(common, **mla, architectures=[arch], model_type='deepseek_v2')
  return dict(common, **mla, architectures=[arch], model_type='deepseek_v3',
              num_nextn_predict_layers=0, rope_interleave=cfg.rope_layout == 'interleaved')


# --- tensors <-> parameters ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One Hugging Face tensor and the parameter(s) of ours it holds."""

  name: str
  ours: tuple[tuple, ...]  # our parameter paths (two for kv_b_proj)
  kind: str = 'linear'  # 'copy' | 'linear' | 'kv_b' | 'bias'
  in_axes: int = 1  # linear: how many leading axes of ours make torch's `in`
  rope_rows: bool = False  # Llama q/k: head rows follow our rope layout
  expert: int | None = None  # one routed expert: row `expert` of our stacked [E, ...] weight


def _tensors(cfg: ModelConfig) -> list[_Tensor]:
  """Every Hugging Face tensor of this model, in the order save_pretrained lists them."""
  out = [_Tensor('model.embed_tokens.weight', (('embed', 'table'),), 'copy'),
         _Tensor('model.norm.weight', (('final_norm', 'scale'),), 'copy')]
  if not cfg.tie_embeddings:
    out.append(_Tensor('lm_head.weight', (('lm_head',),)))
  llama = architecture(cfg) in GQA_ARCHS
  for i in range(cfg.n_layers):
    hf = f'model.layers.{i}.'
    t = lambda name, *path, **kw: _Tensor(hf + name, (('blocks', i, *path),), **kw)  # noqa: B023
    out += [t('input_layernorm.weight', 'attn_norm', 'scale', kind='copy'),
            t('post_attention_layernorm.weight', 'mlp_norm', 'scale', kind='copy')]
    if cfg.is_moe_layer(i):  # per-expert tensors, as save_pretrained writes them
      out.append(t('mlp.gate.weight', 'mlp', 'router'))
      if cfg.topk_method == 'noaux_tc':
        out.append(t('mlp.gate.e_score_correction_bias', 'mlp', 'e_score_correction_bias',
                     kind='copy'))
      for j in range(cfg.n_routed_experts):
        out += [t(f'mlp.experts.{j}.{proj}.weight', 'mlp', ours, expert=j) for proj, ours in
                (('gate_proj', 'w_gate'), ('up_proj', 'w_up'), ('down_proj', 'w_down'))]
      if cfg.n_shared_experts:
        out += [t(f'mlp.shared_experts.{proj}.weight', 'mlp', 'shared', ours) for proj, ours in
                (('gate_proj', 'w_gate'), ('up_proj', 'w_up'), ('down_proj', 'w_down'))]
    else:
      out += [t('mlp.gate_proj.weight', 'mlp', 'w_gate'), t('mlp.up_proj.weight', 'mlp', 'w_up'),
              t('mlp.down_proj.weight', 'mlp', 'w_down')]
    out.append(t('self_attn.o_proj.weight', 'attn', 'w_o', in_axes=2))
    if llama:
      out += [t('self_attn.q_proj.weight', 'attn', 'w_q', rope_rows=True),
              t('self_attn.k_proj.weight', 'attn', 'w_k', rope_rows=True),
              t('self_attn.v_proj.weight', 'attn', 'w_v')]
      if cfg.qkv_bias:
        out += [t('self_attn.q_proj.bias', 'attn', 'b_q', kind='bias', rope_rows=True),
                t('self_attn.k_proj.bias', 'attn', 'b_k', kind='bias', rope_rows=True),
                t('self_attn.v_proj.bias', 'attn', 'b_v', kind='bias')]
      continue
    if cfg.q_lora_rank:
      out += [t('self_attn.q_a_proj.weight', 'attn', 'w_dq'),
              t('self_attn.q_a_layernorm.weight', 'attn', 'q_norm', 'scale', kind='copy'),
              t('self_attn.q_b_proj.weight', 'attn', 'w_uq')]
    else:
      out.append(t('self_attn.q_proj.weight', 'attn', 'w_q'))
    out += [t('self_attn.kv_a_proj_with_mqa.weight', 'attn', 'w_dkv'),
            t('self_attn.kv_a_layernorm.weight', 'attn', 'kv_norm', 'scale', kind='copy'),
            _Tensor(hf + 'self_attn.kv_b_proj.weight',
                    (('blocks', i, 'attn', 'w_uk'), ('blocks', i, 'attn', 'w_uv')), 'kv_b')]
  return out


def _rope_rows(cfg: ModelConfig, t: _Tensor) -> np.ndarray | None:
  """Llama's q/k head rows are in 'half' order; ours in cfg.rope_layout's."""
  if t.rope_rows and cfg.rope_layout == 'interleaved':
    return rope.interleaved_to_half(cfg.head_dim)
  return None


def _hf_shape(t: _Tensor, shapes: dict) -> tuple[int, ...]:
  if t.expert is not None:
    shapes = {t.ours[0]: shapes[t.ours[0]][1:]}  # one expert's [d, f] or [f, d]
  if t.kind == 'copy':
    return shapes[t.ours[0]]
  if t.kind == 'bias':
    return (math.prod(shapes[t.ours[0]]),)
  if t.kind == 'kv_b':
    (c, h, n), (_, _, v) = shapes[t.ours[0]], shapes[t.ours[1]]
    return (h * (n + v), c)
  shape = shapes[t.ours[0]]
  return (math.prod(shape[t.in_axes:]), math.prod(shape[:t.in_axes]))


def to_hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """Our flat {path: array} parameters -> Hugging Face tensors by name."""
  out = {}
  for t in _tensors(cfg):
    arrays = [np.asarray(params[path]) for path in t.ours]
    if t.expert is not None:
      arrays = [a[t.expert] for a in arrays]
    if t.kind == 'copy':
      out[t.name] = arrays[0]
    elif t.kind == 'kv_b':
      w_ukv = np.concatenate(arrays, axis=2)  # [c, h, n + v]
      out[t.name] = w_ukv.transpose(1, 2, 0).reshape(-1, w_ukv.shape[0])
    elif t.kind == 'bias':  # [heads, k] -> [heads * k], rows in 'half' order like the weight's
      rows = _rope_rows(cfg, t)
      out[t.name] = (arrays[0] if rows is None else arrays[0][..., rows]).reshape(-1)
    else:
      w = arrays[0]
      rows = _rope_rows(cfg, t)
      if rows is not None:
        w = w[..., rows]
      out[t.name] = w.reshape(math.prod(w.shape[:t.in_axes]), -1).T
  return out


def from_hf_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[tuple, np.ndarray]:
  """Hugging Face tensors -> our flat {path: array in its parameter's dtype: cfg.param_dtype,
  float32 for an MoE router and its bias}, checking every name and shape. One tensor at a time
  is read from the (memory-mapped) files; routed experts are stacked into [E, ...]."""
  params = {}
  state = traverse_util.flatten_dict(nnx.to_pure_dict(abstract(cfg)[1]))
  shapes = {path: tuple(x.shape) for path, x in state.items()}
  for t in _tensors(cfg):
    if t.name not in tensors:
      raise HFError(f'tensor {t.name} is missing from the checkpoint (config.json implies '
                    f'shape {list(_hf_shape(t, shapes))})')
    w = np.asarray(tensors[t.name]).astype(state[t.ours[0]].dtype)
    if w.shape != _hf_shape(t, shapes):
      raise HFError(f'tensor {t.name} has shape {list(w.shape)} but config.json implies '
                    f'{list(_hf_shape(t, shapes))}')
    if t.expert is not None:  # linear, into row t.expert of the stacked weight
      if t.ours[0] not in params:
        params[t.ours[0]] = np.zeros(shapes[t.ours[0]], w.dtype)
      params[t.ours[0]][t.expert] = w.T
    elif t.kind == 'copy':
      params[t.ours[0]] = w
    elif t.kind == 'kv_b':
      (c, h, n), v = shapes[t.ours[0]], shapes[t.ours[1]][2]
      w = w.reshape(h, n + v, c).transpose(2, 0, 1)  # [c, h, n + v]
      params[t.ours[0]], params[t.ours[1]] = w[..., :n], w[..., n:]
    elif t.kind == 'bias':
      w = w.reshape(shapes[t.ours[0]])
      rows = _rope_rows(cfg, t)
      params[t.ours[0]] = w if rows is None else w[..., np.argsort(rows)]
    else:
      w = w.T.reshape(shapes[t.ours[0]])
      rows = _rope_rows(cfg, t)
      if rows is not None:
        w = w[..., np.argsort(rows)]
      params[t.ours[0]] = w
  return params


def _unused(cfg: ModelConfig, tensors: dict) -> list[str]:
  """Tensors no parameter reads, apart from ones that are safe to drop."""
  used = {t.name for t in _tensors(cfg)}
  extra = []
  for name in sorted(set(tensors) - used):
    layer = re.match(r'model\.layers\.(\d+)\.', name)
    if layer and int(layer.group(1)) >= cfg.n_layers:
      continue  # DeepSeek-V3's multi-token-prediction module: not part of the next-token model
    if name.endswith('rotary_emb.inv_freq'):
      continue  # a buffer recomputed from config.json
    if name == 'lm_head.weight' and cfg.tie_embeddings and np.array_equal(
        tensors[name], tensors['model.embed_tokens.weight']):
      continue  # a tied head saved anyway
    extra.append(name)
  return extra


# --- whole models ----------------------------------------------------------------------------
def load(hf_dir, dtype: str = 'float32', param_dtype: str = 'float32'
         ) -> tuple[Transformer, dict]:
  """(our Transformer, config.json) of a Hugging Face folder; compute and parameter dtypes
  as given (bfloat16 checkpoints convert exactly into either)."""
  hf, tensors = read_folder(hf_dir)
  cfg = config_from_hf(hf, dtype, param_dtype)
  extra = _unused(cfg, tensors)
  if extra:
    raise HFError(f'{len(extra)} tensors have no place in a {cfg.attention} model, e.g. '
                  f'{extra[0]} (biases, experts or an unknown module?); mla_jax converts '
                  'only the Llama, Qwen2 and DeepSeek-V2/V3 layouts (docs/huggingface.md)')
  params = from_hf_tensors(cfg, tensors)
  return with_params(cfg, traverse_util.unflatten_dict(
      {path: jnp.asarray(w) for path, w in params.items()})), hf


def save(model: Transformer, out_dir, tok=None) -> dict:
  """Writes config.json and model.safetensors into an empty or new out_dir (whole: see
  `workdir.staged`), and tok's tokenizer files if it has any (its special token ids then go
  into config.json too); -> config.json."""
  wd.must_be_new(out_dir, 'the folder')
  cfg = model.cfg
  hf = config_to_hf(cfg)
  files = tok.files if tok is not None else {}
  if files:
    hf.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  # every variable: the parameters and an MoE router's bias (moe.RouterBias)
  params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  tensors = to_hf_tensors(cfg, {path: np.asarray(jax.device_get(x)) for path, x in
                                params.items()})
  with wd.staged(out_dir, 'the folder') as out:
    write_safetensors(out / 'model.safetensors', tensors)
    (out / 'config.json').write_text(json.dumps(hf, indent=1) + '\n')
    for name, text in files.items():
      (out / name).write_text(text, encoding='utf-8')
  return hf


# --- workdirs (python -m mla_jax.convert --hf_dir / --to_hf) ------------------------------------

EVAL_SEQ_LEN = 512  # perplexity windows of an imported run (capped by max_position_embeddings)


def import_workdir(hf_dir, workdir, dtype: str = 'float32', param_dtype: str = 'float32',
                   mla_decode: str = 'absorbed') -> ml_collections.ConfigDict:
  """Converts a Hugging Face folder into a new workdir (config.json + checkpoint 0, which
  evaluate and generate use as they use a trained run, and the tokenizer files beside the
  weights: tokenizer.json, tokenizer_config.json, special_tokens_map.json and
  generation_config.json, where present); -> the workdir's config."""
  workdir = pathlib.Path(workdir)
  wd.must_be_new(workdir, '--workdir')  # before the (long) load; write_new checks again
  model, hf_json = load(hf_dir, dtype, param_dtype)
  tok = None  # none: workdir.load_tokenizer reads bytes if the vocabulary is 256, else refuses
  if (pathlib.Path(hf_dir) / 'tokenizer.json').is_file():
    tok = tokenizer.HFTokenizer.from_path(hf_dir)
    if tok.vocab_size > model.cfg.vocab_size:
      raise HFError(f"the tokenizer's {tok.vocab_size} tokens exceed the model's vocab_size="
                    f'{model.cfg.vocab_size}; give the tokenizer saved with this model')
  cfg = model.cfg.to_dict()
  cfg['mla_decode'] = mla_decode
  seq_len = min(EVAL_SEQ_LEN, model.cfg.max_seq_len)
  config = ml_collections.ConfigDict(dict(
      seed=0, model=cfg, mesh=dict(data=-1, fsdp=1, tensor=1),
      eval=dict(seq_len=seq_len, stride=max(seq_len // 2, 1), batch_size=8),
      source=dict(hf_dir=str(pathlib.Path(hf_dir).absolute()),
                  architecture=(hf_json.get('architectures') or ['?'])[0])))
  wd.write_new(workdir, '--workdir', config, model, 'huggingface', tok)
  return config


def export_workdir(workdir, out_dir, step: int | None = None, best: bool = False) -> dict:
  """Writes a run's parameters and its tokenizer's files as a new Hugging Face folder
  (`save`); -> its config.json."""
  wd.must_be_new(out_dir, '--to_hf')  # before the load
  tok = wd.load_tokenizer(workdir, required=False)  # a model without one exports none
  model, _ = wd.load_workdir(workdir, step, best)
  return save(model, out_dir, tok)
