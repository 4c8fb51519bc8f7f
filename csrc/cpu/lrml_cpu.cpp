// CPU kernels of the fused LRML distances and hinge loss, forward and backward (SPEC.md).
//
// The rows of the batch are cut into fixed blocks (their number depends on B only) and each block
// into tiles of a few rows: every tile gathers its user and item rows and runs the attention as
// small register-blocked GEMMs over all its pairs at once (tile_gemm.h):
//   forward   Z = S Kᵀ, A = softmax(Z), R = A M, E = P + R − Q, D(E)
//   backward  GA = GR Mᵀ, GZ = A ⊙ (GA − ⟨A, GA⟩), gM += Aᵀ GR, gK += GZᵀ S, GS = GZ K
// with S = P ⊙ Q the tile's [pairs, d] joint embeddings, K, M (and Kᵀ, Mᵀ) padded once per call
// to whole SIMD vectors and kept in cache. For the gradients, the hinge's ∂L/∂D and the backward
// run right after the forward of the tile, while its rows are hot (one fused pass); pairs with a
// zero upstream gradient (inactive hinge terms) are dropped from the backward GEMMs where that
// drops nothing but zeros (D, K and M finite). With relation="shared" only column 0 of a row
// goes through the attention.
//
// Per-row embedding gradients are written once, contiguous ([B, d], [B, C, d]); the keys/memory
// gradients accumulate in per-block partials (blocks and tiles do not depend on the thread count;
// threads take blocks from a shared counter) that are summed in a fixed order, so the result is
// bitwise reproducible with any number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "kernels.h"
#include "memory_operands.h"
#include "ops_cpu.h"
#include "tile_gemm.h"

