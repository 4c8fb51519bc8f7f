// CPU kernels of the fused LRML distances and hinge loss, forward and backward (SPEC.md).
//
// One pass per row b: gather p = P[users[b]] and q_c = Q[items[b, c]], attention over the memory
// (K and M, N x d, stay in cache), relation, residual and distance for every column; for the
// gradients, the hinge's ∂L/∂D and the backward of every column right after, while the row is hot.
// Per-row embedding gradients are written as rows ([B, d], [B, C, d]); the keys/memory gradients
// accumulate in per-row-block partials (the blocks do not depend on the thread count) that are
// summed in a fixed order, so the result is bitwise reproducible with any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "ops_cpu.h"

namespace lrml {
namespace cpu {
namespace {

constexpr int64_t kMaxBlocks = 64;        // keys/memory partials: at most 64 x 2 x N x d
constexpr int64_t kMinRowsPerBlock = 16;

const std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kDouble};

std::string str(c10::string_view s) { return std::string(s.data(), s.size()); }

template <typename T>
struct Job {
  const T *P = nullptr, *Q = nullptr, *K = nullptr, *M = nullptr;
  const int64_t *users = nullptr, *items = nullptr;
  int64_t B = 0, C = 0, N = 0, d = 0;
  Distance distance = Distance::L2;
  Relation relation = Relation::Pair;
  T eps = 0;
  // forward outputs (optional)
  T* D_out = nullptr;  // [B, C]
  T* L_out = nullptr;  // [B] hinge per row
  bool hinge = false;
  T margin = 0;
  // backward: the upstream gradient of D (gD [B, C]) or of the hinge (w per row or scalar)
  const T* gD = nullptr;
  const T* w_rows = nullptr;
  T w_scalar = 0;
  T* gp_rows = nullptr;  // [B, d]
  T* gq_rows = nullptr;  // [B, C, d]
};

template <typename T>
struct Workspace {
  std::vector<T> buf;
  std::vector<char> active;
  T *s, *a, *r, *e, *Dc, *gD, *ge, *gp, *gr, *ga, *gs;
  Workspace(int64_t C, int64_t N, int64_t d) : active(C) {
    buf.resize(C * N + C * d + 6 * d + 2 * C + N + 8);
    T* x = buf.data();
    a = x; x += C * N;
    e = x; x += C * d;
    s = x; x += d;
    r = x; x += d;
    ge = x; x += d;
    gp = x; x += d;
    gr = x; x += d;
    gs = x; x += d;
    Dc = x; x += C;
    gD = x; x += C;
    ga = x;
  }
};

template <typename T>
void process_row(const Job<T>& job, int64_t b, Workspace<T>& w, T* gK, T* gM) {
  const int64_t d = job.d, N = job.N, C = job.C;
  const T* p = job.P + job.users[b] * d;
  const int64_t* it = job.items + b * C;
  const T* K = job.K;
  const T* M = job.M;
  const bool pair = job.relation == Relation::Pair;

  // Forward: distances of every column.
  if (pair) {
    for (int64_t c = 0; c < C; ++c) {
      const T* q = job.Q + it[c] * d;
      attend(p, q, K, M, N, d, w.s, w.a + c * N, w.r);
      w.Dc[c] = residual_distance(p, w.r, q, w.e + c * d, d, job.distance, job.eps);
    }
  } else {
    attend(p, job.Q + it[0] * d, K, M, N, d, w.s, w.a, w.r);  // the positive's relation
    for (int64_t c = 0; c < C; ++c) {
      const T* q = job.Q + it[c] * d;
      w.Dc[c] = residual_distance(p, w.r, q, w.e + c * d, d, job.distance, job.eps);
    }
  }
  if (job.D_out) std::copy(w.Dc, w.Dc + C, job.D_out + b * C);
  int64_t n_active = 0;
  if (job.hinge) {
    T L = 0;
    const T base = job.margin + w.Dc[0];
    for (int64_t c = 1; c < C; ++c) {
      const T h = base - w.Dc[c];
      w.active[c] = h > 0;
      if (h > 0) {
        L += h;
        ++n_active;
      }
    }
    if (job.L_out) job.L_out[b] = L;
  }
  if (!job.gq_rows) return;

  // ∂L/∂D of this row.
  const T* gD = w.gD;
  if (job.gD) {
    gD = job.gD + b * C;
  } else {
    const T wb = job.w_rows ? job.w_rows[b] : job.w_scalar;
    w.gD[0] = wb * static_cast<T>(n_active);
    for (int64_t c = 1; c < C; ++c) w.gD[c] = w.active[c] ? -wb : T(0);
  }

  // Backward.
  T* gp = w.gp;
  zero(gp, d);
  if (!pair) zero(w.gr, d);
  T* gq_row = job.gq_rows + b * C * d;
  bool any = false;
  for (int64_t c = 0; c < C; ++c) {
    const T g = gD[c];
    T* gq = gq_row + c * d;
    if (g == 0) {
      zero(gq, d);
      continue;
    }
    any = true;
    const T* q = job.Q + it[c] * d;
    residual_grad(w.e + c * d, g, w.Dc[c], d, job.distance, w.ge);
    const T* ge = w.ge;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      gp[j] += ge[j];
      gq[j] = -ge[j];
    }
    if (pair) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) w.s[j] = p[j] * q[j];
      attend_backward(w.s, w.a + c * N, ge, K, M, N, d, gK, gM, w.ga, w.gs);
      const T* gs = w.gs;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        gp[j] += gs[j] * q[j];
        gq[j] += gs[j] * p[j];
      }
    } else {
      axpy(T(1), ge, w.gr, d);
    }
  }
  if (!pair && any) {
    const T* q = job.Q + it[0] * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) w.s[j] = p[j] * q[j];
    attend_backward(w.s, w.a, w.gr, K, M, N, d, gK, gM, w.ga, w.gs);
    const T* gs = w.gs;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) {
      gp[j] += gs[j] * q[j];
      gq_row[j] += gs[j] * p[j];
    }
  }
  std::copy(gp, gp + d, job.gp_rows + b * d);
}

