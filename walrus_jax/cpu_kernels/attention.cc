// Fused softmax attention for XLA:CPU, forward and backward, float32 (XLA FFI handlers).
//
// Space attention builds L x L logits per (frame, head) pair. XLA:CPU computes them as separate
// passes (product, row max, exp, row sum, product), each streaming the logits through memory, and
// its small products run well below the machine's matrix rate. Here each pair is handled by one
// thread, a block of query rows at a time, with the block's logits kept in cache:
//
//   forward   s = (scale q) k^T,  m = rowmax(s),  e = exp(s - m),  o = (e v) / rowsum(e),
//             lse = m + log(rowsum(e))  (saved for the backward pass)
//   backward  p = exp(s - lse),  dv += p^T do,  dp = do v^T,  ds = p (dp - rowsum(do o)),
//             dq = scale (ds k),  dk += ds^T (scale q)
//
// Layout: q, k, v, o and their gradients are (N, L, H, D) row-major, as the model produces them
// (no transposes): pair (n, h), token l, channel d lives at ((n L + l) H + h) D + d. Any leading
// axes before L are flattened into N. lse is (N, H, L).
//
// The matrix products are register-tiled loops over GCC/Clang vector types (16 floats), compiled
// for the host CPU (-march=native): AVX-512 where the CPU has it, narrower vectors otherwise.
// Work items (pairs, or pieces of pairs when there are fewer pairs than threads) are shared out
// over XLA's intra-op thread pool.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace walrus_jax;  // parallel_for, vf and its helpers

namespace {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// exp on a vector: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, and a degree-6 polynomial for
// e^r (Cephes' expf coefficients, ~1 ulp). Inputs below -87.3 return 0 (here: masked entries).
inline vf vexp(vf x) {
  const vf lo = splat(-87.3f), hi = splat(88.7f);
  vi zero_mask = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to the nearest integer
  vf n = (x * splat(1.44269504088896341f) + magic) - magic;
  vf r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf y = p * (vf)e;  // the exponent bits of 2^n
  return zero_mask ? splat(0.0f) : y;
}

// max of row[0, n), n a multiple of 16. Two independent running maxima (then four), so that the
// loop is not one chain of dependent max instructions.
inline float row_max(const float* row, int64_t n) {
  vf m0 = load(row), m1 = m0;
  int64_t j = kW;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    const vf a = load(row + j), b = load(row + j + kW);
    m0 = m0 > a ? m0 : a;
    m1 = m1 > b ? m1 : b;
  }
  for (; j < n; j += kW) m0 = m0 > load(row + j) ? m0 : load(row + j);
  return hmax(m0 > m1 ? m0 : m1);
}

// row[j] = exp(row[j] - shift) for j in [0, n), n a multiple of 16; returns their sum. Two vectors
// per iteration with separate sums: independent exp chains for the out-of-order core to overlap.
inline float exp_in_place(float* row, int64_t n, float shift) {
  const vf sh = splat(shift);
  vf s0{}, s1{};
  int64_t j = 0;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    const vf e0 = vexp(load(row + j) - sh), e1 = vexp(load(row + j + kW) - sh);
    store(row + j, e0);
    store(row + j + kW, e1);
    s0 += e0;
    s1 += e1;
  }
  for (; j < n; j += kW) {
    const vf e = vexp(load(row + j) - sh);
    store(row + j, e);
    s0 += e;
  }
  return hsum(s0 + s1);
}

// C[MR x 16 NV] = A[MR x K] B[K x 16 NV]: A read as A[r sa_row + k sa_col] (any layout, so a
// transposed operand needs no copy), B row-major with row stride ldb, C row stride ldc.
template <int MR, int NV>
inline void tile(const float* A, int64_t sa_row, int64_t sa_col, const float* B, int64_t ldb, int64_t K,
                 float* C, int64_t ldc, bool accumulate) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(C + r * ldc + kW * v) : vf{};
  for (int64_t k = 0; k < K; ++k) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + k * ldb + kW * v);
    for (int r = 0; r < MR; ++r) {
      vf a = splat(A[r * sa_row + k * sa_col]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + kW * v, acc[r][v]);
}

