// Training negatives on the CPU: every entry drawn directly among the items its user has not
// trained on, by the algorithm of the Triton sampler (lrml_kernels/triton/sampling_kernels.py),
// bit for bit: the same Philox words, the same Lemire map and redraws, the same rank-to-item
// search. A seed therefore gives the same negatives here, in the Triton kernel and in the torch
// fallback (lrml_kernels/data/sampling.py), whatever the number of threads.
//
// Entry e (row e / k of the [B, k] output) of user u, whose strictly ascending CSR row holds
// c < n items:
//   1. j uniform in [0, n - c): the 32-bit Philox-4x32-10 word at counter e + t·B·k (Triton's
//      tl.randint(seed, counter)), j = (r · (n - c)) >> 32, redrawn (t + 1) while the low word
//      falls below 2^32 mod (n - c), at most max_tries times: exactly uniform, no modulo bias;
//   2. the j-th item not in the row: j + m, m the number of members p with x[p] - p <= j (a
//      binary search: x[p] - p non-members lie below the p-th member, non-decreasing in p).
// A user who owns every item (c >= n) gets a uniform item. One search per entry: no rejection
// of positives, whose chains cost 1 / (1 - c/n) searches for heavy users.
// With a popularity CDF cdf [n + 1] (lrml_kernels.data.popularity_cdf), entry e first takes the
// item i = #{p >= 1 : cdf[p] <= w}, w the Philox word at counter e under the seed with bit 62
// set; only where i is in the user's row does it take the uniform draw above.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "kernels.h"
#include "ops_cpu.h"