// Runs the rows; with gradients, returns (gK, gM) summed over the row-block partials in order.
template <typename T>
std::pair<Tensor, Tensor> run(const Job<T>& job, const at::TensorOptions& opts) {
  const int64_t B = job.B, N = job.N, d = job.d, C = job.C;
  if (!job.gq_rows) {
    at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
      Workspace<T> w(C, N, d);
      for (int64_t b = lo; b < hi; ++b) process_row(job, b, w, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
    });
    return {};
  }
  const int64_t nblk0 = std::max<int64_t>(
      1, std::min<int64_t>(kMaxBlocks, (B + kMinRowsPerBlock - 1) / kMinRowsPerBlock));
  const int64_t rows = std::max<int64_t>(1, (B + nblk0 - 1) / nblk0);
  const int64_t nblk = std::max<int64_t>(1, (B + rows - 1) / rows);
  const int64_t nd = N * d;
  Tensor partials = at::empty({nblk, 2, N, d}, opts);
  T* part = partials.data_ptr<T>();
  at::parallel_for(0, nblk, 1, [&](int64_t lo, int64_t hi) {
    Workspace<T> w(C, N, d);
    for (int64_t blk = lo; blk < hi; ++blk) {
      T* gK = part + blk * 2 * nd;
      T* gM = gK + nd;
      zero(gK, 2 * nd);  // first touch by the thread that accumulates it
      const int64_t end = std::min(B, (blk + 1) * rows);
      for (int64_t b = blk * rows; b < end; ++b) process_row(job, b, w, gK, gM);
    }
  });
  Tensor gK = at::empty({N, d}, opts);
  Tensor gM = at::empty({N, d}, opts);
  T* ok = gK.data_ptr<T>();
  T* om = gM.data_ptr<T>();
  at::parallel_for(0, nd, 2048, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T sk = 0, sm = 0;
      for (int64_t blk = 0; blk < nblk; ++blk) {
        sk += part[blk * 2 * nd + i];
        sm += part[blk * 2 * nd + nd + i];
      }
      ok[i] = sk;
      om[i] = sm;
    }
  });
  return {gK, gM};
}

