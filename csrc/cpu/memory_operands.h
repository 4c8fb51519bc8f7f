// The keys and memory as the B operands of the tile GEMMs (tile_gemm.h), built once per call:
// shared by the fused distance kernels (lrml_cpu.cpp) and lrml_relations (relations_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "tile_gemm.h"

namespace lrml {
namespace cpu {

// K, M padded to dp = round_up(d, W) columns and Kᵀ, Mᵀ to Np = round_up(N, W): the B operands.
template <typename T>
struct Memory {
  int64_t N, d, dp, Np;
  at::Tensor buf;
  const T *Kp, *Mp, *Kt, *Mt;
  bool finite = true;  // every value of K and M is finite (no NaN, no ±inf)
  // K, M: [N, d] in T or, converted here, a half-precision dtype.
  template <typename S>
  Memory(const S* K, const S* M, int64_t N_, int64_t d_, const at::TensorOptions& opts)
      : N(N_), d(d_) {
    dp = round_up(d, Simd<T>::W);
    Np = round_up(N, Simd<T>::W);
    buf = at::zeros({2 * N * dp + 2 * d * Np}, opts);
    T* x = buf.data_ptr<T>();
    T* kp = x;
    T* mp = kp + N * dp;
    T* kt = mp + N * dp;
    T* mt = kt + d * Np;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < d; ++j) {
        const T k = static_cast<T>(K[n * d + j]), m = static_cast<T>(M[n * d + j]);
        kp[n * dp + j] = k;
        mp[n * dp + j] = m;
        kt[j * Np + n] = k;
        mt[j * Np + n] = m;
        finite = finite && std::isfinite(k) && std::isfinite(m);
      }
    Kp = kp;
    Mp = mp;
    Kt = kt;
    Mt = mt;
  }
};

}  // namespace cpu
}  // namespace lrml