namespace lrml {
namespace cpu {
namespace {

// Row blocks: at most 32 keys/memory partials (2 x N x d each), summed in the calling thread at
// the end (with 64, that serial sum cost ~3% of a B = 4096 x 5 fwd+bwd on 2 threads).
constexpr int64_t kMaxBlocks = 32;
constexpr int64_t kMinRowsPerBlock = 16;
constexpr int64_t kTilePairs = 90;         // attention pairs per tile (pair mode: rows x C)
constexpr int64_t kSharedTileRows = 32;    // rows per tile with relation="shared"
constexpr int64_t kStreamBytes = 4 << 20;  // gradient rows at least this large: streaming stores

const std::initializer_list<at::ScalarType> kDtypes = {at::kFloat, at::kDouble, at::kHalf,
                                                       at::kBFloat16};

// T: the compute dtype; S: the parameters' (storage) dtype, T itself or, for T = float, fp16 or
// bf16. Half-precision rows are converted to T as a tile gathers them and the gradient rows
// rounded to S (to nearest) as it writes them; K and M are converted once per call.
template <typename T, typename S = T>
struct Job {
  const S *P = nullptr, *Q = nullptr, *K = nullptr, *M = nullptr;
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
  S* gp_rows = nullptr;  // [B, d]
  S* gq_rows = nullptr;  // [B, C, d]
  bool grads = false;    // backward wanted (the row buffers are null when B = 0)
  bool stream = false;   // write the rows with non-temporal stores (outputs larger than cache)
};

// dst[0:n] = src[0:n] with non-temporal stores where the CPU has them: the gradient rows are
// written once and not read again by the kernel, so they need not take cache lines (nor be read
// for ownership). The caller fences (stream_fence) before the data is used.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n) {
  char* d = reinterpret_cast<char*>(dst);
  const char* s = reinterpret_cast<const char*>(src);
  size_t bytes = static_cast<size_t>(n) * sizeof(T);
#if defined(__AVX__)
  size_t head = (32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31;
  head = std::min(head, bytes);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= 32; bytes -= 32, d += 32, s += 32)
    _mm256_stream_ps(reinterpret_cast<float*>(d), _mm256_loadu_ps(reinterpret_cast<const float*>(s)));
#endif
  std::memcpy(d, s, bytes);
}

inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Per-thread tile buffers. Rows are dp (or Np) apart; the padding columns start at zero and the
// element-wise loops never write them (the GEMMs may, only into padding of their outputs).
template <typename T>
struct Tile {
  Tensor buf;
  std::vector<int64_t> act, slot;
  std::vector<const T*> prow, qrow;
  // shared: a row's columns with a gradient: their item rows, coefficients, the rows their ge
  // goes to and whether negated (shared_group_grads)
  std::vector<const T*> gcol;
  std::vector<T> gcoef;
  std::vector<T*> gout;
  std::unique_ptr<bool[]> gneg;
  T *S, *A, *R, *E, *GR, *GA, *GS, *Ac, *Sc, *Dc, *g, *Gq, *Gp;
  T *Pc = nullptr, *Qc = nullptr;  // half-precision tables: the tile's rows in T, dp apart
  Tile(int64_t rows, int64_t C, int64_t Ta, bool pair, int64_t dp, int64_t Np,
       const at::TensorOptions& opts, bool convert_rows)
      : act(Ta),
        slot(rows * C),
        prow(rows),
        qrow(rows * C),
        gcol(C),
        gcoef(C),
        gout(C),
        gneg(new bool[C]) {
    const int64_t Tc = rows * C;
    const int64_t Dsz = round_up(Tc, 16);
    const int64_t Esz = pair ? 0 : rows * dp;  // pair: E (then ge) in place of R; shared: ge_0
    const int64_t Csz = convert_rows ? round_up(rows * dp, 16) + Tc * dp : 0;
    const int64_t n = 5 * Ta * dp + 3 * Ta * Np + Esz + 2 * Dsz + round_up(Tc * dp, 16) +
                      round_up(rows * dp, 16) + Csz;
    buf = at::zeros({n}, opts);
    T* x = buf.data_ptr<T>();
    S = x; x += Ta * dp;
    R = x; x += Ta * dp;
    GR = x; x += Ta * dp;
    GS = x; x += Ta * dp;
    Sc = x; x += Ta * dp;
    A = x; x += Ta * Np;
    GA = x; x += Ta * Np;
    Ac = x; x += Ta * Np;
    E = pair ? R : x; x += Esz;
    Dc = x; x += Dsz;
    g = x; x += Dsz;
    Gq = x; x += round_up(Tc * dp, 16);  // the tile's gq rows [Tc, d], as in the output
    Gp = x;                              // and its gp rows [rows, d]
    x += round_up(rows * dp, 16);
    if (convert_rows) {
      Pc = x;
      Qc = x + round_up(rows * dp, 16);
    }
  }
};

// The pieces of D(e) shared by distance_of and shared_group_distances: the term of one vector
// (|x| or x²) and D from the two vector accumulators and the scalar tail (a butterfly sum of the
// lanes; an `omp simd` reduction here compiled to a spill and a chain of scalar adds per call).
template <typename V>
inline V distance_term(V x, bool l1) {
  return l1 ? (x < 0 ? -x : x) : x * x;
}

template <typename T>
inline T distance_from(typename Simd<T>::V a0, typename Simd<T>::V a1, T tail, Distance distance,
                       T eps) {
  using V = typename Simd<T>::V;
  const T acc = allreduce<T>(a0 + a1, [](V x, V y) { return x + y; })[0] + tail;
  return distance == Distance::L2 ? std::sqrt(acc + eps) : acc;
}

// D(e) over d entries: two vector accumulators, a scalar tail.
template <typename T>
inline T distance_of(const T* __restrict e, int64_t d, Distance distance, T eps) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const bool l1 = distance == Distance::L1;
  V a0 = V{}, a1 = V{};
  int64_t j = 0;
  for (; j + 2 * W <= d; j += 2 * W) {
    a0 += distance_term(S::load(e + j), l1);
    a1 += distance_term(S::load(e + j + W), l1);
  }
  if (j + W <= d) {
    a0 += distance_term(S::load(e + j), l1);
    j += W;
  }
  T tail = 0;
  for (; j < d; ++j) tail += l1 ? std::abs(e[j]) : e[j] * e[j];
  return distance_from(a0, a1, tail, distance, eps);
}

// Relation "shared": the columns of one row share p + r, so their residuals e_c = (p + r) − q_c
// are formed a group of columns at a time, p + r loaded once per vector, and never stored: the
// distances need only their sums, and the gradient pass forms them again from the rows in L1
// (one residual pass and one gradient pass over d, not five passes each).
#if defined(__AVX512VL__)
constexpr int kMaxGroup = 8;  // 2 accumulators a column: 16 of the 32 vector registers
#else
constexpr int kMaxGroup = 4;
#endif

template <typename F>
inline void with_group_size(int n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
#if defined(__AVX512VL__)
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
#endif
    default: break;
  }
}

