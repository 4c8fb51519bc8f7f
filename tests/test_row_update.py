"""The Triton fused row update (lrml_kernels/triton/row_update.py): the same steps as the trainer's
torch-ops path, with no host synchronisation. (Against the torch optimizers + project_():
tests/test_trainer.py, backend "triton".)

On the CPU the kernel runs through the Triton interpreter (conftest sets TRITON_INTERPRET=1).
"""

import copy

import pytest
import torch
from _gpu import require_gpu_backend
from torch.utils._python_dispatch import TorchDispatchMode

import lrml_kernels as lk
from lrml_kernels import backends
from lrml_kernels.trainer import OPTIMIZERS, LRMLTrainer
from lrml_kernels.triton.row_update import row_update_

pytestmark = pytest.mark.skipif(
    backends.why_unavailable("triton") is not None, reason="triton backend unavailable here"
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {  # (atol, rtol) per table dtype
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (2e-3, 2e-3),
}


def _triton():
    from lrml_kernels import triton as triton_backend

    return triton_backend


@torch.no_grad()
def _update(tr, name, idx, grad, max_norm):
    """One row update of table ``name`` (what step() does after the backward), with the
    scalars of the step ``tr._advance()`` counted last."""
    tr._update_rows(name, getattr(tr.model, name), idx, grad, max_norm)


def _two_trainers(optimizer, dtype, max_norm):
    """Two trainers on copies of one model: the Triton row update and the torch-ops path."""
    torch.manual_seed(0)
    m = lk.LRML(40, 30, dim=13, memory_slots=3, max_norm=max_norm).to(DEVICE, dtype)
    fused = LRMLTrainer(m, optimizer, lr=0.05)
    ref = LRMLTrainer(copy.deepcopy(m), optimizer, lr=0.05)
    fused._impl = _triton()  # what step() sets on the triton backend
    ref._impl = backends.TORCH_BACKEND
    if DEVICE == "cuda":  # the torch-ops path is the one without the Triton kernel
        ref._gpu_row_update = lambda table: None
    return fused, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("max_norm", [1.0, None])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_row_and_dense_updates_match_the_torch_ops_path_step_for_step(optimizer, max_norm, dtype):
    fused, ref = _two_trainers(optimizer, dtype, max_norm)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for tr in (fused, ref):
            tr._advance()  # the step counters and (lr, eps), as step() before its updates
        for name in ("user_emb", "item_emb"):
            idx = torch.randint(0, 6, (9, 3), generator=g).to(DEVICE)  # many repeats
            grad = torch.randn(9, 3, 13, generator=g, dtype=torch.float64).to(DEVICE, dtype)
            for tr in (fused, ref):
                _update(tr, name, idx, grad, max_norm)
        for name in ("keys", "memory"):  # dense: one launch each
            grad = torch.randn(3, 13, generator=g, dtype=torch.float64).to(DEVICE, dtype)
            for tr in (fused, ref):
                with torch.no_grad():
                    tr._update_dense(name, getattr(tr.model, name), grad)
    atol, rtol = TOL[dtype]
    for name in ("user_emb", "item_emb", "keys", "memory"):
        got, want = getattr(fused.model, name), getattr(ref.model, name)
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
        for key, value in fused.state[name].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(value, ref.state[name][key], atol=atol, rtol=rtol)
            else:
                assert value == ref.state[name][key]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_betas_and_max_norm_are_typed_as_on_the_gpu(gpu_scalar_args, dtype):
    # A compiled launch types a Python float argument fp32 unless the kernel annotates it (the
    # interpreter keeps the double): fp64 tables got fp32 betas and max_norm on the GPU (1 -
    # beta2 = 1 - fp32(0.999) = 9.99987e-4, not 1e-3), ~1e-5 off the torch-ops path's steps.
    test_row_and_dense_updates_match_the_torch_ops_path_step_for_step("adam", 0.7, dtype)


@pytest.mark.parametrize("d", [1, 13, 200])
def test_long_segments_sum_every_gradient_row(d):
    """A row repeated more often than one read of BLOCK_S slots, and runs cut by the batch's end."""
    torch.manual_seed(0)
    table = torch.randn(7, d, dtype=torch.float64, device=DEVICE)
    idx = torch.tensor([3] * 37 + [0, 6, 6] + [5] * 17, device=DEVICE)[torch.randperm(57)]
    grad = torch.randn(57, d, dtype=torch.float64, device=DEVICE)
    want = table.clone().index_add_(0, idx, grad, alpha=-0.1)
    _triton()  # the backend registered
    from lrml_kernels.triton.row_update import row_update_

    hyper = torch.tensor([0.1, 0.0, 0.0], dtype=torch.float64, device=DEVICE)  # (lr, eps, seed)
    row_update_(table, idx, grad, "sgd", hyper)
    torch.testing.assert_close(table, want, atol=1e-12, rtol=1e-12)


# Table rows per key width: the item table's ids (15 bits) take int32 keys, 2^31 rows (31 bits,
# every position needs more) int64 keys; Netflix's users (19 bits) take either by the batch size.
SORT_TABLES = {32: 17_770, 64: 1 << 31}


def _sort_sizes():
    """(n, rows, key bits): the sizes of issue 15, SORT_MAX and one past it (torch.sort), and two
    tight tables whose largest id at the last position is the padding's key, the largest int32
    (18 + 13 bits in one chunk, 16 + 15 bits in four)."""
    from lrml_kernels.triton.row_update import SORT_CHUNK, SORT_MAX

    sizes = [
        (n, SORT_TABLES[bits], bits)
        for bits in (32, 64)
        for n in sorted({1, 2, 7, 4096, 4097, 20_480, SORT_MAX[bits], SORT_MAX[bits] + 1})
    ]
    sizes += [(SORT_CHUNK[32], 1 << 18, 32), (SORT_MAX[32], 1 << 16, 32)]
    return [pytest.param(*s, id=f"{s[0]}-of-{s[1]}-int{s[2]}") for s in sizes]


def _check_sort_ids(n, rows, bits, device):
    """``sort_ids`` of n ids with many repeats, spread over ``rows``, is ``torch.sort(ids,
    stable=True)``: one launch of the one-program sort up to SORT_MAX, torch.sort above."""
    _triton()
    from lrml_kernels.triton import row_update as ru

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, max(1, n // 8), (n,), generator=g)  # ~8 of each
    ids = (ids * (rows // max(1, n // 8))).to(device)  # spread over the table: the top id bits
    ids[-1] = rows - 1  # the largest id, at the last position
    launches = []
    run = ru._sort_ids_kernel.run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ru._sort_ids_kernel, "run", lambda *a, **k: launches.append(k) or run(*a, **k))
        got = ru.sort_ids(ids, rows)
    want = torch.sort(ids, stable=True)
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.int64
    assert torch.equal(got[0].long(), want.values) and torch.equal(got[1], want.indices)
    assert bits == (32 if (rows - 1).bit_length() + max(1, (n - 1).bit_length()) <= 31 else 64)
    one_launch = n <= ru.SORT_MAX[bits]
    assert len(launches) == one_launch
    if one_launch:  # the keys: int32 where they fit; several chunks above SORT_CHUNK
        assert launches[0]["KEY64"] == (bits == 64)
        chunk = 1 << launches[0]["LOG_C"]
        assert chunk == min(ru.SORT_CHUNK[bits], max(2, 1 << (n - 1).bit_length()))
        assert launches[0]["CHUNKS"] == -(-n // chunk)


@pytest.mark.parametrize(("n", "rows", "bits"), _sort_sizes())
def test_sort_ids_is_torch_sort_stable(n, rows, bits):
    _check_sort_ids(n, rows, bits, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n", "rows", "bits"),
    [(4096, 480_189, 32), (20_480, 17_770, 32), (1 << 14, 1 << 31, 64), (32_769, 17_770, 32)],
    ids=["netflix-users", "netflix-items", "int64-4-chunks", "torch.sort"],
)
def test_gpu_sort_ids_is_torch_sort_stable(n, rows, bits):
    """The compiled kernel (its barrier between the chunks' sorts and the merge) on a GPU."""
    require_gpu_backend("triton")
    _check_sort_ids(n, rows, bits, "cuda")


def test_row_update_touches_only_the_indexed_rows():
    fused, _ = _two_trainers("adam", torch.float64, 1.0)
    table = fused.model.user_emb
    before = table.detach().clone()
    idx = torch.tensor([5, 2, 5, 5], device=DEVICE, dtype=torch.int32)
    grad = torch.randn(4, 13, dtype=torch.float64, device=DEVICE)
    fused._advance()
    _update(fused, "user_emb", idx, grad, 1.0)
    changed = (table != before).any(1).cpu()
    assert changed.nonzero().flatten().tolist() == [2, 5]
    untouched = fused.state["user_emb"]["exp_avg"].abs().sum(1).cpu() == 0
    assert untouched.nonzero().flatten().tolist() == [i for i in range(40) if i not in (2, 5)]


@pytest.mark.parametrize("bad", [-1, 40, 2**31 - 1, 2**30 + 5, 2**32 + 5])
def test_row_update_skips_ids_outside_the_table(bad):
    # -1 is the sampler's "no negative"; before, a run of -1s never ended its segment (the
    # masked loads past n read -1 too) and other ids wrote outside the table. 2^30 + 5: its
    # int32 sort key (id << 2 position bits) wrapped to row 5's; 2^32 + 5: the int64 id cast to
    # an int32 key was 5. Row 5 was updated with the out-of-range ids' gradients.
    table = torch.randn(40, 13, dtype=torch.float64, device=DEVICE)
    before = table.clone()
    state = (torch.zeros_like(table), torch.zeros_like(table))
    hyper = torch.tensor([0.1, 1e-8, 0.0], dtype=torch.float64, device=DEVICE)
    idx = torch.tensor([bad, 7, bad, bad], device=DEVICE)
    row_update_(table, idx, torch.ones(4, 13, dtype=torch.float64, device=DEVICE),
                "adam", hyper, state)  # fmt: skip
    assert (table != before).any(1).nonzero().flatten().tolist() == [7]
    assert (state[0] != 0).any(1).nonzero().flatten().tolist() == [7]


def test_row_updates_reject_state_and_gradients_of_another_shape():
    """The kernel indexes the state as ``[R, d]`` (``[R]`` row-wise) and the gradients as
    ``idx.shape + (d,)`` (dense: ``[R, d]``); other shapes raise before the launch. Before, only
    the state's first dimension was checked: Adam on ``[R]`` state read and wrote d values at
    ``state + row``, past the end of the last rows' state, and a dense gradient of fewer rows
    than the table was read past its end. (Each case is a view into a larger buffer, so that
    the unchecked launch stays inside memory the test owns.)"""
    _triton()
    from lrml_kernels.triton.row_update import dense_update_

    table = torch.zeros(40, 13, dtype=torch.float64, device=DEVICE)
    hyper = torch.tensor([0.1, 1e-8, 0.0], dtype=torch.float64, device=DEVICE)
    idx = torch.tensor([1, 39], device=DEVICE)
    grad = torch.ones(2, 13, dtype=torch.float64, device=DEVICE)
    buf = torch.zeros(40 * 13, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="state"):
        row_update_(table, idx, grad, "adam", hyper, (buf[:40], buf[:40]))
    with pytest.raises(ValueError, match="state"):
        row_update_(table, idx, grad, "adagrad", hyper, (buf[:40],))
    with pytest.raises(ValueError, match="state"):
        row_update_(table, idx, grad, "rowwise_adagrad", hyper, (buf.view(40, 13),))
    with pytest.raises(ValueError, match="grad"):
        row_update_(table, idx, grad.reshape(26), "sgd", hyper)
    with pytest.raises(ValueError, match="grad"):
        dense_update_(table, buf.view(40, 13)[:39], "sgd", hyper)
    with pytest.raises(ValueError, match="state"):
        dense_update_(table, grad.new_zeros(40, 13), "adam", hyper, (buf[:40], buf[:40]))
    assert not table.any() and not buf.any()  # nothing ran


@pytest.mark.parametrize("n", [7, 8193, 32_769], ids=["one-chunk", "several-chunks", "torch.sort"])
def test_sort_ids_never_turns_an_id_outside_the_table_into_one_inside(n):
    """Every sorted slot holds its own id (``ids[perm[slot]]``) where that id is a row of the
    table, and an id outside ``[0, rows)`` where it is not: an out-of-range id (2^30 + 5 wraps
    an int32 key onto row 5's, 2^32 + 5 is 5 once cast to int32) is never some other row."""
    _triton()
    from lrml_kernels.triton.row_update import sort_ids

    rows = 40
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, rows, (n,), generator=g)
    bad = torch.tensor([2**30 + 5, 2**32 + 5, -7, rows, 2**31 - 1])
    at = torch.randperm(n, generator=g)[: bad.numel()]
    ids[at] = bad[: at.numel()]
    ids = ids.to(DEVICE)
    got, perm = sort_ids(ids, rows)
    own = ids[perm]
    inside = (own >= 0) & (own < rows)
    assert torch.equal(got.long()[inside], own[inside])
    assert not ((got[~inside] >= 0) & (got[~inside] < rows)).any()
    assert torch.equal(perm.sort().values.cpu(), torch.arange(n))  # a permutation
    assert (got[1:] >= got[:-1]).all()


METADATA_OPS = ("aten.view", "aten.detach", "aten._reshape_alias", "aten.select")  # views
SYNCING = ("aten.item", "aten._local_scalar_dense", "aten.nonzero", "aten.unique")


class _NoSyncOps(TorchDispatchMode):
    """Fails on the aten ops that synchronise with the host; counts the others.

    Ops issued by the Triton interpreter inside a launch (its host copies) are not the program's:
    they are left out, and each launch counts as one op.
    """

    def __init__(self):
        super().__init__()
        self.ops, self.in_kernel = [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(SYNCING):
            raise AssertionError(f"{name} synchronises with the host")
        if not self.in_kernel:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_sync(monkeypatch):
    mode = _NoSyncOps()
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def counted(self, *args, **kwargs):
            mode.ops.append(f"triton.{self.fn.__name__}")
            mode.in_kernel = True
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.in_kernel = False

        monkeypatch.setattr(InterpretedFunction, "run", counted)
    return mode


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_row_update_has_no_host_sync_and_few_ops(optimizer, no_sync):
    fused, _ = _two_trainers(optimizer, torch.float32, 1.0)
    idx = torch.randint(0, 6, (9, 3), device=DEVICE)
    grad = torch.randn(9, 3, 13, device=DEVICE)
    fused._advance()
    with no_sync:
        _update(fused, "item_emb", idx, grad, 1.0)
    if DEVICE == "cpu":
        # metadata ops (``table.data``, the reshapes) and allocations, then two launches: the
        # one-program sort (27 ids) and the row update
        work = [op for op in no_sync.ops if not op.startswith(METADATA_OPS + ("aten.empty",))]
        assert work == ["triton._sort_ids_kernel", "triton._row_update_kernel"], no_sync.ops


def test_triton_training_step_has_no_host_sync(no_sync):
    """A whole step (validate=False) of the triton backend: no op that synchronises."""
    torch.manual_seed(0)
    m = lk.LRML(30, 25, dim=8, memory_slots=3, backend="triton").to(DEVICE)
    trainer = LRMLTrainer(m, "adam")
    users = torch.randint(0, 10, (16,), device=DEVICE)
    items = torch.randint(0, 8, (16, 4), device=DEVICE)
    trainer.step(users, items)  # warm-up: compilation, first allocations
    no_sync.ops.clear()
    with no_sync:
        trainer.step(users, items)
    work = [op for op in no_sync.ops if not op.startswith(METADATA_OPS + ("aten.empty",))]
    # the tables' ids are sorted by one Triton launch each (up to SORT_MAX ids), not torch.sort
    assert not [op for op in work if op.startswith("aten.sort")], work
    if DEVICE == "cpu":  # interpreted launches are seen (CUDA launches bypass the dispatcher)
        # 2 sorts (user and item tables), 2 sorted row updates, 2 dense ones (keys, memory)
        assert work.count("triton._sort_ids_kernel") == 2, work
        assert work.count("triton._row_update_kernel") == 4, work
        # the step's scalars (lr, eps): a host tensor and one copy to the device (on a GPU a
        # memcpy from pinned memory, not a kernel)
        scalars = ["aten.lift_fresh.default", "aten.copy_.default"]
        assert [op for op in work if op in scalars] == scalars, str(work)
        kernels = [op for op in work if op not in scalars]
        # fwd, hinge, bwd, 3 partial sums, 2 x (sort + row update), keys, memory: each sort is
        # one Triton launch, so 12 is the step's whole count of kernels (issue 15's bound; the
        # GPU check's profile counts them on a GPU)
        assert len(kernels) == 12, str(work)
    print(f"ops of one triton adam step on {DEVICE}: {len(work)}: {work}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gpu_step_runs_under_sync_debug_mode_error(backend, optimizer):
    require_gpu_backend(backend)
    torch.manual_seed(0)
    m = lk.LRML(300, 250, dim=100, memory_slots=20, backend=backend).cuda()
    trainer = LRMLTrainer(m, optimizer)
    users = torch.randint(0, 100, (512,), device="cuda")
    items = torch.randint(0, 250, (512, 5), device="cuda")
    trainer.step(users, items)  # warm-up: compilation, first allocations
    torch.cuda.synchronize()
    table, state = m.item_emb, trainer.state["item_emb"]
    grad = torch.randn(512, 5, 100, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer._advance()  # the step's scalars: one copy from pinned memory
        _update(trainer, "item_emb", items, grad, 1.0)  # the row update alone
        trainer.step(users, items, validate=False)  # the whole step
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert state["step"] == 3
    assert torch.isfinite(table).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="reads the interpreter's launches")
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_scalars_changed_in_place_reach_a_launch_with_the_same_arguments(
    optimizer, triton_launches
):
    """The CPU proof that a replayed graph sees a new lr and eps: updates launched twice with
    the same arguments, ``hyper`` changed in place between them, give exactly the updates of
    launches handed the new values in a tensor of their own."""
    from lrml_kernels.triton.row_update import dense_update_, row_update_

    torch.manual_seed(0)
    f64 = {"dtype": torch.float64, "device": DEVICE}
    per_row = {"adam": [(13,)] * 2, "adagrad": [(13,)], "rowwise_adagrad": [()], "sgd": []}

    def tensors(rows):  # a table and its optimizer state
        state = [torch.zeros(rows, *s, **f64) for s in per_row[optimizer]]
        return torch.randn(rows, 13, **f64), state

    (param, state), (table, table_state) = tensors(4), tensors(9)
    want, want_state = param.clone(), [s.clone() for s in state]
    want_table, want_table_state = table.clone(), [s.clone() for s in table_state]
    start = param.clone()
    idx = torch.tensor([3, 0, 3, 6, 3], device=DEVICE)
    # inputs at fixed addresses, refilled in place, as a graph's static buffers
    hyper = torch.empty(3, **f64)
    grad, grad_rows = torch.empty(4, 13, **f64), torch.empty(5, 13, **f64)
    grads = []
    for lr, eps in ((0.1, 1e-8), (0.03, 1e-3)):  # a schedule's next lr; Adam's next eps
        grads.append(grad.copy_(torch.randn(4, 13, **f64)).clone())
        grad_rows.copy_(torch.randn(5, 13, **f64))
        hyper.copy_(torch.tensor([lr, eps, 0.0], dtype=torch.float64))  # in place: same address
        dense_update_(param, grad, optimizer, hyper, tuple(state))
        row_update_(table, idx, grad_rows, optimizer, hyper, tuple(table_state), max_norm=1.0)
        own = torch.tensor([lr, eps, 0.0], **f64)
        dense_update_(want, grad, optimizer, own, tuple(want_state))
        row_update_(
            want_table, idx, grad_rows, optimizer, own, tuple(want_table_state), max_norm=1.0
        )
    assert torch.equal(param, want) and torch.equal(table, want_table)
    for got, ref in zip(state + table_state, want_state + want_table_state, strict=True):
        assert torch.equal(got, ref)
    if optimizer == "sgd":  # the second launch used the second lr
        torch.testing.assert_close(param, start - 0.1 * grads[0] - 0.03 * grads[1])
    # The two dense launches on ``param`` had identical arguments; the two row updates differ
    # only in the addresses of the sort's fresh outputs, which a graph's memory pool fixes.
    dense = [a for _, a in triton_launches if a[0] == ("tensor", param.data_ptr())]
    assert len(dense) == 2 and dense[0] == dense[1]
    sort_outputs = (6, 7)  # sorted_ptr, perm_ptr
    rows = [
        [v for i, v in enumerate(a) if i not in sort_outputs]
        for _, a in triton_launches
        if a[0] == ("tensor", table.data_ptr())
    ]
    assert len(rows) == 2 and rows[0] == rows[1]


def test_bf16_rows_are_rounded_stochastically_without_bias_and_by_the_seed():
    """bf16 tables: an update of a quarter of a bf16 step survives on average (rounding to
    nearest would leave every value at 1.0), the draw is the seed's (a seed changed in place
    gives the launch of its own tensor; another seed other bits), and the torch-ops path draws
    the same distribution."""
    from lrml_kernels.trainer import stochastic_round_bf16
    from lrml_kernels.triton.row_update import dense_update_

    rows, d, step = 512, 64, 2.0**-10  # bf16's step below 1.0 is 2^-8
    f32 = {"dtype": torch.float32, "device": DEVICE}
    grad = torch.full((rows, d), step, **f32)
    idx = torch.arange(rows, device=DEVICE)

    def updated(seed, dense=False):
        table = torch.ones(rows, d, dtype=torch.bfloat16, device=DEVICE)
        hyper = torch.tensor([1.0, 0.0, seed], **f32)  # SGD at lr 1: x = 1 - 2^-10
        if dense:
            dense_update_(table, grad, "sgd", hyper)
        else:
            row_update_(table, idx, grad, "sgd", hyper)
        return table

    a, b = updated(1.0), updated(2.0)
    assert set(a.float().unique().tolist()) == {1.0 - 2.0**-8, 1.0}
    # 32,768 draws of p = 1/4: the mean's standard error is 2.4e-3 · 2^-8 ≈ 1e-5
    for t in (a, b, updated(3.0, dense=True)):
        assert abs(t.float().mean().item() - (1 - step)) < 6e-5
    assert torch.equal(a, updated(1.0)) and not torch.equal(a, b)
    # the same seed in place of another (a graph replay) draws that seed's bits
    table = torch.ones(rows, d, dtype=torch.bfloat16, device=DEVICE)
    hyper = torch.tensor([1.0, 0.0, 2.0], **f32)
    hyper[2] = 1.0
    row_update_(table, idx, grad, "sgd", hyper)
    assert torch.equal(table, a)
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.full((rows, d), 1 - step, **f32)
    torch_path = stochastic_round_bf16(x, g).float()
    assert set(torch_path.unique().tolist()) == {1.0 - 2.0**-8, 1.0}
    assert abs(torch_path.mean().item() - (1 - step)) < 6e-5
