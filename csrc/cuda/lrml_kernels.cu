// CUDA kernels of the fused LRML distances (forward) and their backward (SPEC.md).
//
// Free of torch headers: compiles with a plain nvcc (csrc/check_nvcc.sh); the thin binding layer
// (lrml_cuda.cpp) allocates, casts and reduces with ATen. Parameters are fp32/fp16/bf16, the math
// runs in fp32. K and M (fp32 copies) sit in shared memory when they fit. One warp handles one
// unit (a pair, or a row with relation="shared"); lanes split d, warp shuffles reduce over d
// (the shared pieces: warp_attention.cuh).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../lrml.h"
#include "warp_attention.cuh"

namespace lrml {
namespace cuda {
namespace {

// D of e = p + r − q (all lanes get the value).
template <typename T>
__device__ float warp_distance(const T* p, const float* r, const T* q, int d, Distance distance,
                               float eps, int lane) {
  float acc = 0.f;
  for (int j = lane; j < d; j += kWarp) {
    const float e = to_f(p[j]) + r[j] - to_f(q[j]);
    acc += distance == Distance::L1 ? fabsf(e) : e * e;
  }
  acc = warp_sum(acc);
  return distance == Distance::L2 ? sqrtf(acc + eps) : acc;
}

// Floats of per-warp shared scratch of the backward: s, r, gr, gp [d] and a, g [N].
__host__ __device__ constexpr int64_t backward_scratch(int64_t N, int64_t d) {
  return 4 * d + 2 * N;
}

// Row idx[i] of a table of `size` rows, clamped into range. The ops check index ranges on the host
// only for CPU tensors (free there); on CUDA the Python layer checks them unless validate=False
// (a min/max and a host sync), and an unchecked out-of-range index reads a row of the table (an
// unspecified result), never memory outside it (check_batch refuses empty tables).
__device__ __forceinline__ int64_t row_of(const int64_t* idx, int64_t i, int64_t size) {
  const int64_t r = idx[i];
  return r < 0 ? 0 : (r < size ? r : size - 1);
}

// ge = g ∂D/∂e. The callers skip it (ge = 0) for g = 0 only where D is finite: at a NaN or
// ±inf D the reference's chain rule gives 0 · NaN or 0 · inf = NaN, as this does.
__device__ __forceinline__ float residual_grad(float e, float g, float Dv, Distance distance) {
  if (distance == Distance::L2) return g / Dv * e;
  if (distance == Distance::SquaredL2) return 2.f * g * e;
  return e > 0.f ? g : (e < 0.f ? -g : 0.f);
}

// ---------------------------------------------------------------------------------------------
// Forward: one warp per unit (pair, or row for relation="shared"); per-warp scratch s, r [d], a [N].
template <typename T>
__global__ void distances_kernel(const T* __restrict__ P, const T* __restrict__ Q,
                                 const float* __restrict__ Kg, const float* __restrict__ Mg,
                                 const int64_t* __restrict__ users,
                                 const int64_t* __restrict__ items, int64_t B, int64_t C,
                                 int64_t U, int64_t I, int N, int d, Distance distance,
                                 Relation relation, float eps, bool kmsmem,
                                 float* __restrict__ D_out) {
  extern __shared__ float smem[];
  const int64_t nd = static_cast<int64_t>(N) * d;
  const float *K, *M;
  stage_km(Kg, Mg, nd, kmsmem, smem, &K, &M);
  const int warps = blockDim.x / kWarp;
  const int w = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  float* s = smem + (kmsmem ? 2 * nd : 0) + static_cast<int64_t>(w) * (2 * d + N);
  float* r = s + d;
  float* a = r + d;
  const bool pair = relation == Relation::Pair;
  const int64_t units = pair ? B * C : B;
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * warps + w; unit < units;
       unit += static_cast<int64_t>(gridDim.x) * warps) {
    const int64_t b = pair ? unit / C : unit;
    const T* p = P + row_of(users, b, U) * d;
    if (pair) {
      const int64_t c = unit % C;
      const T* q = Q + row_of(items, b * C + c, I) * d;
      warp_attend(p, q, K, M, N, d, s, a, r, lane);
      const float Dv = warp_distance(p, r, q, d, distance, eps, lane);
      if (lane == 0) D_out[b * C + c] = Dv;
    } else {
      warp_attend(p, Q + row_of(items, b * C, I) * d, K, M, N, d, s, a, r, lane);
      for (int64_t c = 0; c < C; ++c) {
        const T* q = Q + row_of(items, b * C + c, I) * d;
        const float Dv = warp_distance(p, r, q, d, distance, eps, lane);
        if (lane == 0) D_out[b * C + c] = Dv;
      }
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: one warp per row, all warps of a block step through the same number of units so
// that after each unit the block adds the warps' attention contributions to its keys/memory
// partial ([blockIdx, 2, N, d] in global memory, each element owned by one thread, warps added
// in a fixed order: deterministic). Per-warp scratch: p, s, r, gr, gp [d], a, g [N].
template <typename T>
__global__ void distances_backward_kernel(
    const T* __restrict__ P, const T* __restrict__ Q, const float* __restrict__ Kg,
    const float* __restrict__ Mg, const int64_t* __restrict__ users,
    const int64_t* __restrict__ items, const float* __restrict__ gD, int64_t B, int64_t C,
    int64_t U, int64_t I, int N, int d, Distance distance, Relation relation, float eps,
    bool kmsmem,
    float* __restrict__ grad_user_rows, float* __restrict__ grad_item_rows,
    float* __restrict__ partials) {
  extern __shared__ float smem[];
  const int64_t nd = static_cast<int64_t>(N) * d;
  const float *K, *M;
  stage_km(Kg, Mg, nd, kmsmem, smem, &K, &M);
  const int warps = blockDim.x / kWarp;
  const int w = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t per_warp = backward_scratch(N, d);
  float* base = smem + (kmsmem ? 2 * nd : 0);
  float* s = base + w * per_warp;
  float* r = s + d;
  float* gr = r + d;
  float* gp = gr + d;
  float* a = gp + d;
  float* g = a + N;
  float* part_K = partials + static_cast<int64_t>(blockIdx.x) * 2 * nd;
  float* part_M = part_K + nd;
  for (int64_t i = threadIdx.x; i < 2 * nd; i += blockDim.x) part_K[i] = 0.f;

  const bool pair = relation == Relation::Pair;
  const int64_t units_per_row = pair ? C : 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  const int64_t steps = (B + stride - 1) / stride;
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t b = step * stride + static_cast<int64_t>(blockIdx.x) * warps + w;
    const bool valid = b < B;
    const T* p = valid ? P + row_of(users, b, U) * d : P;
    if (valid) {
      for (int j = lane; j < d; j += kWarp) gp[j] = 0.f;
      if (!pair) {
        // Relation of the positive, then every column's residual gradient summed into gr.
        const T* q0 = Q + row_of(items, b * C, I) * d;
        warp_attend(p, q0, K, M, N, d, s, a, r, lane);
        for (int j = lane; j < d; j += kWarp) gr[j] = 0.f;
        for (int64_t c = 0; c < C; ++c) {
          const T* q = Q + row_of(items, b * C + c, I) * d;
          const float gv = gD[b * C + c];
          const float Dv = warp_distance(p, r, q, d, distance, eps, lane);
          const bool zero_grad = gv == 0.f && isfinite(Dv);  // see residual_grad
          float* gq = grad_item_rows + (b * C + c) * d;
          for (int j = lane; j < d; j += kWarp) {
            const float e = to_f(p[j]) + r[j] - to_f(q[j]);
            const float ge = zero_grad ? 0.f : residual_grad(e, gv, Dv, distance);
            gp[j] += ge;
            gr[j] += ge;
            gq[j] = -ge;
          }
        }
        __syncwarp();
      }
    }
    for (int64_t unit = 0; unit < units_per_row; ++unit) {
      if (valid) {
        const int64_t c = pair ? unit : 0;
        const T* q = Q + row_of(items, b * C + c, I) * d;
        float* gq = grad_item_rows + (b * C + c) * d;
        if (pair) {
          const float gv = gD[b * C + c];
          warp_attend(p, q, K, M, N, d, s, a, r, lane);
          const float Dv = warp_distance(p, r, q, d, distance, eps, lane);
          const bool zero_grad = gv == 0.f && isfinite(Dv);  // see residual_grad
          for (int j = lane; j < d; j += kWarp) {
            const float e = to_f(p[j]) + r[j] - to_f(q[j]);
            const float ge = zero_grad ? 0.f : residual_grad(e, gv, Dv, distance);
            gr[j] = ge;
            gp[j] += ge;
            gq[j] = -ge;
          }
          __syncwarp();
        }
        // Attention backward: ga = M gr, gz = a ⊙ (ga − ⟨a, ga⟩), gs = Kᵀ gz.
        warp_rows_dot(M, gr, N, d, g, lane);
        __syncwarp();
        float aga = 0.f;
        for (int n = lane; n < N; n += kWarp) aga += a[n] * g[n];
        aga = warp_sum(aga);
        for (int n = lane; n < N; n += kWarp) g[n] = a[n] * (g[n] - aga);
        __syncwarp();
        for (int j = lane; j < d; j += kWarp) {
          float gs = 0.f;
          for (int n = 0; n < N; ++n) gs = fmaf(g[n], K[static_cast<int64_t>(n) * d + j], gs);
          const float pj = to_f(p[j]);
          const float qj = to_f(q[j]);
          gp[j] += gs * qj;
          gq[j] += gs * pj;
        }
      } else {
        for (int n = lane; n < N; n += kWarp) {
          a[n] = 0.f;
          g[n] = 0.f;
        }
        for (int j = lane; j < d; j += kWarp) {
          gr[j] = 0.f;
          s[j] = 0.f;
        }
      }
      __syncthreads();
      // Block update of the partials, warps in a fixed order.
      for (int64_t i = threadIdx.x; i < nd; i += blockDim.x) {
        const int n = static_cast<int>(i / d);
        const int j = static_cast<int>(i % d);
        float accK = part_K[i];
        float accM = part_M[i];
        for (int v = 0; v < warps; ++v) {
          const float* sv = base + v * per_warp;
          const float* grv = sv + 2 * d;
          const float* av = sv + 4 * d;
          const float* gv = av + N;
          accK = fmaf(gv[n], sv[j], accK);
          accM = fmaf(av[n], grv[j], accM);
        }
        part_K[i] = accK;
        part_M[i] = accM;
      }
      __syncthreads();
    }
    if (valid) {
      for (int j = lane; j < d; j += kWarp) grad_user_rows[b * d + j] = gp[j];
    }
    __syncwarp();
  }
}

template <typename T>
const char* distances_typed(const void* P, const void* Q, const float* K, const float* M,
                            const int64_t* users, const int64_t* items, int64_t B, int64_t C,
                            int64_t U, int64_t I, int64_t N, int64_t d, Distance distance,
                            Relation relation, float eps, float* D_out, cudaStream_t stream) {
  const Config cfg = configure(N, d, 2 * d + N);
  if (const char* e = prepare_kernel(distances_kernel<T>, cfg)) return e;
  const int64_t units = relation == Relation::Pair ? B * C : B;
  if (units == 0) return nullptr;
  int64_t grid = (units + cfg.warps - 1) / cfg.warps;
  const int64_t max_grid = static_cast<int64_t>(cfg.sms) * 32;
  grid = grid < max_grid ? grid : max_grid;
  distances_kernel<T><<<static_cast<unsigned>(grid), cfg.warps * kWarp, cfg.smem, stream>>>(
      static_cast<const T*>(P), static_cast<const T*>(Q), K, M, users, items, B, C, U, I,
      static_cast<int>(N), static_cast<int>(d), distance, relation, eps, cfg.kmsmem,
      D_out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* backward_typed(const void* P, const void* Q, const float* K, const float* M,
                           const int64_t* users, const int64_t* items, const float* gD,
                           int64_t B, int64_t C, int64_t U, int64_t I, int64_t N, int64_t d,
                           Distance distance, Relation relation, float eps, float* gp,
                           float* gq, float* partials, int64_t grid, cudaStream_t stream) {
  const Config cfg = configure(N, d, backward_scratch(N, d));
  if (const char* e = prepare_kernel(distances_backward_kernel<T>, cfg)) return e;
  if (grid <= 0) return nullptr;
  distances_backward_kernel<T>
      <<<static_cast<unsigned>(grid), cfg.warps * kWarp, cfg.smem, stream>>>(
          static_cast<const T*>(P), static_cast<const T*>(Q), K, M, users, items, gD, B, C, U,
          I, static_cast<int>(N), static_cast<int>(d), distance, relation, eps, cfg.kmsmem, gp,
          gq, partials);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int64_t backward_grid(int64_t B, int64_t N, int64_t d, const char** error) {
  const Config cfg = configure(N, d, backward_scratch(N, d));
  if (cfg.error) {
    *error = cfg.error;
    return -1;
  }
  *error = nullptr;
  const int64_t need = (B + cfg.warps - 1) / cfg.warps;
  const int64_t max_grid = static_cast<int64_t>(cfg.sms) * 4;
  const int64_t grid = need < max_grid ? need : max_grid;
  return grid > 0 ? grid : 1;
}

const char* launch_distances(DType dtype, const void* user_emb, const void* item_emb,
                             const float* keys_f, const float* memory_f, const int64_t* users,
                             const int64_t* items, int64_t B, int64_t C, int64_t U, int64_t I,
                             int64_t N, int64_t d, Distance distance, Relation relation,
                             float eps, float* D_out, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32:
      return distances_typed<float>(user_emb, item_emb, keys_f, memory_f, users, items, B, C, U,
                                    I, N, d, distance, relation, eps, D_out, st);
    case DType::Float16:
      return distances_typed<__half>(user_emb, item_emb, keys_f, memory_f, users, items, B, C, U,
                                     I, N, d, distance, relation, eps, D_out, st);
    case DType::BFloat16:
      return distances_typed<__nv_bfloat16>(user_emb, item_emb, keys_f, memory_f, users, items,
                                            B, C, U, I, N, d, distance, relation, eps, D_out,
                                            st);
  }
  return "unsupported dtype";
}

const char* launch_distances_backward(DType dtype, const void* user_emb, const void* item_emb,
                                      const float* keys_f, const float* memory_f,
                                      const int64_t* users, const int64_t* items, const float* gD,
                                      int64_t B, int64_t C, int64_t U, int64_t I, int64_t N,
                                      int64_t d, Distance distance, Relation relation, float eps,
                                      float* grad_user_rows, float* grad_item_rows,
                                      float* partials, int64_t grid, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32:
      return backward_typed<float>(user_emb, item_emb, keys_f, memory_f, users, items, gD, B, C,
                                   U, I, N, d, distance, relation, eps, grad_user_rows,
                                   grad_item_rows, partials, grid, st);
    case DType::Float16:
      return backward_typed<__half>(user_emb, item_emb, keys_f, memory_f, users, items, gD, B, C,
                                    U, I, N, d, distance, relation, eps, grad_user_rows,
                                    grad_item_rows, partials, grid, st);
    case DType::BFloat16:
      return backward_typed<__nv_bfloat16>(user_emb, item_emb, keys_f, memory_f, users, items,
                                           gD, B, C, U, I, N, d, distance, relation, eps,
                                           grad_user_rows, grad_item_rows, partials, grid, st);
  }
  return "unsupported dtype";
}

}  // namespace cuda
}  // namespace lrml
