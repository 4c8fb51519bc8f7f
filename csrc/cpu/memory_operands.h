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
  Memory(const T* K, const T* M, int64_t N_, int64_t d_, const at::TensorOptions& opts)
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
        kp[n * dp + j] = K[n * d + j];
        mp[n * dp + j] = M[n * d + j];
        kt[j * Np + n] = K[n * d + j];
        mt[j * Np + n] = M[n * d + j];
        finite = finite && std::isfinite(K[n * d + j]) && std::isfinite(M[n * d + j]);
      }
    Kp = kp;
    Mp = mp;
    Kt = kt;
    Mt = mt;
  }
};

}  // namespace cpu
}  // namespace lrml
