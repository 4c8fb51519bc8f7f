"""The public ops: input validation (before any kernel), backend choice, edge cases."""

import warnings

import pytest
import torch

import lrml_kernels as lk
from lrml_kernels import backends


def params(U=5, I=6, d=4, N=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, d, generator=g, dtype=dtype) for n in (U, I, N, N)]


def batch(B=3, C=2, U=5, I=6):
    return torch.randint(0, U, (B,)), torch.randint(0, I, (B, C))


OPS = {
    "distances": lambda P, u, i, **kw: lk.lrml_distances(*P, u, i, backend="torch", **kw),
    "hinge": lambda P, u, i, **kw: lk.lrml_hinge_loss(*P, u, i, backend="torch", **kw),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda P, u, i: (P, u.float(), i), TypeError, "users"),
        (lambda P, u, i: (P, u, i.float()), TypeError, "items"),
        (lambda P, u, i: (P, u[:, None], i), ValueError, "users must be 1-D"),
        (lambda P, u, i: (P, u, i[:, 0]), ValueError, "items must be 2-D"),
        (lambda P, u, i: (P, u[:2], i), ValueError, "items has 3 rows but users has 2"),
        (lambda P, u, i: (P, u, i[:, :0]), ValueError, "at least one column"),
        (lambda P, u, i: (P, u + 100, i), IndexError, "users holds index 10"),
        (lambda P, u, i: (P, u - 100, i), IndexError, "users holds index -"),
        (lambda P, u, i: (P, u, i + 6), IndexError, "items holds index"),
        (lambda P, u, i: ([P[0][:, :3], *P[1:]], u, i), ValueError, "item_emb has dimension 4"),
        (lambda P, u, i: ([*P[:3], P[3][:2]], u, i), ValueError, "memory has 2"),
        (lambda P, u, i: ([P[0].double(), *P[1:]], u, i), TypeError, "share one dtype"),
        (lambda P, u, i: ([P[0].long(), *P[1:]], u, i), TypeError, "user_emb must be a floating"),
        (lambda P, u, i: ([P[0][None], *P[1:]], u, i), ValueError, "user_emb must be 2-D"),
        (lambda P, u, i: ([P[0].tolist(), *P[1:]], u, i), TypeError, "user_emb must be a torch"),
        (lambda P, u, i: (P, u.to("meta"), i), ValueError, "users is on meta"),
    ],
)
def test_bad_input_raises_naming_the_argument(op, mutate, exc, words):
    P, (u, i) = params(), batch()
    P, u, i = mutate(P, u, i)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace("[", r"\[")):
        OPS[op](P, u, i)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"distance": "cosine"}, "distance must be one of"),
        ({"relation": "both"}, "relation must be one of"),
        ({"eps": -1.0}, "eps must be"),
        ({"eps": float("nan")}, "eps must be a finite number >= 0"),
        ({"eps": float("inf")}, "eps must be a finite number >= 0"),
        ({"backend": "tpu"}, "backend must be"),
    ],
)
def test_bad_options_raise(kw, words):
    P, (u, i) = params(), batch()
    with pytest.raises(ValueError, match=words):
        lk.lrml_distances(*P, u, i, **kw)


def test_bad_reduction_raises():
    P, (u, i) = params(), batch()
    with pytest.raises(ValueError, match="reduction must be one of"):
        lk.lrml_hinge_loss(*P, u, i, reduction="max")


def test_check_finite_rejects_nan():
    P, (u, i) = params(), batch()
    P[2][0, 0] = float("nan")
    with pytest.raises(ValueError, match="keys contains NaN or Inf"):
        lk.lrml_distances(*P, u, i, check_finite=True)
    with pytest.raises(ValueError, match="keys contains NaN or Inf"):
        lk.lrml_relations(*P, u, i[:, 0], check_finite=True)
    with pytest.raises(ValueError, match="keys contains NaN or Inf"):
        lk.lrml_topk(*P, u, 2, check_finite=True)


def test_validate_false_skips_the_range_check():
    P, (u, i) = params(), batch()
    # The torch backend then raises its own index error, but validation did not run first.
    with pytest.raises(IndexError) as info:
        lk.lrml_distances(*P, u + 100, i, backend="torch", validate=False)
    assert "users holds index" not in str(info.value)


