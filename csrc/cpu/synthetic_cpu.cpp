// The synthetic generator's arithmetic (lrml_kernels/data/synthetic_data.py) on the CPU. The
// random numbers stay numpy's (the caller's Generator, in the same calls as without the
// extension); these ops only do what the numpy code does with them, in one pass instead of a
// dozen array-wide steps, and give bit-identical results:
//   synthetic_items: each draw's item from its two uniforms (taste cluster, then Zipf rank);
//   keep_distinct_: per user, the drawn items not drawn before, in draw order, up to a quota;
//   synthetic_rows_: the chunk's rows written into the log's arrays: the users, their items and
//     times (per user, the start plus the running sum of the integer gaps).
// They run on one thread: each call is a chunk of about 2**19 rows (a few ms), called hundreds of
// times between numpy's draws, and on a busy 2-core machine waiting for a descheduled OpenMP
// sibling at the end of every call costs more than the second core gains.
#include <algorithm>
#include <vector>

#include "ops_cpu.h"

namespace lrml {
namespace cpu {

namespace {

void check_1d(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be a ", dtype, " tensor, got dtype ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

// An opaque copy: keeps the compiler from fusing a product and the sum after it into one FMA
// (-march=native allows contraction), which numpy, doing them as two steps, does not.
inline double unfused(double x) {
  asm("" : "+x"(x));
  return x;
}

}  // namespace

Tensor synthetic_items(const Tensor& r, const Tensor& y, const Tensor& users, const Tensor& cum,
                       const Tensor& segments, const Tensor& zipf_top, const Tensor& sizes,
                       const Tensor& seg_offsets, const Tensor& table) {
  check_1d(r, "r", at::kFloat);
  check_1d(y, "y", at::kDouble);
  check_1d(users, "users", at::kLong);
  check_1d(segments, "segments", at::kLong);
  check_1d(zipf_top, "zipf_top", at::kDouble);
  check_1d(sizes, "sizes", at::kLong);
  check_1d(seg_offsets, "seg_offsets", at::kLong);
  check_1d(table, "table", at::kLong);
  TORCH_CHECK_TYPE(cum.scalar_type() == at::kFloat, "cum must be a float32 tensor, got ",
                   cum.scalar_type());
  TORCH_CHECK_VALUE(cum.dim() == 2 && cum.is_contiguous() && cum.device().is_cpu(),
                    "cum must be a contiguous 2-D CPU tensor [tastes, U], got shape ",
                    cum.sizes());
  const int64_t n = users.numel(), T = cum.size(0), U = cum.size(1), S = sizes.numel();
  TORCH_CHECK_VALUE(r.numel() == n && y.numel() == n, "r and y must have users.numel() = ", n,
                    " entries, got ", r.numel(), " and ", y.numel());
  TORCH_CHECK_VALUE(segments.numel() == U * (T + 1), "segments must have U * (tastes + 1) = ",
                    U * (T + 1), " entries, got ", segments.numel());
  TORCH_CHECK_VALUE(zipf_top.numel() == S && seg_offsets.numel() == S,
                    "zipf_top, sizes and seg_offsets must have the same length");
  const float* rp = r.data_ptr<float>();
  const double* yp = y.data_ptr<double>();
  const int64_t* up = users.data_ptr<int64_t>();
  const float* cp = cum.data_ptr<float>();
  const int64_t* sp = segments.data_ptr<int64_t>();
  const double* top = zipf_top.data_ptr<double>();
  const int64_t* size = sizes.data_ptr<int64_t>();
  const int64_t* off = seg_offsets.data_ptr<int64_t>();
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t ntab = table.numel();
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK_INDEX(up[j] >= 0 && up[j] < U, "users[", j, "] = ", up[j], " is out of range [0, ",
                      U, ")");
  for (int64_t s = 0; s < S; ++s)
    TORCH_CHECK_INDEX(off[s] >= 0 && size[s] >= 1 && off[s] + size[s] <= ntab, "segment ", s,
                      " (offset ", off[s], ", size ", size[s], ") overruns table of ", ntab);
  Tensor out = at::empty({n}, users.options());
  int64_t* o = out.data_ptr<int64_t>();
  int64_t bad_segment = -1;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t u = up[j];
    // the first liked cluster whose cumulative threshold r is under (the catalogue if none)
    int64_t k = u * (T + 1);
    for (int64_t t = 0; t < T; ++t) k += rp[j] >= cp[t * U + u];
    const int64_t seg = sp[k];
    if (seg < 0 || seg >= S) {  // checked where used: the table is U * (T + 1) long
      bad_segment = k;
      break;
    }
    // x = (1 + y * top) ** 10 as four products (numpy's order), the continuous Zipf rank
    const double v = unfused(yp[j] * top[seg]) + 1.0;
    double x = v * v;
    x *= x;
    x *= v;
    x *= x;
    int64_t rank = std::min(static_cast<int64_t>(x), size[seg]) - 1;
    rank = std::max<int64_t>(rank, 0);
    o[j] = tab[off[seg] + rank];
  }
  TORCH_CHECK_INDEX(bad_segment < 0, "segments[", bad_segment, "] = ",
                    bad_segment < 0 ? 0 : sp[bad_segment], " is out of range [0, ", S, ")");
  return out;
}

void keep_distinct_(const Tensor& buffer, const Tensor& got, const Tensor& offsets,
                    const Tensor& quota, const Tensor& who, const Tensor& draws,
                    const Tensor& items, int64_t num_items) {
  check_1d(buffer, "buffer", at::kLong);
  check_1d(got, "got", at::kLong);
  check_1d(offsets, "offsets", at::kLong);
  check_1d(quota, "quota", at::kLong);
  check_1d(who, "who", at::kLong);
  check_1d(draws, "draws", at::kLong);
  check_1d(items, "items", at::kLong);
  const int64_t L = got.numel(), W = who.numel(), cap = buffer.numel();
  TORCH_CHECK_VALUE(num_items >= 1 && num_items <= (int64_t(1) << 31),
                    "num_items must be in [1, 2**31], got ", num_items);
  TORCH_CHECK_VALUE(offsets.numel() == L && quota.numel() == L,
                    "got, offsets and quota must have the same length");
  TORCH_CHECK_VALUE(draws.numel() == W, "draws must have who.numel() = ", W, " entries, got ",
                    draws.numel());
  int64_t* buf = buffer.data_ptr<int64_t>();
  int64_t* g = got.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* q = quota.data_ptr<int64_t>();
  const int64_t* wp = who.data_ptr<int64_t>();
  const int64_t* dp = draws.data_ptr<int64_t>();
  const int64_t* it = items.data_ptr<int64_t>();
  std::vector<int64_t> first(W + 1, 0);  // where each user's draws start in items
  for (int64_t i = 0; i < W; ++i) {
    const int64_t l = wp[i];
    TORCH_CHECK_INDEX(l >= 0 && l < L, "who[", i, "] = ", l, " is out of range [0, ", L, ")");
    TORCH_CHECK_VALUE(dp[i] >= 0, "draws[", i, "] = ", dp[i], " is negative");
    TORCH_CHECK_VALUE(off[l] >= 0 && 0 <= g[l] && g[l] <= q[l] && off[l] + q[l] <= cap,
                      "user ", l, ": offset ", off[l], ", got ", g[l], ", quota ", q[l],
                      " do not fit a buffer of ", cap);
    first[i + 1] = first[i] + dp[i];
  }
  TORCH_CHECK_VALUE(first[W] == items.numel(), "items must have sum(draws) = ", first[W],
                    " entries, got ", items.numel());
  for (int64_t j = 0; j < first[W]; ++j)
    TORCH_CHECK_INDEX(it[j] >= 0 && it[j] < num_items, "items[", j, "] = ", it[j],
                      " is out of range [0, ", num_items, ")");
  {
    std::vector<uint64_t> seen((num_items + 63) / 64, 0);  // the set of the user's items
    for (int64_t i = 0; i < W; ++i) {
      const int64_t l = wp[i];
      int64_t* mine = buf + off[l];
      int64_t n = g[l];
      for (int64_t j = 0; j < n; ++j) seen[mine[j] >> 6] |= uint64_t(1) << (mine[j] & 63);
      for (int64_t j = first[i]; j < first[i + 1] && n < q[l]; ++j) {
        const int64_t v = it[j];
        const uint64_t bit = uint64_t(1) << (v & 63);
        if (seen[v >> 6] & bit) continue;
        seen[v >> 6] |= bit;
        mine[n++] = v;
      }
      for (int64_t j = 0; j < n; ++j) seen[mine[j] >> 6] = 0;
      g[l] = n;
    }
  }
}

namespace {

template <typename IT>
void rows_impl(IT* out_u, IT* out_i, int64_t* out_t, const int64_t* buf, const int64_t* off,
               const int64_t* got, int64_t L, int64_t first_user, const double* e,
               const double* gap, const int64_t* st) {
  int64_t row = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t u = first_user + l;
    int64_t t = st[u];
    for (int64_t j = 0; j < got[l]; ++j, ++row) {
      t += 1 + static_cast<int64_t>(e[row] * gap[u]);  // integer gaps of at least a second
      out_u[row] = static_cast<IT>(u);
      out_i[row] = static_cast<IT>(buf[off[l] + j]);
      out_t[row] = t;
    }
  }
}

}  // namespace

void synthetic_rows_(const Tensor& users, const Tensor& items, const Tensor& timestamps,
                     const Tensor& buffer, const Tensor& offsets, const Tensor& got,
                     int64_t first_user, const Tensor& exponential, const Tensor& mean_gap,
                     const Tensor& start) {
  TORCH_CHECK_TYPE(users.scalar_type() == items.scalar_type() &&
                       (users.scalar_type() == at::kInt || users.scalar_type() == at::kLong),
                   "users and items must both be int32 or both int64, got ", users.scalar_type(),
                   " and ", items.scalar_type());
  check_1d(users, "users", users.scalar_type());
  check_1d(items, "items", items.scalar_type());
  check_1d(timestamps, "timestamps", at::kLong);
  check_1d(buffer, "buffer", at::kLong);
  check_1d(offsets, "offsets", at::kLong);
  check_1d(got, "got", at::kLong);
  check_1d(exponential, "exponential", at::kDouble);
  check_1d(mean_gap, "mean_gap", at::kDouble);
  check_1d(start, "start", at::kLong);
  const int64_t L = got.numel(), U = mean_gap.numel(), n = exponential.numel();
  TORCH_CHECK_VALUE(offsets.numel() == L, "offsets and got must have the same length");
  TORCH_CHECK_VALUE(start.numel() == U, "start and mean_gap must have the same length");
  TORCH_CHECK_INDEX(first_user >= 0 && first_user + L <= U, "users ", first_user, " .. ",
                    first_user + L - 1, " are out of range [0, ", U, ")");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* g = got.data_ptr<int64_t>();
  int64_t rows = 0;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK_VALUE(g[l] >= 0 && off[l] >= 0 && off[l] + g[l] <= buffer.numel(), "user ", l,
                      ": offset ", off[l], " and got ", g[l], " overrun the buffer of ",
                      buffer.numel());
    rows += g[l];
  }
  TORCH_CHECK_VALUE(n == rows && users.numel() == rows && items.numel() == rows &&
                        timestamps.numel() == rows,
                    "exponential, users, items and timestamps must have sum(got) = ", rows,
                    " entries, got ", n, ", ", users.numel(), ", ", items.numel(), ", ",
                    timestamps.numel());
  const int64_t* buf = buffer.data_ptr<int64_t>();
  const double* e = exponential.data_ptr<double>();
  const double* gap = mean_gap.data_ptr<double>();
  const int64_t* st = start.data_ptr<int64_t>();
  int64_t* t = timestamps.data_ptr<int64_t>();
  if (users.scalar_type() == at::kInt)
    rows_impl(users.data_ptr<int32_t>(), items.data_ptr<int32_t>(), t, buf, off, g, L,
              first_user, e, gap, st);
  else
    rows_impl(users.data_ptr<int64_t>(), items.data_ptr<int64_t>(), t, buf, off, g, L,
              first_user, e, gap, st);
}

}  // namespace cpu
}  // namespace lrml