struct Prepared {
  Params p;
  Batch b;
  Distance distance;
  Relation relation;
};

Prepared prepare(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                 const Tensor& memory, const Tensor& users, const Tensor& items,
                 c10::string_view distance, c10::string_view relation, double eps) {
  Prepared r;
  r.distance = parse_distance(str(distance));
  r.relation = parse_relation(str(relation));
  check_eps(eps);
  r.p = check_params(user_emb, item_emb, keys, memory, c10::DeviceType::CPU, kDtypes, "cpu");
  r.b = check_batch(r.p, users, items);
  return r;
}

template <typename T>
Job<T> make_job(const Prepared& pr, double eps) {
  Job<T> job;
  job.P = pr.p.P.data_ptr<T>();
  job.Q = pr.p.Q.data_ptr<T>();
  job.K = pr.p.K.data_ptr<T>();
  job.M = pr.p.M.data_ptr<T>();
  job.users = pr.b.users.data_ptr<int64_t>();
  job.items = pr.b.items.data_ptr<int64_t>();
  job.B = pr.b.B;
  job.C = pr.b.C;
  job.N = pr.p.N;
  job.d = pr.p.d;
  job.distance = pr.distance;
  job.relation = pr.relation;
  job.eps = static_cast<T>(eps);
  return job;
}

Tensor reduce_loss(const Tensor& L, Reduction reduction) {
  if (reduction == Reduction::None) return L;
  // Fixed-order double accumulation: deterministic and accurate.
  const int64_t B = L.size(0);
  double acc = 0;
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "lrml_reduce_loss", [&] {
    const scalar_t* l = L.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) acc += static_cast<double>(l[b]);
  });
  if (reduction == Reduction::Mean && B > 0) acc /= static_cast<double>(B);
  return at::scalar_tensor(acc, L.options());
}

// Shared by hinge_loss_backward and hinge_loss_grads.
Grads hinge_backward_impl(const Prepared& pr, const Tensor* grad, double margin, double eps,
                          Reduction reduction, Tensor* loss_out) {
  const auto opts = pr.p.P.options();
  const int64_t B = pr.b.B, C = pr.b.C, d = pr.p.d;
  Tensor gp_rows = at::empty({B, d}, opts);
  Tensor gq_rows = at::empty({B, C, d}, opts);
  Tensor L = at::empty({B}, opts);
  Tensor w;
  std::pair<Tensor, Tensor> gkm;
  AT_DISPATCH_FLOATING_TYPES(pr.p.P.scalar_type(), "lrml_hinge_backward_cpu", [&] {
    Job<scalar_t> job = make_job<scalar_t>(pr, eps);
    job.hinge = true;
    job.margin = static_cast<scalar_t>(margin);
    job.L_out = L.data_ptr<scalar_t>();
    double scale = 1.0;
    if (reduction == Reduction::Mean && B > 0) scale = 1.0 / static_cast<double>(B);
    if (grad == nullptr) {
      job.w_scalar = static_cast<scalar_t>(scale);
    } else if (reduction == Reduction::None) {
      w = grad->to(opts.dtype()).contiguous();
      job.w_rows = w.data_ptr<scalar_t>();
    } else {
      // Same rounding as autograd of L.mean(): grad / B in the compute dtype.
      const scalar_t g = grad->to(opts.dtype()).item<scalar_t>();
      job.w_scalar = reduction == Reduction::Mean && B > 0 ? g / static_cast<scalar_t>(B) : g;
    }
    job.gp_rows = gp_rows.data_ptr<scalar_t>();
    job.gq_rows = gq_rows.data_ptr<scalar_t>();
    gkm = run(job, opts);
  });
  if (loss_out) *loss_out = reduce_loss(L, reduction);
  return {gp_rows, gq_rows, gkm.first, gkm.second};
}

}  // namespace