// D[g] = D(pr − q[g]) for G columns, pr = p + r: distance_of's arithmetic on residuals formed in
// registers (fp32 results bitwise those of distance_of on the stored residuals here).
template <typename T, int G>
void shared_group_distances(const T* __restrict p, const T* __restrict rv, const T* const* q,
                            int64_t d, Distance distance, T eps, T* D) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const bool l1 = distance == Distance::L1;
  V a0[G], a1[G];
  for (int g = 0; g < G; ++g) a0[g] = a1[g] = V{};
  int64_t j = 0;
  for (; j + 2 * W <= d; j += 2 * W) {
    const V pr0 = S::load(p + j) + S::load(rv + j);
    const V pr1 = S::load(p + j + W) + S::load(rv + j + W);
    for (int g = 0; g < G; ++g) {
      a0[g] += distance_term(pr0 - S::load(q[g] + j), l1);
      a1[g] += distance_term(pr1 - S::load(q[g] + j + W), l1);
    }
  }
  if (j + W <= d) {
    const V pr0 = S::load(p + j) + S::load(rv + j);
    for (int g = 0; g < G; ++g) a0[g] += distance_term(pr0 - S::load(q[g] + j), l1);
    j += W;
  }
  for (int g = 0; g < G; ++g) {
    T tail = 0;
    for (int64_t k = j; k < d; ++k) {
      const T e = p[k] + rv[k] - q[g][k];
      tail += l1 ? std::abs(e) : e * e;
    }
    D[g] = distance_from(a0[g], a1[g], tail, distance, eps);
  }
}

// The residual backward of G columns with gradient: ge_g = coef[g]·e_g (l1: g·sign(e_g), coef
// holding g), e_g = pr − q[g] formed again; ga (+)= Σ_g ge_g in column order (`first`: ga starts
// at 0), and out[g] = −ge_g (an item gradient, final) or ge_g (column 0, kept for its last step).
template <typename T, int G>
void shared_group_grads(const T* __restrict p, const T* __restrict rv, const T* const* q,
                        const T* coef, T* const* out, const bool* negate, int64_t d, bool l1,
                        bool first, T* __restrict ga) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const V zero_v = V{};
  int64_t j = 0;
  for (; j + W <= d; j += W) {
    const V pr = S::load(p + j) + S::load(rv + j);
    V acc = first ? zero_v : S::load(ga + j);
    for (int g = 0; g < G; ++g) {
      const V e = pr - S::load(q[g] + j);
      const V c = S::splat(coef[g]);
      const V ge = l1 ? (e > 0 ? c : (e < 0 ? -c : zero_v)) : c * e;
      acc += ge;
      S::store(out[g] + j, negate[g] ? -ge : ge);
    }
    S::store(ga + j, acc);
  }
  for (; j < d; ++j) {  // the rows of out are d apart: no vector past d
    const T pr = p[j] + rv[j];
    T acc = first ? T(0) : ga[j];
    for (int g = 0; g < G; ++g) {
      const T e = pr - q[g][j];
      const T ge = l1 ? (e > 0 ? coef[g] : (e < 0 ? -coef[g] : T(0))) : coef[g] * e;
      acc += ge;
      out[g][j] = negate[g] ? -ge : ge;
    }
    ga[j] = acc;
  }
}

// Rows of the next tile go into L2 only: a tile's rows and buffers already fill L1, and the next
// tile's lines pulled into it evicted the current tile's (A/B, 1 thread: shared forward -13%).
template <typename T>
inline void prefetch_next_row(const T* x, int64_t d) {
  prefetch_row<0, 2>(x, d);
}

template <typename T, typename S>
void prefetch_rows(const Job<T, S>& job, int64_t b0, int64_t nr) {
  // The tables are large (Netflix users: 192 MB in 4 KB pages): a software prefetch that misses
  // the TLB does not help, so one real load per row walks the page table first. The loads come
  // back to back, so that their page walks and misses overlap (a load to memory holds up
  // retirement: spread among the prefetches, each would stall on its own); then the prefetches
  // of the rows' lines find the translations.
  for (int64_t b = b0; b < b0 + nr; ++b)
    (void)*reinterpret_cast<const volatile S*>(job.P + job.users[b] * job.d);
  for (int64_t b = b0 * job.C; b < (b0 + nr) * job.C; ++b)
    (void)*reinterpret_cast<const volatile S*>(job.Q + job.items[b] * job.d);
  for (int64_t b = b0; b < b0 + nr; ++b) {
    prefetch_next_row(job.P + job.users[b] * job.d, job.d);
    for (int64_t c = 0; c < job.C; ++c)
      prefetch_next_row(job.Q + job.items[b * job.C + c] * job.d, job.d);
  }
}

