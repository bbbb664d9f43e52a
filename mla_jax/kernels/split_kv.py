"""Split-KV flash decoding in Pallas: the machinery shared by the MLA and GQA decode kernels.

One decode step: each sequence b has ONE new query token, whose rows (query heads) q [p, e_i]
attend to the cache slots [0, length_b) of their key/value group. Both kernel families reduce
to this grouped form (attention.py says the same of the einsum paths):

  GQA / MHA / MQA   q_parts = (q,)             k_parts = (k,)             value v
  absorbed MLA      q_parts = (q_lat, q_rope)  k_parts = (c_kv, k_rope)   value c_kv  (g = 1)
  absorbed GLA      q_parts = (q_lat, q_rope)  k_parts = (c_kv, k_rope)   value c_kv  (g latent
                    heads; k_rope [b, 1, s, r], one array every group's program reads)
  GTA               q_parts = (q_tied, q_rope) k_parts = (kv, k_rope)     value kv  (q_tied: the
                    nope query zero-padded to d_h, so q_tied . kv = q_nope . kv[:d_h - d_R])

score_s = (sum_i q_i . k_i[s] * kscale_i[s]) * scale; o = softmax(score) @ (v * vscale).

Algorithm (the online softmax of FlashAttention-2, Dao 2023, split over the keys as in
Flash-Decoding, Dao et al. 2023):
1. Split-KV. One decode query is too little parallel work for a GPU (b * g programs at most).
   Program (b, g, head block, j) takes the j-th of num_splits contiguous slices of sequence
   b's REAL length: blocks_per_split = cdiv(cdiv(length_b, block_s), num_splits) key blocks
   each, computed in the kernel from length_b, so every split of a short sequence still gets
   an equal share and a split past the end does no work at all.
2. Online softmax over the split's key blocks, float32: running max m, running sum l (`denom`), the
   unnormalized output acc; per block
     m' = max(m, rowmax(s)); c = exp(m - m'); p = exp(s - m')
     l' = c l + rowsum(p);   acc' = c acc + p @ v.
   Scores of slots at or beyond length_b are masked to a finite minimum; the tiles themselves
   are loaded masked (zeros there), so stale or NaN slots past the length never reach a sum.
3. Log-sum-exp combine, a small jnp epilogue: with M = max_j m_j and w_j = exp(m_j - M),
   o = sum_j w_j acc_j / sum_j w_j l_j. An empty split has m_j = minimum, l_j = 0, acc_j = 0
   and weight 0 (length >= 1 puts a real key in split 0, so M is a real score).

Work and bytes follow the real length: the per-program loop bound (Triton) or the guarded
grid step with a clamped block index (Mosaic, where an unchanged block index issues no DMA)
stops at length_b. What a step must read, per sequence: the cache rows [0, length_b) of each
array it uses (times their dtype size), the 8-bit caches' float32 scale per row and array,
the queries, and the partial outputs num_splits * rows * (e_v + 2) float32 written by the
kernel and read back by the combine. On Triton the last block's loads are masked per row, so
only the valid rows are read; Mosaic copies whole blocks, up to cdiv(length, block_s) * block_s
rows.

Dot precision follows attention.py: scores accumulate in float32 from operands of
promote(query dtype, cache dtype) (the query's dtype for an 8-bit cache, whose values int8 and
float8_e4m3fn are exact in bfloat16), and the probabilities meet the values in the value
cache's dtype (the query's for an 8-bit cache), accumulating in float32. Float32 dots ask for
Precision.HIGHEST: the Triton lowering maps the default precision to TF32.

Backends: 'triton' (Pallas Triton GPU backend; power-of-two blocks, >= 16 rows for tl.dot,
query rows padded to a power of two >= 16), 'mosaic' (Pallas TPU: scalar-prefetched lengths
drive the block index maps; blocks of whole (8, 128) tiles), or 'auto' by the platform
(mla_jax.platform; models choose explicitly, mla_jax.attention_op). interpret=True runs
either on CPU ('mosaic' in TPU interpret mode).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from mla_jax import platform

_MASKED = float(jnp.finfo(jnp.float32).min)  # finite: exp(_MASKED - m) is 0, never NaN

# Defaults for the Triton backend, sized for one H100/H200 SM (228 KiB shared memory, 132
# SMs). A 64-row block of a d_c = 256 bfloat16 latent cache plus its d_r = 32 rope rows is
# 36 KiB; num_stages = 3 keeps two such blocks in flight per program (~108 KiB of shared
# memory), so two programs fit on an SM: enough bytes in flight to cover HBM latency. A
# 128-row block would need ~216 KiB at 3 stages, one program per SM. These are starting points
# to sweep on the GPU, not measured optima.
TRITON_BLOCK_S = 64
TRITON_NUM_STAGES = 3
TRITON_MAX_BLOCK_H = 64  # query rows per program; more heads take several head blocks
# Split heuristic: about two programs per SM of a 132-SM GPU, but at least 8 blocks per split
# (of the allocated context) so that the partial outputs, rows * (e_v + 2) * 4 bytes a split,
# stay small next to the cache bytes a split reads.
_TARGET_PROGRAMS = 264
_MIN_BLOCKS_PER_SPLIT = 8
# Mosaic: 512-row blocks (a whole number of (8, 128) tiles for every dtype) amortize the
# ~0.35 us per grid step; a 512 x 256 bfloat16 block is 256 KiB, double-buffered.
MOSAIC_BLOCK_S = 512

BACKENDS = ('auto', 'triton', 'mosaic')


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Static description of one kernel instance: which operands exist, in order."""

  n_parts: int  # score parts (q_i, k_i)
  k_scaled: tuple[bool, ...]  # per part: a per-row dequantization scale is given
  value_is_key0: bool  # MLA: the value is k_parts[0] (c_kv), loaded once
  v_scaled: bool  # a separate value has a scale (ignored when value_is_key0)
  scale: float
  block_s: int
  num_splits: int
  score_dtypes: tuple  # per part: the dtype both operands of q_i . k_i meet in
  value_dtype: object  # the dtype probabilities and values meet in

  def split(self, refs):
    """A kernel's input refs, ordered as _operands lists them, split into (q parts, k parts,
    k scales or None, v or None, v scale or None)."""
    refs = list(refs)
    take = lambda n: [refs.pop(0) for _ in range(n)]
    q_refs, k_refs = take(self.n_parts), take(self.n_parts)
    ks_refs = [refs.pop(0) if has else None for has in self.k_scaled]
    v_ref = vs_ref = None
    if not self.value_is_key0:
      v_ref = refs.pop(0)
      vs_ref = refs.pop(0) if self.v_scaled else None
    assert not refs
    return q_refs, k_refs, ks_refs, v_ref, vs_ref


