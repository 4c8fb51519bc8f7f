// The leave-one-out split's passes over the whole log (lrml_kernels/data/split.py) on the CPU,
// each equal to the numpy code it replaces (same outputs bit for bit):
//   sorted_unique_keys: the sorted, distinct user * num_items + item of a log and their per-user
//     offsets, by a counting sort on the user and, per user, a bitmap (or a sort) of its items:
//     O(rows + users * num_items / 64), no sort of the whole log;
//   latest_rows: per user, the row of its latest timestamp (ties: the later row), one pass;
//   eval_negatives_bad: the entries of sorted rows of evaluation negatives to redraw (repeats
//     within a row, or items the row's user interacted with; numpy sorts the rows, faster);
//   drop_held_out_: the training rows (those not of a held-out pair) moved to the front, in place.
// The random draws stay numpy's (the caller's Generator); users and rows are independent, so
// at::parallel_for runs over them where a call is large, and the results do not depend on the
// number of threads.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops_cpu.h"

namespace lrml {
namespace cpu {

namespace {

void check_vector(const Tensor& t, const char* name, std::initializer_list<at::ScalarType> ok) {
  bool found = false;
  for (auto s : ok) found |= t.scalar_type() == s;
  TORCH_CHECK_TYPE(found, name, " must be an integer tensor of dtype int64",
                   ok.size() > 1 ? " or int32" : "", ", got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
}

template <typename T>
const T* ptr(const Tensor& t) {
  return t.data_ptr<T>();
}

// Distinct items of one user, ascending, written over `v[0..n)`; returns how many. A bitmap of
// the catalogue when the user has many items relative to it (the scan costs num_items / 64
// words), else a sort.
int64_t sort_unique(int64_t* v, int64_t n, int64_t num_items, std::vector<uint64_t>& bits) {
  if (n <= 1) return n;
  const int64_t words = (num_items + 63) / 64;
  if (words > 4 * n) {
    std::sort(v, v + n);
    return std::unique(v, v + n) - v;
  }
  if (static_cast<int64_t>(bits.size()) < words) bits.assign(words, 0);
  for (int64_t j = 0; j < n; ++j) bits[v[j] >> 6] |= uint64_t(1) << (v[j] & 63);
  int64_t m = 0;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t b = bits[w];
    bits[w] = 0;
    while (b) {
      v[m++] = w * 64 + __builtin_ctzll(b);
      b &= b - 1;
    }
  }
  return m;
}

template <typename UT, typename IT>
std::tuple<Tensor, Tensor> unique_keys_impl(const Tensor& users, const Tensor& items,
                                            int64_t num_users, int64_t num_items) {
  const int64_t n = users.numel();
  const UT* u = ptr<UT>(users);
  const IT* it = ptr<IT>(items);
  auto opts = at::TensorOptions().dtype(at::kLong);
  Tensor indptr = at::zeros({num_users + 1}, opts);
  int64_t* ip = indptr.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j) {
    const int64_t uj = u[j], ij = it[j];
    TORCH_CHECK_INDEX(uj >= 0 && uj < num_users, "users[", j, "] = ", uj, " is out of range [0, ",
                      num_users, ")");
    TORCH_CHECK_INDEX(ij >= 0 && ij < num_items, "items[", j, "] = ", ij, " is out of range [0, ",
                      num_items, ")");
    ++ip[uj + 1];
  }
  std::vector<int64_t> start(num_users + 1, 0);  // each user's bucket (all its rows)
  for (int64_t r = 0; r < num_users; ++r) start[r + 1] = start[r] + ip[r + 1];
  Tensor keys = at::empty({n}, opts);
  int64_t* k = keys.data_ptr<int64_t>();
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t j = 0; j < n; ++j) k[fill[u[j]]++] = it[j];
  }
  at::parallel_for(0, num_users, 256, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> bits;
    for (int64_t r = begin; r < end; ++r)
      ip[r + 1] = sort_unique(k + start[r], start[r + 1] - start[r], num_items, bits);
  });
  // Compact to the front (left, user by user: each write lands at or before what it reads),
  // turning items into keys, and make the counts offsets.
  int64_t m = 0;
  for (int64_t r = 0; r < num_users; ++r) {
    const int64_t c = ip[r + 1], base = r * num_items;
    const int64_t* src = k + start[r];
    for (int64_t j = 0; j < c; ++j) k[m + j] = base + src[j];
    ip[r] = m;
    m += c;
  }
  ip[num_users] = m;
  return {keys.narrow(0, 0, m), indptr};
}

}  // namespace