// One tile: rows [b0, b0 + nr). gK, gM: the block's padded partials [N, dp] (backward only).
template <typename T, typename S>
void process_tile(const Job<T, S>& job, const Memory<T>& mem, int64_t b0, int64_t nr, Tile<T>& w,
                  T* gK, T* gM, int64_t pf_b, int64_t pf_n) {
  constexpr bool kConvert = !std::is_same_v<T, S>;
  // Rows of the next tile [pf_b, pf_b + pf_n) are prefetched in three parts spread over this
  // tile's work (a burst of hundreds of prefetches would stall on the cache's miss buffers).
  auto prefetch_part = [&](int64_t k) {
    const int64_t lo = pf_b + pf_n * k / 3, hi = pf_b + pf_n * (k + 1) / 3;
    prefetch_rows(job, lo, hi - lo);
  };
  const int64_t d = job.d, N = job.N, C = job.C, dp = mem.dp, Np = mem.Np;
  const bool pair = job.relation == Relation::Pair;
  const int64_t Tc = nr * C;
  const int64_t Ta = pair ? Tc : nr;  // attention pairs
  // Pair tc's item-gradient row: in the tile's buffer when streaming or converting, else in the
  // output.
  auto gq_row = [&](int64_t tc) -> T* {
    if constexpr (kConvert) {
      return w.Gq + tc * d;
    } else {
      return (job.stream ? w.Gq : job.gq_rows + b0 * C * d) + tc * d;
    }
  };
  auto gp_row = [&](int64_t r) -> T* {
    if constexpr (kConvert) {
      return w.Gp + r * d;
    } else {
      return (job.stream ? w.Gp : job.gp_rows + b0 * d) + r * d;
    }
  };
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t b = b0 + r;
    if constexpr (kConvert) {
      convert(w.Pc + r * dp, job.P + job.users[b] * d, d);
      w.prow[r] = w.Pc + r * dp;
      for (int64_t c = 0; c < C; ++c) {
        T* q = w.Qc + (r * C + c) * dp;
        convert(q, job.Q + job.items[b * C + c] * d, d);
        w.qrow[r * C + c] = q;
      }
    } else {
      w.prow[r] = job.P + job.users[b] * d;
      for (int64_t c = 0; c < C; ++c) w.qrow[r * C + c] = job.Q + job.items[b * C + c] * d;
    }
  }

  // ---- forward. Attention pair t: row t / C, column t % C (pair) or row t, column 0 (shared).
  for (int64_t t = 0; t < Ta; ++t) {
    const T* __restrict p = w.prow[pair ? t / C : t];
    const T* __restrict q = w.qrow[pair ? t : t * C];
    T* __restrict s = w.S + t * dp;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) s[j] = p[j] * q[j];
  }
  prefetch_part(0);
  gemm<T, false>(Ta, Np, d, w.S, dp, 1, mem.Kt, Np, w.A, Np);  // Z = S Kᵀ
  softmax_rows(w.A, Ta, N, Np);
  prefetch_part(1);
  gemm<T, false>(Ta, dp, N, w.A, Np, 1, mem.Mp, dp, w.R, dp);  // R = A M
  // ---- row by row, while the row's rows are in L1: e = p + r − q and D(e); the hinge; with
  // gradients, ∂L/∂D (g) and the residual backward: ge = g ∂D/∂e for the pairs with g != 0, and
  // the relation gradients GR of the attention pairs that receive one, compacted (act: their pair
  // index). Pair: e, then ge, in place of R. Shared: e formed from the rows when needed (see
  // shared_group_distances); the item gradients of columns >= 1 (gq = −ge, no attention through
  // them) are final here, and column 0's ge is kept in E.
  int64_t na = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const T* __restrict p = w.prow[r];
    const T* const* qr = w.qrow.data() + r * C;
    if (pair) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t tc = r * C + c;
        const T* __restrict q = qr[c];
        const T* rv = w.R + tc * dp;
        T* e = w.E + tc * dp;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) e[j] = p[j] + rv[j] - q[j];
        w.Dc[tc] = distance_of(e, d, job.distance, job.eps);
      }
    } else {
      for (int64_t c0 = 0; c0 < C; c0 += kMaxGroup) {
        with_group_size(static_cast<int>(std::min<int64_t>(kMaxGroup, C - c0)), [&](auto G) {
          shared_group_distances<T, G()>(p, w.R + r * dp, qr + c0, d, job.distance, job.eps,
                                         w.Dc + r * C + c0);
        });
      }
    }
    T* gr = w.g + r * C;
    if (job.hinge) {
      const T* Dr = w.Dc + r * C;
      const T base = job.margin + Dr[0];
      T L = 0;
      int64_t n_active = 0;
      for (int64_t c = 1; c < C; ++c) {
        const T h = base - Dr[c];
        // active unless h <= 0: a NaN term (a NaN distance) makes the loss NaN and passes its
        // gradient, as relu(NaN) does in the reference (torch's relu backward is 0 only where
        // h <= 0)
        const bool active = !(h <= 0);
        gr[c] = active ? T(1) : T(0);
        if (active) {
          L += h;
          ++n_active;
        }
      }
      gr[0] = static_cast<T>(n_active);
      if (job.L_out) job.L_out[b0 + r] = L;
    }
    if (!job.grads) continue;

    if (job.gD) {
      std::copy(job.gD + (b0 + r) * C, job.gD + (b0 + r + 1) * C, gr);
    } else {
      const T wb = job.w_rows ? job.w_rows[b0 + r] : job.w_scalar;
      // an inactive term's gradient is 0 whatever wb is (relu's backward), not 0 · inf = NaN
      gr[0] = gr[0] != T(0) ? wb * gr[0] : T(0);
      for (int64_t c = 1; c < C; ++c) gr[c] = gr[c] != T(0) ? -wb : T(0);
    }
    const bool l1 = job.distance == Distance::L1;
    int64_t n_act = 0;  // shared: the row's columns with a gradient
    for (int64_t c = 0; c < C; ++c) {
      const int64_t tc = r * C + c;
      const T g = gr[c];
      w.slot[tc] = -1;
      // A zero upstream gradient is dropped, unless D is NaN or ±inf or K or M is: there the
      // reference's chain rule gives 0 · NaN or 0 · inf = NaN in the pair's gradients.
      if (g == T(0) && mem.finite && std::isfinite(w.Dc[tc])) {
        if (!pair && c > 0) zero(gq_row(tc), d);
        continue;
      }
      const T coef = l1 ? g : job.distance == Distance::L2 ? g / w.Dc[tc] : 2 * g;
      if (pair) {
        T* e = w.E + tc * dp;
        if (l1) {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) e[j] = e[j] > 0 ? g : (e[j] < 0 ? -g : T(0));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) e[j] = coef * e[j];
        }
        w.slot[tc] = na;
        w.act[na++] = tc;
      } else {
        w.gcol[n_act] = qr[c];
        w.gcoef[n_act] = coef;
        w.gout[n_act] = c > 0 ? gq_row(tc) : w.E + r * dp;
        w.gneg[n_act++] = c > 0;
      }
    }
    if (!pair && n_act > 0) {
      T* ga = w.GR + na * dp;
      for (int64_t k0 = 0; k0 < n_act; k0 += kMaxGroup) {
        with_group_size(static_cast<int>(std::min<int64_t>(kMaxGroup, n_act - k0)), [&](auto G) {
          shared_group_grads<T, G()>(p, w.R + r * dp, w.gcol.data() + k0, w.gcoef.data() + k0,
                                     w.gout.data() + k0, w.gneg.get() + k0, d, l1, k0 == 0, ga);
        });
      }
      w.slot[r * C] = na;
      w.act[na++] = r;
    }
  }
  prefetch_part(2);
  if (job.D_out) std::copy(w.Dc, w.Dc + Tc, job.D_out + b0 * C);
  if (!job.grads) return;

  // ---- attention backward of the active attention pairs
  if (na > 0) {
    const T* Aa = w.A;
    const T* Sa = w.S;
    const T* GR = (pair && na == Ta) ? w.E : w.GR;  // pair, all active: ge in place is GR
    if (na < Ta) {  // compact A and S (and, pair, GR) to the active pairs
      for (int64_t i = 0; i < na; ++i) {
        const int64_t t = w.act[i];
        if (pair) std::copy(w.E + t * dp, w.E + t * dp + d, w.GR + i * dp);
        std::copy(w.A + t * Np, w.A + t * Np + N, w.Ac + i * Np);
        std::copy(w.S + t * dp, w.S + t * dp + d, w.Sc + i * dp);
      }
      Aa = w.Ac;
      Sa = w.Sc;
    }
    gemm<T, false>(na, Np, d, GR, dp, 1, mem.Mt, Np, w.GA, Np);   // GA = GR Mᵀ
    softmax_backward_rows(Aa, w.GA, na, Np);                      // GZ, in place of GA
    gemm<T, true>(N, dp, na, Aa, 1, Np, GR, dp, gM, dp);          // gM += Aᵀ GR
    gemm<T, true>(N, dp, na, w.GA, 1, Np, Sa, dp, gK, dp);        // gK += GZᵀ S
    gemm<T, false>(na, dp, N, w.GA, Np, 1, mem.Kp, dp, w.GS, dp); // GS = GZ K
  }

  // ---- the rows' remaining gradients, each written once: through e = p + r − q and
  // s = p ⊙ q, gp = Σ_c (ge_c + gs_c ⊙ q_c), gq_c = gs_c ⊙ p − ge_c (gs only where attention ran).
  // Shared: only column 0 is left, and Σ_c ge_c is the row's GR.
  for (int64_t r = 0; r < nr; ++r) {
    const T* __restrict p = w.prow[r];
    T* __restrict gp = gp_row(r);
    if (!pair) {
      const int64_t i = w.slot[r * C];
      T* __restrict gq = gq_row(r * C);
      if (i < 0) {  // no pair of the row has a gradient
        zero(gp, d);
        zero(gq, d);
        continue;
      }
      const T* __restrict ga = w.GR + i * dp;
      const T* __restrict gs = w.GS + i * dp;
      const T* __restrict q = w.qrow[r * C];
      const T* __restrict e = w.E + r * dp;
      const bool active = w.g[r * C] != T(0);
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) {
        gp[j] = ga[j] + gs[j] * q[j];
        gq[j] = gs[j] * p[j] - (active ? e[j] : T(0));
      }
      continue;
    }
    for (int64_t j = 0; j < d; ++j) gp[j] = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t tc = r * C + c;
      T* __restrict gq = gq_row(tc);
      const bool active = w.g[tc] != T(0);
      const int64_t i = w.slot[tc];
      const T* __restrict e = w.E + tc * dp;
      if (i >= 0) {
        const T* __restrict q = w.qrow[tc];
        const T* __restrict gs = w.GS + i * dp;
        if (active) {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            gp[j] += e[j] + gs[j] * q[j];
            gq[j] = gs[j] * p[j] - e[j];
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) {
            gp[j] += gs[j] * q[j];
            gq[j] = gs[j] * p[j];
          }
        }
      } else if (active) {
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          gp[j] += e[j];
          gq[j] = -e[j];
        }
      } else {
        zero(gq, d);
      }
    }
  }
  if constexpr (kConvert) {
    convert(job.gq_rows + b0 * C * d, w.Gq, Tc * d);
    convert(job.gp_rows + b0 * d, w.Gp, nr * d);
  } else if (job.stream) {
    stream_copy(job.gq_rows + b0 * C * d, w.Gq, Tc * d);
    stream_copy(job.gp_rows + b0 * d, w.Gp, nr * d);
  }
}