def _operands(q_parts, k_parts, k_scales, v, v_scale):
  """The kernel inputs after the lengths, each with its kind: 'q' [b, g, p, e] query rows,
  'rows' [b, g, s, e] cache rows, 'row' [b, g, s] per-row scales."""
  ops = [(q, 'q') for q in q_parts] + [(k, 'rows') for k in k_parts]
  ops += [(x, 'row') for x in k_scales if x is not None]
  if v is not None:
    ops.append((v, 'rows'))
    if v_scale is not None:
      ops.append((v_scale, 'row'))
  return ops


def _group(rows_bgse, gi):
  """The group a program reads of a cache array: its own, or group 0 of an array of one group
  that every group shares (GTA's and GLA's one rope key): each group's program reads it where
  it lies, with no copy per group made before the call."""
  return gi if rows_bgse.shape[1] > 1 else 0


def _partials(b, g, num_splits, rows, e_v):
  """Shapes of the per-split outputs: acc [b, g, n, rows, e_v], m and denom [.., rows, 1]."""
  shape = (b, g, num_splits, rows)
  return [jax.ShapeDtypeStruct((*shape, e), jnp.float32) for e in (e_v, 1, 1)]


def _dot_dtype(q_dtype, cache_dtype, *, value: bool):
  """Where a dot's operands meet; see the module docstring."""
  if jnp.dtype(cache_dtype).itemsize == 1:  # int8 / float8: exact in any wider float
    return jnp.dtype(q_dtype)
  return jnp.dtype(cache_dtype) if value else jnp.promote_types(q_dtype, cache_dtype)