template <int NV>
inline void rows_of(int64_t M, const float* A, int64_t sa_row, int64_t sa_col, const float* B, int64_t ldb,
                    int64_t K, float* C, int64_t ldc, bool accumulate) {
  constexpr int MR = NV >= 4 ? 6 : 8;  // MR x NV accumulators stay in (32) vector registers
  int64_t r = 0;
  for (; r + MR <= M; r += MR)
    tile<MR, NV>(A + r * sa_row, sa_row, sa_col, B, ldb, K, C + r * ldc, ldc, accumulate);
  // The last M % MR rows in tiles of 4, 2 and 1: one row at a time loads NV vectors of B per NV
  // multiply-adds, and at 64 rows of 6-row tiles the 4 left over took a tenth of the product.
  if (r + 4 <= M) {
    tile<4, NV>(A + r * sa_row, sa_row, sa_col, B, ldb, K, C + r * ldc, ldc, accumulate);
    r += 4;
  }
  if (r + 2 <= M) {
    tile<2, NV>(A + r * sa_row, sa_row, sa_col, B, ldb, K, C + r * ldc, ldc, accumulate);
    r += 2;
  }
  if (r < M) tile<1, NV>(A + r * sa_row, sa_row, sa_col, B, ldb, K, C + r * ldc, ldc, accumulate);
}

// C[M x Nc] (+)= A[M x K] B[K x Nc], Nc a multiple of 16. Column panels of up to 64 floats, and
// the contraction in chunks whose slice of B (chunk x panel, <= 24 KB) stays in L1 while every row
// tile of C passes over it: with the whole of a long contraction (P V over 1024 keys) each row tile
// streamed B from L2, and that, not the multiply-adds, set the pace.
void matmul(int64_t M, int64_t Nc, int64_t K, const float* A, int64_t sa_row, int64_t sa_col, const float* B,
            int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t c = 0; c < Nc; c += 4 * kW) {
    const int nv = static_cast<int>(std::min<int64_t>(4, (Nc - c) / kW));
    const int64_t kc = 24 * 1024 / (nv * kW * 4);
    for (int64_t k0 = 0; k0 < K; k0 += kc) {
      const float* Ak = A + k0 * sa_col;
      const float* Bk = B + k0 * ldb + c;
      const int64_t kn = std::min(kc, K - k0);
      const bool acc = accumulate || k0 > 0;
      float* Cc = C + c;
      switch (nv) {
        case 4: rows_of<4>(M, Ak, sa_row, sa_col, Bk, ldb, kn, Cc, ldc, acc); break;
        case 3: rows_of<3>(M, Ak, sa_row, sa_col, Bk, ldb, kn, Cc, ldc, acc); break;
        case 2: rows_of<2>(M, Ak, sa_row, sa_col, Bk, ldb, kn, Cc, ldc, acc); break;
        default: rows_of<1>(M, Ak, sa_row, sa_col, Bk, ldb, kn, Cc, ldc, acc); break;
      }
    }
  }
}

// Geometry of one call: N pairs-groups (flattened leading axes), L tokens, H heads, D channels.
struct Geometry {
  int64_t N, L, H, D;
  int64_t Lp, Dp;  // L and D rounded up to whole vectors (zero padded in the packed copies)
  int64_t ldl;     // row stride of the L-wide scratch arrays: Lp plus one cache line, so that
                   // successive rows of a 4 KB-multiple width do not share one L1 set
  int64_t rows;    // query rows per block
  float scale;
  int64_t pair_offset(int64_t p) const { return (p / H) * L * H * D + (p % H) * D; }
  int64_t row_stride() const { return H * D; }
};

Geometry geometry(ffi::Span<const int64_t> dims) {
  Geometry g;
  int rank = static_cast<int>(dims.size());
  g.N = 1;
  for (int i = 0; i < rank - 3; ++i) g.N *= dims[i];
  g.L = dims[rank - 3];
  g.H = dims[rank - 2];
  g.D = dims[rank - 1];
  g.Lp = round_up(g.L, kW);
  g.Dp = round_up(g.D, kW);
  g.ldl = g.Lp + kW;
  // Query rows per block: the block's rows x Lp logits (and, backward, two more such arrays) stay
  // within ~256 KB, a share of L2 on common CPUs.
  g.rows = std::clamp<int64_t>((64 * 1024) / g.Lp, 8, 64);
  g.scale = 1.0f / std::sqrt(static_cast<float>(g.D));
  return g;
}

