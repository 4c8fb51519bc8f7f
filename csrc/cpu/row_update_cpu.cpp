// The fused trainer's row update on the CPU: the batch's gradient rows are grouped by table row
// (duplicates summed in batch order), then each touched row gets its optimizer's update (lazy
// Adam as torch.optim.SparseAdam, Adagrad, row-wise Adagrad or SGD) and the projection into
// the max_norm ball, in one pass over the row, in place (a bf16 table: in fp32, written back
// stochastically rounded with the Triton row update's bits). Grouping is one sequential pass
// through an open-addressing hash table of the row ids (O(batch), nothing the size of the
// table); the rows then update independently, in parallel, and the result does not depend on
// the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <string>
#include <type_traits>
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

enum class RowOptimizer { Adam, Adagrad, RowwiseAdagrad, Sgd };

RowOptimizer parse_optimizer(const std::string& name) {
  if (name == "adam") return RowOptimizer::Adam;
  if (name == "adagrad") return RowOptimizer::Adagrad;
  if (name == "rowwise_adagrad") return RowOptimizer::RowwiseAdagrad;
  TORCH_CHECK_VALUE(name == "sgd",
                    "row_update_: optimizer must be adam, adagrad, rowwise_adagrad or sgd, got '",
                    name, "'");
  return RowOptimizer::Sgd;
}

// The step's scalars in the table's dtype.
template <typename T>
struct RowStep {
  RowOptimizer opt;
  T lr;  // Adam: the bias-corrected step size
  T eps, one_minus_b1, one_minus_b2, max_norm;
};

// One row with its summed gradient g: the optimizer's update of x and its state (Adam: s1 = m,
// s2 = v, both [d]; Adagrad: s1 = the sum of g², [d]; row-wise Adagrad: s1 = the row's sum of
// mean(g²), one value; SGD: none), each in the operation order of the torch-ops path of
// LRMLTrainer._update_rows, then the projection x /= max(1, |x| / max_norm).
template <typename T>
inline void update_row(T* __restrict x, T* __restrict s1, T* __restrict s2,
                       const T* __restrict g, int64_t d, const RowStep<T>& h) {
  T sq = 0;
  switch (h.opt) {
    case RowOptimizer::Adam:
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) {
        const T mj = s1[j] + h.one_minus_b1 * (g[j] - s1[j]);
        const T vj = s2[j] + (g[j] * g[j] - s2[j]) * h.one_minus_b2;
        s1[j] = mj;
        s2[j] = vj;
        const T xj = x[j] - h.lr * (mj / (std::sqrt(vj) + h.eps));
        x[j] = xj;
        sq += xj * xj;
      }
      break;
    case RowOptimizer::Adagrad:
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) {
        const T acc = s1[j] + g[j] * g[j];
        s1[j] = acc;
        const T xj = x[j] - h.lr * g[j] / (std::sqrt(acc) + h.eps);
        x[j] = xj;
        sq += xj * xj;
      }
      break;
    case RowOptimizer::RowwiseAdagrad: {
      T gg = 0;
#pragma omp simd reduction(+ : gg)
      for (int64_t j = 0; j < d; ++j) gg += g[j] * g[j];
      const T acc = s1[0] + gg / static_cast<T>(d);
      s1[0] = acc;
      const T denom = std::sqrt(acc) + h.eps;
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) {
        const T xj = x[j] - h.lr * g[j] / denom;
        x[j] = xj;
        sq += xj * xj;
      }
      break;
    }
    case RowOptimizer::Sgd:
#pragma omp simd reduction(+ : sq)
      for (int64_t j = 0; j < d; ++j) {
        const T xj = x[j] - h.lr * g[j];
        x[j] = xj;
        sq += xj * xj;
      }
      break;
  }
  if (h.max_norm > 0) {
    const T scale = std::sqrt(sq) / h.max_norm;
    if (scale > T(1)) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) x[j] = x[j] / scale;
    }
  }
}

// The updated fp32 row x written to a bf16 row as the Triton row update writes it: stochastically
// rounded, 16 bits of Triton's Philox word at counter (r·d + j) mod 2^32 under seed added to the
// fp32 pattern, then truncated; NaN and ±inf to nearest.
inline void store_row(c10::BFloat16* __restrict out, const float* __restrict x, int64_t r,
                      int64_t d, uint64_t seed) {
#pragma omp simd
  for (int64_t j = 0; j < d; ++j) {
    uint32_t u;
    std::memcpy(&u, &x[j], sizeof(u));
    const uint32_t bits = philox_word(seed, static_cast<uint32_t>(r * d + j)) & 0xFFFFu;
    const uint16_t up = static_cast<uint16_t>((u + bits) >> 16);
    out[j] = std::isfinite(x[j]) ? c10::BFloat16(up, c10::BFloat16::from_bits())
                                 : c10::BFloat16(x[j]);
  }
}