// Runs the rows; with gradients, returns (gK, gM) summed over the row-block partials in order.
template <typename T, typename S>
std::pair<Tensor, Tensor> run(Job<T, S> job, const at::TensorOptions& opts) {
  const int64_t B = job.B, N = job.N, d = job.d, C = job.C;
  const bool grads = job.grads;
  const bool pair = job.relation == Relation::Pair;
  if (B == 0) {  // no rows, no tiles: zero keys/memory gradients
    if (!grads) return {};
    return {at::zeros({N, d}, opts), at::zeros({N, d}, opts)};
  }
  job.stream = grads && std::is_same_v<T, S> &&
               B * C * d * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  Memory<T> mem(job.K, job.M, N, d, opts);
  const int64_t dp = mem.dp, Np = mem.Np;
  const int64_t nblk0 = std::max<int64_t>(
      1, std::min<int64_t>(kMaxBlocks, (B + kMinRowsPerBlock - 1) / kMinRowsPerBlock));
  const int64_t rows = std::max<int64_t>(1, (B + nblk0 - 1) / nblk0);
  const int64_t nblk = std::max<int64_t>(1, (B + rows - 1) / rows);
  const int64_t tile_rows = std::min<int64_t>(
      rows, pair ? std::max<int64_t>(1, kTilePairs / C) : kSharedTileRows);
  const int64_t Ta_max = pair ? tile_rows * C : tile_rows;
  const int64_t nd = N * dp;
  Tensor partials;
  T* part = nullptr;
  if (grads) {
    partials = at::empty({nblk, 2, N, dp}, opts);
    part = partials.data_ptr<T>();
  }
  std::atomic<int64_t> next{0};
  // Threads take blocks from `next` (balanced on a busy machine); what a block computes does not
  // depend on which thread runs it.
  at::parallel_for(0, nblk, 1, [&](int64_t, int64_t) {
    Tile<T> w(tile_rows, C, Ta_max, pair, dp, Np, opts, !std::is_same_v<T, S>);
    auto tiles = [&](int64_t blk) {  // a block's rows [lo, hi) and its number of tiles
      const int64_t lo = blk * rows, hi = std::min(B, lo + rows);
      return std::array<int64_t, 3>{lo, hi, (hi - lo + tile_rows - 1) / tile_rows};
    };
    int64_t blk = next++;
    if (blk < nblk) {
      const auto t = tiles(blk);
      prefetch_rows(job, t[0], (t[1] - t[0]) / t[2]);
    }
    while (blk < nblk) {
      T* gK = grads ? part + blk * 2 * nd : nullptr;
      T* gM = grads ? gK + nd : nullptr;
      if (grads) zero(gK, 2 * nd);
      const auto [lo, hi, ntile] = tiles(blk);
      int64_t nxt = nblk;
      for (int64_t i = 0, b = lo; i < ntile; ++i) {
        const int64_t nr = (hi - b) / (ntile - i);
        // The rows are random reads: prefetch the next tile's, or the first of the next block
        // (claimed now).
        int64_t pf_b = 0, pf_n = 0;
        if (i + 1 < ntile) {
          pf_b = b + nr;
          pf_n = (hi - pf_b) / (ntile - i - 1);
        } else {
          nxt = next++;
          if (nxt < nblk) {
            const auto t = tiles(nxt);
            pf_b = t[0];
            pf_n = (t[1] - t[0]) / t[2];
          }
        }
        process_tile(job, mem, b, nr, w, gK, gM, pf_b, pf_n);
        b += nr;
      }
      blk = nxt;
    }
    if (job.stream) stream_fence();
  });
  if (!grads) return {};
  Tensor gK = at::empty({N, d}, opts);
  Tensor gM = at::empty({N, d}, opts);
  T* ok = gK.data_ptr<T>();
  T* om = gM.data_ptr<T>();
  // Sum of the block partials, block 0 first: the same order for every element and thread count.
  // Small (2 x N x d x blocks adds): in the calling thread unless large, as every parallel region
  // costs a wake-up of the other threads (milliseconds when the cores are busy with other work).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 19) / (nblk * dp));
  at::parallel_for(0, 2 * N, grain, [&](int64_t lo, int64_t hi) {
    std::vector<T> acc(dp);
    for (int64_t x = lo; x < hi; ++x) {  // x < N: keys row x, else memory row x - N
      const T* src = part + (x < N ? x * dp : nd + (x - N) * dp);
      std::copy(src, src + dp, acc.begin());
      for (int64_t blk = 1; blk < nblk; ++blk) {
        const T* pb = src + blk * 2 * nd;
        T* __restrict a = acc.data();
#pragma omp simd
        for (int64_t j = 0; j < dp; ++j) a[j] += pb[j];
      }
      std::copy(acc.begin(), acc.begin() + d, (x < N ? ok + x * d : om + (x - N) * d));
    }
  });
  return {gK, gM};
}