@pytest.mark.parametrize("backend", lk.available_backends())
def test_vmap_names_the_checks_that_read_values(backend):
    # torch.func.vmap hides the values that the range and finiteness checks read on the host:
    # the error names the option to turn off, and with it off vmap gives the batched result.
    P, (u, i) = params(), batch(B=4)
    u2, i2 = u.view(2, 2), i.view(2, 2, 2)

    def batched(**kw):
        return torch.func.vmap(lambda uu, ii: lk.lrml_distances(*P, uu, ii, backend=backend, **kw))

    with pytest.raises(RuntimeError, match="under vmap pass validate=False"):
        batched()(u2, i2)
    want = lk.lrml_distances(*P, u, i, backend=backend)
    torch.testing.assert_close(batched(validate=False)(u2, i2).reshape(4, 2), want)
    # two models at once (their tables stacked): the finiteness check reads the tables
    stacked = [torch.stack([t, t]) for t in P]
    models = torch.func.vmap(
        lambda *ts: lk.lrml_distances(*ts, u, i, backend=backend, check_finite=True)
    )
    with pytest.raises(RuntimeError, match="under vmap pass check_finite=False"):
        models(*stacked)


@pytest.mark.parametrize("table", [0, 1])
@pytest.mark.parametrize("backend", lk.available_backends())
def test_an_empty_table_raises_even_without_validation(table, backend):
    # A kernel clamps indices into [0, rows - 1]; with no rows that would read before the table.
    P, (u, i) = params(), batch()
    P[table] = P[table][:0]
    name = ("users", "items")[table]
    with pytest.raises(IndexError, match=f"{name} indexes a table with no rows"):
        lk.lrml_hinge_loss(*P, u, i, backend=backend, validate=False)
    with pytest.raises(IndexError, match=f"{name} indexes a table with no rows"):
        lk.lrml_relations(*P, u, i[:, 0], backend=backend, validate=False)
    if table == 0:
        with pytest.raises(IndexError, match="users indexes a table with no rows"):
            lk.lrml_topk(*P, u, 2, backend=backend, validate=False)
    if backend in ("cpu", "cuda"):  # the op itself, called directly, refuses too
        with pytest.raises(IndexError, match="users and items index a table with no rows"):
            torch.ops.lrml_ext.hinge_loss(*P, u, i, 0.5, "l2", "pair", 1e-3, "sum", False)


def test_empty_batch_returns_empty_results():
    P = [t.requires_grad_() for t in params()]
    u, i = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64)
    assert lk.lrml_distances(*P, u, i).shape == (0, 3)
    loss = lk.lrml_hinge_loss(*P, u, i)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in P)
    assert lk.lrml_hinge_loss(*P, u, i, reduction="none").shape == (0,)


@pytest.mark.parametrize("backend", lk.available_backends())
def test_a_sum_beyond_the_dtype_range_is_inf_as_in_the_reference(backend):
    # 64 finite losses of about 1e37 each: their float32 sum (6.4e38) is beyond the range.
    ue, ie = torch.zeros(4, 5), torch.zeros(4, 5)
    ie[1, 0] = 1e37
    keys, memory = torch.randn(3, 5), torch.randn(3, 5) * 1e-3
    users, items = torch.zeros(64, dtype=torch.int64), torch.tensor([[1, 0]] * 64)
    args = (ue, ie, keys, memory, users, items)
    rows = lk.lrml_hinge_loss(*args, distance="l1", reduction="none", backend=backend)
    assert torch.isfinite(rows).all()
    loss = lk.lrml_hinge_loss(*args, distance="l1", reduction="sum", backend=backend)
    assert loss.dtype == torch.float32 and loss.item() == float("inf")


def test_int32_indices_and_noncontiguous_inputs_work():
    P, (u, i) = params(d=8), batch()
    want = lk.lrml_distances(*P, u, i)
    P2 = [torch.stack([t, t], 2)[..., 0] for t in P]  # non-contiguous, same values
    got = lk.lrml_distances(*P2, u.int(), i.int().t().contiguous().t())
    torch.testing.assert_close(got, want)


def test_uint8_indices_are_accepted():
    P, (u, i) = params(), batch()
    torch.testing.assert_close(
        lk.lrml_distances(*P, u.to(torch.uint8), i), lk.lrml_distances(*P, u, i)
    )


def test_available_backends_lists_torch_and_explains_the_rest():
    names = lk.available_backends()
    assert names[0] == "torch"
    for name in backends.BACKENDS:
        reason = backends.why_unavailable(name)
        assert (reason is None) == (name in names)
        assert reason is None or name in reason


