// TORCH_LIBRARY schema of the lrml_ext ops and their CPU implementations. The CUDA
// implementations live in a separate library (cuda/lrml_cuda.cpp) registered under the CUDA key,
// so a failed CUDA build never takes the CPU backend down. Autograd and fake (meta) kernels are
// registered from Python (lrml_kernels/extension.py), as in pytorch/extension-cpp, except the
// fused autograd of hinge_loss_fused (fused_hinge_autograd.cpp): a C++ node costs less per call.
#include <Python.h>
#include <torch/library.h>

#include "cpu/ops_cpu.h"

// Importable as a Python module too (setup.py builds it as lrml_kernels._C_cpu); the ops are
// registered when the shared library is loaded.
extern "C" PyObject* PyInit__C_cpu(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}

#define LRML_PARAMS "Tensor user_emb, Tensor item_emb, Tensor keys, Tensor memory"

TORCH_LIBRARY(lrml_ext, m) {
  m.def("distances(" LRML_PARAMS
        ", Tensor users, Tensor items, str distance, str relation, float eps, bool sparse_grad)"
        " -> Tensor");
  m.def("distances_backward(Tensor grad, " LRML_PARAMS
        ", Tensor users, Tensor items, str distance, str relation, float eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("hinge_loss(" LRML_PARAMS
        ", Tensor users, Tensor items, float margin, str distance, str relation, float eps,"
        " str reduction, bool sparse_grad) -> Tensor");
  m.def("hinge_loss_backward(Tensor grad, " LRML_PARAMS
        ", Tensor users, Tensor items, float margin, str distance, str relation, float eps,"
        " str reduction) -> (Tensor, Tensor, Tensor, Tensor)");
  // Scalar reductions only; its autograd is in fused_hinge_autograd.cpp.
  m.def("hinge_loss_fused(" LRML_PARAMS
        ", Tensor users, Tensor items, float margin, str distance, str relation, float eps,"
        " str reduction, bool sparse_grad) -> Tensor");
  m.def("hinge_loss_grads(" LRML_PARAMS
        ", Tensor users, Tensor items, float margin, str distance, str relation, float eps,"
        " str reduction) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk(" LRML_PARAMS
        ", Tensor users, int k, Tensor? exclude_indptr, Tensor? exclude_indices, str distance,"
        " float eps) -> (Tensor, Tensor)");
  // Device-generic (ATen ops, CompositeExplicitAutograd, topk_screened.cpp): the cuda backend's
  // topk; returns (distances, ids, fallback [B] bool) for a candidate list of `candidates` (0:
  // default).
  m.def("topk_screened(" LRML_PARAMS
        ", Tensor users, int k, Tensor? exclude_indptr, Tensor? exclude_indices, str distance,"
        " float eps, int candidates) -> (Tensor, Tensor, Tensor)");
  m.def("relations(" LRML_PARAMS ", Tensor users, Tensor items) -> (Tensor, Tensor)");
  m.def("row_update_(Tensor(a!) table, Tensor(b!)[] state, Tensor idx, Tensor grad,"
        " str optimizer, float lr, float eps, float beta1, float beta2, float max_norm,"
        " int seed) -> ()");
  m.def("sample_negatives(Tensor indptr, Tensor indices, Tensor? popularity, Tensor users,"
        " int num_items, int k, int seed, int max_tries) -> Tensor");
  m.def("epoch_order(Tensor round_keys, int start, int count, int n, int world, int rank, int a,"
        " int b) -> Tensor");
  m.def("training_batch(Tensor rows, Tensor train_users, Tensor train_items, Tensor indptr,"
        " Tensor indices, Tensor? popularity, int num_items, int k, int seed, int max_tries,"
        " bool parallel) -> (Tensor, Tensor)");
  m.def("synthetic_items(Tensor r, Tensor y, Tensor users, Tensor cum, Tensor segments,"
        " Tensor zipf_top, Tensor sizes, Tensor seg_offsets, Tensor table) -> Tensor");
  m.def("keep_distinct_(Tensor(a!) buffer, Tensor(b!) got, Tensor offsets, Tensor quota,"
        " Tensor who, Tensor draws, Tensor items, int num_items) -> ()");
  m.def("synthetic_rows_(Tensor(a!) users, Tensor(b!) items, Tensor(c!) timestamps, Tensor buffer,"
        " Tensor offsets, Tensor got, int first_user, Tensor exponential, Tensor mean_gap,"
        " Tensor start) -> ()");
  m.def("sorted_unique_keys(Tensor users, Tensor items, int num_users, int num_items)"
        " -> (Tensor, Tensor)");
  m.def("latest_rows(Tensor users, Tensor? timestamps, int num_users) -> Tensor");
  m.def("eval_negatives_bad(Tensor negatives, Tensor users, Tensor keys, Tensor indptr,"
        " int num_items) -> Tensor");
  m.def("drop_held_out_(Tensor(a!) users, Tensor(b!) items, Tensor(c!)? timestamps,"
        " Tensor held_out_item) -> int");
}

TORCH_LIBRARY_IMPL(lrml_ext, CPU, m) {
  m.impl("distances", &lrml::cpu::distances);
  m.impl("distances_backward", &lrml::cpu::distances_backward);
  m.impl("hinge_loss", &lrml::cpu::hinge_loss);
  m.impl("hinge_loss_backward", &lrml::cpu::hinge_loss_backward);
  m.impl("hinge_loss_grads", &lrml::cpu::hinge_loss_grads);
  m.impl("topk", &lrml::cpu::topk);
  m.impl("relations", &lrml::cpu::relations);
  m.impl("row_update_", &lrml::cpu::row_update_);
  m.impl("sample_negatives", &lrml::cpu::sample_negatives);
  m.impl("training_batch", &lrml::cpu::training_batch);
  m.impl("epoch_order", &lrml::cpu::epoch_order);
  m.impl("synthetic_items", &lrml::cpu::synthetic_items);
  m.impl("keep_distinct_", &lrml::cpu::keep_distinct_);
  m.impl("synthetic_rows_", &lrml::cpu::synthetic_rows_);
  m.impl("sorted_unique_keys", &lrml::cpu::sorted_unique_keys);
  m.impl("latest_rows", &lrml::cpu::latest_rows);
  m.impl("eval_negatives_bad", &lrml::cpu::eval_negatives_bad);
  m.impl("drop_held_out_", &lrml::cpu::drop_held_out_);
}