Prepared prepare(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                 const Tensor& memory, const Tensor& users, const Tensor& items,
                 c10::string_view distance, c10::string_view relation, double eps) {
  return lrml::prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps,
                       c10::DeviceType::CPU, kDtypes, "cpu");
}

template <typename T, typename S>
Job<T, S> make_job(const Prepared& pr, double eps) {
  Job<T, S> job;
  job.P = pr.p.P.data_ptr<S>();
  job.Q = pr.p.Q.data_ptr<S>();
  job.K = pr.p.K.data_ptr<S>();
  job.M = pr.p.M.data_ptr<S>();
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

// f(T{}, S{}) for the parameters' dtype S and its compute dtype T (float for fp16 / bf16); the
// dtype was checked by prepare.
template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}, float{}); break;
    case at::kDouble: f(double{}, double{}); break;
    case at::kHalf: f(float{}, c10::Half{}); break;
    case at::kBFloat16: f(float{}, c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "the cpu kernels do not take dtype ", dtype);
  }
}

// The options of the compute dtype of parameters `p` (float for fp16 / bf16).
at::TensorOptions compute_options(const Params& p) {
  const at::ScalarType s = p.P.scalar_type();
  const bool half = s == at::kHalf || s == at::kBFloat16;
  return p.P.options().dtype(half ? at::kFloat : s);
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
  // Built in double, then cast: a finite sum beyond the dtype's range becomes inf, as the
  // reference's sum does (at::scalar_tensor(acc, float) would throw an overflow error instead).
  return at::scalar_tensor(acc, L.options().dtype(at::kDouble)).to(L.scalar_type());
}

