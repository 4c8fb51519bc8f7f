// Input checks shared by the CPU and CUDA bindings: every tensor argument is checked and named,
// with the exception types of the Python front end (TypeError, ValueError, IndexError).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <string_view>
#include <utility>

#include "lrml.h"

namespace lrml {

inline Distance parse_distance(std::string_view s) {
  if (s == "l2") return Distance::L2;
  if (s == "squared_l2") return Distance::SquaredL2;
  if (s == "l1") return Distance::L1;
  TORCH_CHECK_VALUE(false, "distance must be one of ('l2', 'squared_l2', 'l1'), got '",
                    std::string(s), "'");
  return Distance::L2;
}

inline Relation parse_relation(std::string_view s) {
  if (s == "pair") return Relation::Pair;
  if (s == "shared") return Relation::Shared;
  TORCH_CHECK_VALUE(false, "relation must be one of ('pair', 'shared'), got '", std::string(s),
                    "'");
  return Relation::Pair;
}

inline Reduction parse_reduction(std::string_view s) {
  if (s == "sum") return Reduction::Sum;
  if (s == "mean") return Reduction::Mean;
  if (s == "none") return Reduction::None;
  TORCH_CHECK_VALUE(false, "reduction must be one of ('sum', 'mean', 'none'), got '",
                    std::string(s), "'");
  return Reduction::Sum;
}

struct Params {
  at::Tensor P, Q, K, M;  // contiguous
  int64_t U = 0, I = 0, N = 0, d = 0;
};

// The four parameter tensors: 2-D, one floating dtype (one of `allowed`), one device of
// `device_type`, a shared d, N >= 1, d >= 1. Returns them contiguous.
inline Params check_params(const at::Tensor& user_emb, const at::Tensor& item_emb,
                           const at::Tensor& keys, const at::Tensor& memory,
                           c10::DeviceType device_type, std::initializer_list<at::ScalarType> allowed,
                           const char* backend) {
  const at::Tensor* ts[4] = {&user_emb, &item_emb, &keys, &memory};
  const char* names[4] = {"user_emb", "item_emb", "keys", "memory"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *ts[i];
    TORCH_CHECK_TYPE(t.defined(), names[i], " must be a tensor, got None");
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), names[i],
                     " must be a floating-point tensor, got dtype ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 2, names[i], " must be 2-D, got shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device().type() == device_type, names[i], " is on ", t.device(),
                      " but the ", backend, " backend runs on ", c10::DeviceTypeName(device_type, true),
                      " tensors");
    TORCH_CHECK_VALUE(t.device() == user_emb.device(),
                      "all tensors must be on one device, got user_emb on ", user_emb.device(),
                      " and ", names[i], " on ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == user_emb.scalar_type(),
                     "user_emb, item_emb, keys and memory must share one dtype, got user_emb=",
                     user_emb.scalar_type(), ", ", names[i], "=", t.scalar_type());
  }
  bool ok = false;
  for (auto s : allowed) ok = ok || s == user_emb.scalar_type();
  if (!ok) {
    std::string list;
    for (auto s : allowed) list += (list.empty() ? "" : ", ") + std::string(c10::toString(s));
    TORCH_CHECK_TYPE(false, "the ", backend, " backend supports parameter dtypes ", list,
                     "; got ", user_emb.scalar_type());
  }
  const int64_t d = user_emb.size(1);
  for (int i = 1; i < 4; ++i) {
    TORCH_CHECK_VALUE(ts[i]->size(1) == d, names[i], " has dimension ", ts[i]->size(1),
                      " but user_emb has ", d, ": all tables share d");
  }
  TORCH_CHECK_VALUE(keys.size(0) == memory.size(0), "keys has ", keys.size(0),
                    " memory slots but memory has ", memory.size(0), ": they must match");
  TORCH_CHECK_VALUE(keys.size(0) >= 1, "keys and memory must have at least one memory slot (N >= 1)");
  TORCH_CHECK_VALUE(d >= 1, "the embedding dimension d must be at least 1");
  Params p;
  p.P = user_emb.contiguous();
  p.Q = item_emb.contiguous();
  p.K = keys.contiguous();
  p.M = memory.contiguous();
  p.U = user_emb.size(0);
  p.I = item_emb.size(0);
  p.N = keys.size(0);
  p.d = d;
  return p;
}