def _dot(a, b, contract_b: int):
  """a [m, e] with b contracted on axis contract_b -> [m, n] float32."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((1,), (contract_b,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _scores(lay: _Layout, qs, k_tiles, k_scale_rows, valid_row):
  """[rows, block_s] float32 scores, one dot per part: each part's scale row applies to its
  own dot, and d_c, d_r stay separate powers of two (their sum 288 is not one)."""
  total = None
  for q, k, ks, dtype in zip(qs, k_tiles, k_scale_rows, lay.score_dtypes, strict=True):
    s = _dot(q.astype(dtype), k.astype(dtype), contract_b=1)
    if ks is not None:
      s = s * ks
    total = s if total is None else total + s
  return jnp.where(valid_row, total * lay.scale, _MASKED)


def _online_update(lay: _Layout, state, scores, v_tile, v_scale_row):
  """One key block of the online softmax (module docstring, step 2)."""
  m, denom, acc = state
  m_new = jnp.maximum(m, jnp.max(scores, axis=-1, keepdims=True))
  correction = jnp.exp(m - m_new)
  p = jnp.exp(scores - m_new)
  denom_new = correction * denom + jnp.sum(p, axis=-1, keepdims=True)
  if v_scale_row is not None:
    p = p * v_scale_row
  pv = _dot(p.astype(lay.value_dtype), v_tile.astype(lay.value_dtype), contract_b=0)
  return m_new, denom_new, correction * acc + pv


def _initial_state(rows: int, e_v: int):
  return (jnp.full((rows, 1), _MASKED, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, e_v), jnp.float32))


def _split_bounds(length, j, lay: _Layout):
  """[start, end) of split j of a sequence of `length` keys (whole blocks but for the end),
  and the split's block count."""
  blocks_per_split = pl.cdiv(pl.cdiv(length, lay.block_s), lay.num_splits)
  start = j * blocks_per_split * lay.block_s
  end = jnp.minimum(start + blocks_per_split * lay.block_s, length)
  return start, end, blocks_per_split


# ---------------------------------------------------------------------------------------------
# Triton (GPU): one program per (b, g, head block, split) loops over its key blocks.


def _triton_kernel(len_ref, *refs, lay: _Layout):
  q_refs, k_refs, ks_refs, v_ref, vs_ref = lay.split(refs[:-3])
  acc_ref, m_ref, denom_ref = refs[-3:]
  start, end, _ = _split_bounds(len_ref[...], pl.program_id(3), lay)
  qs = [q_ref[...] for q_ref in q_refs]  # [block_h, e_i], loaded once
  offsets = jnp.arange(lay.block_s)

  def body(i, state):
    first = start + i * lay.block_s
    valid = first + offsets < end  # masked loads: rows at or past `end` are never read
    rows = pl.ds(first, lay.block_s)
    # `other` in the ref's own dtype: Triton cannot cast an int zero to float8.
    zero = lambda ref: jnp.zeros((), ref.dtype)
    load_rows = lambda ref: plgpu.load(ref.at[rows, :], mask=valid[:, None], other=zero(ref))
    load_row = lambda ref: plgpu.load(ref.at[rows], mask=valid, other=zero(ref))[None, :]
    k_tiles = [load_rows(ref) for ref in k_refs]
    k_scales = [None if ref is None else load_row(ref) for ref in ks_refs]
    scores = _scores(lay, qs, k_tiles, k_scales, valid[None, :])
    if lay.value_is_key0:
      v_tile, v_scale = k_tiles[0], k_scales[0]
    else:
      v_tile, v_scale = load_rows(v_ref), None if vs_ref is None else load_row(vs_ref)
    return _online_update(lay, state, scores, v_tile, v_scale)

  n_blocks = jnp.maximum(pl.cdiv(end - start, lay.block_s), 0)  # 0 past the length
  m, denom, acc = lax.fori_loop(0, n_blocks, body, _initial_state(*acc_ref.shape))
  acc_ref[...] = acc
  m_ref[...] = m
  denom_ref[...] = denom


