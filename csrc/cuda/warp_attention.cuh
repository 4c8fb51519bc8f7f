// Device pieces shared by the CUDA kernels (lrml_kernels.cu, relations_kernels.cu): fp32 loads,
// warp reductions, K/M staged in shared memory, the warp-cooperative attention of one pair, and
// the launch configuration (warps per block, shared memory). Free of torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lrml {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// out[n] = ⟨X[n, :], v⟩ for the N rows of X [N, d] (row-major): the warp's lanes split d.
__device__ __forceinline__ void warp_rows_dot(const float* X, const float* v, int N, int d,
                                              float* out, int lane) {
  for (int n = 0; n < N; ++n) {
    float part = 0.f;
    const float* Xn = X + static_cast<int64_t>(n) * d;
    for (int j = lane; j < d; j += kWarp) part = fmaf(Xn[j], v[j], part);
    part = warp_sum(part);
    if (lane == 0) out[n] = part;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Loads K and M into shared memory (when kmsmem) and returns the pointers to use.
__device__ __forceinline__ void stage_km(const float* Kg, const float* Mg, int64_t nd, bool kmsmem,
                                         float* smem, const float** K, const float** M) {
  if (kmsmem) {
    for (int64_t i = threadIdx.x; i < nd; i += blockDim.x) {
      smem[i] = Kg[i];
      smem[nd + i] = Mg[i];
    }
    *K = smem;
    *M = smem + nd;
  } else {
    *K = Kg;
    *M = Mg;
  }
  __syncthreads();
}

// Warp-cooperative attention of one pair: s = p ⊙ q (into s), a = softmax(K s) (into a),
// r = Mᵀ a (into r, when r != nullptr). p, q: row pointers (global, type T).
template <typename T>
__device__ void warp_attend(const T* p, const T* q, const float* K, const float* M, int N, int d,
                            float* s, float* a, float* r, int lane) {
  for (int j = lane; j < d; j += kWarp) s[j] = to_f(p[j]) * to_f(q[j]);
  __syncwarp();
  warp_rows_dot(K, s, N, d, a, lane);
  __syncwarp();
  float m = -INFINITY;
  for (int n = lane; n < N; n += kWarp) m = fmaxf(m, a[n]);
  m = warp_max(m);
  float sum = 0.f;
  for (int n = lane; n < N; n += kWarp) {
    const float v = expf(a[n] - m);
    a[n] = v;
    sum += v;
  }
  sum = warp_sum(sum);
  __syncwarp();
  for (int n = lane; n < N; n += kWarp) a[n] = a[n] / sum;
  __syncwarp();
  if (r != nullptr) {
    for (int j = lane; j < d; j += kWarp) {
      float acc = 0.f;
      for (int n = 0; n < N; ++n) acc = fmaf(a[n], M[static_cast<int64_t>(n) * d + j], acc);
      r[j] = acc;
    }
    __syncwarp();
  }
}

struct Config {
  int warps = 8;
  bool kmsmem = true;
  size_t smem = 0;
  int max_smem = 48 * 1024;
  int sms = 1;
  const char* error = nullptr;
};

// Warps per block and whether K/M go to shared memory, for per-warp scratch of `per_warp` floats.
inline Config configure(int64_t N, int64_t d, int64_t per_warp) {
  Config cfg;
  int dev = 0, optin = 0;
  // A failed query is reported here and cleared from the runtime's last error, which the next
  // launch check would otherwise report under that launch's name.
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) !=
          cudaSuccess ||
      cudaDeviceGetAttribute(&cfg.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();
    cfg.error = "querying the CUDA device failed";
    return cfg;
  }
  cfg.max_smem = optin > 0 ? optin : 48 * 1024;
  const size_t km = 2 * static_cast<size_t>(N) * d * sizeof(float);
  for (int warps = 8; warps >= 1; warps /= 2) {
    const size_t scratch = static_cast<size_t>(warps) * per_warp * sizeof(float);
    if (km + scratch <= static_cast<size_t>(cfg.max_smem)) {
      cfg.warps = warps;
      cfg.kmsmem = true;
      cfg.smem = km + scratch;
      return cfg;
    }
  }
  for (int warps = 8; warps >= 1; warps /= 2) {
    const size_t scratch = static_cast<size_t>(warps) * per_warp * sizeof(float);
    if (scratch <= static_cast<size_t>(cfg.max_smem)) {
      cfg.warps = warps;
      cfg.kmsmem = false;
      cfg.smem = scratch;
      return cfg;
    }
  }
  cfg.error =
      "the embedding dimension d and the memory slots N are too large for the cuda backend's "
      "shared memory (one warp's scratch of about 4d + 2N floats must fit a block)";
  return cfg;
}

template <typename Kernel>
const char* prepare_kernel(Kernel kernel, const Config& cfg) {
  if (cfg.error) return cfg.error;
  if (cfg.smem > 48 * 1024) {
    // The device's opt-in maximum, not this launch's size: the attribute is per kernel and
    // process, so a smaller value set by another thread's launch would fail this one.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           cfg.max_smem);
    if (err != cudaSuccess) {
      cudaGetLastError();  // cleared, as in configure
      return cudaGetErrorString(err);
    }
  }
  return nullptr;
}

}  // namespace cuda
}  // namespace lrml
