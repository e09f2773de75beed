// Time attention's core for XLA:CPU: per token, softmax attention over its T frames with a
// relative-position bias, forward and backward, float32 (XLA FFI handlers).
//
//   s[t, u] = scale q[t] . k[u] + bias[h, t, u]   (u > t masked when causal)
//   p = softmax over u;  o[t] = sum_u p[t, u] v[u]
//   backward: dv[u] = sum_t p[t, u] do[t];  dp[t, u] = do[t] . v[u];  ds = p (dp - sum_u p dp);
//             dq[t] = scale sum_u ds[t, u] k[u];  dk[u] = scale sum_t ds[t, u] q[t];
//             dbias[h] = sum over tokens of ds (one partial sum per work item, summed by the caller)
//
// With T ~ 6 every token's problem is a few dozen dot products of head_dim floats: XLA:CPU ran it
// as broadcast products and reductions over the (N, T, T, heads, head_dim) intermediate, ~10 ms
// per block of the small configuration forward. Here each token's T x T logits stay in registers
// and the backward recomputes them (no saved probabilities).
//
// Layout: q (N, Tq, H, D), k and v (N, T, H, D), o like q, row-major; bias (H, Tq, T); the queries
// are the last Tq of the T frames (Tq = T, or 1 for a rollout's last frame).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace walrus_jax;  // parallel_runs, dot

namespace {

constexpr int64_t kMaxT = 64;  // frames (checked): the per-token logits live on the stack

struct Shape {
  int64_t N, Tq, T, H, D;
  float scale;
  bool causal;
};

// y[0, D) += a x[0, D)
inline void axpy(float a, const float* x, float* y, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}

// Probabilities p[t * T + u] of one (token, head): scale q . k + bias, masked, softmax.
void probabilities(const Shape& s, const float* q, const float* k, const float* bias_h, int64_t n, int64_t h,
                   float* p) {
  const int64_t HD = s.H * s.D, off = s.T - s.Tq;
  for (int64_t t = 0; t < s.Tq; ++t) {
    const float* qt = q + ((n * s.Tq + t) * s.H + h) * s.D;
    float* row = p + t * s.T;
    float mx = -INFINITY;
    const int64_t last = s.causal ? off + t : s.T - 1;  // keys u <= last are seen
    for (int64_t u = 0; u <= last; ++u) {
      row[u] = s.scale * dot(qt, k + (n * s.T + u) * HD + h * s.D, s.D) + bias_h[t * s.T + u];
      mx = std::max(mx, row[u]);
    }
    float sum = 0.f;
    for (int64_t u = 0; u <= last; ++u) {
      row[u] = std::exp(row[u] - mx);
      sum += row[u];
    }
    const float inv = 1.f / sum;
    for (int64_t u = 0; u <= last; ++u) row[u] *= inv;
    for (int64_t u = last + 1; u < s.T; ++u) row[u] = 0.f;
  }
}

void forward_tokens(const Shape& s, int64_t n0, int64_t n1, const float* q, const float* k, const float* v,
                    const float* bias, float* o) {
  float p[kMaxT * kMaxT];
  const int64_t HD = s.H * s.D;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < s.H; ++h) {
      probabilities(s, q, k, bias + h * s.Tq * s.T, n, h, p);
      for (int64_t t = 0; t < s.Tq; ++t) {
        float* ot = o + ((n * s.Tq + t) * s.H + h) * s.D;
        std::fill(ot, ot + s.D, 0.f);
        for (int64_t u = 0; u < s.T; ++u)
          if (p[t * s.T + u] != 0.f) axpy(p[t * s.T + u], v + (n * s.T + u) * HD + h * s.D, ot, s.D);
      }
    }
  }
}