Tensor distances(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                 const Tensor& memory, const Tensor& users, const Tensor& items,
                 c10::string_view distance, c10::string_view relation, double eps,
                 bool /*sparse_grad*/) {
  Prepared pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  Tensor D = at::empty({pr.b.B, pr.b.C}, pr.p.P.options());
  AT_DISPATCH_FLOATING_TYPES(pr.p.P.scalar_type(), "lrml_distances_cpu", [&] {
    Job<scalar_t> job = make_job<scalar_t>(pr, eps);
    job.D_out = D.data_ptr<scalar_t>();
    run(job, D.options());
  });
  return D;
}

Grads distances_backward(const Tensor& grad, const Tensor& user_emb, const Tensor& item_emb,
                         const Tensor& keys, const Tensor& memory, const Tensor& users,
                         const Tensor& items, c10::string_view distance,
                         c10::string_view relation, double eps) {
  Prepared pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  check_grad_D(grad, pr.b, pr.p);
  const auto opts = pr.p.P.options();
  const int64_t B = pr.b.B, C = pr.b.C, d = pr.p.d;
  Tensor g = grad.to(opts.dtype()).contiguous();
  Tensor gp_rows = at::empty({B, d}, opts);
  Tensor gq_rows = at::empty({B, C, d}, opts);
  std::pair<Tensor, Tensor> gkm;
  AT_DISPATCH_FLOATING_TYPES(pr.p.P.scalar_type(), "lrml_distances_backward_cpu", [&] {
    Job<scalar_t> job = make_job<scalar_t>(pr, eps);
    job.gD = g.data_ptr<scalar_t>();
    job.gp_rows = gp_rows.data_ptr<scalar_t>();
    job.gq_rows = gq_rows.data_ptr<scalar_t>();
    gkm = run(job, opts);
  });
  return {gp_rows, gq_rows, gkm.first, gkm.second};
}

Tensor hinge_loss(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                  const Tensor& memory, const Tensor& users, const Tensor& items, double margin,
                  c10::string_view distance, c10::string_view relation, double eps,
                  c10::string_view reduction, bool /*sparse_grad*/) {
  const Reduction red = parse_reduction(str(reduction));
  Prepared pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  Tensor L = at::empty({pr.b.B}, pr.p.P.options());
  AT_DISPATCH_FLOATING_TYPES(pr.p.P.scalar_type(), "lrml_hinge_loss_cpu", [&] {
    Job<scalar_t> job = make_job<scalar_t>(pr, eps);
    job.hinge = true;
    job.margin = static_cast<scalar_t>(margin);
    job.L_out = L.data_ptr<scalar_t>();
    run(job, L.options());
  });
  return reduce_loss(L, red);
}

Grads hinge_loss_backward(const Tensor& grad, const Tensor& user_emb, const Tensor& item_emb,
                          const Tensor& keys, const Tensor& memory, const Tensor& users,
                          const Tensor& items, double margin, c10::string_view distance,
                          c10::string_view relation, double eps, c10::string_view reduction) {
  const Reduction red = parse_reduction(str(reduction));
  Prepared pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  check_grad_loss(grad, pr.b, pr.p, red);
  return hinge_backward_impl(pr, &grad, margin, eps, red, nullptr);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> hinge_loss_grads(
    const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys, const Tensor& memory,
    const Tensor& users, const Tensor& items, double margin, c10::string_view distance,
    c10::string_view relation, double eps, c10::string_view reduction) {
  const Reduction red = parse_reduction(str(reduction));
  Prepared pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  Tensor loss;
  Grads g = hinge_backward_impl(pr, nullptr, margin, eps, red, &loss);
  return {loss, std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g)};
}

}  // namespace cpu
}  // namespace lrml