// An index tensor: integer dtype, `rank` dims, on `device`. Returned as contiguous int64.
inline at::Tensor check_index(const char* name, const at::Tensor& idx, int64_t rank,
                              const at::Device& device) {
  TORCH_CHECK_TYPE(idx.defined(), name, " must be a tensor of integer indices, got None");
  TORCH_CHECK_TYPE(at::isIntegralType(idx.scalar_type(), /*includeBool=*/false), name,
                   " must hold integer indices, got dtype ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == rank, name, " must be ", rank, "-D, got shape ", idx.sizes());
  TORCH_CHECK_VALUE(idx.device() == device, name, " is on ", idx.device(),
                    " but the parameters are on ", device);
  return idx.to(at::kLong).contiguous();
}

// Every index in [0, size): an out-of-range index is an IndexError, never a wild read.
inline void check_index_range(const char* name, const at::Tensor& idx, int64_t size) {
  const int64_t n = idx.numel();
  if (n == 0) return;
  int64_t lo, hi;
  if (idx.device().is_cpu()) {
    const int64_t* p = idx.data_ptr<int64_t>();
    lo = p[0];
    hi = p[0];
    for (int64_t i = 1; i < n; ++i) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
  } else {
    auto mm = at::aminmax(idx);
    auto both = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
    lo = both[0].item<int64_t>();
    hi = both[1].item<int64_t>();
  }
  const int64_t bad = lo < 0 ? lo : hi;
  TORCH_CHECK_INDEX(lo >= 0 && hi < size, name, " holds index ", bad,
                    ", out of range for a table of ", size, " rows (valid: 0..", size - 1, ")");
}

struct Batch {
  at::Tensor users, items;  // int64, contiguous
  int64_t B = 0, C = 0;
};

inline Batch check_batch(const Params& p, const at::Tensor& users, const at::Tensor& items) {
  Batch b;
  b.users = check_index("users", users, 1, p.P.device());
  b.items = check_index("items", items, 2, p.P.device());
  TORCH_CHECK_VALUE(b.items.size(0) == b.users.size(0), "items has ", b.items.size(0),
                    " rows but users has ", b.users.size(0), ": items is [B, C]");
  TORCH_CHECK_VALUE(b.items.size(1) >= 1,
                    "items must have at least one column (column 0 is the positive item)");
  b.B = b.users.size(0);
  b.C = b.items.size(1);
  // On every device (shapes only, no sync): the CUDA kernels clamp indices into their tables,
  // which an empty table does not have.
  TORCH_CHECK_INDEX(b.B == 0 || (p.U > 0 && p.I > 0), "users and items index a table with no ",
                    "rows (", p.U, " users, ", p.I, " items)");
  // The range check reads every index: free on the CPU, a device-to-host copy and a sync on a
  // GPU, where the training step must not wait for the host. There the public ops check ranges
  // (unless validate=False) and the CUDA kernels clamp every index into its table.
  if (p.P.device().is_cpu()) {
    check_index_range("users", b.users, p.U);
    check_index_range("items", b.items, p.I);
  }
  return b;
}

// The pairs (users[b], items[b]) of lrml_relations: two 1-D index tensors of one length, in
// range. Returned as contiguous int64.
inline std::pair<at::Tensor, at::Tensor> check_pairs(const Params& p, const at::Tensor& users,
                                                     const at::Tensor& items) {
  at::Tensor u = check_index("users", users, 1, p.P.device());
  at::Tensor i = check_index("items", items, 1, p.P.device());
  TORCH_CHECK_VALUE(i.size(0) == u.size(0), "items has ", i.size(0), " entries but users has ",
                    u.size(0), ": one item per user");
  check_index_range("users", u, p.U);
  check_index_range("items", i, p.I);
  return {u, i};
}

inline void check_eps(double eps) {
  TORCH_CHECK_VALUE(eps >= 0, "eps must be a non-negative number, got ", eps);
}

inline std::string str(c10::string_view s) { return std::string(s.data(), s.size()); }

// The checked inputs of one distances / hinge-loss call.
struct Prepared {
  Params p;
  Batch b;
  Distance distance;
  Relation relation;
};

// Every argument of a distances / hinge-loss call checked, for a backend on `device_type` that
// takes the dtypes `allowed`.
inline Prepared prepare(const at::Tensor& user_emb, const at::Tensor& item_emb,
                        const at::Tensor& keys, const at::Tensor& memory, const at::Tensor& users,
                        const at::Tensor& items, c10::string_view distance,
                        c10::string_view relation, double eps, c10::DeviceType device_type,
                        std::initializer_list<at::ScalarType> allowed, const char* backend) {
  Prepared r;
  r.distance = parse_distance(str(distance));
  r.relation = parse_relation(str(relation));
  check_eps(eps);
  r.p = check_params(user_emb, item_emb, keys, memory, device_type, allowed, backend);
  r.b = check_batch(r.p, users, items);
  return r;
}

// The upstream gradient of the distances: [B, C], floating.
inline at::Tensor check_grad_D(const at::Tensor& grad, const Batch& b, const Params& p) {
  TORCH_CHECK_TYPE(grad.defined() && at::isFloatingType(grad.scalar_type()),
                   "grad must be a floating-point tensor");
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == b.B && grad.size(1) == b.C,
                    "grad must have the shape of D [", b.B, ", ", b.C, "], got ", grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == p.P.device(), "grad is on ", grad.device(),
                    " but the parameters are on ", p.P.device());
  return grad;
}

// The upstream gradient of the hinge loss: a scalar ("sum"/"mean") or [B] ("none").
inline at::Tensor check_grad_loss(const at::Tensor& grad, const Batch& b, const Params& p,
                                  Reduction reduction) {
  TORCH_CHECK_TYPE(grad.defined() && at::isFloatingType(grad.scalar_type()),
                   "grad must be a floating-point tensor");
  if (reduction == Reduction::None) {
    TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == b.B,
                      "grad must have the shape of the per-row losses [", b.B, "], got ",
                      grad.sizes());
  } else {
    TORCH_CHECK_VALUE(grad.numel() == 1, "grad of a reduced loss must have one element, got ",
                      grad.sizes());
  }
  TORCH_CHECK_VALUE(grad.device() == p.P.device(), "grad is on ", grad.device(),
                    " but the parameters are on ", p.P.device());
  return grad;
}

}  // namespace lrml
