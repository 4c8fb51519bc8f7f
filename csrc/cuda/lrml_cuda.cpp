// Thin binding layer of the CUDA kernels (lrml_kernels.cu): checks, allocation, dtype casts, the
// hinge's ∂L/∂D and the fixed-order sum of the keys/memory partials, with ATen; registered under
// the CUDA dispatch key of the lrml_ext ops (the schema is defined by the CPU library).
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "../lrml.h"

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

namespace lrml {
namespace cuda {
namespace {

using at::Tensor;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, "the cuda backend supports float32, float16 and bfloat16");
  }
  return DType::Float32;
}

void check_launch(const char* err, const char* what) {
  TORCH_CHECK(err == nullptr, "lrml_ext ", what, " CUDA kernel failed: ", err ? err : "");
}

// The checked inputs and fp32 copies of the small keys and memory (the kernels read them in fp32).
struct CudaPrepared : Prepared {
  Tensor Kf, Mf;
};

CudaPrepared prepare(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                     const Tensor& memory, const Tensor& users, const Tensor& items,
                     c10::string_view distance, c10::string_view relation, double eps) {
  CudaPrepared r;
  static_cast<Prepared&>(r) =
      lrml::prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps,
                    c10::DeviceType::CUDA, {at::kFloat, at::kHalf, at::kBFloat16}, "cuda");
  r.Kf = r.p.K.to(at::kFloat).contiguous();
  r.Mf = r.p.M.to(at::kFloat).contiguous();
  return r;
}

void* stream() { return static_cast<void*>(c10::cuda::getCurrentCUDAStream().stream()); }

// D [B, C] in fp32.
Tensor distances_f32(const CudaPrepared& pr, double eps) {
  Tensor D = at::empty({pr.b.B, pr.b.C}, pr.p.P.options().dtype(at::kFloat));
  if (pr.b.B == 0) return D;
  check_launch(launch_distances(dtype_of(pr.p.P), pr.p.P.data_ptr(), pr.p.Q.data_ptr(),
                                pr.Kf.data_ptr<float>(), pr.Mf.data_ptr<float>(),
                                pr.b.users.data_ptr<int64_t>(), pr.b.items.data_ptr<int64_t>(),
                                pr.b.B, pr.b.C, pr.p.U, pr.p.I, pr.p.N, pr.p.d, pr.distance,
                                pr.relation, static_cast<float>(eps), D.data_ptr<float>(),
                                stream()),
               "distances");
  return D;
}

Grads backward_f32(const CudaPrepared& pr, const Tensor& gD, double eps) {
  const auto f32 = pr.p.P.options().dtype(at::kFloat);
  const int64_t B = pr.b.B, C = pr.b.C, N = pr.p.N, d = pr.p.d;
  const char* err = nullptr;
  const int64_t grid = backward_grid(B, N, d, &err);
  check_launch(err, "distances_backward");
  Tensor gp = at::empty({B, d}, f32);
  Tensor gq = at::empty({B, C, d}, f32);
  Tensor partials = at::empty({grid, 2, N, d}, f32);
  Tensor g = gD.to(at::kFloat).contiguous();
  check_launch(launch_distances_backward(
                   dtype_of(pr.p.P), pr.p.P.data_ptr(), pr.p.Q.data_ptr(),
                   pr.Kf.data_ptr<float>(), pr.Mf.data_ptr<float>(),
                   pr.b.users.data_ptr<int64_t>(), pr.b.items.data_ptr<int64_t>(),
                   g.data_ptr<float>(), B, C, pr.p.U, pr.p.I, N, d, pr.distance, pr.relation,
                   static_cast<float>(eps), gp.data_ptr<float>(), gq.data_ptr<float>(),
                   partials.data_ptr<float>(), grid, stream()),
               "distances_backward");
  Tensor sums = partials.sum(0);  // [2, N, d], a deterministic reduction
  const auto dt = pr.p.P.scalar_type();
  return {gp.to(dt), gq.to(dt), sums[0].to(dt), sums[1].to(dt)};
}

