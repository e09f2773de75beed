// Vectors of 16 floats (GCC/Clang vector types), shared by the project's FFI kernels: compiled for
// the host CPU (-march=native), AVX-512 where the CPU has it, narrower instructions otherwise.
#ifndef WALRUS_JAX_CPU_KERNELS_VEC_H_
#define WALRUS_JAX_CPU_KERNELS_VEC_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace walrus_jax {

constexpr int kW = 16;  // floats per vector
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }  // (0 + x would cost an add)

inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = std::max(m, v[i]);
  return m;
}

// a[0, n) . b[0, n): whole vectors, then the remaining elements one by one.
inline float dot(const float* a, const float* b, int64_t n) {
  vf acc{};
  int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += load(a + i) * load(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace walrus_jax

#endif  // WALRUS_JAX_CPU_KERNELS_VEC_H_
