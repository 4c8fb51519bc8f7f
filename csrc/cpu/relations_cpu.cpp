// CPU kernel of lrml_relations (SPEC.md): the attention a = softmax(K (p ⊙ q)) and the relation
// r = Mᵀ a of each (users[b], items[b]) pair, forward only.
//
// The attention of the fused distance kernels (lrml_cpu.cpp), without the distance: the pairs are
// cut into fixed tiles of kTilePairs; OpenMP threads (at::parallel_for) take tiles, and each tile
// runs S = P ⊙ Q, Z = S Kᵀ, A = softmax(Z), R = A M as register-blocked GEMMs against K and M
// padded once per call (tile_gemm.h, memory_operands.h), then copies A and R to the outputs. No
// reduction across pairs and a summation order fixed per element: the result does not depend on
// the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "memory_operands.h"
#include "ops_cpu.h"
#include "tile_gemm.h"

namespace lrml {
namespace cpu {
namespace {

constexpr int64_t kTilePairs = 64;

template <typename T>
void relations_kernel(const Params& pr, const int64_t* users, const int64_t* items, int64_t B,
                      T* a_out, T* r_out) {
  const T* P = pr.P.data_ptr<T>();
  const T* Q = pr.Q.data_ptr<T>();
  const int64_t N = pr.N, d = pr.d;
  const Memory<T> mem(pr.K.data_ptr<T>(), pr.M.data_ptr<T>(), N, d, pr.P.options());
  const int64_t dp = mem.dp, Np = mem.Np;
  const int64_t tiles = (B + kTilePairs - 1) / kTilePairs;
  at::parallel_for(0, tiles, 1, [&](int64_t lo, int64_t hi) {
    // The tile's S [pairs, dp], A [pairs, Np] and R [pairs, dp]; padding columns stay zero.
    std::vector<T> S(kTilePairs * dp), A(kTilePairs * Np), R(kTilePairs * dp);
    for (int64_t tile = lo; tile < hi; ++tile) {
      const int64_t b0 = tile * kTilePairs;
      const int64_t nt = std::min(kTilePairs, B - b0);
      for (int64_t t = 0; t < nt; ++t) {
        const T* __restrict p = P + users[b0 + t] * d;
        const T* __restrict q = Q + items[b0 + t] * d;
        T* __restrict s = S.data() + t * dp;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) s[j] = p[j] * q[j];
      }
      gemm<T, false>(nt, Np, d, S.data(), dp, 1, mem.Kt, Np, A.data(), Np);  // Z = S Kᵀ
      softmax_rows(A.data(), nt, N, Np);
      gemm<T, false>(nt, dp, N, A.data(), Np, 1, mem.Mp, dp, R.data(), dp);  // R = A M
      for (int64_t t = 0; t < nt; ++t) {
        std::copy_n(A.data() + t * Np, N, a_out + (b0 + t) * N);
        std::copy_n(R.data() + t * dp, d, r_out + (b0 + t) * d);
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> relations(const Tensor& user_emb, const Tensor& item_emb,
                                     const Tensor& keys, const Tensor& memory,
                                     const Tensor& users, const Tensor& items) {
  Params pr = check_params(user_emb, item_emb, keys, memory, c10::DeviceType::CPU,
                           {at::kFloat, at::kDouble}, "cpu");
  const auto [u, i] = check_pairs(pr, users, items);
  const int64_t B = u.size(0);
  Tensor a = at::empty({B, pr.N}, pr.P.options());
  Tensor r = at::empty({B, pr.d}, pr.P.options());
  if (B == 0) return {a, r};
  AT_DISPATCH_FLOATING_TYPES(pr.P.scalar_type(), "lrml_relations_cpu", [&] {
    relations_kernel<scalar_t>(pr, u.data_ptr<int64_t>(), i.data_ptr<int64_t>(), B,
                               a.data_ptr<scalar_t>(), r.data_ptr<scalar_t>());
  });
  return {a, r};
}

}  // namespace cpu
}  // namespace lrml
