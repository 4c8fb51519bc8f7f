// CPU kernel of lrml_relations (SPEC.md): the attention a = softmax(K (p ⊙ q)) and the relation
// r = Mᵀ a of each (users[b], items[b]) pair, forward only. Rows are independent: OpenMP threads
// (at::parallel_for) take blocks of rows and run kernels.h's attend() on each, writing a and r in
// place; no reduction across rows, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "ops_cpu.h"

namespace lrml {
namespace cpu {
namespace {

constexpr int64_t kRowsPerTask = 64;  // rows per parallel_for grain

template <typename T>
void relations_kernel(const Params& pr, const int64_t* users, const int64_t* items, int64_t B,
                      T* a_out, T* r_out) {
  const T* P = pr.P.data_ptr<T>();
  const T* Q = pr.Q.data_ptr<T>();
  const T* K = pr.K.data_ptr<T>();
  const T* M = pr.M.data_ptr<T>();
  const int64_t N = pr.N, d = pr.d;
  at::parallel_for(0, B, kRowsPerTask, [&](int64_t lo, int64_t hi) {
    std::vector<T> s(d);  // the joint embedding p ⊙ q of the current row
    for (int64_t b = lo; b < hi; ++b) {
      attend(P + users[b] * d, Q + items[b] * d, K, M, N, d, s.data(), a_out + b * N,
             r_out + b * d);
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
  AT_DISPATCH_FLOATING_TYPES(pr.P.scalar_type(), "lrml_relations_cpu", [&] {
    relations_kernel<scalar_t>(pr, u.data_ptr<int64_t>(), i.data_ptr<int64_t>(), B,
                               a.data_ptr<scalar_t>(), r.data_ptr<scalar_t>());
  });
  return {a, r};
}

}  // namespace cpu
}  // namespace lrml
