// The fused trainer's row update on the CPU: for each touched row, lazy Adam (the update of
// torch.optim.SparseAdam) and the projection into the max_norm ball, in one pass over the row, in
// place. The rows are distinct (the trainer de-duplicates them), so rows update independently and
// the result does not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "ops_cpu.h"

namespace lrml {
namespace cpu {

namespace {

template <typename T>
void row_adam_impl(T* table, T* exp_avg, T* exp_avg_sq, const int64_t* rows, const T* grad,
                   int64_t n, int64_t d, T one_minus_b1, T one_minus_b2, T eps, T step_size,
                   T max_norm) {
  at::parallel_for(0, n, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t r = rows[i];
      T* __restrict x = table + r * d;
      T* __restrict m = exp_avg + r * d;
      T* __restrict v = exp_avg_sq + r * d;
      const T* __restrict g = grad + i * d;
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
  });
}

}  // namespace

void row_adam_(const Tensor& table, const Tensor& exp_avg, const Tensor& exp_avg_sq,
               const Tensor& rows, const Tensor& grad, double beta1, double beta2, double eps,
               double step_size, double max_norm) {
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "row_adam_: table must be 2-D contiguous");
  for (const Tensor* t : {&exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->sizes() == table.sizes() && t->is_contiguous() &&
                    t->scalar_type() == table.scalar_type(),
                "row_adam_: exp_avg and exp_avg_sq must match table (shape, dtype, contiguous)");
  }
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "row_adam_: rows must be a contiguous int64 vector");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == rows.size(0) && grad.size(1) == table.size(1) &&
                  grad.scalar_type() == table.scalar_type() && grad.is_contiguous(),
              "row_adam_: grad must be [len(rows), d] contiguous, in the table's dtype");
  const int64_t n = rows.size(0), d = table.size(1), R = table.size(0);
  if (n == 0) return;
  const int64_t* r = rows.data_ptr<int64_t>();
  const auto [lo_it, hi_it] = std::minmax_element(r, r + n);
  const int64_t lo = *lo_it, hi = *hi_it;
  TORCH_CHECK_INDEX(lo >= 0 && hi < R, "row_adam_: rows holds index ", lo < 0 ? lo : hi,
                    ", out of range for a table of ", R, " rows");
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "lrml_row_adam_cpu", [&] {
    row_adam_impl<scalar_t>(table.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(),
                            exp_avg_sq.data_ptr<scalar_t>(), rows.data_ptr<int64_t>(),
                            grad.data_ptr<scalar_t>(), n, d, static_cast<scalar_t>(1 - beta1),
                            static_cast<scalar_t>(1 - beta2), static_cast<scalar_t>(eps),
                            static_cast<scalar_t>(step_size), static_cast<scalar_t>(max_norm));
  });
}

}  // namespace cpu
}  // namespace lrml