std::tuple<Tensor, Tensor> sorted_unique_keys(const Tensor& users, const Tensor& items,
                                              int64_t num_users, int64_t num_items) {
  check_vector(users, "users", {at::kLong, at::kInt});
  check_vector(items, "items", {at::kLong, at::kInt});
  TORCH_CHECK_VALUE(users.numel() == items.numel(), "users and items must have the same length, ",
                    "got ", users.numel(), " and ", items.numel());
  TORCH_CHECK_VALUE(num_users >= 0 && num_items >= 1, "need num_users >= 0 and num_items >= 1",
                    ", got ", num_users, " and ", num_items);
  TORCH_CHECK_VALUE(num_items <= (int64_t(1) << 40) && num_users <= (int64_t(1) << 40) &&
                        (num_users == 0 || num_items <= INT64_MAX / num_users),
                    "num_users * num_items must fit in int64");
  const Tensor us = users.contiguous(), is = items.contiguous();
  const bool u32 = us.scalar_type() == at::kInt, i32 = is.scalar_type() == at::kInt;
  if (u32 && i32) return unique_keys_impl<int32_t, int32_t>(us, is, num_users, num_items);
  if (u32) return unique_keys_impl<int32_t, int64_t>(us, is, num_users, num_items);
  if (i32) return unique_keys_impl<int64_t, int32_t>(us, is, num_users, num_items);
  return unique_keys_impl<int64_t, int64_t>(us, is, num_users, num_items);
}

Tensor latest_rows(const Tensor& users, const std::optional<Tensor>& timestamps,
                   int64_t num_users) {
  check_vector(users, "users", {at::kLong, at::kInt});
  TORCH_CHECK_VALUE(num_users >= 0, "num_users must be >= 0, got ", num_users);
  const Tensor us = users.contiguous();
  Tensor ts;
  if (timestamps.has_value()) {
    check_vector(*timestamps, "timestamps", {at::kLong});
    TORCH_CHECK_VALUE(timestamps->numel() == us.numel(),
                      "timestamps must have users.numel() = ", us.numel(), " entries, got ",
                      timestamps->numel());
    ts = timestamps->contiguous();
  }
  const int64_t n = us.numel();
  Tensor held = at::full({num_users}, -1, at::TensorOptions().dtype(at::kLong));
  int64_t* h = held.data_ptr<int64_t>();
  std::vector<int64_t> latest(ts.defined() ? num_users : 0, INT64_MIN);
  const int64_t* t = ts.defined() ? ts.data_ptr<int64_t>() : nullptr;
  auto run = [&](auto* u) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = u[j];
      TORCH_CHECK_INDEX(r >= 0 && r < num_users, "users[", j, "] = ", r, " is out of range [0, ",
                        num_users, ")");
      if (t == nullptr || t[j] >= latest[r]) {  // >=: a later row wins a tie
        if (t != nullptr) latest[r] = t[j];
        h[r] = j;
      }
    }
  };
  if (us.scalar_type() == at::kInt)
    run(us.data_ptr<int32_t>());
  else
    run(us.data_ptr<int64_t>());
  return held;
}