// Shared by hinge_loss_backward and hinge_loss_grads. The loss and the gradients in the
// parameters' dtype (the loss and gK, gM of fp16 / bf16 parameters computed in float, then
// rounded, as the float computation's outputs cast to it would be).
Grads hinge_backward_impl(const Prepared& pr, const Tensor* grad, double margin, double eps,
                          Reduction reduction, Tensor* loss_out) {
  const auto opts = pr.p.P.options();
  const auto copts = compute_options(pr.p);
  const int64_t B = pr.b.B, C = pr.b.C, d = pr.p.d;
  Tensor gp_rows = at::empty({B, d}, opts);
  Tensor gq_rows = at::empty({B, C, d}, opts);
  Tensor L = at::empty({B}, copts);
  Tensor w;
  std::pair<Tensor, Tensor> gkm;
  dispatch(pr.p.P.scalar_type(), [&](auto t, auto s) {
    using T = decltype(t);
    using S = decltype(s);
    Job<T, S> job = make_job<T, S>(pr, eps);
    job.hinge = true;
    job.margin = static_cast<T>(margin);
    job.L_out = L.data_ptr<T>();
    double scale = 1.0;
    if (reduction == Reduction::Mean && B > 0) scale = 1.0 / static_cast<double>(B);
    if (grad == nullptr) {
      job.w_scalar = static_cast<T>(scale);
    } else if (reduction == Reduction::None) {
      w = grad->to(copts.dtype()).contiguous();
      job.w_rows = w.data_ptr<T>();
    } else {
      // Same rounding as autograd of L.mean(): grad / B in the compute dtype.
      const T g = grad->to(copts.dtype()).item<T>();
      job.w_scalar = reduction == Reduction::Mean && B > 0 ? g / static_cast<T>(B) : g;
    }
    job.gp_rows = gp_rows.data_ptr<S>();
    job.gq_rows = gq_rows.data_ptr<S>();
    job.grads = true;
    gkm = run(job, copts);
  });
  if (loss_out) *loss_out = reduce_loss(L, reduction).to(opts.dtype());
  return {gp_rows, gq_rows, gkm.first.to(opts.dtype()), gkm.second.to(opts.dtype())};
}

}  // namespace