namespace lrml {
namespace cpu {

namespace {

constexpr int kGroup = 64;  // searches interleaved (random CSR rows beyond cache)

// j uniform in [0, span) for entry e from the Philox word at counter e + t·total, t the first
// try whose word is fair (word·span's low half >= 2^32 mod span), or max_tries. The low half is
// below span whenever it is below 2^32 mod span (< span), so the division is almost never made.
inline int64_t uniform_rank(uint32_t first_word, uint64_t seed, uint64_t e, uint64_t total,
                            uint64_t span, int64_t max_tries) {
  uint64_t m = static_cast<uint64_t>(first_word) * span;
  if ((m & 0xFFFFFFFFu) < span) {
    const uint64_t threshold = (uint64_t{1} << 32) % span;
    for (int64_t t = 1; t <= max_tries && (m & 0xFFFFFFFFu) < threshold; ++t)
      m = static_cast<uint64_t>(philox_word(seed, e + static_cast<uint64_t>(t) * total)) * span;
  }
  return static_cast<int64_t>(m >> 32);
}

// body(begin, end) over [0, n): in at::parallel_for's threads, or on this thread alone (a
// batch prepared on a background thread beside the step must not start a team of its own).
template <typename F>
void for_range(bool parallel, int64_t n, int64_t grain, const F& body) {
  if (parallel)
    at::parallel_for(0, n, grain, body);
  else if (n > 0)
    body(0, n);
}

// The checks both ops share: num_items, k, max_tries and seed in range, indptr's form, the
// popularity CDF's form and endpoints. Returns the CDF contiguous, or an undefined tensor.
Tensor check_draw(const Tensor& indptr, const Tensor& indices,
                  const std::optional<Tensor>& popularity, int64_t num_items, int64_t k,
                  int64_t seed, int64_t max_tries) {
  const Tensor* ts[2] = {&indptr, &indices};
  const char* names[2] = {"indptr", "indices"};
  TORCH_CHECK_TYPE(indptr.scalar_type() == at::kLong, "indptr must be an int64 tensor, got dtype ",
                   indptr.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "indices must be an int32 or int64 tensor, got dtype ", indices.scalar_type());
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(ts[i]->device().is_cpu(), names[i], " must be on the CPU, got ",
                      ts[i]->device());
    TORCH_CHECK_VALUE(ts[i]->dim() == 1, names[i], " must be 1-D, got shape ", ts[i]->sizes());
  }
  TORCH_CHECK_VALUE(indptr.numel() >= 1, "indptr needs num_users + 1 >= 1 entries");
  TORCH_CHECK_VALUE(num_items >= 1 && num_items < (int64_t{1} << 31),
                    "need 1 <= num_items < 2**31, got ", num_items);
  TORCH_CHECK_VALUE(k >= 0 && max_tries >= 0, "need k >= 0 and max_tries >= 0, got k=", k,
                    ", max_tries=", max_tries);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be non-negative, got ", seed);
  if (!popularity.has_value()) return Tensor();
  const Tensor cdf = popularity->contiguous();
  TORCH_CHECK_VALUE(cdf.scalar_type() == at::kLong && cdf.device().is_cpu() && cdf.dim() == 1 &&
                        cdf.numel() == num_items + 1,
                    "popularity must be an int64 CPU tensor [num_items + 1] = [", num_items + 1,
                    "], got ", cdf.scalar_type(), " ", cdf.device(), " shape ", cdf.sizes());
  // (the search reads inside [1, num_items] for any values: it never probes past an entry that
  // exceeds the 32-bit word, and the last one does; that the CDF increases is the caller's part)
  const int64_t* c = cdf.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(c[0] == 0 && c[num_items] == (int64_t{1} << 32),
                    "popularity must run from 0 to 2**32 (popularity_cdf), got ", c[0], " .. ",
                    c[num_items]);
  return cdf;
}

inline const int64_t* cdf_data(const Tensor& cdf) {
  return cdf.defined() ? cdf.data_ptr<int64_t>() : nullptr;
}

constexpr uint64_t kPopularityKeyBit = uint64_t{1} << 62;  // sampling.POPULARITY_KEY_BIT

// Binary searches of m entries at once, one probe of every entry per pass: the group's cache
// misses overlap instead of each search waiting on its own chain of them. Entry j searches
// row[j][0, len[j]) for the number of positions q where below(j, q) holds (true, then false);
// returns it in base[j] (len is consumed).
template <typename T, typename Below>
void interleaved_search(int m, const T* const* row, int64_t* base, int64_t* len,
                        const Below& below) {
  for (bool more = true; more;) {
    more = false;
    for (int j = 0; j < m; ++j) {
      if (len[j] <= 1) continue;
      const int64_t half = len[j] / 2, q = base[j] + half;
      base[j] = below(j, q) ? q : base[j];
      len[j] -= half;
      if (len[j] > 1) {
        __builtin_prefetch(row[j] + base[j] + len[j] / 2);
        more = true;
      }
    }
  }
  for (int j = 0; j < m; ++j) base[j] = len[j] == 0 ? 0 : base[j] + below(j, base[j]);
}

// out[b * stride + j] for j < k: the negatives of users u[0..B) (every user's row checked
// first: in range, inside indices, not decreasing); cdf: the popularity CDF [num_items + 1], or
// nullptr for uniform negatives.
template <typename index_t>
void draw_negatives(const int64_t* p, int64_t rows, const index_t* x, int64_t nnz,
                    const int64_t* cdf, const int64_t* u, int64_t B, int64_t num_items, int64_t k,
                    uint64_t key, int64_t max_tries, int64_t* out, int64_t stride,
                    bool parallel) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = u[b];
    TORCH_CHECK_INDEX(r >= 0 && r < rows, "users[", b, "] = ", r,
                      " is out of range for a CSR of ", rows, " rows");
    TORCH_CHECK_VALUE(0 <= p[r] && p[r] <= p[r + 1] && p[r + 1] <= nnz, "row ", r,
                      " of the CSR spans indptr [", p[r], ", ", p[r + 1],
                      "), outside [0, indices.numel() = ", nnz, "] or decreasing");
  }
  const uint64_t total = static_cast<uint64_t>(B * k);
  for_range(parallel, B * k, 256, [&](int64_t begin, int64_t end) {
    const index_t* row[kGroup];
    const int64_t* table[kGroup];
    int64_t base[kGroup], len[kGroup], count[kGroup], rank[kGroup], drawn[kGroup], dst[kGroup];
    uint32_t word[kGroup];
    bool uniform[kGroup];
    for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
      const int m = static_cast<int>(std::min<int64_t>(kGroup, end - g0));
      int64_t b = g0 / k, c = g0 % k;  // entry g0 + j is column c of row b (no division per entry)
      for (int j = 0; j < m; ++j, ++c) {
        if (c == k) c = 0, ++b;
        dst[j] = b * stride + c;
        row[j] = x + p[u[b]];
        count[j] = p[u[b] + 1] - p[u[b]];
        uniform[j] = true;
      }
      if (cdf != nullptr) {
        for (int j = 0; j < kGroup; ++j)  // a vectorised loop
          word[j] = philox_word(key | kPopularityKeyBit, static_cast<uint64_t>(g0 + j));
        // the item: the number of cdf[1 + q] <= word (the CDF stays in cache: 142 KB for
        // Netflix; the searches interleaved all the same, each step a dependent read)
        for (int j = 0; j < m; ++j) table[j] = cdf + 1, base[j] = 0, len[j] = num_items;
        interleaved_search(m, table, base, len,
                           [&](int j, int64_t q) { return table[j][q] <= int64_t{word[j]}; });
        for (int j = 0; j < m; ++j) {
          drawn[j] = base[j];
          base[j] = 0;
          len[j] = count[j];
          if (count[j] > 0) __builtin_prefetch(row[j] + count[j] / 2);
        }
        interleaved_search(m, row, base, len,
                           [&](int j, int64_t q) { return row[j][q] < drawn[j]; });
        for (int j = 0; j < m; ++j)
          uniform[j] = base[j] < count[j] && row[j][base[j]] == drawn[j];
      }
      for (int j = 0; j < kGroup; ++j)  // first words of the whole group: a vectorised loop
        word[j] = philox_word(key, static_cast<uint64_t>(g0 + j));
      for (int j = 0; j < m; ++j) {
        // every item (or more): any item will do
        const int64_t free_count = count[j] >= num_items ? 0 : count[j];
        base[j] = 0;
        len[j] = uniform[j] ? free_count : 0;
        if (len[j] > 0) __builtin_prefetch(row[j] + len[j] / 2);
        rank[j] = uniform[j] ? uniform_rank(word[j], key, static_cast<uint64_t>(g0 + j), total,
                                            static_cast<uint64_t>(num_items - free_count),
                                            max_tries)
                             : 0;
      }
      // the number of members q with x[q] - q <= rank: the rank-th non-member is rank + that
      interleaved_search(m, row, base, len,
                         [&](int j, int64_t q) { return row[j][q] - q <= rank[j]; });
      for (int j = 0; j < m; ++j) out[dst[j]] = uniform[j] ? rank[j] + base[j] : drawn[j];
    }
  });
}

}  // namespace

