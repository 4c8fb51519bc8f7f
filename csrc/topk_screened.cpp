// lrml_ext::topk_screened: exact full-catalogue top-k on the GEMM formulation, written with ATen
// ops only, so the same code runs on CPU tensors (tests) and CUDA tensors (the cuda backend's
// topk: cuBLAS GEMMs). Registered under CompositeExplicitAutograd; SPEC.md "Exact top-k from a
// screen" gives the exactness argument, "The GEMM screen (the cuda backend)" its arithmetic.
//
// Per chunk of users (l2, squared_l2):
//   1. Screen. The logits of every (user, item, slot) are one GEMM [chunk·N, d] × [d, I] of
//      p ⊙ K_n and Q, p·q a second [chunk, d] × [d, I]; softmax over the N slots; the rewrite
//      ‖e‖² = ‖p‖² + ‖q‖² − 2p·q + 2a·(Mp) − 2a·(Mq) + aᵀ(MMᵀ)a with aᵀ(MMᵀ) a third (batched)
//      GEMM. The GEMM operands are rounded to tf32 (bf16 on CPU tensors when oneDNN's fp32
//      matmul precision is bf16), so whatever cuBLAS does with fp32 inputs its products are
//      exact and only the fp32 accumulation errs; the screened value minus the error bound δ is
//      a lower bound lo.
//   2. The KC smallest (lo, id) per user by one at::topk on the key bits(lo) << 32 | id
//      (excluded items never enter), and the smallest lower bound not kept.
//   3. The KC candidates re-scored by the pair distances op lrml_ext::distances (the CUDA
//      kernel on CUDA tensors, the CPU kernel on CPU tensors); the k smallest (D̂, id); certified
//      when the k-th D̂ is below the smallest dropped lower bound.
//   4. Uncertified users, l1 (no rewrite) and k with KC > 256 take the direct path: every item by
//      the pair distances op, selected by at::topk on the same kind of (distance, id) key.
//
// Roofline (Netflix: U = 480,189, I = 17,770, d = 100, N = 20, k = 10, KC = 32; H200). GEMMs:
// logits 2·U·I·N·d = 3.4e13 FLOP, p·q 1.7e12, (MMᵀ)a 6.8e12: ~0.8 s as fp32 SIMT (~55 TFLOP/s
// achieved), ~0.15 s where the tf32 flag lets cuBLAS use tensor cores. Memory: the [chunk, N, I]
// fp32 arrays (1.42 MB per user) are written and read ~15 times (GEMM out, softmax, 2(Mp − Mq),
// tf32 rounding, batched GEMM, a ⊙ t, sum over N): ~21 MB per user, 10 TB, ~2.9 s at ~3.5 TB/s;
// the [chunk, I] bound arithmetic and the int64 keys' at::topk add ~0.5 s, the KC re-scores
// ~15M pairs (~10 ms). Expected ~4-4.5 s for all users (l2 / squared_l2), plus ~3,000 chunks of
// ~50 launches and a few host syncs each, against 20.4 s for the eager baseline. The working set
// is what limits it: a fused kernel (the Triton screen) never writes [N, I] to memory.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"

namespace lrml {
namespace {

using at::Tensor;

constexpr int64_t kEmptyKey = std::numeric_limits<int64_t>::max();
constexpr int64_t kMaxCandidates = 256;
// Working set of one chunk of the screen, and elements of one chunk of the direct path.
constexpr int64_t kScreenChunkBytes = int64_t(1) << 30;
constexpr int64_t kDirectChunkElements = int64_t(1) << 24;

// The checked call.
struct Call {
  Params p;
  Tensor users;            // [B] int64
  Tensor indptr, indices;  // exclusion CSR (undefined without one)
  Distance dist = Distance::L2;
  c10::string_view distance;
  double eps = 0;
  int64_t B = 0, kk = 0;  // kk = min(k, I)
};

// The pair distances op through the dispatcher: D [B, C] in the parameter dtype.
Tensor pair_distances(const Call& c, const Tensor& users, const Tensor& items) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lrml_ext::distances", "")
          .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&, const Tensor&, c10::string_view, c10::string_view, double,
                        bool)>();
  return op.call(c.p.P, c.p.Q, c.p.K, c.p.M, users, items, c.distance, "pair", c.eps, false);
}

// The values ranked: fp64 for fp64 parameters, else fp32 (fp16/bf16 distances exactly).
Tensor rank_values(const Tensor& D) {
  return D.scalar_type() == at::kDouble ? D : D.to(at::kFloat);
}