def test_auto_never_picks_triton_for_cpu_tensors():
    assert backends.resolve("auto", torch.device("cpu")) in ("cpu", "torch")


def test_env_override_replaces_auto(monkeypatch):
    monkeypatch.setenv("LRML_KERNELS_BACKEND", "torch")
    assert backends.resolve("auto", torch.device("cpu")) == "torch"


def test_unavailable_backend_explains_why():
    with pytest.raises(lk.BackendUnavailable, match="cuda"):
        backends.resolve("cuda", torch.device("cpu"))


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "broken"),
    [
        ("3.6.0", "2.4.6", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.4.6", False),
        ("3.9.1+git1a2b", "2.5.0", False),
        (None, "2.4.6", False),
    ],
)
def test_triton_36_interpreter_with_numpy_24_is_refused_with_the_fix(
    triton_version, numpy_version, broken, monkeypatch
):
    reason = backends.interpreter_problem_of(triton_version, numpy_version)
    assert (reason is not None) == broken
    if broken:
        assert "numpy<2.4 or triton>=3.7" in reason
        monkeypatch.setattr(backends, "_INTERPRETER_PROBLEM", [reason])
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(lk.BackendUnavailable, match="numpy<2.4"):
            backends.resolve("triton", torch.device("cpu"))


def test_sparse_grad_gives_sparse_embedding_gradients():
    P = [t.requires_grad_() for t in params()]
    u, i = batch()
    lk.lrml_hinge_loss(*P, u, i, sparse_grad=True, backend="torch").backward()
    assert P[0].grad.is_sparse and P[1].grad.is_sparse
    assert not P[2].grad.is_sparse
    dense = [t.detach().clone().requires_grad_() for t in P]
    lk.lrml_hinge_loss(*dense, u, i, backend="torch").backward()
    for a, b in zip(P, dense, strict=True):
        torch.testing.assert_close(a.grad.to_dense(), b.grad)


class TestTopkValidation:
    def test_k_must_be_positive(self):
        P = params()
        with pytest.raises(ValueError, match="k must be at least 1"):
            lk.lrml_topk(*P, torch.tensor([0]), 0)

    def test_indptr_length(self):
        P = params()
        with pytest.raises(ValueError, match="B \\+ 1 = 3"):
            lk.lrml_topk(
                *P, torch.tensor([0, 1]), 2, exclude=(torch.tensor([0, 1]), torch.tensor([1]))
            )

    def test_unsorted_exclusions(self):
        P = params()
        ex = (torch.tensor([0, 2]), torch.tensor([3, 1]))
        with pytest.raises(ValueError, match="sorted ascending"):
            lk.lrml_topk(*P, torch.tensor([0]), 2, exclude=ex)

    def test_out_of_range_exclusion(self):
        P = params()
        ex = (torch.tensor([0, 1]), torch.tensor([6]))
        with pytest.raises(IndexError, match="exclude indices holds index 6"):
            lk.lrml_topk(*P, torch.tensor([0]), 2, exclude=ex)

    def test_indptr_must_cover_indices(self):
        P = params()
        ex = (torch.tensor([0, 1]), torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="end at len"):
            lk.lrml_topk(*P, torch.tensor([0]), 2, exclude=ex)


def test_fp32_matmul_precision_whichever_api_set_it():
    from lrml_kernels.precision import fp32_matmul_precision

    matmul = torch.backends.cuda.matmul
    try:
        for legacy, new, want in [
            ("high", None, "high"),
            ("medium", None, "medium"),
            ("high", "ieee", "highest"),  # torch's own getter would still say "high"
            ("highest", "tf32", "high"),  # torch's own getter raises: the APIs were mixed
        ]:
            torch.set_float32_matmul_precision(legacy)
            if new is not None:
                matmul.fp32_precision = new
            assert fp32_matmul_precision() == want, (legacy, new)
    finally:
        torch.set_float32_matmul_precision("highest")


def test_using_fp32_matmul_precision_restores_what_was_in_force():
    from lrml_kernels.precision import fp32_matmul_precision, using_fp32_matmul_precision

    try:
        torch.set_float32_matmul_precision("medium")
        with using_fp32_matmul_precision("high"):
            assert fp32_matmul_precision() == "high"
            with using_fp32_matmul_precision(None):  # None: leave it as it is
                assert fp32_matmul_precision() == "high"
        assert fp32_matmul_precision() == "medium"
        with pytest.raises(KeyError), using_fp32_matmul_precision("highest"):
            raise KeyError("restored on the way out too")
        assert fp32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")