void backward_tokens(const Shape& s, int64_t n0, int64_t n1, const float* q, const float* k, const float* v,
                     const float* bias, const float* dout, float* dq, float* dk, float* dv, float* dbias) {
  float p[kMaxT * kMaxT], ds[kMaxT * kMaxT];
  const int64_t HD = s.H * s.D;
  std::fill(dbias, dbias + s.H * s.Tq * s.T, 0.f);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(dk + n * s.T * HD, dk + (n + 1) * s.T * HD, 0.f);
    std::fill(dv + n * s.T * HD, dv + (n + 1) * s.T * HD, 0.f);
    for (int64_t h = 0; h < s.H; ++h) {
      probabilities(s, q, k, bias + h * s.Tq * s.T, n, h, p);
      for (int64_t t = 0; t < s.Tq; ++t) {
        const float* dot_ = dout + ((n * s.Tq + t) * s.H + h) * s.D;
        float delta = 0.f;
        for (int64_t u = 0; u < s.T; ++u) {
          const float pu = p[t * s.T + u];
          const float dp = pu != 0.f ? dot(dot_, v + (n * s.T + u) * HD + h * s.D, s.D) : 0.f;
          ds[t * s.T + u] = dp;
          delta += pu * dp;
          if (pu != 0.f) axpy(pu, dot_, dv + (n * s.T + u) * HD + h * s.D, s.D);
        }
        float* dqt = dq + ((n * s.Tq + t) * s.H + h) * s.D;
        std::fill(dqt, dqt + s.D, 0.f);
        const float* qt = q + ((n * s.Tq + t) * s.H + h) * s.D;
        for (int64_t u = 0; u < s.T; ++u) {
          const float g = p[t * s.T + u] * (ds[t * s.T + u] - delta);
          dbias[(h * s.Tq + t) * s.T + u] += g;
          if (g != 0.f) {
            axpy(s.scale * g, k + (n * s.T + u) * HD + h * s.D, dqt, s.D);
            axpy(s.scale * g, qt, dk + (n * s.T + u) * HD + h * s.D, s.D);
          }
        }
      }
    }
  }
}

ffi::Error check(ffi::Span<const int64_t> qd, ffi::Span<const int64_t> kd, ffi::Span<const int64_t> bd,
                 bool causal, Shape* s) {
  if (qd.size() != 4 || kd.size() != 4 || bd.size() != 3)
    return ffi::Error::InvalidArgument("frame_attention: q, k must be (N, T, H, D), bias (H, Tq, T)");
  s->N = kd[0];
  s->T = kd[1];
  s->H = kd[2];
  s->D = kd[3];
  s->Tq = qd[1];
  if (qd[0] != s->N || qd[2] != s->H || qd[3] != s->D || s->Tq > s->T || bd[0] != s->H || bd[1] != s->Tq ||
      bd[2] != s->T)
    return ffi::Error::InvalidArgument("frame_attention: shapes of q, k and bias disagree");
  if (s->T > kMaxT) return ffi::Error::InvalidArgument("frame_attention: at most 64 frames");
  if (causal && s->Tq != s->T) return ffi::Error::InvalidArgument("frame_attention: causal needs Tq = T");
  s->scale = 1.f / std::sqrt(static_cast<float>(s->D));
  s->causal = causal;
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> o, int64_t causal) {
  Shape s;
  if (ffi::Error e = check(q.dimensions(), k.dimensions(), bias.dimensions(), causal != 0, &s); e.failure())
    return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *bp = bias.typed_data();
  float* op = o->typed_data();
  parallel_runs(pool, s.N, partial_items(s.N), [&](int64_t, int64_t n0, int64_t n1) {
    forward_tokens(s, n0, n1, qp, kp, vp, bp, op);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    ffi::ResultBuffer<ffi::F32> dbias, int64_t causal) {
  Shape s;
  if (ffi::Error e = check(q.dimensions(), k.dimensions(), bias.dimensions(), causal != 0, &s); e.failure())
    return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *bp = bias.typed_data(),
              *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data(), *dbp = dbias->typed_data();
  parallel_runs(pool, s.N, partial_items(s.N), [&](int64_t i, int64_t n0, int64_t n1) {
    backward_tokens(s, n0, n1, qp, kp, vp, bp, dop, dqp, dkp, dvp, dbp + i * s.H * s.Tq * s.T);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WjFrameAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("causal"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WjFrameAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("causal"));