def _triton_call(lay, lengths_b, ops, e_v, *, block_h, num_warps, num_stages, interpret):
  """ops: _operands' list; the query rows are padded to a multiple of block_h."""
  (q, _), *_ = ops
  b, g, rows, _ = q.shape
  # Each program sees its sequence's whole cache array and loads block_s rows at a time.
  specs = {'q': lambda x: pl.BlockSpec((None, None, block_h, x.shape[-1]),
                                       lambda bi, gi, hi, j: (bi, gi, hi, 0)),
           'rows': lambda x: pl.BlockSpec((None, None, *x.shape[2:]),
                                          lambda bi, gi, hi, j: (bi, _group(x, gi), 0, 0)),
           'row': lambda x: pl.BlockSpec((None, None, x.shape[2]),
                                         lambda bi, gi, hi, j: (bi, gi, 0))}
  out_index = lambda bi, gi, hi, j: (bi, gi, j, hi, 0)
  return pl.pallas_call(
      functools.partial(_triton_kernel, lay=lay),
      grid=(b, g, rows // block_h, lay.num_splits),
      in_specs=[pl.BlockSpec((None,), lambda bi, gi, hi, j: (bi,)),
                *(specs[kind](x) for x, kind in ops)],
      out_specs=[pl.BlockSpec((None, None, None, block_h, e), out_index) for e in (e_v, 1, 1)],
      out_shape=_partials(b, g, lay.num_splits, rows, e_v),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name='split_kv_decode',
  )(lengths_b, *(x for x, _ in ops))


# ---------------------------------------------------------------------------------------------
# Mosaic (TPU): grid step (b, g, 0, split, i) is one key block; state lives in VMEM scratch.


def _mosaic_block_index(bi, j, i, lengths_ref, lay: _Layout):
  """Key block of grid step (j, i), clamped to the split's last real block: a skipped step
  maps to the block already in VMEM, so the pipeline issues no copy for it."""
  n_blocks = pl.cdiv(lengths_ref[bi], lay.block_s)
  blocks_per_split = pl.cdiv(n_blocks, lay.num_splits)
  first = j * blocks_per_split
  last = jnp.minimum(first + blocks_per_split, n_blocks) - 1
  return jnp.maximum(jnp.minimum(first + i, last), 0)


def _mosaic_kernel(lengths_ref, *refs, lay: _Layout):
  q_refs, k_refs, ks_refs, v_ref, vs_ref = lay.split(refs[:-6])
  acc_ref, m_ref, denom_ref, m_scr, denom_scr, acc_scr = refs[-6:]
  bi, j, i = pl.program_id(0), pl.program_id(3), pl.program_id(4)
  start, end, blocks_per_split = _split_bounds(lengths_ref[bi], j, lay)
  first = start + i * lay.block_s

  @pl.when(i == 0)
  def _init():
    m_scr[...], denom_scr[...], acc_scr[...] = _initial_state(*acc_scr.shape)

  @pl.when((i < blocks_per_split) & (first < end))
  def _step():
    # Rows past `end` hold stale cache slots or, in a partial edge block, unspecified VMEM:
    # zero them (after widening: 8-bit selects are not native everywhere) before any sum.
    def tile(ref, dtype):
      x = ref[...].astype(dtype)
      rows = first + lax.broadcasted_iota(jnp.int32, x.shape, 0)
      return jnp.where(rows < end, x, jnp.zeros_like(x))

    valid_row = first + lax.broadcasted_iota(jnp.int32, (1, lay.block_s), 1) < end
    row = lambda ref: None if ref is None else jnp.where(valid_row, ref[...], 0.0)
    k_tiles = [tile(ref, dtype) for ref, dtype in zip(k_refs, lay.score_dtypes, strict=True)]
    k_scales = [row(ref) for ref in ks_refs]
    scores = _scores(lay, [ref[...] for ref in q_refs], k_tiles, k_scales, valid_row)
    if lay.value_is_key0:
      v_tile, v_scale = k_tiles[0], k_scales[0]
    else:
      v_tile, v_scale = tile(v_ref, lay.value_dtype), row(vs_ref)
    state = (m_scr[...], denom_scr[...], acc_scr[...])
    m_scr[...], denom_scr[...], acc_scr[...] = _online_update(lay, state, scores, v_tile,
                                                              v_scale)

  @pl.when(i == pl.num_programs(4) - 1)
  def _finish():
    acc_ref[...] = acc_scr[...]
    m_ref[...] = m_scr[...]
    denom_ref[...] = denom_scr[...]


def _mosaic_call(lay, lengths_b, ops, e_v, *, interpret):
  """ops: _operands' list; the query rows are padded to a multiple of 8."""
  (q, _), *_ = ops
  b, g, rows, _ = q.shape
  s = next(x for x, kind in ops if kind == 'rows').shape[2]
  block = lambda bi, j, i, lens: _mosaic_block_index(bi, j, i, lens, lay)
  # Scales are reshaped to [b, g, 1, s] so that a block's last two dims, (1, block_s), form
  # a legal TPU block (1 = the full dim).
  specs = {'q': lambda x: pl.BlockSpec((None, None, rows, x.shape[-1]),
                                       lambda bi, gi, hi, j, i, lens: (bi, gi, 0, 0)),
           'rows': lambda x: pl.BlockSpec(
               (None, None, lay.block_s, x.shape[-1]),
               lambda bi, gi, hi, j, i, lens: (bi, _group(x, gi), block(bi, j, i, lens), 0)),
           'row': lambda x: pl.BlockSpec(
               (None, None, 1, lay.block_s),
               lambda bi, gi, hi, j, i, lens: (bi, gi, 0, block(bi, j, i, lens)))}
  as_row = lambda x, kind: x.reshape(b, g, 1, s) if kind == 'row' else x
  out_index = lambda bi, gi, hi, j, i, lens: (bi, gi, j, 0, 0)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(b, g, 1, lay.num_splits, pl.cdiv(pl.cdiv(s, lay.block_s), lay.num_splits)),
      in_specs=[specs[kind](x) for x, kind in ops],
      out_specs=[pl.BlockSpec((None, None, None, rows, e), out_index) for e in (e_v, 1, 1)],
      scratch_shapes=[pltpu.VMEM((rows, e), jnp.float32) for e in (1, 1, e_v)],
  )
  return pl.pallas_call(
      functools.partial(_mosaic_kernel, lay=lay),
      grid_spec=grid_spec,
      out_shape=_partials(b, g, lay.num_splits, rows, e_v),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=('parallel', 'parallel', 'parallel', 'parallel', 'arbitrary')),
      interpret=pltpu.InterpretParams() if interpret else False,
      name='split_kv_decode',
  )(lengths_b, *(as_row(x, kind) for x, kind in ops))