// Copies of a pair's (L x D) operand, strided in the source: transposed to (D x ldl) or row-major
// (Lp x Dp); padding is zero.
void pack_transposed(const float* src, const Geometry& g, float* dst) {
  std::fill(dst, dst + g.D * g.ldl, 0.f);
  for (int64_t l = 0; l < g.L; ++l) {
    const float* row = src + l * g.row_stride();
    for (int64_t d = 0; d < g.D; ++d) dst[d * g.ldl + l] = row[d];
  }
}
void pack_rows(const float* src, const Geometry& g, int64_t n_rows, float* dst, float scale = 1.f) {
  for (int64_t l = 0; l < n_rows; ++l) {
    const float* row = src + l * g.row_stride();
    float* out = dst + l * g.Dp;
    for (int64_t d = 0; d < g.D; ++d) out[d] = row[d] * scale;
    std::fill(out + g.D, out + g.Dp, 0.f);
  }
}

// Per-thread scratch, grown on demand and kept for the thread's life (pool threads persist).
float* scratch(std::vector<float>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Logits of a block: s[r, :Lp] = qs[r] . kt[:, :Lp] (kt is D x ldl); columns >= L are set to -inf.
void block_logits(const Geometry& g, int64_t n_rows, const float* qs, const float* kt, float* s) {
  matmul(n_rows, g.Lp, g.D, qs, g.Dp, 1, kt, g.ldl, s, g.ldl, false);
  for (int64_t r = 0; r < n_rows; ++r)
    std::fill(s + r * g.ldl + g.L, s + r * g.ldl + g.Lp, -INFINITY);
}

void forward_rows(const Geometry& g, int64_t pair, int64_t r0, int64_t r1, const float* q, const float* k,
                  const float* v, float* o, float* lse) {
  thread_local std::vector<float> buf;
  const int64_t R = g.rows;
  float* kt = scratch(buf, g.D * g.ldl + g.Lp * g.Dp + R * g.Dp * 2 + R * g.ldl);
  float* vp = kt + g.D * g.ldl;
  float* qs = vp + g.Lp * g.Dp;
  float* ob = qs + R * g.Dp;
  float* s = ob + R * g.Dp;
  const int64_t off = g.pair_offset(pair), rs = g.row_stride();
  pack_transposed(k + off, g, kt);
  pack_rows(v + off, g, g.L, vp);
  std::fill(vp + g.L * g.Dp, vp + g.Lp * g.Dp, 0.f);
  for (int64_t b0 = r0; b0 < r1; b0 += R) {
    const int64_t n = std::min(R, r1 - b0);
    pack_rows(q + off + b0 * rs, g, n, qs, g.scale);
    block_logits(g, n, qs, kt, s);
    float inv_sum[64];
    for (int64_t r = 0; r < n; ++r) {
      float* row = s + r * g.ldl;
      const float mx = row_max(row, g.Lp);
      const float total = exp_in_place(row, g.Lp, mx);
      inv_sum[r] = 1.f / total;
      lse[pair * g.L + b0 + r] = mx + std::log(total);  // lse (N, H, L): pair n H + h
    }
    matmul(n, g.Dp, g.Lp, s, g.ldl, 1, vp, g.Dp, ob, g.Dp, false);
    for (int64_t r = 0; r < n; ++r) {
      float* out = o + off + (b0 + r) * rs;
      for (int64_t d = 0; d < g.D; ++d) out[d] = ob[r * g.Dp + d] * inv_sum[r];
    }
  }
}

// Items: whole pairs, or each pair cut into pieces of query rows when there are fewer pairs than
// about twice the threads (a rollout's single frame, say).
struct Split {
  int64_t pieces, rows_per_piece;
};
Split split(const Geometry& g, int64_t threads) {
  const int64_t pairs = g.N * g.H;
  int64_t pieces = pairs >= 2 * threads ? 1 : (2 * threads + pairs - 1) / pairs;
  int64_t per = round_up((g.L + pieces - 1) / pieces, g.rows);
  pieces = (g.L + per - 1) / per;
  return {pieces, per};
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> o,
                            ffi::ResultBuffer<ffi::F32> lse) {
  if (q.dimensions().size() < 3) return ffi::Error::InvalidArgument("attention: q must be (..., L, H, D)");
  const Geometry g = geometry(q.dimensions());
  const Split sp = split(g, std::max<int64_t>(1, pool.num_threads()));
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, g.N * g.H * sp.pieces, [&](int64_t item) {
    const int64_t pair = item / sp.pieces, r0 = (item % sp.pieces) * sp.rows_per_piece;
    forward_rows(g, pair, r0, std::min(g.L, r0 + sp.rows_per_piece), qp, kp, vp, op, lp);
  });
  return ffi::Error::Success();
}