// v >= 0 or NaN with bit patterns that order like the values: -0.0 made +0.0 and every NaN
// positive (a NaN with its sign bit set, as x86 arithmetic makes, is a negative integer).
Tensor monotone(const Tensor& v) { return v.add(0.0).masked_fill_(v.isnan(), NAN); }

// [n, C] int64 keys (bits(v) << 32) | id of fp32 values v >= 0 (or NaN, after +inf): at::topk
// on them orders by (v, id) exactly.
Tensor packed_keys(const Tensor& v, const Tensor& ids) {
  Tensor bits = monotone(v).view(at::kInt).to(at::kLong);
  return at::bitwise_or(at::bitwise_left_shift(bits, 32), ids);
}

// The kk smallest (value, id) per row of rank [R, C] (fp32 or fp64, >= 0), ascending; ids < 0
// mark empty slots, never chosen (-1 / +inf where a row has fewer than kk). fp32: one at::topk
// on packed keys. fp64: two passes, the kk-th value (at::topk on the monotone bits), then the
// items below it and the smallest ids at it, ordered among themselves.
std::tuple<Tensor, Tensor> select_smallest(const Tensor& rank, const Tensor& ids, int64_t kk) {
  const Tensor empty = ids.lt(0);
  if (rank.scalar_type() == at::kFloat) {
    Tensor key = packed_keys(rank, ids.clamp_min(0)).masked_fill_(empty, kEmptyKey);
    Tensor top = std::get<0>(at::topk(key, kk, 1, /*largest=*/false, /*sorted=*/true));
    Tensor gone = top.eq(kEmptyKey);
    Tensor out_i = at::bitwise_and(top, int64_t(0xFFFFFFFF)).masked_fill_(gone, -1);
    Tensor out_d = at::bitwise_right_shift(top, 32).to(at::kInt).view(at::kFloat);
    return {out_d.masked_fill(gone, INFINITY), out_i};
  }
  Tensor r = monotone(rank).view(at::kLong).masked_fill(empty, kEmptyKey);
  Tensor thr = std::get<0>(at::topk(r, kk, 1, false, true)).narrow(1, kk - 1, 1);
  Tensor at_thr = at::where(r.eq(thr).logical_and(empty.logical_not()), ids, kEmptyKey);
  Tensor sel = std::get<1>(at::topk(at::where(r.lt(thr), -1, at_thr), kk, 1, false, false));
  Tensor sr = r.gather(1, sel), si = ids.gather(1, sel);
  Tensor by_id = std::get<1>(at::sort(si, 1));  // ids are distinct, -1s go last by value below
  sr = sr.gather(1, by_id);
  si = si.gather(1, by_id);
  Tensor by_value = std::get<1>(at::sort(sr, /*stable=*/true, 1, /*descending=*/false));
  sr = sr.gather(1, by_value);
  si = si.gather(1, by_value);
  Tensor gone = sr.eq(kEmptyKey);
  return {sr.view(at::kDouble).masked_fill(gone, INFINITY), si.masked_fill(gone, -1)};
}

// [n, I] bool: row j marks the items the CSR excludes for user row rows[j] ([n] int64).
Tensor excluded_items(const Call& c, const Tensor& rows) {
  const int64_t n = rows.size(0), I = c.p.I;
  Tensor mask = at::zeros({n, I}, rows.options().dtype(at::kBool));
  Tensor begin = c.indptr.index_select(0, rows);
  Tensor counts = c.indptr.index_select(0, rows + 1) - begin;
  const int64_t total = counts.sum().item<int64_t>();
  if (total == 0) return mask;
  Tensor which = at::repeat_interleave(at::arange(n, rows.options()), counts, 0, total);
  Tensor first = at::cumsum(counts, 0) - counts;        // where each row's entries start
  Tensor pos = at::arange(total, rows.options()) - first.index_select(0, which) +
               begin.index_select(0, which);
  mask.index_put_({which, c.indices.index_select(0, pos)}, true);
  return mask;
}

// Direct path for the user rows `rows` [m]: every item by the pair distances op, the kk smallest
// (D̂, id) written into rows `rows` of out_rank / out_i [B, kk].
void topk_direct(const Call& c, const Tensor& rows, Tensor& out_rank, Tensor& out_i) {
  const int64_t m = rows.size(0), I = c.p.I;
  const int64_t chunk = std::max<int64_t>(1, kDirectChunkElements / I);
  Tensor all_items = at::arange(I, rows.options()).expand({std::min(chunk, m), I}).contiguous();
  for (int64_t s = 0; s < m; s += chunk) {
    const int64_t nb = std::min(chunk, m - s);
    Tensor r = rows.narrow(0, s, nb);
    Tensor items = all_items.narrow(0, 0, nb);
    Tensor D = pair_distances(c, c.users.index_select(0, r), items);
    Tensor ids = c.indptr.defined() ? items.masked_fill(excluded_items(c, r), -1) : items;
    auto [dd, ii] = select_smallest(rank_values(D), ids, c.kk);
    out_rank.index_copy_(0, r, dd);
    out_i.index_copy_(0, r, ii);
  }
}

