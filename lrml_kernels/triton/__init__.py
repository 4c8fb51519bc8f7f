"""The "triton" backend: fused Triton kernels for LRML (SPEC.md).

Runs on CUDA tensors, or on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1`` set
before this package is imported; :mod:`lrml_kernels.backends` enforces that). Parameters: float16,
bfloat16 and float32 (computed in fp32), float64 (computed in fp64). The interpreter holds bf16 as
raw 16-bit integers and converts them to and from fp32 exactly, but would compute on them as
integers: every kernel converts a bf16 value to fp32 before any arithmetic (the bf16 tests that
run through the interpreter check it).

Backend interface (inputs validated and contiguous by :mod:`lrml_kernels.ops`):

- :func:`distances` and :func:`hinge_loss`: fused forward, fused backward through registered
  custom ops (``torch.compile(fullgraph=True)`` sees them as opaque ops with fake shapes);
- :func:`hinge_loss_grads`: forward and backward in one call without autograd, per-row embedding
  gradients (for a fused sparse optimizer);
- :func:`topk`: exact full-catalogue top-k;
- :func:`relations`: the attention and relation vectors of pairs (forward only).
"""

from lrml_kernels.triton.distance_kernels import distances, hinge_loss, hinge_loss_grads
from lrml_kernels.triton.relations_kernels import relations
from lrml_kernels.triton.topk_kernels import topk

name = "triton"
devices = ("cuda", "cpu")

__all__ = ["devices", "distances", "hinge_loss", "hinge_loss_grads", "name", "relations", "topk"]
