// Causal flash attention for XLA's CPU backend, forward and backward, float32.
//
// XLA:CPU runs attention as separate batched dots (each on one thread) and elementwise passes
// over [b, h, t, s] score arrays; torch's CPU sdpa runs one fused kernel. This is that kernel
// for the one case the training step needs: a whole sequence, queries and keys at positions
// 0 .. t - 1, no cache. Built on first use by mla_jax/kernels/cpu_attention.py and called
// through XLA's FFI; the heads run in parallel on XLA's own intra-op threads. The arrays
// come in the model's token-major layout (row-major, as the FFI hands them over):
//   q [b, t, g, p, e]   (g key/value heads, p query heads per key/value head)
//   k [b, t, g, e], v [b, t, g, w]   o [b, t, g, p, w], lse [b, g, p, t] (log-normaliser)
// Per query row i: s_j = scale q_i . k_j for j <= i, o_i = sum_j exp(s_j - m) v_j / sum_j
// exp(s_j - m) with m = max_j s_j: the einsum path's arithmetic, in query tiles of TQ rows
// that read only the keys up to the tile's last row. The backward recomputes the
// probabilities from lse (flash attention's backward): dv = P^T do, dp = do v^T,
// ds = P (dp - rowsum(do o)) scale, dq = ds k, dk = ds^T q. Every sum runs in a fixed order
// on one thread per query head (forward) or key/value head (backward): results do not depend
// on the number of threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 16;  // one 64-byte vector; GCC splits it where registers are narrower
typedef float vf __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(64), aligned(4), may_alias));
constexpr int64_t kTQ = 32;  // query rows per tile

int64_t Pad(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
vf Load(const float* p) { return *reinterpret_cast<const vf*>(p); }
void Store(float* p, vf x) { *reinterpret_cast<vf*>(p) = x; }
vf Splat(float x) { return vf{} + x; }

// exp on a vector (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n);
// within 2 ulp of the exact value for the arguments here (x <= 0, or slightly above).
vf Exp(vf x) {
  x = x < Splat(-87.3f) ? Splat(-87.3f) : x;
  x = x > Splat(88.3f) ? Splat(88.3f) : x;
  const vf magic = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + magic) - magic;
  vf r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vf y = Splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

// body(i) for i < count, on the calling thread and on up to all of XLA's intra-op threads.
// The caller waits for the items, never for a helper to start: a helper that starts late
// (its threads busy with other work, or with this caller) finds nothing left and returns.
template <typename F>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, const F& body) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, count, &body]() {
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < count; ++finished) body(i);
    if (finished == 0) return;  // late: body may be gone by now, so it is never touched
    std::lock_guard<std::mutex> lock(state->mu);
    state->done += finished;
    state->cv.notify_all();
  };
  for (int64_t h = 1; h < std::min<int64_t>(pool.num_threads(), count); ++h) {
    auto copy = work;
    pool.Schedule(std::move(copy));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == count; });
}

float Sum(vf x) {
  float s = 0.0f;
  for (int l = 0; l < kLanes; ++l) s += x[l];
  return s;
}

// c[m, :n] (+)= sum_k a(m, k) b[k, :n] for m < rows: a(m, k) = a[m * am + k * ak], rows of b
// and c contiguous with n a multiple of kLanes. MR rows x 2 vectors of accumulators stay in
// registers over the k loop.
template <int MR, bool kAccumulate>
void Block(int64_t m0, int64_t n, int64_t depth, const float* a, int64_t am, int64_t ak,
           const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
    vf acc[MR][2];
    for (int r = 0; r < MR; ++r)
      for (int h = 0; h < 2; ++h)
        acc[r][h] = kAccumulate ? Load(c + (m0 + r) * ldc + j + h * kLanes) : vf{};
    for (int64_t k = 0; k < depth; ++k) {
      vf b0 = Load(b + k * ldb + j), b1 = Load(b + k * ldb + j + kLanes);
      for (int r = 0; r < MR; ++r) {
        float x = a[(m0 + r) * am + k * ak];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int h = 0; h < 2; ++h) Store(c + (m0 + r) * ldc + j + h * kLanes, acc[r][h]);
  }
  for (; j < n; j += kLanes) {
    vf acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = kAccumulate ? Load(c + (m0 + r) * ldc + j) : vf{};
    for (int64_t k = 0; k < depth; ++k) {
      vf b0 = Load(b + k * ldb + j);
      for (int r = 0; r < MR; ++r) acc[r] += a[(m0 + r) * am + k * ak] * b0;
    }
    for (int r = 0; r < MR; ++r) Store(c + (m0 + r) * ldc + j, acc[r]);
  }
}

template <bool kAccumulate>
void Gemm(int64_t rows, int64_t n, int64_t depth, const float* a, int64_t am, int64_t ak,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t m = 0;
  for (; m + 4 <= rows; m += 4) Block<4, kAccumulate>(m, n, depth, a, am, ak, b, ldb, c, ldc);
  for (; m < rows; ++m) Block<1, kAccumulate>(m, n, depth, a, am, ak, b, ldb, c, ldc);
}