Tensor eval_negatives_bad(const Tensor& negatives, const Tensor& users, const Tensor& keys,
                          const Tensor& indptr, int64_t num_items) {
  TORCH_CHECK_TYPE(negatives.scalar_type() == at::kLong, "negatives must be an int64 tensor, got ",
                   negatives.scalar_type());
  TORCH_CHECK_VALUE(negatives.dim() == 2 && negatives.device().is_cpu(),
                    "negatives must be a 2-D CPU tensor, got shape ", negatives.sizes());
  check_vector(users, "users", {at::kLong});
  check_vector(keys, "keys", {at::kLong});
  check_vector(indptr, "indptr", {at::kLong});
  TORCH_CHECK_VALUE(users.numel() == negatives.size(0), "users must have negatives.size(0) = ",
                    negatives.size(0), " entries, got ", users.numel());
  TORCH_CHECK_VALUE(indptr.numel() >= 1, "indptr must have at least one entry");
  const Tensor ns = negatives.contiguous(), us = users.contiguous(), ks = keys.contiguous(),
               ps = indptr.contiguous();
  const int64_t* neg = ns.data_ptr<int64_t>();
  const int64_t* up = us.data_ptr<int64_t>();
  const int64_t* kp = ks.data_ptr<int64_t>();
  const int64_t* pp = ps.data_ptr<int64_t>();
  const int64_t R = ns.size(0), k = ns.size(1), U = ps.numel() - 1, nkeys = ks.numel();
  for (int64_t i = 0; i < R; ++i) {
    const int64_t u = up[i];
    TORCH_CHECK_INDEX(u >= 0 && u < U, "users[", i, "] = ", u, " is out of range [0, ", U, ")");
    TORCH_CHECK_VALUE(0 <= pp[u] && pp[u] <= pp[u + 1] && pp[u + 1] <= nkeys, "indptr[", u,
                      ":", u + 2, "] is not a valid slice of ", nkeys, " keys");
  }
  std::vector<uint8_t> bad(R * k);
  at::parallel_for(0, R, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t* v = neg + i * k;
      uint8_t* b = bad.data() + i * k;
      const int64_t base = up[i] * num_items;
      const int64_t* lo = kp + pp[up[i]];
      const int64_t* hi = kp + pp[up[i] + 1];
      // Both ascend: one merge of the row with the user's keys, read in order (rows of
      // consecutive users read consecutive keys), no binary searches through cold memory.
      for (int64_t j = 0; j < k; ++j) {
        const int64_t q = base + v[j];
        while (lo != hi && *lo < q) ++lo;
        b[j] = (j > 0 && v[j] == v[j - 1]) || (lo != hi && *lo == q);
      }
    }
  });
  int64_t m = 0;
  for (uint8_t x : bad) m += x;
  Tensor out = at::empty({m}, us.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t e = 0, j = 0; e < R * k; ++e)
    if (bad[e]) o[j++] = e;
  return out;
}

namespace {

template <typename UT, typename IT>
int64_t compact_impl(UT* u, IT* it, int64_t* t, const int64_t* drop_item, int64_t n,
                     int64_t U) {
  int64_t w = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t r = u[j];
    TORCH_CHECK_INDEX(r >= 0 && r < U, "users[", j, "] = ", r, " is out of range [0, ", U, ")");
    if (it[j] == drop_item[r]) continue;
    u[w] = u[j];
    it[w] = it[j];
    if (t) t[w] = t[j];
    ++w;
  }
  return w;
}

}  // namespace

int64_t drop_held_out_(const Tensor& users, const Tensor& items,
                       const std::optional<Tensor>& timestamps, const Tensor& held_out_item) {
  check_vector(users, "users", {at::kLong, at::kInt});
  check_vector(items, "items", {at::kLong, at::kInt});
  check_vector(held_out_item, "held_out_item", {at::kLong});
  const int64_t n = users.numel();
  TORCH_CHECK_VALUE(users.is_contiguous() && items.is_contiguous() && items.numel() == n,
                    "users and items must be contiguous and of the same length");
  int64_t* t = nullptr;
  if (timestamps.has_value()) {
    check_vector(*timestamps, "timestamps", {at::kLong});
    TORCH_CHECK_VALUE(timestamps->is_contiguous() && timestamps->numel() == n,
                      "timestamps must be contiguous, of users.numel() = ", n, " entries");
    t = timestamps->data_ptr<int64_t>();
  }
  const Tensor drop = held_out_item.contiguous();
  const int64_t* d = drop.data_ptr<int64_t>();
  const int64_t U = drop.numel();
  const bool u32 = users.scalar_type() == at::kInt, i32 = items.scalar_type() == at::kInt;
  if (u32 && i32)
    return compact_impl(users.data_ptr<int32_t>(), items.data_ptr<int32_t>(), t, d, n, U);
  if (u32) return compact_impl(users.data_ptr<int32_t>(), items.data_ptr<int64_t>(), t, d, n, U);
  if (i32) return compact_impl(users.data_ptr<int64_t>(), items.data_ptr<int32_t>(), t, d, n, U);
  return compact_impl(users.data_ptr<int64_t>(), items.data_ptr<int64_t>(), t, d, n, U);
}

}  // namespace cpu
}  // namespace lrml
