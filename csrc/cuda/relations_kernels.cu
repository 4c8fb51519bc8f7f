// CUDA kernel of lrml_relations (SPEC.md): the attention a = softmax(K (p ⊙ q)) [B, N] and the
// relation r = Mᵀ a [B, d] of each pair (users[b], items[b]), forward only, in fp32.
//
// Free of torch headers (csrc/check_nvcc.sh compiles it with a plain nvcc). One warp per pair,
// warp_attend() of warp_attention.cuh (the distance kernels' attention): K and M staged in shared
// memory when they fit, per-warp scratch s [d] and a [N] there too; r is written straight to its
// output row, a copied out after the softmax.
#include <cuda_runtime.h>

#include <cstdint>

#include "../lrml.h"
#include "warp_attention.cuh"

namespace lrml {
namespace cuda {
namespace {

template <typename T>
__global__ void relations_kernel(const T* __restrict__ P, const T* __restrict__ Q,
                                 const float* __restrict__ Kg, const float* __restrict__ Mg,
                                 const int64_t* __restrict__ users,
                                 const int64_t* __restrict__ items, int64_t B, int N, int d,
                                 bool kmsmem, float* __restrict__ a_out,
                                 float* __restrict__ r_out) {
  extern __shared__ float smem[];
  const int64_t nd = static_cast<int64_t>(N) * d;
  const float *K, *M;
  stage_km(Kg, Mg, nd, kmsmem, smem, &K, &M);
  const int warps = blockDim.x / kWarp;
  const int w = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  float* s = smem + (kmsmem ? 2 * nd : 0) + static_cast<int64_t>(w) * (d + N);
  float* a = s + d;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * warps + w; b < B;
       b += static_cast<int64_t>(gridDim.x) * warps) {
    warp_attend(P + users[b] * d, Q + items[b] * d, K, M, N, d, s, a, r_out + b * d, lane);
    for (int n = lane; n < N; n += kWarp) a_out[b * N + n] = a[n];
    __syncwarp();
  }
}

template <typename T>
const char* relations_typed(const void* P, const void* Q, const float* K, const float* M,
                            const int64_t* users, const int64_t* items, int64_t B, int64_t N,
                            int64_t d, float* a_out, float* r_out, cudaStream_t stream) {
  const Config cfg = configure(N, d, d + N);
  if (const char* e = prepare_kernel(relations_kernel<T>, cfg)) return e;
  if (B == 0) return nullptr;
  int64_t grid = (B + cfg.warps - 1) / cfg.warps;
  const int64_t max_grid = static_cast<int64_t>(cfg.sms) * 32;
  grid = grid < max_grid ? grid : max_grid;
  relations_kernel<T><<<static_cast<unsigned>(grid), cfg.warps * kWarp, cfg.smem, stream>>>(
      static_cast<const T*>(P), static_cast<const T*>(Q), K, M, users, items, B,
      static_cast<int>(N), static_cast<int>(d), cfg.kmsmem, a_out, r_out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_relations(DType dtype, const void* user_emb, const void* item_emb,
                             const float* keys_f, const float* memory_f, const int64_t* users,
                             const int64_t* items, int64_t B, int64_t N, int64_t d, float* a_out,
                             float* r_out, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32:
      return relations_typed<float>(user_emb, item_emb, keys_f, memory_f, users, items, B, N, d,
                                    a_out, r_out, st);
    case DType::Float16:
      return relations_typed<__half>(user_emb, item_emb, keys_f, memory_f, users, items, B, N, d,
                                     a_out, r_out, st);
    case DType::BFloat16:
      return relations_typed<__nv_bfloat16>(user_emb, item_emb, keys_f, memory_f, users, items, B,
                                            N, d, a_out, r_out, st);
  }
  return "unsupported dtype";
}

}  // namespace cuda
}  // namespace lrml
