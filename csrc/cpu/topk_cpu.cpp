// CPU top-k over the whole catalogue (SPEC.md "Ranking all items"), never forming [users, items, d].
//
// Per call: M Qᵀ [I, N], M Mᵀ [N, N] and ‖q‖² once. Per block of Ub users and tile of Ti items:
// one GEMM Z = Q_tile [Ti, d] · [p ⊙ K ; p]ᵀ gives every logit z_n = Q_i · (p ⊙ K_n) and p·q; a
// softmax (vectorised exp), one GEMM A · M Mᵀ, and the rewrite
//   ‖e‖² = ‖p‖² + ‖q‖² − 2 p·q + 2 a·(M p) − 2 a·(M q) + aᵀ (M Mᵀ) a
// give an approximate distance ("l1": a second GEMM A · M forms r per tile instead). Each user keeps
// a running threshold (max-heap of the k smallest) and every item within `tol` of it, where `tol`
// bounds twice the rounding error of the approximation (cancellation included); the survivors are
// re-scored with the direct formula and sorted by (distance, id). So the result is exact. Items at
// a NaN distance rank last, as in the reference: the first k of them by id are kept and re-scored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "ops_cpu.h"
#include "tile_gemm.h"

namespace lrml {
namespace cpu {
namespace {

constexpr int64_t kUsersPerBlock = 16;
constexpr int64_t kItemsPerTile = 256;

template <typename T>
struct Selector {
  int64_t kk = 0;
  T tol = 0;
  size_t cap = 0;
  std::vector<T> heap;  // max-heap of the kk smallest approximate distances
  std::vector<std::pair<T, int64_t>> cands;
  std::vector<int64_t> nans;  // the first kk items at a NaN distance: ranked last, by id

