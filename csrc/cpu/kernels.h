// Inner loops of the CPU kernels: vectorisable loops over d (omp simd), the direct distance of
// one pair (SPEC.md; the top-k's exact rescoring), Triton's Philox word (the sampler's draws,
// the bf16 row update's rounding bits) and the prefetch of a row. Plain C++ on raw
// pointers; `T` is the compute type (float/double).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../lrml.h"

namespace lrml {
namespace cpu {

template <typename T>
inline T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// y += alpha * x
template <typename T>
inline void axpy(T alpha, const T* __restrict x, T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * x[j];
}

template <typename T>
inline void zero(T* x, int64_t n) {
  std::memset(x, 0, sizeof(T) * n);
}

// dst[0:n] = src[0:n] in dst's dtype: half-precision rows to float, float rows to fp16 / bf16
// (to nearest even, as Tensor.to rounds).
template <typename D, typename S>
inline void convert(D* __restrict dst, const S* __restrict src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<D>(src[j]);
}

inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// The first word of Philox-4x32 with 10 rounds at counter (lo, hi, 0, 0) and key (seed's low,
// high word): triton.language.randint(seed, counter) for an int64 counter.
inline uint32_t philox_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(kRoundB, a2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, a0) ^ c3 ^ k1;
    c1 = kRoundB * a2;
    c3 = kRoundA * a0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// Prefetch the lines of a row of d entries: for reading or writing (kWrite), into L1
// (kLocality 3) or only L2 (kLocality 2).
template <int kWrite, int kLocality, typename T>
inline void prefetch_row(const T* x, int64_t d) {
  const char* c = reinterpret_cast<const char*>(x);
  for (int64_t o = 0; o < d * static_cast<int64_t>(sizeof(T)); o += 64)
    __builtin_prefetch(c + o, kWrite, kLocality);
}

// Forward attention of one pair: s = p ⊙ q, a = softmax(K s) (max-subtracted), r = Mᵀ a.
template <typename T>
inline void attend(const T* __restrict p, const T* __restrict q, const T* __restrict K,
                   const T* __restrict M, int64_t N, int64_t d, T* __restrict s, T* __restrict a,
                   T* __restrict r) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) s[j] = p[j] * q[j];
  T zmax = -std::numeric_limits<T>::infinity();
  for (int64_t n = 0; n < N; ++n) {
    a[n] = dot(K + n * d, s, d);
    zmax = a[n] > zmax ? a[n] : zmax;
  }
  T sum = 0;
  for (int64_t n = 0; n < N; ++n) {
    a[n] = std::exp(a[n] - zmax);
    sum += a[n];
  }
  for (int64_t n = 0; n < N; ++n) a[n] = a[n] / sum;
  zero(r, d);
  for (int64_t n = 0; n < N; ++n) axpy(a[n], M + n * d, r, d);
}

// e = p + r − q; returns D(e).
template <typename T>
inline T residual_distance(const T* __restrict p, const T* __restrict r, const T* __restrict q,
                           T* __restrict e, int64_t d, Distance distance, T eps) {
  T acc = 0;
  if (distance == Distance::L1) {
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < d; ++j) {
      e[j] = p[j] + r[j] - q[j];
      acc += std::abs(e[j]);
    }
    return acc;
  }
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < d; ++j) {
    e[j] = p[j] + r[j] - q[j];
    acc += e[j] * e[j];
  }
  return distance == Distance::L2 ? std::sqrt(acc + eps) : acc;
}

// Direct distance of one pair (scratch: 3d + N).
template <typename T>
inline T pair_distance(const T* p, const T* q, const T* K, const T* M, int64_t N, int64_t d,
                       Distance distance, T eps, T* scratch) {
  T* s = scratch;
  T* r = s + d;
  T* e = r + d;
  T* a = e + d;
  attend(p, q, K, M, N, d, s, a, r);
  return residual_distance(p, r, q, e, d, distance, eps);
}

}  // namespace cpu
}  // namespace lrml
