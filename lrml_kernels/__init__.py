"""lrml_kernels: fused kernels and a reference for LRML recommenders (Tay et al., WWW 2018).

Public API::

    lrml_distances, lrml_hinge_loss, lrml_topk   # the fused ops (ops.py)
    lrml_relations                               # attention and relation of pairs (ops.py)
    available_backends                           # which backends run here (backends.py)
    BackendUnavailable                           # raised for a backend that cannot run here
    LRML                                         # the nn.Module (model.py)
    LRMLTrainer                                  # fused sparse optimizer step (trainer.py)
    evaluate                                     # HR@k / nDCG@k, sampled or full (metrics.py)
    data                                         # readers, splits, synthetic data, sampling
    explain                                      # what the memory slots learn (lrml explain)
    reference                                    # SPEC.md in plain PyTorch
"""

from lrml_kernels import data, explain, reference
from lrml_kernels.backends import BackendUnavailable, available_backends
from lrml_kernels.metrics import evaluate
from lrml_kernels.model import LRML
from lrml_kernels.ops import lrml_distances, lrml_hinge_loss, lrml_relations, lrml_topk
from lrml_kernels.trainer import LRMLTrainer

__version__ = "0.1.0"

__all__ = [
    "LRML",
    "LRMLTrainer",
    "BackendUnavailable",
    "data",
    "evaluate",
    "explain",
    "available_backends",
    "lrml_distances",
    "lrml_hinge_loss",
    "lrml_relations",
    "lrml_topk",
    "reference",
    "__version__",
]
