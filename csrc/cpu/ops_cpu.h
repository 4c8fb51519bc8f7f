// The CPU implementations registered under the CPU dispatch key (see bindings.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace lrml {
namespace cpu {

using Tensor = at::Tensor;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

Tensor distances(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                 const Tensor& memory, const Tensor& users, const Tensor& items,
                 c10::string_view distance, c10::string_view relation, double eps,
                 bool sparse_grad);

Grads distances_backward(const Tensor& grad, const Tensor& user_emb, const Tensor& item_emb,
                         const Tensor& keys, const Tensor& memory, const Tensor& users,
                         const Tensor& items, c10::string_view distance,
                         c10::string_view relation, double eps);

Tensor hinge_loss(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                  const Tensor& memory, const Tensor& users, const Tensor& items, double margin,
                  c10::string_view distance, c10::string_view relation, double eps,
                  c10::string_view reduction, bool sparse_grad);

Grads hinge_loss_backward(const Tensor& grad, const Tensor& user_emb, const Tensor& item_emb,
                          const Tensor& keys, const Tensor& memory, const Tensor& users,
                          const Tensor& items, double margin, c10::string_view distance,
                          c10::string_view relation, double eps, c10::string_view reduction);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> hinge_loss_grads(
    const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys, const Tensor& memory,
    const Tensor& users, const Tensor& items, double margin, c10::string_view distance,
    c10::string_view relation, double eps, c10::string_view reduction);

std::tuple<Tensor, Tensor> topk(const Tensor& user_emb, const Tensor& item_emb,
                                const Tensor& keys, const Tensor& memory, const Tensor& users,
                                int64_t k, const std::optional<Tensor>& exclude_indptr,
                                const std::optional<Tensor>& exclude_indices,
                                c10::string_view distance, double eps);

// The attention a [B, N] and relation r [B, d] of the pairs (users[b], items[b]), forward only.
std::tuple<Tensor, Tensor> relations(const Tensor& user_emb, const Tensor& item_emb,
                                     const Tensor& keys, const Tensor& memory,
                                     const Tensor& users, const Tensor& items);

// In place, for each distinct row r of idx: lazy Adam with the gradient g = the sum of grad[i]
// over the i with idx[i] = r, in increasing i (SparseAdam's update of a coalesced gradient;
// step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)), then x /= max(1, |x| / max_norm) when
// max_norm > 0.
void row_adam_(const Tensor& table, const Tensor& exp_avg, const Tensor& exp_avg_sq,
               const Tensor& idx, const Tensor& grad, double beta1, double beta2, double eps,
               double step_size, double max_norm);

// The flat positions e (ascending; e = b * k + j) of values [B, k] with values[b, j] in row
// users[b] of the CSR (indptr, indices), each row sorted. With candidates (positions,
// ascending), only those are checked and the result is the subset of them that hit.
Tensor csr_members(const Tensor& indptr, const Tensor& indices, const Tensor& users,
                   const Tensor& values, const std::optional<Tensor>& candidates);

}  // namespace cpu
}  // namespace lrml