  void reset(int64_t k, T tolerance) {
    kk = k;
    tol = tolerance;
    cap = static_cast<size_t>(4 * k + 256);
    heap.clear();
    cands.clear();
    nans.clear();
  }
  T threshold() const {
    return static_cast<int64_t>(heap.size()) < kk ? std::numeric_limits<T>::infinity()
                                                   : heap.front();
  }
  void push(T v, int64_t id) {
    if (std::isnan(v)) {  // after every other item, as the reference sorts it
      if (static_cast<int64_t>(nans.size()) < kk) nans.push_back(id);
      return;
    }
    const T thr = threshold();
    if (!(v <= thr + tol)) return;
    cands.emplace_back(v, id);
    if (static_cast<int64_t>(heap.size()) < kk) {
      heap.push_back(v);
      std::push_heap(heap.begin(), heap.end());
    } else if (v < heap.front()) {
      std::pop_heap(heap.begin(), heap.end());
      heap.back() = v;
      std::push_heap(heap.begin(), heap.end());
    }
    if (cands.size() > cap) prune();
  }
  void prune() {
    const T lim = threshold() + tol;
    cands.erase(std::remove_if(cands.begin(), cands.end(),
                               [lim](const std::pair<T, int64_t>& c) { return !(c.first <= lim); }),
                cands.end());
    if (cands.size() > cap / 2) cap = 2 * cands.size();
  }
};

template <typename T>
bool dist_less(const std::pair<T, int64_t>& x, const std::pair<T, int64_t>& y) {
  const bool nx = std::isnan(x.first), ny = std::isnan(y.first);
  if (nx != ny) return ny;  // NaN last
  if (!nx && x.first != y.first) return x.first < y.first;
  return x.second < y.second;
}

template <typename T>
void topk_kernel(const Params& pr, const int64_t* users, int64_t B, int64_t k,
                 const int64_t* indptr, const int64_t* indices, Distance distance, T eps,
                 T* out_d, int64_t* out_i) {
  const int64_t I = pr.I, N = pr.N, d = pr.d;
  const int64_t kk = std::min(k, I);
  const T* P = pr.P.data_ptr<T>();
  const T* Q = pr.Q.data_ptr<T>();
  const T* K = pr.K.data_ptr<T>();
  const T* M = pr.M.data_ptr<T>();
  const auto opts = pr.P.options();
  const bool l1 = distance == Distance::L1;

  // Once per call.
  const Tensor MQ = at::mm(pr.Q, pr.M.t()).contiguous();  // [I, N]
  const Tensor MMt = at::mm(pr.M, pr.M.t()).contiguous();  // [N, N]
  const T* mq = MQ.data_ptr<T>();
  std::vector<T> qq(I);
  T qq_max = 0, q1_max = 0, mq_max = 0, mm_max = 0, msum = 0;
  for (int64_t i = 0; i < I; ++i) {
    const T* q = Q + i * d;
    qq[i] = dot(q, q, d);
    qq_max = std::max(qq_max, qq[i]);
    T a1 = 0;
    for (int64_t j = 0; j < d; ++j) a1 += std::abs(q[j]);
    q1_max = std::max(q1_max, a1);
  }
  for (int64_t i = 0; i < I * N; ++i) mq_max = std::max(mq_max, std::abs(mq[i]));
  for (int64_t i = 0; i < N * N; ++i) mm_max = std::max(mm_max, std::abs(MMt.data_ptr<T>()[i]));
  for (int64_t j = 0; j < d; ++j) {
    T m = 0;
    for (int64_t n = 0; n < N; ++n) m = std::max(m, std::abs(M[n * d + j]));
    msum += m;
  }
  const T q_max = std::sqrt(qq_max);
  const T em = std::numeric_limits<T>::epsilon();
  const T gamma = 4 * static_cast<T>(d + N + 16) * em;

  const int64_t W = N + 1;  // per user: N logit rows p ⊙ K_n and the row p
  const int64_t nblocks = (B + kUsersPerBlock - 1) / kUsersPerBlock;
  const int64_t words = (I + 63) / 64;

  at::parallel_for(0, nblocks, 1, [&](int64_t lo, int64_t hi) {
    Tensor Wb = at::empty({kUsersPerBlock * W, d}, opts);
    Tensor Zbuf = at::empty({kItemsPerTile * kUsersPerBlock * W}, opts);
    Tensor Abuf = at::empty({kUsersPerBlock * kItemsPerTile * N}, opts);
    Tensor Ybuf = at::empty({kUsersPerBlock * kItemsPerTile * (l1 ? d : N)}, opts);
    std::vector<T> pq(kUsersPerBlock * kItemsPerTile);
    std::vector<T> Mp(kUsersPerBlock * N), pp(kUsersPerBlock), p1(kUsersPerBlock);
    std::vector<uint64_t> excl(kUsersPerBlock * words);
    std::vector<Selector<T>> sel(kUsersPerBlock);
    std::vector<T> scratch(3 * d + N + 4);
    std::vector<std::pair<T, int64_t>> exact;
    T* wb = Wb.data_ptr<T>();

    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t u0 = blk * kUsersPerBlock;
      const int64_t nu = std::min(kUsersPerBlock, B - u0);
      const int64_t ldz = nu * W;
      std::fill(excl.begin(), excl.end(), 0);
      for (int64_t uu = 0; uu < nu; ++uu) {
        const T* p = P + users[u0 + uu] * d;
        T zb = 0;
        for (int64_t n = 0; n < N; ++n) {
          T* row = wb + (uu * W + n) * d;
          for (int64_t j = 0; j < d; ++j) row[j] = p[j] * K[n * d + j];
          zb = std::max(zb, std::sqrt(dot(row, row, d)));
        }
        std::copy(p, p + d, wb + (uu * W + N) * d);
        pp[uu] = dot(p, p, d);
        T mp_max = 0, a1 = 0;
        for (int64_t n = 0; n < N; ++n) {
          Mp[uu * N + n] = dot(M + n * d, p, d);
          mp_max = std::max(mp_max, std::abs(Mp[uu * N + n]));
        }
        for (int64_t j = 0; j < d; ++j) a1 += std::abs(p[j]);
        p1[uu] = a1;
        zb *= q_max;  // |z| <= ‖p ⊙ K_n‖ ‖q‖
        T delta;
        if (l1) {
          delta = gamma * (a1 + q1_max + msum + 2 * zb * msum) + 8 * em * msum;
        } else {
          const T V = 2 * mp_max + 2 * mq_max + 2 * mm_max;
          const T mag = pp[uu] + qq_max + 2 * std::sqrt(pp[uu] * qq_max) + V;
          delta = gamma * (mag + 2 * zb * V) + 8 * em * V;
        }
        sel[uu].reset(kk, 2 * delta);
        if (indptr) {
          const int64_t b = u0 + uu;
          for (int64_t x = indptr[b]; x < indptr[b + 1]; ++x) {
            const int64_t it = indices[x];
            if (it >= 0 && it < I) excl[uu * words + (it >> 6)] |= uint64_t(1) << (it & 63);
          }
        }
      }
      const Tensor Wv = Wb.narrow(0, 0, nu * W);
      for (int64_t t0 = 0; t0 < I; t0 += kItemsPerTile) {
        const int64_t tl = std::min(kItemsPerTile, I - t0);
        Tensor Z = Zbuf.narrow(0, 0, tl * ldz).view({tl, ldz});
        at::mm_out(Z, pr.Q.narrow(0, t0, tl), Wv.t());
        const T* zp = Z.data_ptr<T>();
        T* ap = Abuf.data_ptr<T>();
        for (int64_t uu = 0; uu < nu; ++uu) {
          for (int64_t t = 0; t < tl; ++t) {
            const T* z = zp + t * ldz + uu * W;
            T* a = ap + (uu * tl + t) * N;
            T m = z[0];
            for (int64_t n = 1; n < N; ++n) m = z[n] > m ? z[n] : m;
            T s = 0;
#pragma omp simd reduction(+ : s)
            for (int64_t n = 0; n < N; ++n) {
              const T v = exp_nonpositive(z[n] - m);  // candidate selection only
              a[n] = v;
              s += v;
            }
            const T inv = T(1) / s;
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) a[n] *= inv;
            pq[uu * tl + t] = z[N];
          }
        }
        const Tensor A = Abuf.narrow(0, 0, nu * tl * N).view({nu * tl, N});
        Tensor Y = Ybuf.narrow(0, 0, nu * tl * (l1 ? d : N)).view({nu * tl, l1 ? d : N});
        at::mm_out(Y, A, l1 ? pr.M : MMt);
        const T* yp = Y.data_ptr<T>();
        for (int64_t uu = 0; uu < nu; ++uu) {
          const uint64_t* ex = excl.data() + uu * words;
          Selector<T>& S = sel[uu];
          const T* mpu = Mp.data() + uu * N;
          const T* p = P + users[u0 + uu] * d;
          for (int64_t t = 0; t < tl; ++t) {
            const int64_t id = t0 + t;
            if ((ex[id >> 6] >> (id & 63)) & 1) continue;
            const T* a = ap + (uu * tl + t) * N;
            T v;
            if (l1) {
              const T* r = yp + (uu * tl + t) * d;
              const T* q = Q + id * d;
              T acc = 0;
#pragma omp simd reduction(+ : acc)
              for (int64_t j = 0; j < d; ++j) acc += std::abs(p[j] + r[j] - q[j]);
              v = acc;
            } else {
              const T* y = yp + (uu * tl + t) * N;
              const T* mqi = mq + id * N;
              T lin = 0, quad = 0;
#pragma omp simd reduction(+ : lin, quad)
              for (int64_t n = 0; n < N; ++n) {
                lin += a[n] * (mpu[n] - mqi[n]);
                quad += a[n] * y[n];
              }
              v = pp[uu] + qq[id] - 2 * pq[uu * tl + t] + 2 * lin + quad;
            }
            S.push(v, id);
          }
        }
      }
      // Exact re-scoring of the survivors, (distance, id) order, padding.
      for (int64_t uu = 0; uu < nu; ++uu) {
        const int64_t b = u0 + uu;
        Selector<T>& S = sel[uu];
        S.prune();
        const T* p = P + users[b] * d;
        exact.clear();
        for (const auto& c : S.cands) {
          exact.emplace_back(
              pair_distance(p, Q + c.second * d, K, M, N, d, distance, eps, scratch.data()),
              c.second);
        }
        for (const int64_t id : S.nans) {
          exact.emplace_back(pair_distance(p, Q + id * d, K, M, N, d, distance, eps, scratch.data()),
                             id);
        }
        std::sort(exact.begin(), exact.end(), dist_less<T>);
        const int64_t n_out = std::min<int64_t>(k, static_cast<int64_t>(exact.size()));
        for (int64_t x = 0; x < k; ++x) {
          out_d[b * k + x] = x < n_out ? exact[x].first : std::numeric_limits<T>::infinity();
          out_i[b * k + x] = x < n_out ? exact[x].second : -1;
        }
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> topk(const Tensor& user_emb, const Tensor& item_emb,
                                const Tensor& keys, const Tensor& memory, const Tensor& users,
                                int64_t k, const std::optional<Tensor>& exclude_indptr,
                                const std::optional<Tensor>& exclude_indices,
                                c10::string_view distance, double eps) {
  const Distance dist = parse_distance(std::string(distance.data(), distance.size()));
  check_eps(eps);
  TORCH_CHECK_VALUE(k >= 1, "k must be at least 1, got ", k);
  Params pr = check_params(user_emb, item_emb, keys, memory, c10::DeviceType::CPU,
                           {at::kFloat, at::kDouble}, "cpu");
  Tensor u = check_index("users", users, 1, pr.P.device());
  check_index_range("users", u, pr.U);
  const int64_t B = u.size(0);
  TORCH_CHECK_VALUE(exclude_indptr.has_value() == exclude_indices.has_value(),
                    "exclude must be None or a CSR pair (indptr [B+1], indices)");
  Tensor indptr, indices;
  if (exclude_indptr.has_value()) {
    indptr = check_index("exclude indptr", *exclude_indptr, 1, pr.P.device());
    indices = check_index("exclude indices", *exclude_indices, 1, pr.P.device());
    TORCH_CHECK_VALUE(indptr.size(0) == B + 1, "exclude indptr has ", indptr.size(0),
                      " entries but users has ", B, " rows: it must have B + 1 = ", B + 1);
    const int64_t* ip = indptr.data_ptr<int64_t>();
    const int64_t nnz = indices.size(0);
    TORCH_CHECK_VALUE(ip[0] == 0 && ip[B] == nnz,
                      "exclude indptr must start at 0 and end at len(indices) = ", nnz, ", got ",
                      ip[0], " .. ", ip[B]);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK_VALUE(ip[b + 1] >= ip[b], "exclude indptr must be non-decreasing");
    }
    check_index_range("exclude indices", indices, pr.I);
  }
  Tensor out_d = at::empty({B, k}, pr.P.options());
  Tensor out_i = at::empty({B, k}, pr.P.options().dtype(at::kLong));
  if (B == 0) return {out_d, out_i};
  if (pr.I == 0) {  // no items: every slot padded (the kernel's selectors need kk >= 1)
    out_d.fill_(std::numeric_limits<double>::infinity());
    out_i.fill_(-1);
    return {out_d, out_i};
  }
  AT_DISPATCH_FLOATING_TYPES(pr.P.scalar_type(), "lrml_topk_cpu", [&] {
    topk_kernel<scalar_t>(pr, u.data_ptr<int64_t>(), B, k,
                          indptr.defined() ? indptr.data_ptr<int64_t>() : nullptr,
                          indices.defined() ? indices.data_ptr<int64_t>() : nullptr, dist,
                          static_cast<scalar_t>(eps), out_d.data_ptr<scalar_t>(),
                          out_i.data_ptr<int64_t>());
  });
  return {out_d, out_i};
}

}  // namespace cpu
}  // namespace lrml