# ---------------------------------------------------------------------------------------------
# Entry point


def combine_splits(acc, m, denom):
  """Log-sum-exp combine over the split axis 2 (module docstring, step 3).

  acc [b, g, n, p, e], m and denom [b, g, n, p, 1] per split -> o [b, g, p, e].
  """
  weight = jnp.exp(m - jnp.max(m, axis=2, keepdims=True))
  return jnp.sum(weight * acc, axis=2) / jnp.sum(weight * denom, axis=2)


def resolve_backend(backend: str, interpret: bool) -> str:
  """'auto' -> 'mosaic' on TPU, 'triton' on GPU or when interpreting (on CPU)."""
  if backend not in BACKENDS:
    raise ValueError(f'backend={backend!r} is not one of {BACKENDS}; pass one of those.')
  if backend != 'auto':
    return backend
  name = platform.current()
  if name == 'tpu':
    return 'mosaic'
  if name == 'gpu' or interpret:
    return 'triton'
  raise ValueError(f"No Pallas decode kernel for the '{name}' backend; run on a GPU or TPU, "
                   'pass interpret=True, or use the einsum decode path.')


def _is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _triton_takes(n: int) -> bool:
  """A width (or block size) compiled Triton takes: tl.arange and tl.dot want powers of two
  >= 16."""
  return _is_pow2(n) and n >= 16


def fits(key_dims, value_dim: int, interpret: bool = False, backend: str = 'auto') -> bool:
  """Whether the kernels take heads of these widths (each score part's, the value's) on this
  backend. Compiled Triton needs powers of two >= 16 (tl.arange and tl.dot); the interpreter
  and Mosaic take any. The model's decode step takes the einsum path where this is False."""
  if interpret or resolve_backend(backend, interpret) != 'triton':
    return True
  return all(_triton_takes(n) for n in (*key_dims, value_dim))