// rows x cols of src (row stride lds) into dst (row stride ldd), zeros in dst's padding.
void CopyPadded(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                int64_t ldd, int64_t dst_rows) {
  for (int64_t r = 0; r < dst_rows; ++r) {
    float* d = dst + r * ldd;
    if (r < rows) std::memcpy(d, src + r * lds, cols * sizeof(float));
    std::fill(d + (r < rows ? cols : 0), d + ldd, 0.0f);
  }
}

// src [rows, cols] (row stride lds) -> dst [cols, ldd] transposed, zeros past rows.
void Transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
               int64_t ldd) {
  std::fill(dst, dst + cols * ldd, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// The arrays' sizes and one head's row strides: q, o, dq, do [b, t, g, p, .] and k, v, dk,
// dv [b, t, g, .] as the model holds them (token-major: no transposes to heads-first).
struct Dims {
  int64_t b, t, g, p, e, w;
  int64_t ldq() const { return g * p * e; }  // from one token's query to the next's
  int64_t ldo() const { return g * p * w; }
  int64_t ldk() const { return g * e; }
  int64_t ldv() const { return g * w; }
  // the first row of head (batch i, group j, query head h of the group)
  int64_t q(int64_t i, int64_t j, int64_t h) const { return i * t * ldq() + (j * p + h) * e; }
  int64_t o(int64_t i, int64_t j, int64_t h) const { return i * t * ldo() + (j * p + h) * w; }
  int64_t k(int64_t i, int64_t j) const { return i * t * ldk() + j * e; }
  int64_t v(int64_t i, int64_t j) const { return i * t * ldv() + j * w; }
};

Dims GetDims(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> vd) {
  return Dims{qd[0], qd[1], qd[2], qd[3], qd[4], vd[3]};
}

// One query head: o (row stride ldo) and lse [t] from q (row stride ldq) and its group's
// keys, transposed (kt [e, tp]), and values (vp [t, wp]).
void ForwardHead(const float* q, int64_t ldq, const float* kt, const float* vp, int64_t t,
                 int64_t e, int64_t w, float scale, float* o, int64_t ldo, float* lse,
                 std::vector<float>& s) {
  const int64_t tp = Pad(t), wp = Pad(w);
  std::vector<float> out(kTQ * wp);
  for (int64_t i0 = 0; i0 < t; i0 += kTQ) {
    const int64_t rows = std::min(kTQ, t - i0), cols = i0 + rows, ncols = Pad(cols);
    Gemm<false>(rows, ncols, e, q + i0 * ldq, ldq, 1, kt, tp, s.data(), tp);
    float m_row[kTQ], l_row[kTQ];
    for (int64_t r = 0; r < rows; ++r) {
      float* srow = s.data() + r * tp;
      const int64_t len = i0 + r + 1;  // keys 0 .. i
      float m = -INFINITY;
      for (int64_t j = 0; j < len; ++j) m = std::max(m, srow[j] *= scale);
      for (int64_t j = len; j < ncols; ++j) srow[j] = -INFINITY;  // exp gives 0 below
      vf total{};
      for (int64_t j = 0; j < ncols; j += kLanes) {
        vf x = Load(srow + j), pj = Exp(x - m);
        pj = x == Splat(-INFINITY) ? vf{} : pj;
        Store(srow + j, pj);
        total += pj;
      }
      m_row[r] = m;
      l_row[r] = Sum(total);
    }
    Gemm<false>(rows, wp, cols, s.data(), tp, 1, vp, wp, out.data(), wp);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < w; ++c) o[(i0 + r) * ldo + c] = out[r * wp + c] / l_row[r];
      lse[i0 + r] = m_row[r] + std::log(l_row[r]);
    }
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   float scale, ffi::ThreadPool pool, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  if (q.dimensions().size() != 5 || k.dimensions().size() != 4 || v.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument(
        "cpu_attention: q [b, t, g, p, e], k [b, t, g, e], v [b, t, g, w] expected");
  }
  const Dims d = GetDims(q.dimensions(), v.dimensions());
  const int64_t tp = Pad(d.t), wp = Pad(d.w);
  const float *qa = q.typed_data(), *ka = k.typed_data(), *va = v.typed_data();
  float *oa = o->typed_data(), *la = lse->typed_data();
  ParallelFor(pool, d.b * d.g * d.p, [&](int64_t head) {  // lse [b, g, p, t]
    const int64_t i = head / (d.g * d.p), j = head / d.p % d.g, h = head % d.p;
    std::vector<float> kt(d.e * tp), vpad(d.t * wp), s(kTQ * tp);
    Transpose(ka + d.k(i, j), d.t, d.e, d.ldk(), kt.data(), tp);
    CopyPadded(va + d.v(i, j), d.t, d.w, d.ldv(), vpad.data(), wp, d.t);
    ForwardHead(qa + d.q(i, j, h), d.ldq(), kt.data(), vpad.data(), d.t, d.e, d.w, scale,
                oa + d.o(i, j, h), d.ldo(), la + head * d.t, s);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, float scale, ffi::ThreadPool pool,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = GetDims(q.dimensions(), v.dimensions());
  const int64_t t = d.t, e = d.e, w = d.w, tp = Pad(t), wp = Pad(w), ep = Pad(e);
  const int64_t ldq = d.ldq(), ldo = d.ldo();
  const float *qa = q.typed_data(), *ka = k.typed_data(), *va = v.typed_data();
  const float *oa = o.typed_data(), *la = lse.typed_data(), *doa = dout.typed_data();
  float *dqa = dq->typed_data(), *dka = dk->typed_data(), *dva = dv->typed_data();
  ParallelFor(pool, d.b * d.g, [&](int64_t group) {  // one key/value head and its queries
    const int64_t i = group / d.g, j = group % d.g;
    std::vector<float> kt(e * tp), vt(w * tp), kpad(t * ep), s(kTQ * tp), ds(kTQ * tp),
        qtile(kTQ * ep), dotile(kTQ * wp), dqtile(kTQ * ep), dkacc(t * ep), dvacc(t * wp);
    Transpose(ka + d.k(i, j), t, e, d.ldk(), kt.data(), tp);
    Transpose(va + d.v(i, j), t, w, d.ldv(), vt.data(), tp);
    CopyPadded(ka + d.k(i, j), t, e, d.ldk(), kpad.data(), ep, t);
    for (int64_t h = 0; h < d.p; ++h) {
      const float *qh = qa + d.q(i, j, h), *oh = oa + d.o(i, j, h), *doh = doa + d.o(i, j, h);
      const float* lh = la + (group * d.p + h) * t;
      for (int64_t i0 = 0; i0 < t; i0 += kTQ) {
        const int64_t rows = std::min(kTQ, t - i0), cols = i0 + rows, ncols = Pad(cols);
        Gemm<false>(rows, ncols, e, qh + i0 * ldq, ldq, 1, kt.data(), tp, s.data(), tp);
        Gemm<false>(rows, ncols, w, doh + i0 * ldo, ldo, 1, vt.data(), tp, ds.data(), tp);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = i0 + r, len = row + 1;
          float delta = 0.0f;  // rowsum(do o)
          for (int64_t c = 0; c < w; ++c) delta += doh[row * ldo + c] * oh[row * ldo + c];
          float *srow = s.data() + r * tp, *dsrow = ds.data() + r * tp;
          for (int64_t col = len; col < ncols; ++col) srow[col] = -INFINITY;
          for (int64_t col = 0; col < ncols; col += kLanes) {
            vf x = Load(srow + col);
            vf pj = Exp(x * scale - lh[row]);
            pj = x == Splat(-INFINITY) ? vf{} : pj;
            Store(srow + col, pj);
            Store(dsrow + col, pj * (Load(dsrow + col) - delta) * scale);
          }
        }
        CopyPadded(qh + i0 * ldq, rows, e, ldq, qtile.data(), ep, rows);
        CopyPadded(doh + i0 * ldo, rows, w, ldo, dotile.data(), wp, rows);
        // dq = ds k; dv += P^T do; dk += ds^T q (only keys < cols are touched)
        Gemm<false>(rows, ep, cols, ds.data(), tp, 1, kpad.data(), ep, dqtile.data(), ep);
        for (int64_t r = 0; r < rows; ++r)
          std::memcpy(dqa + d.q(i, j, h) + (i0 + r) * ldq, dqtile.data() + r * ep, e * sizeof(float));
        Gemm<true>(cols, wp, rows, s.data(), 1, tp, dotile.data(), wp, dvacc.data(), wp);
        Gemm<true>(cols, ep, rows, ds.data(), 1, tp, qtile.data(), ep, dkacc.data(), ep);
      }
    }
    for (int64_t row = 0; row < t; ++row) {
      std::memcpy(dka + d.k(i, j) + row * d.ldk(), dkacc.data() + row * ep, e * sizeof(float));
      std::memcpy(dva + d.v(i, j) + row * d.ldv(), dvacc.data() + row * wp, w * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlaCausalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::Buffer<ffi::F32>>()   // o
                                  .Ret<ffi::Buffer<ffi::F32>>());  // lse

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlaCausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v
                                  .Arg<ffi::Buffer<ffi::F32>>()  // o
                                  .Arg<ffi::Buffer<ffi::F32>>()  // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()  // do
                                  .Attr<float>("scale")
                                  .Ctx<ffi::ThreadPool>()
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()   // dk
                                  .Ret<ffi::Buffer<ffi::F32>>());  // dv