def _matmul_settings():
    """torch's fp32 matmul settings as both APIs read them (the first's getter may raise)."""
    from lrml_kernels.precision import _first_api_precision

    return (
        _first_api_precision() or "mixed",
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.mkldnn.matmul.fp32_precision,
    )


@pytest.mark.parametrize(
    "setup",
    [
        ("legacy", "medium"),
        ("legacy", "high"),
        ("cuda", "tf32"),
        ("cuda", "ieee"),
        ("mkldnn", "bf16"),
    ],
    ids=lambda s: "=".join(s),
)
@pytest.mark.parametrize("inner", ["highest", "high", "medium"])
def test_using_fp32_matmul_precision_restores_either_api_exactly(setup, inner):
    # It set the first API's value back, which rewrites every backend's: a oneDNN "bf16" or a
    # CUDA "tf32" set through torch.backends.<backend>.matmul.fp32_precision alone was lost after
    # fit() (whose matmul_precision defaults to "highest"), or changed the other backend.
    from lrml_kernels.precision import fp32_matmul_precision, using_fp32_matmul_precision

    api, value = setup
    try:
        if api == "legacy":
            torch.set_float32_matmul_precision(value)
        else:
            getattr(torch.backends, api).matmul.fp32_precision = value
        before, seen = _matmul_settings(), fp32_matmul_precision()
        with using_fp32_matmul_precision(inner):
            assert fp32_matmul_precision() == inner
        assert _matmul_settings() == before and fp32_matmul_precision() == seen
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"


def test_auto_says_once_when_no_compiled_backend_runs(monkeypatch):
    from lrml_kernels import backends
    from lrml_kernels.errors import LRMLWarning

    real = backends.why_unavailable
    monkeypatch.setattr(
        backends,
        "why_unavailable",
        lambda name, device_type=None: (
            "cpu backend: build failed:\nc++: not found"
            if name == "cpu"
            else real(name, device_type)
        ),
    )
    monkeypatch.setattr(backends, "_fell_back", set())
    cpu = torch.device("cpu")
    with pytest.warns(
        LRMLWarning, match=r"\(cpu backend: build failed: c\+\+: not found\): the torch"
    ):
        assert backends.resolve("auto", cpu) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", cpu) == "torch"  # (once a process)


def test_exclude_indptr_must_be_non_decreasing():  # (torch backend: no kernel re-check)
    # starts at 0, ends at len(indices), rows sorted: only the decrease in the middle is wrong
    P = params()
    ex = (torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="non-decreasing"):
        lk.lrml_topk(*P, torch.tensor([0, 1, 2]), 2, exclude=ex, backend="torch")


def test_exclude_indptr_must_start_at_zero():
    P = params()
    ex = (torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="start at 0"):
        lk.lrml_topk(*P, torch.tensor([0]), 2, exclude=ex, backend="torch")


@pytest.mark.parametrize("backend", lk.available_backends())
def test_k_zero_is_refused_by_the_op_itself_on_every_backend(backend):
    with pytest.raises(ValueError, match="k must be at least 1"):
        lk.lrml_topk(*params(), torch.tensor([0]), 0, backend=backend)


@pytest.mark.parametrize("backend", lk.available_backends())
def test_one_index_into_an_empty_table_raises_without_validation(backend):
    P = params()
    P[0] = P[0][:0]
    with pytest.raises(IndexError, match="users indexes a table with no rows"):
        lk.lrml_distances(
            *P, torch.tensor([0]), torch.tensor([[0]]), backend=backend, validate=False
        )


def test_distances_sparse_grad_gives_sparse_gradients():
    P = [t.requires_grad_() for t in params()]
    u, i = torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]])
    lk.lrml_distances(*P, u, i, sparse_grad=True, backend="torch").sum().backward()
    assert P[0].grad.is_sparse and P[1].grad.is_sparse


@pytest.mark.parametrize("backend", lk.available_backends())
def test_an_index_equal_to_the_table_size_is_out_of_range(backend):
    P, (u, i) = params(), batch()
    with pytest.raises(IndexError, match="users holds index 5, out of range for a table of 5"):
        lk.lrml_distances(*P, torch.full_like(u, 5), i, backend=backend)
    with pytest.raises(IndexError, match="items holds index 6, out of range for a table of 6"):
        lk.lrml_distances(*P, u, torch.full_like(i, 6), backend=backend)
