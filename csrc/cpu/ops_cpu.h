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

// In place, for each distinct row r of idx, with the gradient g = the sum of grad[i] over the i
// with idx[i] = r, in increasing i: the optimizer's update of row r of the table and of its
// state (adam: lazy Adam, SparseAdam's update of a coalesced gradient, state (exp_avg,
// exp_avg_sq) [R, d], lr the bias-corrected step size lr * sqrt(1 - beta2^t) / (1 - beta1^t);
// adagrad: state (sum [R, d]); rowwise_adagrad: state (sum [R]) of mean(g²); sgd: no state),
// then x /= max(1, |x| / max_norm) when max_norm > 0. The trainer's torch-ops update, fused.
// float32 and float64 tables compute in their dtype; a bfloat16 table (state float32, grad
// float32 or bfloat16) in float32, each updated row written back stochastically rounded with
// the bits the Triton row update draws for the same seed (16 bits of the Philox word at counter
// r·d + j).
void row_update_(const Tensor& table, at::TensorList state, const Tensor& idx,
                 const Tensor& grad, c10::string_view optimizer, double lr, double eps,
                 double beta1, double beta2, double max_norm, int64_t seed);

// sampling_cpu.cpp: out [B, k] int64, negatives for users [B], each drawn uniformly among the
// items its user has not trained on (row users[b] of the CSR (indptr, indices), strictly
// ascending rows), from Philox counters under seed: the Triton sampler's numbers, bit for bit.
// popularity: the CDF [num_items + 1] of popularity-aware draws (data.popularity_cdf), or none.
Tensor sample_negatives(const Tensor& indptr, const Tensor& indices,
                        const std::optional<Tensor>& popularity, const Tensor& users,
                        int64_t num_items, int64_t k, int64_t seed, int64_t max_tries);
// A training batch: users [B] = train_users[rows], items [B, 1 + k] int64 with column 0
// train_items[rows] and columns 1..k sample_negatives(indptr, indices, users, ...) for seed;
// in at::parallel_for's threads, or (parallel false) on the calling thread alone.
// Entries [start, start + count) of rank `rank` of `world` in the CPU epoch order of n rows
// (lrml_kernels.batches.EpochOrder): its Feistel bijection of [0, a·b) with round_keys [R]
// (R even), values >= n walked through it again. The same numbers as EpochOrder's torch ops.
Tensor epoch_order(const Tensor& round_keys, int64_t start, int64_t count, int64_t n,
                   int64_t world, int64_t rank, int64_t a, int64_t b);
std::tuple<Tensor, Tensor> training_batch(const Tensor& rows, const Tensor& train_users,
                                          const Tensor& train_items, const Tensor& indptr,
                                          const Tensor& indices,
                                          const std::optional<Tensor>& popularity,
                                          int64_t num_items, int64_t k, int64_t seed,
                                          int64_t max_tries, bool parallel);

// synthetic_cpu.cpp: the synthetic generator's arithmetic on numpy's random numbers.
// items[j]: the item of draw j of user users[j] from its uniforms r[j] (taste) and y[j] (rank).
Tensor synthetic_items(const Tensor& r, const Tensor& y, const Tensor& users, const Tensor& cum,
                       const Tensor& segments, const Tensor& zipf_top, const Tensor& sizes,
                       const Tensor& seg_offsets, const Tensor& table);
// For each i, user l = who[i] appends to buffer[offsets[l] + got[l]...] its draws
// items[sum(draws[:i]) : sum(draws[:i + 1])] not already there, in order, until got[l] = quota[l].
void keep_distinct_(const Tensor& buffer, const Tensor& got, const Tensor& offsets,
                    const Tensor& quota, const Tensor& who, const Tensor& draws,
                    const Tensor& items, int64_t num_items);
// Writes the rows of users first_user + l (l = 0 .. got.numel() - 1, in order): got[l] rows each,
// item buffer[offsets[l] + j], time start[u] + the sum over the user's rows up to this one of
// 1 + int64(exponential[row] * mean_gap[u]).
void synthetic_rows_(const Tensor& users, const Tensor& items, const Tensor& timestamps,
                     const Tensor& buffer, const Tensor& offsets, const Tensor& got,
                     int64_t first_user, const Tensor& exponential, const Tensor& mean_gap,
                     const Tensor& start);

// split_cpu.cpp: the leave-one-out split's passes over the log.
// (keys, indptr): the sorted distinct users * num_items + items and each user's offsets.
std::tuple<Tensor, Tensor> sorted_unique_keys(const Tensor& users, const Tensor& items,
                                              int64_t num_users, int64_t num_items);
// held[u]: the row of user u's latest timestamp (ties and no timestamps: its last row), or -1.
Tensor latest_rows(const Tensor& users, const std::optional<Tensor>& timestamps,
                   int64_t num_users);
// The flat positions e = i * k + j (ascending) of the entries of negatives [R, k] (rows sorted)
// that repeat the one before or are keys (sorted, per-user offsets indptr) of user users[i].
Tensor eval_negatives_bad(const Tensor& negatives, const Tensor& users, const Tensor& keys,
                          const Tensor& indptr, int64_t num_items);
// Moves the rows j with items[j] != held_out_item[users[j]] to the front of users, items and
// timestamps, in order; returns how many.
int64_t drop_held_out_(const Tensor& users, const Tensor& items,
                       const std::optional<Tensor>& timestamps, const Tensor& held_out_item);

}  // namespace cpu
}  // namespace lrml
