// The membership test of negative sampling on the CPU: which drawn items a user has trained on.
// The draws themselves stay in torch (the caller's generator), so results are the same with and
// without the extension; this op only finds, by a binary search inside each user's sorted CSR
// slice, the entries that must be redrawn. Given the candidates of the previous round it checks
// only those (the redrawn entries), not the whole batch. Entries are independent: at::parallel_for
// over them, kGroup searches advanced in lockstep with each next probe prefetched, and the result
// (a sorted list of positions) does not depend on the number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops_cpu.h"

namespace lrml {
namespace cpu {

namespace {

constexpr int kGroup = 16;  // binary searches interleaved (random CSR rows beyond cache)

}  // namespace

Tensor csr_members(const Tensor& indptr, const Tensor& indices, const Tensor& users,
                   const Tensor& values, const std::optional<Tensor>& candidates) {
  const Tensor* ts[4] = {&indptr, &indices, &users, &values};
  const char* names[4] = {"indptr", "indices", "users", "values"};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK_TYPE(ts[i]->scalar_type() == at::kLong, names[i],
                     " must be an int64 tensor, got dtype ", ts[i]->scalar_type());
    TORCH_CHECK_VALUE(ts[i]->device().is_cpu(), names[i], " must be on the CPU, got ",
                      ts[i]->device());
  }
  TORCH_CHECK_VALUE(indptr.dim() == 1 && indptr.numel() >= 1,
                    "indptr must be 1-D with at least one entry, got shape ", indptr.sizes());
  TORCH_CHECK_VALUE(indices.dim() == 1, "indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK_VALUE(users.dim() == 1, "users must be 1-D, got shape ", users.sizes());
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == users.size(0),
                    "values must be [B, k] with B = users.size(0) = ", users.size(0),
                    ", got shape ", values.sizes());
  const Tensor ip = indptr.contiguous(), ix = indices.contiguous(), us = users.contiguous(),
               vs = values.contiguous();
  const int64_t* p = ip.data_ptr<int64_t>();
  const int64_t* x = ix.data_ptr<int64_t>();
  const int64_t* u = us.data_ptr<int64_t>();
  const int64_t* v = vs.data_ptr<int64_t>();
  const int64_t rows = ip.numel() - 1, k = vs.size(1), B = us.numel(), nnz = ix.numel();
  TORCH_CHECK_VALUE(p[rows] <= nnz, "indptr[-1] = ", p[rows], " exceeds indices.numel() = ", nnz);
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_INDEX(u[b] >= 0 && u[b] < rows, "users[", b, "] = ", u[b],
                      " is out of range for a CSR of ", rows, " rows");

  Tensor cand;
  const int64_t* c = nullptr;
  int64_t n = B * k;
  if (candidates.has_value()) {
    cand = candidates->contiguous();
    TORCH_CHECK_TYPE(cand.scalar_type() == at::kLong, "candidates must be an int64 tensor, got ",
                     cand.scalar_type());
    TORCH_CHECK_VALUE(cand.dim() == 1, "candidates must be 1-D, got shape ", cand.sizes());
    c = cand.data_ptr<int64_t>();
    n = cand.numel();
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK_INDEX(c[i] >= 0 && c[i] < B * k, "candidates[", i, "] = ", c[i],
                        " is out of range for values of ", B * k, " entries");
  }
  std::vector<uint8_t> hit(n);
  at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
    const int64_t* base[kGroup];
    const int64_t* last[kGroup];
    int64_t len[kGroup], val[kGroup];
    for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
      const int m = static_cast<int>(std::min<int64_t>(kGroup, end - g0));
      for (int j = 0; j < m; ++j) {
        const int64_t e = c ? c[g0 + j] : g0 + j;
        const int64_t r = u[e / k];
        base[j] = x + p[r];
        len[j] = p[r + 1] - p[r];
        last[j] = base[j] + len[j];
        val[j] = v[e];
        __builtin_prefetch(base[j] + len[j] / 2);
      }
      // Branchless lower_bound, one probe of every entry per pass: the group's cache misses
      // overlap instead of each search waiting on its own chain of them.
      for (bool more = true; more;) {
        more = false;
        for (int j = 0; j < m; ++j) {
          if (len[j] <= 1) continue;
          const int64_t half = len[j] / 2;
          base[j] = base[j][half] < val[j] ? base[j] + half : base[j];
          len[j] -= half;
          if (len[j] > 1) {
            __builtin_prefetch(base[j] + len[j] / 2);
            more = true;
          }
        }
      }
      for (int j = 0; j < m; ++j) {
        if (len[j] == 0) {
          hit[g0 + j] = 0;
          continue;
        }
        const int64_t* lb = base[j] + (*base[j] < val[j]);
        hit[g0 + j] = lb != last[j] && *lb == val[j];
      }
    }
  });
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) m += hit[i];
  Tensor out = at::empty({m}, ip.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0, j = 0; i < n; ++i)
    if (hit[i]) o[j++] = c ? c[i] : i;
  return out;
}

}  // namespace cpu
}  // namespace lrml