// Per-row hinge losses L [B] (fp32) and, when w is given, ∂L/∂D [B, C] for the row weights w.
Tensor hinge_rows(const Tensor& D, double margin) {
  if (D.size(1) < 2) return at::zeros({D.size(0)}, D.options());
  return at::relu(D.narrow(1, 0, 1) + margin - D.narrow(1, 1, D.size(1) - 1)).sum(1);
}

Tensor hinge_grad_D(const Tensor& D, double margin, const Tensor& w) {
  Tensor gD = at::zeros_like(D);
  if (D.size(1) < 2) return gD;
  // active unless h <= 0: a NaN term passes its gradient, as relu(NaN) does in the reference
  Tensor h = D.narrow(1, 0, 1) + margin - D.narrow(1, 1, D.size(1) - 1);
  // An inactive term's gradient is 0 whatever w is (relu's backward), not 0 · inf = NaN.
  Tensor active = h.le(0).logical_not();
  Tensor wv = w.reshape({-1, 1}).to(D.dtype());
  Tensor zero = at::zeros({}, D.options());
  gD.narrow(1, 1, D.size(1) - 1).copy_(at::where(active, -wv, zero));
  Tensor count = active.sum(1, true).to(D.dtype());
  gD.narrow(1, 0, 1).copy_(at::where(count.gt(0), count * wv, zero));
  return gD;
}

Tensor reduce_loss(const Tensor& L, Reduction red, at::ScalarType dt) {
  if (red == Reduction::None) return L.to(dt);
  if (red == Reduction::Mean && L.size(0) > 0) return L.mean().to(dt);
  return L.sum().to(dt);
}

Tensor row_weights(const Tensor* grad, Reduction red, int64_t B, const at::TensorOptions& f32) {
  Tensor g = grad ? grad->to(at::kFloat) : at::ones({}, f32);
  if (red == Reduction::None) return grad ? g.reshape({B}) : at::ones({B}, f32);
  g = g.reshape({});
  if (red == Reduction::Mean && B > 0) g = g / static_cast<double>(B);
  return g.expand({B});
}

// ---- the ops -------------------------------------------------------------------------------

// The device an op makes current: user_emb's, when it is a CUDA tensor. A user_emb on another
// device is left for check_params to refuse with a message that names it (a CUDAGuard of a CPU
// device throws a bare c10::Error first).
std::optional<c10::Device> cuda_device(const Tensor& user_emb) {
  if (user_emb.is_cuda()) return user_emb.device();
  return std::nullopt;
}

Tensor distances(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                 const Tensor& memory, const Tensor& users, const Tensor& items,
                 c10::string_view distance, c10::string_view relation, double eps, bool) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(user_emb));
  const auto pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  return distances_f32(pr, eps).to(pr.p.P.scalar_type());
}

Grads distances_backward(const Tensor& grad, const Tensor& user_emb, const Tensor& item_emb,
                         const Tensor& keys, const Tensor& memory, const Tensor& users,
                         const Tensor& items, c10::string_view distance,
                         c10::string_view relation, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(user_emb));
  const auto pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  check_grad_D(grad, pr.b, pr.p);
  return backward_f32(pr, grad, eps);
}

Tensor hinge_loss(const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys,
                  const Tensor& memory, const Tensor& users, const Tensor& items, double margin,
                  c10::string_view distance, c10::string_view relation, double eps,
                  c10::string_view reduction, bool) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(user_emb));
  const Reduction red = parse_reduction(str(reduction));
  const auto pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  return reduce_loss(hinge_rows(distances_f32(pr, eps), margin), red, pr.p.P.scalar_type());
}

Grads hinge_loss_backward(const Tensor& grad, const Tensor& user_emb, const Tensor& item_emb,
                          const Tensor& keys, const Tensor& memory, const Tensor& users,
                          const Tensor& items, double margin, c10::string_view distance,
                          c10::string_view relation, double eps, c10::string_view reduction) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(user_emb));
  const Reduction red = parse_reduction(str(reduction));
  const auto pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  check_grad_loss(grad, pr.b, pr.p, red);
  Tensor D = distances_f32(pr, eps);
  Tensor w = row_weights(&grad, red, pr.b.B, D.options());
  return backward_f32(pr, hinge_grad_D(D, margin, w), eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> hinge_loss_grads(
    const Tensor& user_emb, const Tensor& item_emb, const Tensor& keys, const Tensor& memory,
    const Tensor& users, const Tensor& items, double margin, c10::string_view distance,
    c10::string_view relation, double eps, c10::string_view reduction) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(user_emb));
  const Reduction red = parse_reduction(str(reduction));
  const auto pr = prepare(user_emb, item_emb, keys, memory, users, items, distance, relation, eps);
  Tensor D = distances_f32(pr, eps);
  Tensor loss = reduce_loss(hinge_rows(D, margin), red, pr.p.P.scalar_type());
  Tensor w = row_weights(nullptr, red, pr.b.B, D.options());
  Grads g = backward_f32(pr, hinge_grad_D(D, margin, w), eps);
  return {loss, std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g)};
}