// state: the optimizer's state tables (Adam: m, v [R, d]; Adagrad: [R, d]; row-wise Adagrad:
// [R]; SGD: none), row r of each updated with row r of the table. S: the table's dtype, T the
// compute dtype (S = bf16: T = float, the row updated in a float copy and written by store_row).
// G: the gradient's dtype, T or S (a bf16 table's gradient rows are converted as they are read).
template <typename T, typename S, typename G>
void row_update_impl(S* table, const std::vector<T*>& state, const std::vector<int64_t>& width,
                     const RowGroups& groups, const G* grad, int64_t d, const RowStep<T>& h,
                     uint64_t seed) {
  const int64_t nu = static_cast<int64_t>(groups.rows.size());
  at::parallel_for(0, nu, 64, [&](int64_t lo, int64_t hi) {
    std::vector<T> acc(d), row(std::is_same_v<S, T> ? 0 : d);
    for (int64_t u = lo; u < hi; ++u) {
      if (u + kAhead < hi) {
        const int64_t ra = groups.rows[u + kAhead];
        prefetch_row<1, 3>(table + ra * d, d);
        for (size_t s = 0; s < state.size(); ++s)
          prefetch_row<1, 3>(state[s] + ra * width[s], width[s]);
        for (int32_t i = groups.first[u + kAhead]; i >= 0; i = groups.next[i])
          prefetch_row<0, 3>(grad + i * d, d);
      }
      const int64_t r = groups.rows[u];
      int32_t i = groups.first[u];
      const T* g = nullptr;
      if constexpr (std::is_same_v<G, T>) g = grad + i * d;
      // a repeated row (its gradients summed in batch order) or a bf16 gradient: in acc
      if (!std::is_same_v<G, T> || groups.next[i] >= 0) {
        T* __restrict a = acc.data();
        g = a;
        convert(a, grad + i * d, d);
        for (i = groups.next[i]; i >= 0; i = groups.next[i]) {
          const G* __restrict gi = grad + i * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) a[j] += static_cast<T>(gi[j]);
        }
      }
      T* s1 = state.empty() ? nullptr : state[0] + r * width[0];
      T* s2 = state.size() < 2 ? nullptr : state[1] + r * width[1];
      if constexpr (std::is_same_v<S, T>) {
        update_row(table + r * d, s1, s2, g, d, h);
      } else {
        convert(row.data(), table + r * d, d);  // (exact in float)
        update_row(row.data(), s1, s2, g, d, h);
        store_row(table + r * d, row.data(), r, d, seed);
      }
    }
  });
}

// row_update_impl for the table's dtype (T itself, or bf16 where T is float) and the gradient's
// (T, or bf16 for a bf16 table).
template <typename T>
void run_row_update(const Tensor& table, const std::vector<T*>& state,
                    const std::vector<int64_t>& width, const RowGroups& groups,
                    const Tensor& grad, int64_t d, const RowStep<T>& h, uint64_t seed) {
  if constexpr (std::is_same_v<T, float>) {
    if (table.scalar_type() == at::kBFloat16) {
      auto* out = table.data_ptr<c10::BFloat16>();
      if (grad.scalar_type() == at::kBFloat16) {
        row_update_impl(out, state, width, groups, grad.data_ptr<c10::BFloat16>(), d, h, seed);
      } else {
        row_update_impl(out, state, width, groups, grad.data_ptr<T>(), d, h, seed);
      }
      return;
    }
  }
  row_update_impl(table.data_ptr<T>(), state, width, groups, grad.data_ptr<T>(), d, h, seed);
}

}  // namespace

void row_update_(const Tensor& table, at::TensorList state, const Tensor& idx,
                 const Tensor& grad, c10::string_view optimizer, double lr, double eps,
                 double beta1, double beta2, double max_norm, int64_t seed) {
  const RowOptimizer opt = parse_optimizer(std::string(optimizer));
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(),
              "row_update_: table must be 2-D contiguous");
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.is_contiguous(),
              "row_update_: idx must be a contiguous int64 vector");
  const bool bf16 = table.scalar_type() == at::kBFloat16;
  const at::ScalarType compute = bf16 ? at::kFloat : table.scalar_type();
  TORCH_CHECK(bf16 || compute == at::kFloat || compute == at::kDouble,
              "row_update_: the table must be float32, float64 or bfloat16, got ",
              table.scalar_type());
  const int64_t n = idx.size(0), d = table.size(1), R = table.size(0);
  const size_t states = opt == RowOptimizer::Adam ? 2 : opt == RowOptimizer::Sgd ? 0 : 1;
  TORCH_CHECK(state.size() == states, "row_update_: ", optimizer, " takes ", states,
              " state tensors, got ", state.size());
  std::vector<int64_t> width;
  for (const Tensor& t : state) {
    const bool per_row = opt == RowOptimizer::RowwiseAdagrad;
    TORCH_CHECK((per_row ? t.dim() == 1 && t.size(0) == R : t.sizes() == table.sizes()) &&
                    t.is_contiguous() && t.scalar_type() == compute,
                "row_update_: the state must be ", per_row ? "[R]" : "[R, d]",
                " contiguous, in the compute dtype (float32 for a bfloat16 table)");
    width.push_back(per_row ? 1 : d);
  }
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == d &&
                  (grad.scalar_type() == compute || grad.scalar_type() == table.scalar_type()) &&
                  grad.is_contiguous(),
              "row_update_: grad must be [len(idx), d] contiguous, in the compute dtype or the "
              "table's");
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "row_update_: more than 2^31 - 1 rows");
  TORCH_CHECK_VALUE(seed >= 0, "row_update_: seed must be >= 0, got ", seed);
  if (n == 0) return;
  check_index_range("idx", idx, R);
  const RowGroups groups(idx.data_ptr<int64_t>(), n);
  AT_DISPATCH_FLOATING_TYPES(compute, "lrml_row_update_cpu", [&] {
    std::vector<scalar_t*> ptrs;
    for (const Tensor& t : state) ptrs.push_back(t.data_ptr<scalar_t>());
    const RowStep<scalar_t> h{opt,
                              static_cast<scalar_t>(lr),
                              static_cast<scalar_t>(eps),
                              static_cast<scalar_t>(1 - beta1),
                              static_cast<scalar_t>(1 - beta2),
                              static_cast<scalar_t>(max_norm)};
    run_row_update<scalar_t>(table, ptrs, width, groups, grad, d, h, static_cast<uint64_t>(seed));
  });
}

}  // namespace cpu
}  // namespace lrml