// Per-call operands of the screen (SPEC.md, "The GEMM screen"): GEMM operands rounded to the
// screen precision, fp64-derived norms rounded up, the bound's constants.
struct Screen {
  bool bf16 = false;
  Tensor QrT;     // [d, I] fp32: Qᵀ rounded to the screen precision
  Tensor MQ2;     // [N, I] fp32: 2 M qᵢ
  Tensor Gr;      // [N, N] fp32: M Mᵀ, rounded
  Tensor Kf, Kd;  // [N, d] fp32 / fp64 keys
  Tensor Md;      // [N, d] fp64 memory
  Tensor qn, qq;  // [I] fp32: ‖q‖₂ rounded up, ‖q‖²
  double mu = 0, muc = 0, c_z = 0, c_r = 0;
};

// fp32 x rounded to tf32 (10 mantissa bits, ties away, as the Triton screen) or bf16.
Tensor round_operand(const Tensor& x, bool bf16) {
  if (bf16) return x.to(at::kBFloat16).to(at::kFloat);
  return x.contiguous().view(at::kInt).add(0x1000).bitwise_and_(-8192).view(at::kFloat);
}

// fp64 -> fp32 rounded up (norms used as bounds).
Tensor round_up(const Tensor& x) { return (x * (1 + std::ldexp(1.0, -22))).to(at::kFloat); }

Screen prepare_screen(const Call& c) {
  Screen s;
  // cuBLAS runs fp32 GEMMs in fp32 or tf32 only (torch's CUDA matmul precision is "ieee" or
  // "tf32", "medium" included): tf32 operands are exact under both. oneDNN may run them in bf16
  // on CPU tensors (its matmul precision "bf16", which "medium" sets): round to bf16 there.
  const auto onednn = at::globalContext().float32Precision(at::Float32Backend::MKLDNN,
                                                           at::Float32Op::MATMUL);
  s.bf16 = !c.p.Q.is_cuda() && onednn == at::Float32Precision::BF16;
  const int64_t N = c.p.N, d = c.p.d;
  Tensor Qd = c.p.Q.to(at::kDouble);
  s.Kd = c.p.K.to(at::kDouble);
  s.Md = c.p.M.to(at::kDouble);
  s.Kf = c.p.K.to(at::kFloat);
  s.QrT = round_operand(c.p.Q.to(at::kFloat), s.bf16).t();
  s.MQ2 = at::mm(s.Md, Qd.t()).mul_(2.0).to(at::kFloat);
  s.Gr = round_operand(at::mm(s.Md, s.Md.t()).to(at::kFloat), s.bf16);
  s.qn = round_up(Qd.norm(2, 1));
  s.qq = (Qd * Qd).sum(1).to(at::kFloat);
  const double up = 1 + std::ldexp(1.0, -22);
  Tensor Mc = s.Md - s.Md.mean(0, true);  // Σ Δa = 0: a change of a moves r by Σ Δa_n (M_n − M̄)
  s.mu = s.Md.norm(2, 1).max().item<double>() * up;
  s.muc = Mc.norm(2, 1).max().item<double>() * up;
  const double g = static_cast<double>(d + N + 32) * std::ldexp(1.0, -23);
  const double u = s.bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  s.c_z = 2.25 * u + 4 * g;
  s.c_r = s.c_z + 4 * g;
  return s;
}