def _triton_config(b, g, p, s, dims, block_s, num_splits, block_h, num_warps, num_stages,
                   interpret):
  """Defaults and checks for the Triton backend -> (rows, block_s, num_splits, block_h,
  num_warps, num_stages); rows: the query rows padded to a power of two >= 16 for tl.dot."""
  block_s = TRITON_BLOCK_S if block_s is None else block_s
  rows = max(16, 1 << (p - 1).bit_length())
  block_h = min(rows, TRITON_MAX_BLOCK_H) if block_h is None else block_h
  if not interpret:  # the interpreter takes any shape; keep tests free to use tiny ones
    fixes = {'block_s': 'pick e.g. 64', 'block_h': 'pick e.g. 16',
             **{name: 'use the einsum decode path for this model' for name in dims}}
    for name, n in {'block_s': block_s, 'block_h': block_h, **dims}.items():
      if not _triton_takes(n):
        raise ValueError(f'{name}={n} must be a power of two >= 16 for the Triton backend '
                         f'(tl.arange and tl.dot need it); {fixes[name]}.')
  rows = max(rows, block_h)
  if rows % block_h:
    raise ValueError(f'block_h={block_h} must divide the padded head count {rows}.')
  if num_splits is None:
    by_occupancy = pl.cdiv(_TARGET_PROGRAMS, b * g * (rows // block_h))
    num_splits = max(1, min(by_occupancy, s // (block_s * _MIN_BLOCKS_PER_SPLIT)))
  if num_warps is None:  # the float32 accumulator is block_h * e_v registers' worth
    num_warps = 4 if block_h * dims['value dim'] <= 64 * 256 else 8
  num_stages = TRITON_NUM_STAGES if num_stages is None else num_stages
  return rows, block_s, num_splits, block_h, num_warps, num_stages


def _mosaic_config(b, g, p, s, block_s, num_splits):
  """Defaults and checks for the Mosaic backend -> (rows, block_s, num_splits)."""
  block_s = MOSAIC_BLOCK_S if block_s is None else block_s
  block_s = s if s <= block_s else block_s  # a block may always span the whole axis
  if block_s != s and block_s % 128:
    raise ValueError(f'block_s={block_s} must be a multiple of 128 for the Mosaic backend.')
  # Megacore: two splits keep both TensorCores busy when the grid has one sequence.
  num_splits = (2 if b * g == 1 else 1) if num_splits is None else num_splits
  return 8 * pl.cdiv(p, 8), block_s, num_splits


def _pad_rows(x, rows: int):
  """Pads the query-row axis 2 to `rows` (queries are small; the cache is never padded)."""
  pad = rows - x.shape[2]
  return x if pad == 0 else jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0)))


def split_kv_decode(q_parts, k_parts, lengths_b, scale: float, *, v=None, k_scales=None,
                    v_scale=None, block_s: int | None = None, num_splits: int | None = None,
                    block_h: int | None = None, num_warps: int | None = None,
                    num_stages: int | None = None, interpret: bool = False,
                    backend: str = 'auto'):
  """Grouped single-token attention over a cache, split-KV; returns o [b, g, p, e_v] float32.

  q_parts: [b, g, p, e_i] per score part; k_parts: [b, g, s, e_i], or [b, 1, s, e_i] for a
  part every group shares (GTA's and GLA's rope key; no per-group scale); v: [b, g, s, e_v],
  or None when the value is k_parts[0] (MLA, GLA, GTA's tied state); k_scales (one per part)
  / v_scale: per-row float32 [b, g, s] factors (value = stored * scale) or None; lengths_b:
  slots [0, length) are read, length >= 1 (a row of length 0 has no softmax and comes out
  NaN); a length past the allocation is clamped to it.
  """
  backend = resolve_backend(backend, interpret)
  k_scales = (None,) * len(k_parts) if k_scales is None else tuple(k_scales)
  b, g, p, _ = q_parts[0].shape
  s = k_parts[0].shape[2]
  value = k_parts[0] if v is None else v
  if backend == 'triton':
    dims = {f'query/key dim {i}': q.shape[-1] for i, q in enumerate(q_parts)}
    rows, block_s, num_splits, block_h, num_warps, num_stages = _triton_config(
        b, g, p, s, {**dims, 'value dim': value.shape[-1]}, block_s, num_splits, block_h,
        num_warps, num_stages, interpret)
  else:
    rows, block_s, num_splits = _mosaic_config(b, g, p, s, block_s, num_splits)
  if num_splits < 1:
    raise ValueError(f'num_splits={num_splits} must be >= 1.')

  lay = _Layout(
      n_parts=len(k_parts),
      k_scaled=tuple(x is not None for x in k_scales),
      value_is_key0=v is None,
      v_scaled=v_scale is not None,
      scale=float(scale),
      block_s=block_s,
      num_splits=num_splits,
      score_dtypes=tuple(_dot_dtype(q.dtype, k.dtype, value=False)
                         for q, k in zip(q_parts, k_parts, strict=True)),
      value_dtype=_dot_dtype(q_parts[0].dtype, value.dtype, value=True),
  )
  lengths_b = jnp.minimum(lengths_b.astype(jnp.int32), s)  # never read past the allocation
  ops = _operands([_pad_rows(q, rows) for q in q_parts], k_parts, k_scales, v, v_scale)
  if backend == 'triton':
    parts = _triton_call(lay, lengths_b, ops, value.shape[-1], block_h=block_h,
                         num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  else:
    parts = _mosaic_call(lay, lengths_b, ops, value.shape[-1], interpret=interpret)
  return combine_splits(*parts)[:, :, :p]


def check_ranks(**arrays_and_specs):
  """Raises one clear line if an argument has the wrong number of axes: name=(x, 'bhc')."""
  for name, (x, spec) in arrays_and_specs.items():
    if x is not None and x.ndim != len(spec):
      raise ValueError(f'{name} must have shape [{", ".join(spec)}]; got {x.shape}.')
