// lrml_kernels C++/CUDA extension: declarations shared by the CPU kernels, the CUDA kernels and
// the bindings. This header is free of torch and CUDA headers so that the .cu files compile with a
// plain nvcc (no CUDA build of torch needed).
#pragma once

#include <cstdint>

namespace lrml {

enum class Distance : int { L2 = 0, SquaredL2 = 1, L1 = 2 };
enum class Relation : int { Pair = 0, Shared = 1 };
enum class Reduction : int { Sum = 0, Mean = 1, None = 2 };

// Element types the CUDA kernels are instantiated for (params); the math always runs in fp32.
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

namespace cuda {

// All pointers are device pointers; `stream` is a cudaStream_t. Index arrays are int64.
// keys_f/memory_f are fp32 copies of K and M ([N, d], row-major). Every launcher returns nullptr on
// success, else a static string describing the CUDA error (the launch-error check).

// D [B, C] (fp32) of every (users[b], items[b, c]) pair (also top-k's re-score and direct path,
// through the distances op: csrc/topk_screened.cpp).
const char* launch_distances(DType dtype, const void* user_emb, const void* item_emb,
                             const float* keys_f, const float* memory_f, const int64_t* users,
                             const int64_t* items, int64_t B, int64_t C, int64_t U, int64_t I,
                             int64_t N, int64_t d, Distance distance, Relation relation,
                             float eps, float* D_out, void* stream);

// Backward of the distances for a given upstream gradient gD [B, C] (fp32): per-row gradients
// grad_user_rows [B, d], grad_item_rows [B, C, d] (fp32) and block partials of the keys/memory
// gradients, partials [grid, 2, N, d] (fp32; [g, 0] keys, [g, 1] memory), summed by the caller in
// a fixed order. `grid` must be the value returned by backward_grid().
const char* launch_distances_backward(DType dtype, const void* user_emb, const void* item_emb,
                                      const float* keys_f, const float* memory_f,
                                      const int64_t* users, const int64_t* items, const float* gD,
                                      int64_t B, int64_t C, int64_t U, int64_t I, int64_t N,
                                      int64_t d, Distance distance, Relation relation, float eps,
                                      float* grad_user_rows, float* grad_item_rows,
                                      float* partials, int64_t grid, void* stream);

// The attention a [B, N] and relation r [B, d] (fp32) of the pairs (users[b], items[b]).
const char* launch_relations(DType dtype, const void* user_emb, const void* item_emb,
                             const float* keys_f, const float* memory_f, const int64_t* users,
                             const int64_t* items, int64_t B, int64_t N, int64_t d, float* a_out,
                             float* r_out, void* stream);

// Number of thread blocks launch_distances_backward uses (size of the partials buffer), or -1 and
// an error message in *error when d/N are too large for shared memory.
int64_t backward_grid(int64_t B, int64_t N, int64_t d, const char** error);

}  // namespace cuda
}  // namespace lrml