// [n, I] fp32 lower bounds lo(u, i) <= D̂(u, i), >= 0, of the users us [n] (l2 / squared_l2).
Tensor screen_lower_bounds(const Call& c, const Screen& s, const Tensor& us) {
  const int64_t n = us.size(0), N = c.p.N, d = c.p.d, I = c.p.I;
  Tensor Pd = c.p.P.index_select(0, us).to(at::kDouble);  // [n, d]
  Tensor Pf = Pd.to(at::kFloat);
  Tensor pK = round_operand((Pf.unsqueeze(1) * s.Kf.unsqueeze(0)).reshape({n * N, d}), s.bf16);
  Tensor a = at::softmax(at::mm(pK, s.QrT).view({n, N, I}), 1);  // [n, N, I]
  Tensor pq = at::mm(round_operand(Pf, s.bf16), s.QrT);         // [n, I]
  // Σ_n a_n t_n with t = 2(Mp − Mq) + (MMᵀ) a (a batched GEMM accumulating into t):
  // 2a·(Mp) − 2a·(Mq) + aᵀ(MMᵀ)a.
  Tensor Mp2 = at::mm(Pd, s.Md.t()).mul_(2.0).to(at::kFloat);  // [n, N]
  Tensor t = Mp2.unsqueeze(2) - s.MQ2;                          // [n, N, I]
  t.baddbmm_(s.Gr.expand({n, N, N}), round_operand(a, s.bf16)).mul_(a);
  Tensor pp = (Pd * Pd).sum(1).to(at::kFloat);
  Tensor x = t.sum(1).add_(pp.unsqueeze(1)).add_(s.qq.unsqueeze(0)).sub_(pq, 2.0);  // ‖e‖²
  // δ = 2 √(max(x, 0) + c_r R²) ρ + ρ² + c_r R², ρ = μ_c (c_z κ ‖q‖ + c_r), R = ‖p‖ + ‖q‖ + μ.
  Tensor p_norm = round_up(Pd.norm(2, 1));
  Tensor kappa = round_up(at::mm(Pd * Pd, (s.Kd * s.Kd).t()).amax(1).sqrt());
  Tensor rho = (kappa.unsqueeze(1) * s.qn.unsqueeze(0)).mul_(s.c_z).add_(s.c_r).mul_(s.muc);
  Tensor err = (p_norm.unsqueeze(1) + s.qn.unsqueeze(0)).add_(s.mu).square_().mul_(s.c_r);
  Tensor delta = x.clamp_min(0).add_(err).sqrt_().mul_(rho).mul_(2.0).add_(rho.square()).add_(err);
  Tensor lo = x.sub_(delta);
  if (c.dist == Distance::L2) {
    lo = lo.clamp_min_(0).add_(c.eps).sqrt_().mul_(1 - std::ldexp(1.0, -20));
  }
  return lo.clamp_min_(0).add_(0.0);
}

// Screen, re-score, select and certify every user; returns the users that failed the certificate.
Tensor topk_screen(const Call& c, int64_t kc, Tensor& out_rank, Tensor& out_i) {
  const int64_t B = c.B, I = c.p.I, N = c.p.N;
  const Screen s = prepare_screen(c);
  // Per user: ~4 live [N, I] fp32 arrays, ~12 [I] fp32, the int64 key and the exclusion mask.
  const int64_t per_user = I * (16 * N + 64);
  const int64_t chunk = std::max<int64_t>(1, kScreenChunkBytes / per_user);
  const int64_t kept = std::min(kc, I);
  Tensor item_ids = at::arange(I, c.users.options());
  Tensor failed = at::zeros({B}, c.users.options().dtype(at::kBool));
  for (int64_t start = 0; start < B; start += chunk) {
    const int64_t n = std::min(chunk, B - start);
    Tensor rows = at::arange(start, start + n, c.users.options());
    Tensor us = c.users.narrow(0, start, n);
    Tensor key = packed_keys(screen_lower_bounds(c, s, us), item_ids.expand({n, I}));
    if (c.indptr.defined()) key.masked_fill_(excluded_items(c, rows), kEmptyKey);
    Tensor top = std::get<0>(at::topk(key, std::min(kc + 1, I), 1, false, true));
    Tensor cand = top.narrow(1, 0, kept);
    Tensor drop = I > kc ? top.select(1, kc) : at::full({n}, kEmptyKey, top.options());
    Tensor ids = at::where(cand.eq(kEmptyKey), -1, at::bitwise_and(cand, int64_t(0xFFFFFFFF)));
    Tensor D = pair_distances(c, us, ids.clamp_min(0));
    auto [dd, ii] = select_smallest(rank_values(D), ids, c.kk);
    // The smallest dropped lower bound, rounded as the ranked values are (monotone: lo <= D̂
    // survives it).
    Tensor lo = at::bitwise_right_shift(drop, 32).to(at::kInt).view(at::kFloat);
    lo = lo.to(D.scalar_type()).to(dd.scalar_type());
    Tensor good = drop.eq(kEmptyKey).logical_or(
        ii.select(1, c.kk - 1).ge(0).logical_and(dd.select(1, c.kk - 1).lt(lo)));
    out_rank.narrow(0, start, n).copy_(dd);
    out_i.narrow(0, start, n).copy_(ii);
    failed.narrow(0, start, n).copy_(good.logical_not());
  }
  return failed;
}

