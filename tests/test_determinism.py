"""Determinism (issue 8): under ``torch.use_deterministic_algorithms(True)`` every backend gives
bitwise identical results and gradients on repeated runs (distances, hinge loss, the fused
per-row gradients of the trainer, top-k, a few training steps). The C++ CPU backend also gives
the same bits for any number of threads (its keys/memory partial sums are per fixed block of
rows, summed in block order).

Nondeterministic otherwise (documented in the README's "Guarantees"): on CUDA with deterministic
algorithms off, torch's accumulating scatters (``index_put_``/``index_add_``, used for the
embedding gradients) use atomics. The triton kernels themselves use none: their keys/memory
gradients are per-program partial sums added in a fixed order, with or without the flag.
"""

from __future__ import annotations

import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import backends
from lrml_kernels.model import LRML
from lrml_kernels.trainer import LRMLTrainer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = [b for b in backends.BACKENDS if backends.why_unavailable(b, DEVICE) is None]
DISTANCES = ("l2", "squared_l2", "l1")


@pytest.fixture(autouse=True)
def deterministic():
    """Deterministic algorithms on (and one intra-op thread: tiny tensors on a shared CPU);
    the previous settings are restored afterwards."""
    mode = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    torch.set_num_threads(threads)


def make(U=40, I=50, N=7, d=37, B=257, C=4, dtype=torch.float32, seed=0):
    """Non-power-of-two sizes, few rows (indices repeat heavily), B over several row blocks."""
    g = torch.Generator().manual_seed(seed)
    params = [(torch.randn(n, d, generator=g) * 0.4).to(dtype).to(DEVICE) for n in (U, I, N, N)]
    users = torch.randint(0, U, (B,), generator=g).to(DEVICE)
    items = torch.randint(0, I, (B, C), generator=g).to(DEVICE)
    return params, users, items


def run(backend, params, users, items, **kw):
    """Hinge loss and distances with all gradients (dense and sparse): a flat list of tensors."""
    out = []
    for sparse in (False, True):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        loss = lk.lrml_hinge_loss(*leaves, users, items, backend=backend, sparse_grad=sparse, **kw)
        loss.backward()
        out += [loss.detach()] + [p.grad.coalesce() if p.grad.is_sparse else p.grad for p in leaves]
    leaves = [p.detach().clone().requires_grad_() for p in params]
    D = lk.lrml_distances(*leaves, users, items, backend=backend, **kw)
    w = torch.linspace(-1, 1, D.numel(), device=D.device).view_as(D).to(D.dtype)
    (D * w).sum().backward()
    return out + [D.detach()] + [p.grad for p in leaves]


def assert_same_bits(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.is_sparse:
            assert torch.equal(x.indices(), y.indices()), i
            x, y = x.values(), y.values()
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)), i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relation", ["pair", "shared"])
def test_ops_and_gradients_are_bitwise_repeatable(backend, relation):
    params, users, items = make()
    for distance in DISTANCES:
        kw = {"distance": distance, "relation": relation}
        assert_same_bits(
            run(backend, params, users, items, **kw), run(backend, params, users, items, **kw)
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_hinge_loss_grads_are_bitwise_repeatable(backend):
    params, users, items = make()
    impl = backends.get(backend, torch.device(DEVICE))
    for reduction in ("sum", "mean"):
        args = (*params, users, items, 0.5, "l2", "pair", 1e-3, reduction)
        assert_same_bits(list(impl.hinge_loss_grads(*args)), list(impl.hinge_loss_grads(*args)))


def exclusions(B, I, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, I, generator=g) < 0.3
    mask[0] = True  # a row with every item excluded
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    return indptr.to(DEVICE), mask.nonzero()[:, 1].to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_is_bitwise_repeatable(backend):
    params, users, _ = make(I=300, B=37)
    exclude = exclusions(37, 300)
    for distance in DISTANCES:
        runs = [
            list(lk.lrml_topk(*params, users, 20, exclude=exclude, distance=distance, backend=b))
            for b in (backend, backend)
        ]
        assert_same_bits(*runs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["adam", "rowwise_adagrad"])
def test_training_steps_are_bitwise_repeatable(backend, optimizer):
    _, users, items = make(B=96, C=3)

    def train():
        torch.manual_seed(0)
        model = LRML(40, 50, 37, 7, backend=backend, device=DEVICE)
        trainer = LRMLTrainer(model, optimizer, 0.05)
        losses = [trainer.step(users[i::3], items[i::3]) for i in range(3)]
        return losses + [p.detach() for p in model.parameters()]

    assert_same_bits(train(), train())


@pytest.mark.skipif(
    backends.why_unavailable("cpu", "cpu") is not None, reason="the C++ CPU backend is unavailable"
)
def test_cpu_extension_gives_the_same_bits_for_any_thread_count():
    params, users, items = make(B=1500)  # 64 row blocks of the keys/memory partial sums
    params = [p.cpu() for p in params]
    users, items = users.cpu(), items.cpu()
    exclude = tuple(t.cpu() for t in exclusions(37, 50))
    got = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = run("cpu", params, users, items, distance="l2")
        out += list(lk.lrml_topk(*params, users[:37], 9, exclude=exclude, backend="cpu"))
        got.append(out)
    assert_same_bits(*got)


@pytest.mark.gpu
def test_triton_keys_memory_gradients_are_repeatable_without_the_flag_gpu():
    # Many more row blocks than backward programs (each program sums several row blocks into its
    # own partials): bitwise repeatable even with deterministic algorithms off (no atomics).
    from lrml_kernels.triton import distance_kernels as TD

    params, users, items = make(U=2000, I=3000, B=1 << 16)
    cfg = TD.block_config(users.shape[0], 7, 37, params[0], backward=True)
    blocks = -(-users.shape[0] // cfg["BLOCK_B"])
    assert TD._backward_programs(users.shape[0], cfg, params[0]) < blocks
    torch.use_deterministic_algorithms(False)
    impl = backends.get("triton", torch.device(DEVICE))
    for relation in ("pair", "shared"):
        args = (*params, users, items, 0.5, "l2", relation, 1e-3, "sum")
        assert_same_bits(list(impl.hinge_loss_grads(*args)), list(impl.hinge_loss_grads(*args)))
