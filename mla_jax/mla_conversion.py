r"""MHA / GQA / MQA -> MLA: an exact embedding, and a lossy compression into DeepSeek's MLA.

After TransMLA (Meng et al. 2025, arXiv 2502.07864) and MHA2MLA (Ji et al. 2025, arXiv
2502.14837); the method below is this module's own, with the choices and why.

Notation: the source has H query heads in G groups (P = H / G per group; MHA G = H, MQA G = 1)
of width d_h, m = d_h / 2 RoPE pairs of frequencies θ_i (rope.inv_frequencies(d_h)), scale
d_h^-1/2 · μ² (μ: YaRN's softmax mscale, 1 without YaRN). x is a layer's attention input (after
its RMSNorm). Weights W_Q [d, H, d_h], W_K, W_V [d, G, d_h], W_O [H, d_h, d]; g(h) = h // P is
the group of head h. Pair i of a head vector is the complex number z_i = x_re + i x_im (dims
(2i, 2i+1) in layout 'interleaved', (i, i + m) in 'half'); RoPE at position p multiplies it by
e^{i p θ_i}, so a score is

  s_h(t, u) = d_h^-1/2 μ² Σ_i Re( conj(Q_{h,i}) K_{g(h),i} e^{i (u - t) θ_i} ).           (1)

1. Exact embedding (`to_mla(model)`). One rope key of width G d_h holds every group's key,
   [K_1, .., K_G] (kv_lora_rank = qk_rope_head_dim = G d_h), each block rotated with the
   source's frequencies (ModelConfig.rope_block = d_h: the frequencies of a d_h-wide rotation
   repeated per block, pairs within each block in either layout; a YaRN or Llama 3 rescaling
   is computed for d_h dims, as the source's is); head h's rope query is its
   source query on block g(h) and zero elsewhere, times √G, which turns MLA's (0 + G d_h)^-1/2
   into d_h^-1/2; the latent is the values, c_kv = [V_1, .., V_G] with no RMSNorm
   (kv_norm=False), and W_UV[:, h] selects block g(h); d_n = 0 (no W_UK). Every term of (1) is
   reproduced, so logits are equal up to float rounding, through the full forward and the
   cache, and the cache holds (d_c + d_r) = 2 G d_h elements per token and layer, as the
   source's does. transformers cannot represent rope_block or kv_norm=False: hf.save refuses.

2. Compression into the standard architecture (`to_mla(model, kv_lora_rank=R,
   qk_rope_head_dim=d_r)`): latent RMSNorm on, one rope key of d_r = 2 n dims rotated by the
   ordinary frequencies θ'_j = θ'^(-2j/d_r) of a d_r-wide rotation, which is what a
   DeepseekV3 checkpoint is. Per layer:

   a. Statistics. C = E[x xᵀ] over calibration tokens (the source's own activations, every
      layer from one forward pass), or C = diag(γ²) from weights alone (γ the attention
      RMSNorm's scale: x / rms(x) has unit mean square, assumed isotropic). Everything below
      needs only C: for a complex weight column w (pair i of a head, w = w_re + i w_im),
      E|x·w|² = w_reᵀ C w_re + w_imᵀ C w_im.

   b. One shared key per frequency (the shared rope key). MLA has ONE rope key for all heads,
      so the G keys of pair i must become one complex number. Σ_i = E[K_{:,i} K_{:,i}^H]
      (G × G Hermitian, = W_iᵀ C conj(W_i) for the complex weights W_i [d, G]) has the top
      unit eigenvector u_i and eigenvalue λ_i; the best rank-one fit is K_{j,i} ≈ u_{j,i} w_i
      with the shared key w_i = Σ_j conj(u_{j,i}) K_{j,i}, E|w_i|² = λ_i. Multiplying by the
      complex number u commutes with the rotation e^{iφ}, so head h's term of (1) becomes
        Re( conj(Q'_{h,i}) w_i e^{iφ} ),   Q'_{h,i} = conj(u_{g(h),i}) Q_{h,i},           (2)
      exactly when the fit is. This is TransMLA's RoRoPE (a PCA of the G keys of each
      frequency, real and imaginary parts as samples), done over the complex numbers: a
      unitary, not only an orthogonal, mix of the groups, which captures at least as much of
      the keys. MQA (G = 1) loses nothing here: u = 1.

   c. Which pairs keep RoPE (n = d_r / 2 of the m). '2norm' (MHA2MLA's criterion, made
      joint over the heads that share the key): pair i scores
        S_i = √λ_i · Σ_h |u_{g(h),i}| · ‖Q_{h,i}‖,                                         (3)
      the product of the (merged) key's and the queries' norms, ‖·‖ root-mean-square over the
      calibration tokens (MHA2MLA averages the norms; the second moment is what C gives); the
      n best pairs are kept, per layer. 'uniform': pairs i_j = ⌊j m / n⌋, the same in every
      layer: with n dividing m these are exactly the frequencies of a d_r-wide rotation at the
      source's rope_theta, the ordinary DeepSeek ladder.

   d. Frequencies. Slot j of the rope key (pairs in increasing index i_0 < i_1 < ..., i.e.
      decreasing frequency) rotates at θ'_j = θ'^(-2j/d_r), one rope_theta θ' for the model:
      ln θ' = (d_r / d_h) ln θ · Σ_{l,j} j i_{l,j} / Σ_{l,j} j², the least-squares fit of
      ln θ'_j to ln θ_{i_j} over all layers (slot 0 turns at θ'_0 = 1 whatever θ' is). For
      'uniform' with n | m the fit is θ exactly; otherwise a kept pair turns at a slightly
      different frequency, part of the loss fine-tuning recovers. With YaRN the source's
      rope_scaling is kept; its ramp is recomputed for d_r dims, close to but not exactly the
      kept pairs' blend. Llama 3's rescaling is kept too and is exact wherever the ladder is:
      it maps each frequency by its own wavelength, whatever the rotation's width.

   e. No-rope part (d_n = d_h). What RoPE no longer carries moves, unrotated, into the nope
      key: for each group j, K^nope_j = K_j with every kept pair i replaced by its residual
      K_{j,i} - u_{j,i} w_i; the nope query is the source query Q_h, unchanged. Head h's score
      is then (2) over the kept pairs plus Q_h · K^nope_{g(h)}, which equals (1) except that the
      residuals and the dropped pairs lose their rotation (MHA2MLA's partial RoPE) and the kept
      pairs may change frequency.

   f. Low rank (the latent). M = [α W_Knope, W_V] (d × 2 G d_h); α balances the keys' energy
      against the values' (TransMLA's balanced KV: α² = tr(W_Vᵀ C W_V) / tr(W_Knopeᵀ C
      W_Knope)), so that neither dominates the fit. With V_R the top R eigenvectors of Mᵀ C M
      (the principal directions of the activations x M: activation-aware PCA with calibration
      data, a weighted SVD of M without), c = x M V_R is the latent, W_DKV's first R columns,
      and [α K^nope, V] ≈ c V_Rᵀ: W_UK[:, h] = V_Rᵀ[:, key block g(h)] / α, W_UV[:, h] =
      V_Rᵀ[:, value block g(h)]. Nothing is lost when R = rank(M) ≤ min(d, 2 G d_h).

   g. The latent RMSNorm. DeepSeek normalises c: c_n = c / ρ_t · γ_c with ρ_t = rms(c_t),
      which the source does not do. A per-token scalar cannot be folded into weights; what
      can be is its typical size: latent_norm='calibrated' sets γ_c = ρ̄ = √(tr(V_Rᵀ Mᵀ C M
      V_R) / R) (the root-mean-square latent over the calibration tokens, or under the
      weight-only C), so c_n = c exactly for a token of typical latent size, and each key and
      value is otherwise scaled by ρ̄ / ρ_t; latent_norm='unit' leaves γ = 1 (values and keys
      come out ρ_t times too small) for fine-tuning to recover. experiments/to_mla.py measures
      both.

   h. Scale. MLA scales scores by (d_n + d_r)^-1/2 μ²; the queries (nope and rope) are
      multiplied by ((d_h + d_r) / d_h)^1/2 to give back d_h^-1/2.

   The cache is R + d_r elements per token and layer (the source: 2 G d_h).

Everything else (embeddings, norms, MLPs, the head) is copied. The linear algebra runs in
float64 numpy; the result is a Transformer in the source's parameter dtype.

`to_mla_workdir` applies it to a run (`python -m mla_jax.convert --to_mla`): a new MLA workdir
that keeps the run's data and eval sections (evaluate scores it on the source corpus) and
records how it was made in a `conversion` section; `python -m mla_jax.train --init_from=`
fine-tunes it.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mla_jax import data
from mla_jax import workdir as wd
from mla_jax.config import ModelConfig
from mla_jax.errors import Error, check_token_ids
from mla_jax.model import Transformer, with_params

ROPE_SELECTIONS = ('2norm', 'uniform')
LATENT_NORMS = ('calibrated', 'unit')
GQA_FAMILY = ('mha', 'gqa', 'mqa')


class ConversionError(Error, ValueError):
  """A conversion the source cannot give (wrong variant, rank or rope width); says the fix."""


# --- the exact embedding -------------------------------------------------------------------
def exact_config(src: ModelConfig) -> ModelConfig:
  """The generalised MLA config that holds `src` (MHA / GQA / MQA) exactly."""
  g, k = src.n_kv_heads, src.head_dim
  return _mla_config(src, kv_lora_rank=g * k, qk_nope_head_dim=0, qk_rope_head_dim=g * k,
                     rope_block=k, kv_norm=False)


def _mla_config(src: ModelConfig, **mla) -> ModelConfig:
  fields = {**src.to_dict(), 'attention': 'mla', 'n_kv_heads': None, 'q_lora_rank': 0,
            'v_head_dim': src.head_dim, **mla}
  return ModelConfig.from_dict(fields)


def _exact_attention(attn: dict, src: ModelConfig) -> dict:
  """One layer's MLA parameters (numpy) equal to the GQA layer `attn`."""
  w_q, w_k, w_v, w_o = (np.asarray(attn[n], np.float64) for n in ('w_q', 'w_k', 'w_v', 'w_o'))
  d, h, k = w_q.shape
  g = w_k.shape[1]
  groups = np.arange(h) // (h // g)
  q = np.zeros((d, h, g, k))
  q[:, np.arange(h), groups] = w_q * math.sqrt(g)  # (G d_h)^-1/2 * √G = d_h^-1/2
  w_uv = np.zeros((g, k, h, k))
  w_uv[groups, :, np.arange(h), :] = np.eye(k)  # head h reads the values of its group
  return {'w_q': q.reshape(d, h, g * k),
          'w_dkv': np.concatenate([w_v.reshape(d, g * k), w_k.reshape(d, g * k)], axis=1),
          'w_uv': w_uv.reshape(g * k, h, k), 'w_o': w_o}