int64_t candidates_for(int64_t k) {
  int64_t kc = 16;
  while (kc < std::max(2 * k, k + 16)) kc *= 2;
  return kc;
}

// (distances [B, k] in the parameter dtype, ids int64 [B, k], fallback bool [B]: the users the
// direct path computed). `candidates`: the candidate list length KC, 0 for the default
// max(16, next_pow2(max(2k, k + 16))); the screen runs for l2 / squared_l2 with KC <= 256.
std::tuple<Tensor, Tensor, Tensor> topk_screened(
    const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys, const Tensor& memory,
    const Tensor& users, int64_t k, const std::optional<Tensor>& exclude_indptr,
    const std::optional<Tensor>& exclude_indices, c10::string_view distance, double eps,
    int64_t candidates) {
  Call c;
  c.dist = parse_distance(str(distance));
  c.distance = distance;
  c.eps = eps;
  check_eps(eps);
  TORCH_CHECK_VALUE(k >= 1, "k must be at least 1, got ", k);
  TORCH_CHECK_VALUE(candidates == 0 || candidates >= k,
                    "candidates must be 0 (the default) or at least k = ", k, ", got ",
                    candidates);
  const c10::DeviceType type = user_emb.device().type();
  const std::string backend = c10::DeviceTypeName(type, /*lower_case=*/true);
  if (type == c10::DeviceType::CUDA) {
    c.p = check_params(user_emb, item_emb, keys, memory, type,
                       {at::kFloat, at::kHalf, at::kBFloat16}, backend.c_str());
  } else {
    c.p = check_params(user_emb, item_emb, keys, memory, type, {at::kFloat, at::kDouble},
                       backend.c_str());
  }
  c.users = check_index("users", users, 1, c.p.P.device());
  check_index_range("users", c.users, c.p.U);
  const int64_t B = c.users.size(0), I = c.p.I;
  c.B = B;
  TORCH_CHECK_VALUE(exclude_indptr.has_value() == exclude_indices.has_value(),
                    "exclude must be None or a CSR pair (indptr [B+1], indices)");
  if (exclude_indptr.has_value()) {
    c.indptr = check_index("exclude indptr", *exclude_indptr, 1, c.p.P.device());
    c.indices = check_index("exclude indices", *exclude_indices, 1, c.p.P.device());
    TORCH_CHECK_VALUE(c.indptr.size(0) == B + 1, "exclude indptr has ", c.indptr.size(0),
                      " entries but users has ", B, " rows: it must have B + 1 = ", B + 1);
    Tensor ends = at::stack({c.indptr[0], c.indptr[B]}).cpu();
    TORCH_CHECK_VALUE(ends[0].item<int64_t>() == 0 && ends[1].item<int64_t>() == c.indices.size(0),
                      "exclude indptr must start at 0 and end at len(indices) = ",
                      c.indices.size(0));
    if (B > 0) {
      TORCH_CHECK_VALUE(!c.indptr.narrow(0, 1, B).lt(c.indptr.narrow(0, 0, B)).any().item<bool>(),
                        "exclude indptr must be non-decreasing");
    }
    check_index_range("exclude indices", c.indices, I);
  }
  // The pair distances op below is called for its CPU / CUDA kernel, not its autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto dt = c.p.P.scalar_type();
  Tensor out_d = at::full({B, k}, INFINITY, c.p.P.options());
  Tensor out_i = at::full({B, k}, -1, c.users.options());
  Tensor fallback = at::zeros({B}, c.users.options().dtype(at::kBool));
  if (B == 0 || I == 0) return {out_d, out_i, fallback};
  c.kk = std::min(k, I);
  const int64_t kc = candidates > 0 ? candidates : candidates_for(k);
  const auto rank_dtype = dt == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out_rank = at::empty({B, c.kk}, c.p.P.options().dtype(rank_dtype));
  Tensor top_i = at::empty({B, c.kk}, c.users.options());
  if (c.dist != Distance::L1 && kc <= kMaxCandidates) {
    fallback = topk_screen(c, kc, out_rank, top_i);
  } else {
    fallback.fill_(true);
  }
  Tensor rows = at::nonzero(fallback).select(1, 0);
  if (rows.size(0) > 0) topk_direct(c, rows, out_rank, top_i);
  out_d.narrow(1, 0, c.kk).copy_(out_rank);
  out_i.narrow(1, 0, c.kk).copy_(top_i);
  return {out_d, out_i, fallback};
}

}  // namespace
}  // namespace lrml

TORCH_LIBRARY_IMPL(lrml_ext, CompositeExplicitAutograd, m) {
  m.impl("topk_screened", &lrml::topk_screened);
}
