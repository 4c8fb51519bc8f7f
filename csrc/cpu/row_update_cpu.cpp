// The fused trainer's row update on the CPU: the batch's gradient rows are grouped by table row
// (duplicates summed in batch order), then each touched row gets lazy Adam (the update of
// torch.optim.SparseAdam) and the projection into the max_norm ball, in one pass over the row, in
// place. Grouping is one sequential pass through an open-addressing hash table of the row ids
// (O(batch), nothing the size of the table); the rows then update independently, in parallel, and
// the result does not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "ops_cpu.h"

namespace lrml {
namespace cpu {

namespace {

// The positions of idx grouped by value: rows[u] is the u-th distinct value (in order of first
// appearance), its positions are first[u], next[first[u]], ... in increasing order (-1 ends).
struct RowGroups {
  std::vector<int64_t> rows;
  std::vector<int32_t> first, next;

  RowGroups(const int64_t* idx, int64_t n) : next(n, -1) {
    int bits = 1;
    while ((int64_t(1) << bits) < 2 * n) ++bits;
    const int64_t cap = int64_t(1) << bits;
    std::vector<int64_t> keys(cap, -1);
    std::vector<int32_t> slot(cap);
    std::vector<int32_t> last;
    rows.reserve(n);
    first.reserve(n);
    last.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = idx[i];
      uint64_t h = (static_cast<uint64_t>(r) * 0x9E3779B97F4A7C15ull) >> (64 - bits);
      while (keys[h] != -1 && keys[h] != r) h = (h + 1) & (cap - 1);
      if (keys[h] == -1) {
        keys[h] = r;
        slot[h] = static_cast<int32_t>(rows.size());
        rows.push_back(r);
        first.push_back(static_cast<int32_t>(i));
        last.push_back(static_cast<int32_t>(i));
      } else {
        const int32_t u = slot[h];
        next[last[u]] = static_cast<int32_t>(i);
        last[u] = static_cast<int32_t>(i);
      }
    }
  }
};

constexpr int64_t kAhead = 8;  // rows prefetched ahead (random rows of tables beyond cache)

// One row: lazy Adam with gradient g, then the projection; returns nothing, writes x, m, v.
template <typename T>
inline void adam_row(T* __restrict x, T* __restrict m, T* __restrict v, const T* __restrict g,
                     int64_t d, T one_minus_b1, T one_minus_b2, T eps, T step_size, T max_norm) {
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < d; ++j) {
    const T mj = m[j] + one_minus_b1 * (g[j] - m[j]);
    const T vj = v[j] + (g[j] * g[j] - v[j]) * one_minus_b2;
    m[j] = mj;
    v[j] = vj;
    const T xj = x[j] - step_size * (mj / (std::sqrt(vj) + eps));
    x[j] = xj;
    sq += xj * xj;
  }
  if (max_norm > 0) {
    const T scale = std::sqrt(sq) / max_norm;
    if (scale > T(1)) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) x[j] = x[j] / scale;
    }
  }
}

template <typename T>
void row_adam_impl(T* table, T* exp_avg, T* exp_avg_sq, const RowGroups& groups, const T* grad,
                   int64_t d, T one_minus_b1, T one_minus_b2, T eps, T step_size, T max_norm) {
  const int64_t nu = static_cast<int64_t>(groups.rows.size());
  at::parallel_for(0, nu, 64, [&](int64_t lo, int64_t hi) {
    std::vector<T> acc(d);
    for (int64_t u = lo; u < hi; ++u) {
      if (u + kAhead < hi) {
        const int64_t ra = groups.rows[u + kAhead];
        for (T* t : {table, exp_avg, exp_avg_sq}) prefetch_row<1, 3>(t + ra * d, d);
        for (int32_t i = groups.first[u + kAhead]; i >= 0; i = groups.next[i])
          prefetch_row<0, 3>(grad + i * d, d);
      }
      const int64_t r = groups.rows[u];
      int32_t i = groups.first[u];
      const T* g = grad + i * d;
      if (groups.next[i] >= 0) {  // a repeated row: its gradients summed in batch order
        T* __restrict a = acc.data();
        std::copy(g, g + d, a);
        for (i = groups.next[i]; i >= 0; i = groups.next[i]) {
          const T* __restrict gi = grad + i * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) a[j] += gi[j];
        }
        g = a;
      }
      adam_row(table + r * d, exp_avg + r * d, exp_avg_sq + r * d, g, d, one_minus_b1,
               one_minus_b2, eps, step_size, max_norm);
    }
  });
}

}  // namespace

void row_adam_(const Tensor& table, const Tensor& exp_avg, const Tensor& exp_avg_sq,
               const Tensor& idx, const Tensor& grad, double beta1, double beta2, double eps,
               double step_size, double max_norm) {
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "row_adam_: table must be 2-D contiguous");
  for (const Tensor* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->sizes() == table.sizes() && t->is_contiguous() &&
                    t->scalar_type() == table.scalar_type(),
                "row_adam_: exp_avg and exp_avg_sq must match table (shape, dtype, contiguous)");
  }
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "row_adam_: idx must be a contiguous int64 vector");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == idx.size(0) && grad.size(1) == table.size(1) &&
                  grad.scalar_type() == table.scalar_type() && grad.is_contiguous(),
              "row_adam_: grad must be [len(idx), d] contiguous, in the table's dtype");
  const int64_t n = idx.size(0), d = table.size(1), R = table.size(0);
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "row_adam_: more than 2^31 - 1 rows");
  if (n == 0) return;
  check_index_range("idx", idx, R);
  const RowGroups groups(idx.data_ptr<int64_t>(), n);
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "lrml_row_adam_cpu", [&] {
    row_adam_impl<scalar_t>(table.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(),
                            exp_avg_sq.data_ptr<scalar_t>(), groups, grad.data_ptr<scalar_t>(), d,
                            static_cast<scalar_t>(1 - beta1), static_cast<scalar_t>(1 - beta2),
                            static_cast<scalar_t>(eps), static_cast<scalar_t>(step_size),
                            static_cast<scalar_t>(max_norm));
  });
}

}  // namespace cpu
}  // namespace lrml