Tensor distances(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                 const Tensor& memory, const Tensor& users, const Tensor& items,
                 c10::string_view distance, c10::string_view relation, double eps,
                 bool /*sparse_grad*/) {
  Prepared pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  Tensor D = at::empty({pr.b.B, pr.b.C}, compute_options(pr.p));
  dispatch(pr.p.P.scalar_type(), [&](auto t, auto s) {
    using T = decltype(t);
    Job<T, decltype(s)> job = make_job<T, decltype(s)>(pr, eps);
    job.D_out = D.data_ptr<T>();
    run(job, D.options());
  });
  return D.to(pr.p.P.scalar_type());
}

Grads distances_backward(const Tensor& grad, const Tensor& user_emb, const Tensor& item_emb,
                         const Tensor& keys, const Tensor& memory, const Tensor& users,
                         const Tensor& items, c10::string_view distance,
                         c10::string_view relation, double eps) {
  Prepared pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  check_grad_D(grad, pr.b, pr.p);
  const auto opts = pr.p.P.options();
  const auto copts = compute_options(pr.p);
  const int64_t B = pr.b.B, C = pr.b.C, d = pr.p.d;
  Tensor g = grad.to(copts.dtype()).contiguous();
  Tensor gp_rows = at::empty({B, d}, opts);
  Tensor gq_rows = at::empty({B, C, d}, opts);
  std::pair<Tensor, Tensor> gkm;
  dispatch(pr.p.P.scalar_type(), [&](auto t, auto s) {
    using T = decltype(t);
    using S = decltype(s);
    Job<T, S> job = make_job<T, S>(pr, eps);
    job.gD = g.data_ptr<T>();
    job.gp_rows = gp_rows.data_ptr<S>();
    job.gq_rows = gq_rows.data_ptr<S>();
    job.grads = true;
    gkm = run(job, copts);
  });
  return {gp_rows, gq_rows, gkm.first.to(opts.dtype()), gkm.second.to(opts.dtype())};
}

Tensor hinge_loss(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                  const Tensor& memory, const Tensor& users, const Tensor& items, double margin,
                  c10::string_view distance, c10::string_view relation, double eps,
                  c10::string_view reduction, bool /*sparse_grad*/) {
  const Reduction red = parse_reduction(str(reduction));
  Prepared pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  Tensor L = at::empty({pr.b.B}, compute_options(pr.p));
  dispatch(pr.p.P.scalar_type(), [&](auto t, auto s) {
    using T = decltype(t);
    Job<T, decltype(s)> job = make_job<T, decltype(s)>(pr, eps);
    job.hinge = true;
    job.margin = static_cast<T>(margin);
    job.L_out = L.data_ptr<T>();
    run(job, L.options());
  });
  return reduce_loss(L, red).to(pr.p.P.scalar_type());
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