Tensor sample_negatives(const Tensor& indptr, const Tensor& indices,
                        const std::optional<Tensor>& popularity, const Tensor& users,
                        int64_t num_items, int64_t k, int64_t seed, int64_t max_tries) {
  const Tensor cdf = check_draw(indptr, indices, popularity, num_items, k, seed, max_tries);
  TORCH_CHECK_TYPE(users.scalar_type() == at::kLong, "users must be an int64 tensor, got dtype ",
                   users.scalar_type());
  TORCH_CHECK_VALUE(users.device().is_cpu() && users.dim() == 1,
                    "users must be a 1-D CPU tensor, got ", users.device(), " shape ",
                    users.sizes());
  const Tensor ip = indptr.contiguous(), ix = indices.contiguous(), us = users.contiguous();
  Tensor out = at::empty({us.numel(), k}, us.options());
  AT_DISPATCH_INDEX_TYPES(ix.scalar_type(), "sample_negatives", [&] {
    draw_negatives(ip.data_ptr<int64_t>(), ip.numel() - 1, ix.data_ptr<index_t>(), ix.numel(),
                   cdf_data(cdf), us.data_ptr<int64_t>(), us.numel(), num_items, k,
                   static_cast<uint64_t>(seed), max_tries, out.data_ptr<int64_t>(), k,
                   /*parallel=*/true);
  });
  return out;
}