void backward_pair(const Geometry& g, int64_t pair, const float* q, const float* k, const float* v,
                   const float* o, const float* lse, const float* dout, float* dq, float* dk, float* dv) {
  thread_local std::vector<float> buf;
  const int64_t R = g.rows, Lp = g.Lp, Dp = g.Dp, ldl = g.ldl;
  float* kt = scratch(buf, 2 * g.D * ldl + 3 * Lp * Dp + 3 * R * Dp + 2 * R * ldl);
  float* vt = kt + g.D * ldl;
  float* kr = vt + g.D * ldl;  // k row-major (Lp x Dp)
  float* dk_acc = kr + Lp * Dp;
  float* dv_acc = dk_acc + Lp * Dp;
  float* qs = dv_acc + Lp * Dp;  // scaled q block (R x Dp)
  float* dob = qs + R * Dp;      // do block (R x Dp)
  float* dqb = dob + R * Dp;     // dq block (R x Dp)
  float* p = dqb + R * Dp;       // probabilities (R x ldl)
  float* ds = p + R * ldl;       // do v^T, then ds (R x ldl)
  const int64_t off = g.pair_offset(pair), rs = g.row_stride();
  const float* lse_pair = lse + pair * g.L;
  pack_transposed(k + off, g, kt);
  pack_transposed(v + off, g, vt);
  pack_rows(k + off, g, g.L, kr);
  std::fill(kr + g.L * Dp, kr + Lp * Dp, 0.f);
  std::fill(dk_acc, dk_acc + 2 * Lp * Dp, 0.f);
  for (int64_t b0 = 0; b0 < g.L; b0 += R) {
    const int64_t n = std::min(R, g.L - b0);
    pack_rows(q + off + b0 * rs, g, n, qs, g.scale);
    pack_rows(dout + off + b0 * rs, g, n, dob);
    block_logits(g, n, qs, kt, p);
    float delta[64];
    for (int64_t r = 0; r < n; ++r) {
      const float* orow = o + off + (b0 + r) * rs;
      float acc = 0.f;
      for (int64_t d = 0; d < g.D; ++d) acc += dob[r * Dp + d] * orow[d];
      delta[r] = acc;
      float* row = p + r * ldl;
      const vf shift = splat(lse_pair[b0 + r]);
      for (int64_t j = 0; j < Lp; j += kW) store(row + j, vexp(load(row + j) - shift));
    }
    // dv += p^T do: rows are keys, the contraction runs over the block's query rows.
    matmul(Lp, Dp, n, p, 1, ldl, dob, Dp, dv_acc, Dp, true);
    // dp = do v^T, then ds = p (dp - delta) in place.
    matmul(n, Lp, g.D, dob, Dp, 1, vt, ldl, ds, ldl, false);
    for (int64_t r = 0; r < n; ++r) {
      float* drow = ds + r * ldl;
      const float* prow = p + r * ldl;
      const vf dl = splat(delta[r]);
      for (int64_t j = 0; j < Lp; j += kW) store(drow + j, load(prow + j) * (load(drow + j) - dl));
    }
    // dq = scale (ds k);  dk += ds^T (scale q).
    matmul(n, Dp, Lp, ds, ldl, 1, kr, Dp, dqb, Dp, false);
    for (int64_t r = 0; r < n; ++r) {
      float* out = dq + off + (b0 + r) * rs;
      for (int64_t d = 0; d < g.D; ++d) out[d] = dqb[r * Dp + d] * g.scale;
    }
    matmul(Lp, Dp, n, ds, 1, ldl, qs, Dp, dk_acc, Dp, true);
  }
  for (int64_t l = 0; l < g.L; ++l) {
    std::memcpy(dk + off + l * rs, dk_acc + l * Dp, g.D * sizeof(float));
    std::memcpy(dv + off + l * rs, dv_acc + l * Dp, g.D * sizeof(float));
  }
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  if (q.dimensions().size() < 3) return ffi::Error::InvalidArgument("attention: q must be (..., L, H, D)");
  const Geometry g = geometry(q.dimensions());
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = o.typed_data(),
              *lp = lse.typed_data(), *dp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, g.N * g.H, [&](int64_t pair) {
    backward_pair(g, pair, qp, kp, vp, op, lp, dp, dqp, dkp, dvp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WjAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WjAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