// The attention a [B, N] and relation r [B, d] of the pairs (users[b], items[b]), forward only.
std::tuple<Tensor, Tensor> relations(const Tensor& user_emb, const Tensor& item_emb,
                                     const Tensor& keys, const Tensor& memory,
                                     const Tensor& users, const Tensor& items) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(user_emb));
  Params p = check_params(user_emb, item_emb, keys, memory, c10::DeviceType::CUDA,
                          {at::kFloat, at::kHalf, at::kBFloat16}, "cuda");
  const auto [u, i] = check_pairs(p, users, items);
  const int64_t B = u.size(0);
  const auto f32 = p.P.options().dtype(at::kFloat);
  Tensor a = at::empty({B, p.N}, f32);
  Tensor r = at::empty({B, p.d}, f32);
  Tensor Kf = p.K.to(at::kFloat).contiguous(), Mf = p.M.to(at::kFloat).contiguous();
  check_launch(launch_relations(dtype_of(p.P), p.P.data_ptr(), p.Q.data_ptr(),
                                Kf.data_ptr<float>(), Mf.data_ptr<float>(),
                                u.data_ptr<int64_t>(), i.data_ptr<int64_t>(), B, p.N, p.d,
                                a.data_ptr<float>(), r.data_ptr<float>(), stream()),
               "relations");
  const auto dt = p.P.scalar_type();
  return {a.to(dt), r.to(dt)};
}

// Exact top-k: lrml_ext::topk_screened on these CUDA tensors (csrc/topk_screened.cpp: cuBLAS
// screen, candidates re-scored by launch_distances, certificate, direct fallback), after the
// checks of this backend (device, dtypes), so its errors name the cuda backend.
std::tuple<Tensor, Tensor> topk(const Tensor& user_emb, const Tensor& item_emb,
                                const Tensor& keys, const Tensor& memory, const Tensor& users,
                                int64_t k, const std::optional<Tensor>& exclude_indptr,
                                const std::optional<Tensor>& exclude_indices,
                                c10::string_view distance, double eps) {
  const c10::cuda::OptionalCUDAGuard guard(cuda_device(user_emb));
  parse_distance(str(distance));
  check_eps(eps);
  TORCH_CHECK_VALUE(k >= 1, "k must be at least 1, got ", k);
  check_params(user_emb, item_emb, keys, memory, c10::DeviceType::CUDA,
               {at::kFloat, at::kHalf, at::kBFloat16}, "cuda");
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lrml_ext::topk_screened", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
              const std::optional<Tensor>&, const std::optional<Tensor>&, c10::string_view,
              double, int64_t)>();
  auto out = op.call(user_emb, item_emb, keys, memory, users, k, exclude_indptr, exclude_indices,
                     distance, eps, 0);
  return {std::get<0>(out), std::get<1>(out)};
}

}  // namespace
}  // namespace cuda
}  // namespace lrml

TORCH_LIBRARY_IMPL(lrml_ext, CUDA, m) {
  m.impl("distances", &lrml::cuda::distances);
  m.impl("distances_backward", &lrml::cuda::distances_backward);
  m.impl("hinge_loss", &lrml::cuda::hinge_loss);
  m.impl("hinge_loss_backward", &lrml::cuda::hinge_loss_backward);
  m.impl("hinge_loss_grads", &lrml::cuda::hinge_loss_grads);
  m.impl("topk", &lrml::cuda::topk);
  m.impl("relations", &lrml::cuda::relations);
}