std::tuple<Tensor, Tensor> training_batch(const Tensor& rows, const Tensor& train_users,
                                          const Tensor& train_items, const Tensor& indptr,
                                          const Tensor& indices,
                                          const std::optional<Tensor>& popularity,
                                          int64_t num_items, int64_t k, int64_t seed,
                                          int64_t max_tries, bool parallel) {
  const Tensor cdf = check_draw(indptr, indices, popularity, num_items, k, seed, max_tries);
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kLong, "rows must be an int64 tensor, got dtype ",
                   rows.scalar_type());
  TORCH_CHECK_VALUE(rows.device().is_cpu() && rows.dim() == 1, "rows must be a 1-D CPU tensor");
  TORCH_CHECK_TYPE(train_users.scalar_type() == train_items.scalar_type() &&
                       (train_users.scalar_type() == at::kInt ||
                        train_users.scalar_type() == at::kLong),
                   "train_users and train_items must be both int32 or both int64, got ",
                   train_users.scalar_type(), " and ", train_items.scalar_type());
  TORCH_CHECK_VALUE(train_users.device().is_cpu() && train_items.device().is_cpu() &&
                        train_users.dim() == 1 && train_users.sizes() == train_items.sizes(),
                    "train_users and train_items must be 1-D CPU tensors of one length, got ",
                    train_users.sizes(), " and ", train_items.sizes());
  const Tensor rs = rows.contiguous(), tu = train_users.contiguous(),
               ti = train_items.contiguous(), ip = indptr.contiguous(), ix = indices.contiguous();
  const int64_t B = rs.numel(), n = tu.numel();
  const int64_t* r = rs.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_INDEX(r[b] >= 0 && r[b] < n, "rows[", b, "] = ", r[b],
                      " is out of range for ", n, " training interactions");
  Tensor users = at::empty({B}, rs.options()), items = at::empty({B, 1 + k}, rs.options());
  int64_t* uo = users.data_ptr<int64_t>();
  int64_t* io = items.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(tu.scalar_type(), "training_batch", [&] {
    const index_t* tus = tu.data_ptr<index_t>();
    const index_t* tis = ti.data_ptr<index_t>();
    // random rows of the training arrays: a group's reads are prefetched together
    for_range(parallel, B, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
        const int64_t g1 = std::min<int64_t>(g0 + kGroup, end);
        for (int64_t b = g0; b < g1; ++b) {
          __builtin_prefetch(tus + r[b]);
          __builtin_prefetch(tis + r[b]);
        }
        for (int64_t b = g0; b < g1; ++b) {
          uo[b] = tus[r[b]];
          io[b * (1 + k)] = tis[r[b]];
        }
      }
    });
  });
  AT_DISPATCH_INDEX_TYPES(ix.scalar_type(), "training_batch", [&] {
    draw_negatives(ip.data_ptr<int64_t>(), ip.numel() - 1, ix.data_ptr<index_t>(), ix.numel(),
                   cdf_data(cdf), uo, B, num_items, k, static_cast<uint64_t>(seed), max_tries,
                   io + 1, 1 + k, parallel);
  });
  return {users, items};
}

namespace {

// lrml_kernels.batches._hash32: a 32-bit integer hash of x < 2^32.
inline uint64_t hash32(uint64_t x) {
  x = ((x >> 16) ^ x) * 0x45D9F3Bu & 0xFFFFFFFFu;
  x = ((x >> 16) ^ x) * 0x45D9F3Bu & 0xFFFFFFFFu;
  return (x >> 16) ^ x;
}

}  // namespace

Tensor epoch_order(const Tensor& round_keys, int64_t start, int64_t count, int64_t n,
                   int64_t world, int64_t rank, int64_t a, int64_t b) {
  TORCH_CHECK_VALUE(round_keys.scalar_type() == at::kLong && round_keys.dim() == 1 &&
                        round_keys.device().is_cpu(),
                    "round_keys must be a 1-D int64 CPU tensor");
  const Tensor kt = round_keys.contiguous();
  const at::IntArrayRef keys(kt.data_ptr<int64_t>(), kt.numel());
  TORCH_CHECK_VALUE(n >= 1 && a >= 1 && b >= 1 && a * b >= n && a < (int64_t{1} << 32) &&
                        b < (int64_t{1} << 32),
                    "need 1 <= n <= a * b and a, b below 2**32; got n=", n, ", a=", a, ", b=", b);
  TORCH_CHECK_VALUE(world >= 1 && rank >= 0 && rank < world && start >= 0 && count >= 0 &&
                        (start + count) * world <= n,
                    "entries [", start, ", ", start + count, ") of rank ", rank, " of ", world,
                    " are outside an order of ", n, " rows");
  TORCH_CHECK_VALUE(keys.size() % 2 == 0, "need an even number of round keys, got ", keys.size());
  for (const int64_t key : keys)
    TORCH_CHECK_VALUE(key >= 0 && key < (int64_t{1} << 32), "round keys must lie in [0, 2**32)");
  Tensor out = at::empty({count}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  const uint64_t ua = static_cast<uint64_t>(a), ub = static_cast<uint64_t>(b);
  const size_t rounds = keys.size();
  auto permute = [&](uint64_t x) {
    uint64_t left = x / ub, right = x % ub;  // left in [0, a), right in [0, b)
    for (size_t i = 0; i < rounds; ++i) {
      const uint64_t next = (left + hash32(right ^ static_cast<uint64_t>(keys[i]))) %
                            (i % 2 == 0 ? ua : ub);
      left = right;
      right = next;
    }
    return left * ub + right;  // after an even number of rounds: left in [0, a) again
  };
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint64_t x = permute(static_cast<uint64_t>((start + i) * world + rank));
      while (x >= static_cast<uint64_t>(n)) x = permute(x);  // cycle walking
      o[i] = static_cast<int64_t>(x);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace lrml
