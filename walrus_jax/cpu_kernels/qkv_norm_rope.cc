// Query / key preparation of both attentions for XLA:CPU, forward and backward, float32 (XLA FFI).
//
// Every head vector of q and of k (head_dim D channels) gets a LayerNorm over its channels (its own
// weight and bias for q and for k), then the rotary embedding of its token:
//
//   z = (x - mean) / sqrt(var + eps) * scale + bias
//   y[2m]   = z[2m]   cos[2m]   + z[2m+1] sin[2m]        (sin holds -sin(angle) at even channels,
//   y[2m+1] = z[2m+1] cos[2m+1] + z[2m]   sin[2m+1]       +sin(angle) at odd ones; cos = 1, sin = 0
//                                                          on channels that are not rotated)
//
// XLA:CPU ran this as reductions over the 48-channel minor axis and a gather for the pair swap,
// ~3 ns per element; here one pass per head vector keeps it in registers.
//
// Layout: qkv holds R rows (all leading axes and the tokens flattened), each 3 x H x D floats: the
// queries, keys and values of one token, as the fused projection produced them, in one of two
// orders: (3, H, D) (space attention: all query heads, then all keys, then all values) or
// (H, 3, D) with heads_major (time attention: per head its query, key and value). q, k, v out
// (R, H, D) each (v copied, so that the attention that follows reads contiguous rows); scale and
// bias (2, D) (row 0 for q, row 1 for k); cos and sin (L, D) with the token of row r at r % L
// (ones and zeros where nothing is rotated).
//
// backward: dz = dy cos + swap(dy sin);  dscale = sum over vectors of dz xhat;  dbias = sum of dz;
//           g = dz scale;  dx = (g - mean(g) - xhat mean(g xhat)) / sqrt(var + eps).
// The weight gradients are written as one partial sum per work item ((items, 2, 2, D): [item,
// {scale, bias}, {q, k}, channel]), summed by the caller: deterministic, whatever the threads.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "vec.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace walrus_jax;  // parallel_runs, vf and its helpers

namespace {

constexpr float kEps = 1e-5f;  // torch.nn.LayerNorm's default

struct Shape {
  int64_t R, H, D, L;
  int64_t which_stride, head_stride;  // floats from q to k (to v) and from one head to the next
  int64_t at(int64_t r, int64_t which, int64_t h) const { return r * 3 * H * D + which * which_stride + h * head_stride; }
};

// (v[1], v[0], v[3], v[2], ...): each channel pair's partner (a vector starts at an even channel).
inline vf swap_pairs(vf v) { return __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14); }

// mean and 1 / sqrt(var + eps) of x[0, D): whole vectors, then the remaining channels one by one.
inline void moments(const float* x, int64_t D, float* mean, float* rstd) {
  vf acc{};
  int64_t d = 0;
  for (; d + kW <= D; d += kW) acc += load(x + d);
  float s = hsum(acc);
  for (; d < D; ++d) s += x[d];
  const float m = s / static_cast<float>(D);
  vf vacc{};
  for (d = 0; d + kW <= D; d += kW) {
    const vf c = load(x + d) - splat(m);
    vacc += c * c;
  }
  float v = hsum(vacc);
  for (; d < D; ++d) v += (x[d] - m) * (x[d] - m);
  *mean = m;
  *rstd = 1.f / std::sqrt(v / static_cast<float>(D) + kEps);
}

// One head vector: y = rope(LayerNorm(x)).
inline void norm_rope(const float* x, const float* w, const float* b, const float* c, const float* sn, int64_t D,
                      float* y) {
  float mean, rstd;
  moments(x, D, &mean, &rstd);
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    const vf z = (load(x + d) - splat(mean)) * splat(rstd) * load(w + d) + load(b + d);
    store(y + d, z * load(c + d) + swap_pairs(z) * load(sn + d));
  }
  for (; d < D; d += 2) {
    const float z0 = (x[d] - mean) * rstd * w[d] + b[d], z1 = (x[d + 1] - mean) * rstd * w[d + 1] + b[d + 1];
    y[d] = z0 * c[d] + z1 * sn[d];
    y[d + 1] = z1 * c[d + 1] + z0 * sn[d + 1];
  }
}

// One head vector's backward: dx, and dz xhat and dz added to dscale and dbias.
inline void norm_rope_backward(const float* x, const float* w, const float* c, const float* sn, const float* dy,
                               int64_t D, float* dx, float* dscale, float* dbias) {
  float mean, rstd;
  moments(x, D, &mean, &rstd);
  float dz[256], xhat[256];  // D <= 256 (checked)
  vf g_acc{}, gx_acc{};
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    const vf z = load(dy + d) * load(c + d) + swap_pairs(load(dy + d) * load(sn + d));
    const vf xh = (load(x + d) - splat(mean)) * splat(rstd);
    store(dz + d, z);
    store(xhat + d, xh);
    store(dscale + d, load(dscale + d) + z * xh);
    store(dbias + d, load(dbias + d) + z);
    const vf g = z * load(w + d);
    g_acc += g;
    gx_acc += g * xh;
  }
  float g_sum = hsum(g_acc), gx_sum = hsum(gx_acc);
  for (; d < D; d += 2) {
    dz[d] = dy[d] * c[d] + dy[d + 1] * sn[d + 1];
    dz[d + 1] = dy[d + 1] * c[d + 1] + dy[d] * sn[d];
    for (int64_t e = d; e < d + 2; ++e) {
      xhat[e] = (x[e] - mean) * rstd;
      dscale[e] += dz[e] * xhat[e];
      dbias[e] += dz[e];
      g_sum += dz[e] * w[e];
      gx_sum += dz[e] * w[e] * xhat[e];
    }
  }
  const float g_mean = g_sum / static_cast<float>(D), gx_mean = gx_sum / static_cast<float>(D);
  for (d = 0; d < D; ++d) dx[d] = rstd * (dz[d] * w[d] - g_mean - xhat[d] * gx_mean);
}

