// Register-blocked small GEMMs for the tiled CPU kernels (lrml_cpu.cpp).
//
// Every product of the LRML attention over a tile of pairs has the form
//     C[m, :] (+)= Σ_k a(m, k) · B[k, :]        m < rows, k < depth
// with B row-major and its rows padded to a whole number of SIMD vectors (zeros in the padding),
// and a(m, k) = A[m·sam + k·sak] read with arbitrary strides (so Aᵀ costs nothing). The
// micro-kernel keeps an MR x NV block of C in vector registers, loads NV vectors of B per k and
// broadcasts MR scalars of A: MR·NV FMAs per MR + NV loads.
//
// The vectors are GCC/Clang vector extensions of 32 bytes (8 floats / 4 doubles): one AVX2 (or
// AVX-512VL ymm) register, two SSE registers elsewhere; -march=native picks the instructions and
// -O3 contracts a·b + c into FMAs. 32 bytes rather than 64: on AMD Zen 4 a 512-bit FMA costs two
// 256-bit ones, and the padding of d = 100 or N = 20 to 8 lanes wastes less than to 16.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

namespace lrml {
namespace cpu {

template <typename T>
struct Simd {
  static constexpr int W = 32 / static_cast<int>(sizeof(T));
  typedef T V __attribute__((vector_size(32)));
  static inline V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  // Broadcast (V{} + x would cost an add: 0 + x is not x for x = -0).
  static inline V splat(T x) { return splat_(x, std::make_index_sequence<W>{}); }
  template <std::size_t... I>
  static inline V splat_(T x, std::index_sequence<I...>) {
    return V{((void)I, x)...};
  }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Register block: 32 vector registers with AVX-512VL (ymm0-31), 16 otherwise.
#if defined(__AVX512VL__)
constexpr int kMR = 6;
constexpr int kNV = 4;
#else
constexpr int kMR = 4;
constexpr int kNV = 3;
#endif

template <typename T, int MR, int NV, bool ACC>
inline void micro(T* __restrict C, int64_t ldc, const T* __restrict A, int64_t sam, int64_t sak,
                  const T* __restrict B, int64_t ldb, int64_t depth) {
  using S = Simd<T>;
  using V = typename S::V;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = ACC ? S::load(C + m * ldc + v * S::W) : V{};
  for (int64_t k = 0; k < depth; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = S::load(B + k * ldb + v * S::W);
    for (int m = 0; m < MR; ++m) {
      const V a = S::splat(A[m * sam + k * sak]);
      for (int v = 0; v < NV; ++v) acc[m][v] += a * b[v];
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) S::store(C + m * ldc + v * S::W, acc[m][v]);
}

template <typename T, bool ACC, int MR>
inline void micro_nv(int nv, T* C, int64_t ldc, const T* A, int64_t sam, int64_t sak, const T* B,
                     int64_t ldb, int64_t depth) {
  switch (nv) {
    case 1: micro<T, MR, 1, ACC>(C, ldc, A, sam, sak, B, ldb, depth); break;
    case 2: micro<T, MR, 2, ACC>(C, ldc, A, sam, sak, B, ldb, depth); break;
    case 3: micro<T, MR, 3, ACC>(C, ldc, A, sam, sak, B, ldb, depth); break;
#if defined(__AVX512VL__)
    case 4: micro<T, MR, 4, ACC>(C, ldc, A, sam, sak, B, ldb, depth); break;
#endif
    default: break;
  }
}

template <typename T, bool ACC>
inline void micro_dispatch(int mr, int nv, T* C, int64_t ldc, const T* A, int64_t sam,
                           int64_t sak, const T* B, int64_t ldb, int64_t depth) {
  switch (mr) {
    case 1: micro_nv<T, ACC, 1>(nv, C, ldc, A, sam, sak, B, ldb, depth); break;
    case 2: micro_nv<T, ACC, 2>(nv, C, ldc, A, sam, sak, B, ldb, depth); break;
    case 3: micro_nv<T, ACC, 3>(nv, C, ldc, A, sam, sak, B, ldb, depth); break;
    case 4: micro_nv<T, ACC, 4>(nv, C, ldc, A, sam, sak, B, ldb, depth); break;
#if defined(__AVX512VL__)
    case 5: micro_nv<T, ACC, 5>(nv, C, ldc, A, sam, sak, B, ldb, depth); break;
    case 6: micro_nv<T, ACC, 6>(nv, C, ldc, A, sam, sak, B, ldb, depth); break;
#endif
    default: break;
  }
}

// C[rows, ncols] (+)= A(rows x depth) · B[depth, ncols]; ncols a multiple of Simd<T>::W, C and B
// rows ldc/ldb apart. Rows and vector columns are split into near-equal register blocks (13
// vectors -> 4+3+3+3, not 4+4+4+1). The summation order of every C element is k = 0..depth-1
// whatever the blocking, so results do not depend on how rows are grouped.
template <typename T, bool ACC>
inline void gemm(int64_t rows, int64_t ncols, int64_t depth, const T* A, int64_t sam, int64_t sak,
                 const T* B, int64_t ldb, T* C, int64_t ldc) {
  constexpr int W = Simd<T>::W;
  const int64_t nvec = ncols / W;
  const int64_t nb = (nvec + kNV - 1) / kNV;
  const int64_t mb = (rows + kMR - 1) / kMR;
  for (int64_t i = 0, m0 = 0; i < mb; ++i) {
    const int mr = static_cast<int>((rows - m0) / (mb - i));
    for (int64_t j = 0, v0 = 0; j < nb; ++j) {
      const int nv = static_cast<int>((nvec - v0) / (nb - j));
      micro_dispatch<T, ACC>(mr, nv, C + m0 * ldc + v0 * W, ldc, A + m0 * sam, sam, sak,
                             B + v0 * W, ldb, depth);
      v0 += nv;
    }
    m0 += mr;
  }
}

// exp of floats x <= 0 (softmax after max subtraction), for a float or a Simd<float>::V: Cephes'
// expf polynomial (relative error ~2 ulp) with round-to-nearest range reduction; x < -87 gives 0
// (the true value is below 1.7e-38). Branch-free, so the scalar form vectorises in `omp simd`
// loops. For doubles, std::exp (lane by lane).
template <typename V>
inline V exp_nonpositive(V x) {
  constexpr bool scalar = std::is_same_v<V, float>;
  typedef int32_t Vi_ __attribute__((vector_size(32)));
  using Vi = std::conditional_t<scalar, int32_t, Vi_>;
  const auto bcast = [](float v) {
    if constexpr (scalar) {
      return v;
    } else {
      return Simd<float>::splat(v);
    }
  };
  const V lo = bcast(-87.0f);
  const auto under = x < lo;
  x = under ? lo : x;
  const V magic = bcast(12582912.0f);  // 1.5 * 2^23: adding rounds to an integer
  V n = x * 1.44269504088896341f + magic;
  n = n - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = bcast(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  Vi ni;
  if constexpr (scalar) {
    ni = static_cast<int32_t>(n);
  } else {
    ni = __builtin_convertvector(n, Vi);
  }
  const Vi bits = (ni + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  y = y * scale;
  return under ? bcast(0.0f) : y;
}

inline double exp_nonpositive(double x) { return std::exp(x); }

inline Simd<double>::V exp_nonpositive(Simd<double>::V x) {
  for (int i = 0; i < Simd<double>::W; ++i) x[i] = std::exp(x[i]);
  return x;
}

// Every lane of the result holds op over all lanes of v: log2(W) butterfly steps (lane i with
// lane i ^ step), no scalar chain.
template <typename T, int Step, std::size_t... I>
inline typename Simd<T>::V lanes_swapped(typename Simd<T>::V v, std::index_sequence<I...>) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, static_cast<int>(I ^ Step)...);
#else
  using I_t = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I_t Vi __attribute__((vector_size(32)));
  return __builtin_shuffle(v, Vi{static_cast<I_t>(I ^ Step)...});
#endif
}

template <typename T, int Step = Simd<T>::W / 2, typename Op>
inline typename Simd<T>::V allreduce(typename Simd<T>::V v, Op op) {
  v = op(v, lanes_swapped<T, Step>(v, std::make_index_sequence<Simd<T>::W>{}));
  if constexpr (Step > 1) v = allreduce<T, Step / 2>(v, op);
  return v;
}

// Softmax over the first N of the Np (a multiple of W) entries of each of `rows` rows, in place,
// max-subtracted; the padding entries become 0. The padding lanes are masked in registers: the
// GEMM has just stored the row, and scalar stores into its last vector would make that vector's
// reload miss store forwarding (a stall of every row).
template <typename T>
inline void softmax_rows(T* Z, int64_t rows, int64_t N, int64_t Np) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int W = S::W;
  const int64_t nv = Np / W;
  V lane;
  for (int i = 0; i < W; ++i) lane[i] = static_cast<T>((nv - 1) * W + i);
  const auto pad = lane >= static_cast<T>(N);  // padding lanes of the last vector
  const V ninf = S::splat(-std::numeric_limits<T>::infinity());
  const auto vmax = [](V a, V b) { return a > b ? a : b; };
  const auto vadd = [](V a, V b) { return a + b; };
  for (int64_t t = 0; t < rows; ++t) {
    T* z = Z + t * Np;
    V mx = nv == 1 ? ninf : S::load(z);
    for (int64_t v = 1; v < nv - 1; ++v) mx = vmax(mx, S::load(z + v * W));
    const V last = S::load(z + (nv - 1) * W);
    mx = allreduce<T>(vmax(mx, pad ? ninf : last), vmax);
    V sum = V{};
    for (int64_t v = 0; v < nv; ++v) {
      V e = exp_nonpositive((v == nv - 1 ? last : S::load(z + v * W)) - mx);
      if (v == nv - 1) e = pad ? V{} : e;
      S::store(z + v * W, e);
      sum += e;
    }
    const V inv = S::splat(T(1)) / allreduce<T>(sum, vadd);
    for (int64_t v = 0; v < nv; ++v) S::store(z + v * W, S::load(z + v * W) * inv);
  }
}

// Softmax backward in place of GA: gz = a ⊙ (ga − ⟨a, ga⟩) for `rows` rows Np apart (the padding
// of a is 0, so it contributes nothing).
template <typename T>
inline void softmax_backward_rows(const T* A, T* GA, int64_t rows, int64_t Np) {
  using S = Simd<T>;
  using V = typename S::V;
  const int64_t nv = Np / S::W;
  for (int64_t t = 0; t < rows; ++t) {
    const T* a = A + t * Np;
    T* ga = GA + t * Np;
    V acc = V{};
    for (int64_t v = 0; v < nv; ++v) acc += S::load(a + v * S::W) * S::load(ga + v * S::W);
    const V aga = allreduce<T>(acc, [](V x, V y) { return x + y; });
    for (int64_t v = 0; v < nv; ++v)
      S::store(ga + v * S::W, S::load(a + v * S::W) * (S::load(ga + v * S::W) - aga));
  }
}

}  // namespace cpu
}  // namespace lrml