# --- calibration -----------------------------------------------------------------------------
def _attention_inputs(model: Transformer, tokens_bt):
  """Every layer's attention input (after its RMSNorm), [l, b, t, d], from one forward pass."""
  x = model.embed(tokens_bt)
  inputs = []
  for block in model.blocks:
    inputs.append(block.attn_norm(x))
    x, _ = block(x, None)
  return inputs


@jax.jit
def _grams(graphdef, state, tokens_bt):
  inputs = _attention_inputs(nnx.merge(graphdef, state), tokens_bt)
  return jnp.stack([jnp.einsum('btd,bte->de', x, x, precision='highest',
                               preferred_element_type=jnp.float32) for x in inputs])


def input_covariances(model: Transformer, batches: Iterable) -> np.ndarray:
  """C_l = E[x xᵀ] of each layer's attention input over the tokens of `batches` (int [b, t]
  each), float64 [l, d, d]."""
  graphdef, state = nnx.split(model)
  total, count = None, 0
  for batch in batches:
    tokens = np.asarray(batch)
    check_token_ids(tokens, model.cfg.vocab_size, 'calibration token')
    if tokens.ndim != 2:
      raise ConversionError(f'calibration batches must be int [batch, time]; got shape '
                            f'{list(tokens.shape)}')
    grams = np.asarray(_grams(graphdef, state, jnp.asarray(tokens, jnp.int32)), np.float64)
    total = grams if total is None else total + grams
    count += tokens.size
  if not count:
    raise ConversionError('calibration has no tokens; give at least one batch, or None to '
                          'use the weights alone')
  return total / count