void forward_rows(const Shape& s, int64_t r0, int64_t r1, const float* qkv, const float* scale, const float* bias,
                  const float* cos, const float* sin, float* q, float* k, float* v) {
  const int64_t D = s.D;
  for (int64_t r = r0; r < r1; ++r) {
    const float* c = cos + (r % s.L) * D;
    const float* sn = sin + (r % s.L) * D;
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t out = (r * s.H + h) * D;
      norm_rope(qkv + s.at(r, 0, h), scale, bias, c, sn, D, q + out);
      norm_rope(qkv + s.at(r, 1, h), scale + D, bias + D, c, sn, D, k + out);
      std::memcpy(v + out, qkv + s.at(r, 2, h), D * sizeof(float));
    }
  }
}

void backward_rows(const Shape& s, int64_t r0, int64_t r1, const float* qkv, const float* scale, const float* cos,
                   const float* sin, const float* dq, const float* dk, const float* dv, float* dqkv, float* partial) {
  const int64_t D = s.D;
  float* dscale = partial;         // (2, D)
  float* dbias = partial + 2 * D;  // (2, D)
  std::fill(partial, partial + 4 * D, 0.f);
  for (int64_t r = r0; r < r1; ++r) {
    const float* c = cos + (r % s.L) * D;
    const float* sn = sin + (r % s.L) * D;
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t out = (r * s.H + h) * D;
      for (int64_t which = 0; which < 2; ++which) {
        const int64_t at = s.at(r, which, h);
        norm_rope_backward(qkv + at, scale + which * D, c, sn, (which == 0 ? dq : dk) + out, D, dqkv + at,
                           dscale + which * D, dbias + which * D);
      }
      std::memcpy(dqkv + s.at(r, 2, h), dv + out, D * sizeof(float));
    }
  }
}

ffi::Error check(ffi::Span<const int64_t> dims, int64_t heads_major, ffi::Span<const int64_t> table_dims, Shape* s) {
  const int rank = static_cast<int>(dims.size());
  if (rank < 4 || dims[heads_major ? rank - 2 : rank - 3] != 3)
    return ffi::Error::InvalidArgument(heads_major ? "qkv_norm_rope: qkv must be (..., L, H, 3, D)"
                                                   : "qkv_norm_rope: qkv must be (..., L, 3, H, D)");
  s->R = 1;
  for (int i = 0; i < rank - 3; ++i) s->R *= dims[i];
  s->H = dims[heads_major ? rank - 3 : rank - 2];
  s->D = dims[rank - 1];
  s->L = dims[rank - 4];
  s->which_stride = heads_major ? s->D : s->H * s->D;
  s->head_stride = heads_major ? 3 * s->D : s->D;
  if (s->D % 2 || s->D > 256) return ffi::Error::InvalidArgument("qkv_norm_rope: head_dim must be even and <= 256");
  if (table_dims.size() != 2 || table_dims[0] != s->L || table_dims[1] != s->D)
    return ffi::Error::InvalidArgument("qkv_norm_rope: cos and sin must be (L, head_dim)");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                   ffi::ResultBuffer<ffi::F32> q, ffi::ResultBuffer<ffi::F32> k, ffi::ResultBuffer<ffi::F32> v,
                   int64_t heads_major) {
  Shape s;
  if (ffi::Error e = check(qkv.dimensions(), heads_major, cos.dimensions(), &s); e.failure()) return e;
  const float *x = qkv.typed_data(), *w = scale.typed_data(), *b = bias.typed_data(), *c = cos.typed_data(),
              *sn = sin.typed_data();
  float *qp = q->typed_data(), *kp = k->typed_data(), *vp = v->typed_data();
  parallel_runs(pool, s.R, partial_items(s.R), [&](int64_t, int64_t r0, int64_t r1) {
    forward_rows(s, r0, r1, x, w, b, c, sn, qp, kp, vp);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, ffi::Buffer<ffi::F32> dq,
                    ffi::Buffer<ffi::F32> dk, ffi::Buffer<ffi::F32> dv, ffi::ResultBuffer<ffi::F32> dqkv,
                    ffi::ResultBuffer<ffi::F32> partial, int64_t heads_major) {
  Shape s;
  if (ffi::Error e = check(qkv.dimensions(), heads_major, cos.dimensions(), &s); e.failure()) return e;
  const float *x = qkv.typed_data(), *w = scale.typed_data(), *c = cos.typed_data(), *sn = sin.typed_data(),
              *dqp = dq.typed_data(), *dkp = dk.typed_data(), *dvp = dv.typed_data();
  float *dx = dqkv->typed_data(), *part = partial->typed_data();
  parallel_runs(pool, s.R, partial_items(s.R), [&](int64_t i, int64_t r0, int64_t r1) {
    backward_rows(s, r0, r1, x, w, c, sn, dqp, dkp, dvp, dx, part + i * 4 * s.D);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(WjQkvNormRopeForward, Forward,
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
                                  .Attr<int64_t>("heads_major"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WjQkvNormRopeBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads_major"));