def weight_covariances(model: Transformer) -> np.ndarray:
  """The weight-only stand-in for input_covariances: diag(γ²) per layer."""
  return np.stack([np.diag(np.asarray(b.attn_norm.scale[...], np.float64)**2)
                   for b in model.blocks])


# --- the compression -------------------------------------------------------------------------
def _pair_dims(width: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
  """(real, imaginary) dims of each RoPE pair of a width-dim rotation."""
  i = np.arange(width // 2)
  return (2 * i, 2 * i + 1) if layout == 'interleaved' else (i, i + width // 2)


def _energy(w, cov):
  """E|x·w|² for complex weight columns w [d, ...] (x real, E[x xᵀ] = cov) -> [...]."""
  return (np.einsum('d...,de,e...->...', w.real, cov, w.real)
          + np.einsum('d...,de,e...->...', w.imag, cov, w.imag))


@dataclasses.dataclass
class _RopeSplit:
  """One layer's RoPE pairs: the shared key direction u [m, G] and energy λ [m] of each
  frequency, and the score (3) of each pair."""

  u: np.ndarray
  lam: np.ndarray
  score: np.ndarray


def _rope_split(w_q, w_k, cov, layout) -> _RopeSplit:
  h, g, k = w_q.shape[1], w_k.shape[1], w_k.shape[2]
  re, im = _pair_dims(k, layout)
  k_c = w_k[..., re] + 1j * w_k[..., im]  # [d, g, m]
  q_c = w_q[..., re] + 1j * w_q[..., im]  # [d, h, m]
  sigma = np.einsum('dgm,de,ejm->mgj', k_c, cov, k_c.conj())  # E[K_g conj(K_j)] per pair
  lam, vecs = np.linalg.eigh(sigma)  # ascending, per pair
  u, lam = vecs[..., -1], np.maximum(lam[:, -1], 0.0)  # [m, g], [m]
  q_norm = np.sqrt(np.maximum(_energy(q_c, cov), 0.0))  # [h, m]
  groups = np.arange(h) // (h // g)
  score = np.sqrt(lam) * np.einsum('hm,mh->m', q_norm, np.abs(u[:, groups]))
  return _RopeSplit(u, lam, score)


def _select(split: _RopeSplit, n: int, selection: str) -> np.ndarray:
  """The n kept pairs, increasing (slot j holds pair out[j])."""
  m = len(split.score)
  if selection == 'uniform':
    return (np.arange(n) * m) // n
  return np.sort(np.argsort(-split.score, kind='stable')[:n])


def _fit_theta(src: ModelConfig, kept: list[np.ndarray], d_r: int) -> float:
  """rope_theta whose d_r-wide ladder best fits the kept pairs' frequencies (step d)."""
  d_h = src.head_dim
  j = np.arange(d_r // 2)
  if all(np.array_equal(i, j * (d_h // d_r)) for i in kept) and d_h % d_r == 0:
    return src.rope_theta  # the ordinary ladder at the source's theta: exact
  num = sum(float(np.dot(j, i)) for i in kept)
  den = len(kept) * float(np.dot(j, j))
  if den == 0:  # one slot: it turns at θ'_0 = 1 whatever θ' is
    return src.rope_theta
  fitted = math.exp(d_r / d_h * math.log(src.rope_theta) * num / den)
  return float(f'{fitted:.6g}')  # six digits: the fit is no more precise than that


def _compress_attention(attn: dict, cov: np.ndarray, split: _RopeSplit, kept: np.ndarray,
                        src: ModelConfig, rank: int, d_r: int, latent_norm: str) -> dict:
  """One layer's standard-MLA parameters (numpy float64) from the GQA layer `attn`."""
  w_q, w_k, w_v, w_o = (np.asarray(attn[n], np.float64) for n in ('w_q', 'w_k', 'w_v', 'w_o'))
  d, h, k = w_q.shape
  g = w_k.shape[1]
  groups = np.arange(h) // (h // g)
  re, im = _pair_dims(k, src.rope_layout)
  re_r, im_r = _pair_dims(d_r, src.rope_layout)
  u = split.u[kept]  # [n, g]
  k_c = w_k[..., re[kept]] + 1j * w_k[..., im[kept]]  # [d, g, n]
  q_c = w_q[..., re[kept]] + 1j * w_q[..., im[kept]]  # [d, h, n]
  shared = np.einsum('dgn,ng->dn', k_c, u.conj())  # w_i = Σ_j conj(u_j) K_j  (step b)
  q_rope = q_c * u[:, groups].T.conj()[None]  # Q' = conj(u_g(h)) Q  (2)
  k_rope = np.zeros((d, d_r))
  k_rope[:, re_r], k_rope[:, im_r] = shared.real, shared.imag
  w_q_rope = np.zeros((d, h, d_r))
  w_q_rope[..., re_r], w_q_rope[..., im_r] = q_rope.real, q_rope.imag
  residual = k_c - shared[:, None, :] * u.T[None]  # what the shared key misses (step e)
  k_nope = w_k.copy()
  k_nope[..., re[kept]], k_nope[..., im[kept]] = residual.real, residual.imag
  k_flat, v_flat = k_nope.reshape(d, g * k), w_v.reshape(d, g * k)
  k_energy = np.trace(k_flat.T @ cov @ k_flat)
  alpha = math.sqrt(np.trace(v_flat.T @ cov @ v_flat) / k_energy) if k_energy > 0 else 1.0
  m_joint = np.concatenate([alpha * k_flat, v_flat], axis=1)  # [d, 2 g k]  (step f)
  _, vecs = np.linalg.eigh(m_joint.T @ cov @ m_joint)
  basis = vecs[:, ::-1][:, :rank]  # [2 g k, R], principal directions first
  down = m_joint @ basis  # [d, R]: c = x M V_R
  up = basis.T.reshape(rank, 2, g, k)  # [R, key|value, g, k]
  w_uk = up[:, 0][:, groups] / alpha  # [R, h, k]
  w_uv = up[:, 1][:, groups]
  scale = np.ones(rank)
  if latent_norm == 'calibrated':  # step g: γ = the root-mean-square latent
    scale *= math.sqrt(max(np.trace(down.T @ cov @ down) / rank, 0.0) + src.norm_eps)
  q_factor = math.sqrt((k + d_r) / k)  # step h
  return {'w_q': q_factor * np.concatenate([w_q, w_q_rope], axis=2),
          'w_dkv': np.concatenate([down, k_rope], axis=1), 'kv_norm': {'scale': scale},
          'w_uk': w_uk, 'w_uv': w_uv, 'w_o': w_o}


def _check_arguments(src: ModelConfig, rank, d_r, selection: str, latent_norm: str) -> None:
  if src.attention not in GQA_FAMILY:
    raise ConversionError(f"to_mla converts {'/'.join(GQA_FAMILY)} models; this one is "
                          f'attention={src.attention!r}')
  if src.qkv_bias:
    raise ConversionError('qkv_bias=True (Qwen2) is not converted: MLA has no bias on its '
                          'latent or rope key, and x W + b does not factor through c_kv = x W_DKV '
                          'as x W does')
  if selection not in ROPE_SELECTIONS or latent_norm not in LATENT_NORMS:
    raise ConversionError(f'rope_selection={selection!r} / latent_norm={latent_norm!r}: use '
                          f'one of {ROPE_SELECTIONS} / {LATENT_NORMS}')
  if rank is None:
    if d_r is not None:
      raise ConversionError(f'qk_rope_head_dim={d_r} needs kv_lora_rank (the compression); '
                            'give both, or neither for the exact embedding')
    return
  g, k, d = src.n_kv_heads, src.head_dim, src.d_model
  most = min(2 * g * k, d)
  if not isinstance(rank, int) or not 1 <= rank <= most:
    raise ConversionError(
        f"kv_lora_rank={rank} is not in [1, {most}]: the source's keys and values span at most "
        f'min(2·G·d_h = {2 * g * k}, d_model = {d}) dims; omit it for the exact embedding')
  if not isinstance(d_r, int) or d_r % 2 or not 2 <= d_r <= k:
    raise ConversionError(
        f'qk_rope_head_dim={d_r} must be even and in [2, head_dim={k}]: the shared rope key '
        f'holds at most one RoPE pair per source frequency ({k // 2} of them)')


def to_mla(model: Transformer, kv_lora_rank: int | None = None,
           qk_rope_head_dim: int | None = None, *, rope_selection: str = '2norm',
           calibration: Iterable | None = None, latent_norm: str = 'calibrated') -> Transformer:
  """An MLA Transformer made from an MHA / GQA / MQA one (module docstring).

  No kv_lora_rank: the exact embedding (same logits, same cache size). With kv_lora_rank R:
  the standard architecture with a cache of R + qk_rope_head_dim (default head_dim / 2)
  elements per token and layer; rope_selection '2norm' | 'uniform' picks the pairs that keep
  RoPE; calibration, an iterable of int token batches [b, t] (e.g. a few training batches),
  makes the statistics activation-aware (None: from the weights); latent_norm 'calibrated' |
  'unit' sets the latent RMSNorm's scale.
  """
  src = model.cfg
  if kv_lora_rank is not None and qk_rope_head_dim is None:
    qk_rope_head_dim = src.head_dim // 2
  _check_arguments(src, kv_lora_rank, qk_rope_head_dim, rope_selection, latent_norm)
  # every variable (an MoE's router bias too); only the attention is converted
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  if kv_lora_rank is None:
    cfg = exact_config(src)
    for i in range(src.n_layers):
      params['blocks'][i]['attn'] = _exact_attention(params['blocks'][i]['attn'], src)
  else:
    # A generator of batches streams: one batch in memory at a time, however many there are.
    cov = (weight_covariances(model) if calibration is None
           else input_covariances(model, calibration))
    layers = [params['blocks'][i]['attn'] for i in range(src.n_layers)]
    splits = [_rope_split(np.asarray(a['w_q'], np.float64), np.asarray(a['w_k'], np.float64),
                          c, src.rope_layout) for a, c in zip(layers, cov, strict=True)]
    kept = [_select(s, qk_rope_head_dim // 2, rope_selection) for s in splits]
    cfg = _mla_config(src, kv_lora_rank=kv_lora_rank, qk_nope_head_dim=src.head_dim,
                      qk_rope_head_dim=qk_rope_head_dim,
                      rope_theta=_fit_theta(src, kept, qk_rope_head_dim))
    for i, (a, c, s, kp) in enumerate(zip(layers, cov, splits, kept, strict=True)):
      params['blocks'][i]['attn'] = _compress_attention(a, c, s, kp, src, kv_lora_rank,
                                                        qk_rope_head_dim, latent_norm)
  dtype = jnp.dtype(cfg.param_dtype)
  for block in params['blocks'].values():
    block['attn'] = jax.tree.map(lambda x: jnp.asarray(x, dtype), block['attn'])
  return with_params(cfg, jax.tree.map(jnp.asarray, params))


# --- runs (python -m mla_jax.convert --to_mla) ------------------------------------------------


def calibration_batches(config, n: int, tok=None) -> Iterator[np.ndarray]:
  """n batches [data.batch_size, data.seq_len] of the run's training split, drawn from
  (seed, i) on a stream of their own (training draws stream 0, these stream 1), made one at a
  time as they are used (tok: the run's tokenizer). n may not exceed the batches the split
  holds: more only repeats its windows and takes time without a word."""
  if config.data is None:
    raise ConversionError('the source run has no corpus (a converted checkpoint?); use '
                          '--calibration_batches=0 (statistics from the weights)')
  tokens, d = data.load_splits(config.data, tok)['train'], config.data
  most = len(tokens) // (d.batch_size * d.seq_len)
  if n > most:
    raise ConversionError(f'--calibration_batches={n} exceeds the {most} batches of '
                          f'{d.batch_size} x {d.seq_len} tokens that the training split '
                          f'({len(tokens):,} tokens) holds; give at most {most}')

  def draw():
    for i in range(n):
      rng = np.random.default_rng([config.seed, i, 1])
      starts = rng.integers(0, len(tokens) - d.seq_len, size=d.batch_size)
      yield tokens[starts[:, None] + np.arange(d.seq_len)].astype(np.int32)

  return draw()


def to_mla_workdir(workdir, out, kv_lora_rank: int | None = None,
                   qk_rope_head_dim: int | None = None, rope_selection: str = '2norm',
                   calibration: int = 0, latent_norm: str = 'calibrated',
                   step: int | None = None, best: bool = False) -> ml_collections.ConfigDict:
  """Converts a run (MHA / GQA / MQA) into a new MLA workdir `out`; -> its config. Without
  kv_lora_rank: the exact embedding; calibration: training batches for the statistics."""
  out = pathlib.Path(out)
  wd.must_be_new(out, '--to_mla')
  if kv_lora_rank is None and (calibration or qk_rope_head_dim is not None):
    raise ConversionError('--calibration_batches and --qk_rope_head_dim apply to the '
                          'compression: give --kv_lora_rank too (without it the conversion is '
                          'the exact embedding)')
  if calibration < 0:
    raise ConversionError(f'--calibration_batches={calibration} must be >= 0')
  source = wd.read_config(workdir)
  tok = wd.load_tokenizer(workdir, required=False)  # the new run reads text as the source did
  batches = calibration_batches(source, calibration, tok) if calibration else None  # checks n
  model, _ = wd.load_workdir(workdir, step, best)
  mla = to_mla(model, kv_lora_rank, qk_rope_head_dim, rope_selection=rope_selection,
               calibration=batches, latent_norm=latent_norm)
  config = ml_collections.ConfigDict({k: v for k, v in source.to_dict().items()
                                      if k in ('seed', 'data', 'eval', 'mesh')})
  config.model = mla.cfg.to_dict()
  config.conversion = dict(
      source_workdir=str(pathlib.Path(workdir).absolute()), source_attention=model.cfg.attention,
      step=step, best=best, exact=kv_lora_rank is None, kv_lora_rank=mla.cfg.kv_lora_rank,
      qk_rope_head_dim=mla.cfg.qk_rope_head_dim, calibration_batches=calibration,
      rope_selection=None if kv_lora_rank is None else rope_selection,
      latent_norm=None if kv_lora_rank is None else latent_norm)
  wd.write_new(out, '--to_mla', config, mla, 'to_mla', tok)
  return config
