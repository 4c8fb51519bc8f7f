"""The fused sparse optimizer step against autograd + the torch optimizer + project_()."""

import copy

import numpy as np
import pytest
import torch
from _gpu import require_gpu_backend

import lrml_kernels as lk
from lrml_kernels.backends import why_unavailable
from lrml_kernels.trainer import LRMLTrainer


def torch_optimizers(m, name, lr, relation_lr_scale=1.0):
    emb = {"params": [m.user_emb, m.item_emb], "lr": lr}
    dense = {"params": [m.keys, m.memory], "lr": lr * relation_lr_scale}
    if name == "adam":
        return [torch.optim.SparseAdam([emb]), torch.optim.Adam([dense])]
    if name == "adagrad":
        return [torch.optim.Adagrad([emb, dense])]
    return [torch.optim.SGD([emb, dense])]


# triton: on CPU tensors through the interpreter, the Triton row update (triton/row_update.py)
BACKENDS = ["torch"] + [b for b in ("cpu", "triton") if why_unavailable(b, "cpu") is None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd"])
@pytest.mark.parametrize(("relation", "scale"), [("pair", 1.0), ("shared", 1.0), ("pair", 0.25)])
def test_fused_step_matches_torch_optimizer_for_20_steps(name, relation, scale, backend):
    # scale: relation_lr_scale, the keys' and memory's learning rate as a factor of lr
    # backend="cpu" runs the C++ row update (row_update_); the reference runs torch ops.
    torch.manual_seed(0)
    fused = lk.LRML(
        30, 25, dim=8, memory_slots=3, relation=relation, sparse=True, backend=backend
    ).double()
    ref = copy.deepcopy(fused)
    ref.backend = "torch"
    trainer = LRMLTrainer(fused, name, lr=0.05, relation_lr_scale=scale)
    opts = torch_optimizers(ref, name, 0.05, scale)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        users = torch.randint(0, 10, (16,), generator=g)  # few users: many repeats
        items = torch.randint(0, 8, (16, 4), generator=g)
        loss = trainer.step(users, items)
        for o in opts:
            o.zero_grad()
        want = ref(users, items)
        want.backward()
        for o in opts:
            o.step()
        ref.project_(users, items)
        torch.testing.assert_close(loss, want.detach())
    for a, b in zip(fused.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert (fused.user_emb[:10].norm(dim=1) <= 1 + 1e-9).all()  # the touched rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_fused_step_projects_into_a_ball_of_radius_max_norm(name, backend):
    # max_norm = 0.37, not the default 1 (x / max(1, |x| / r) and x / max(1, |x| r) agree at
    # r = 1): the fused update (torch ops; cpu: the C++ row_update_; triton: the Triton row
    # update) projects like autograd + the torch optimizer + project_(). Rows start at norm ~1.
    torch.manual_seed(0)
    fused = lk.LRML(13, 11, dim=7, memory_slots=3, max_norm=0.37, sparse=True, backend=backend)
    fused = fused.double()
    ref = copy.deepcopy(fused)
    ref.backend = "torch"
    trainer = LRMLTrainer(fused, name, lr=0.05)
    opts = torch_optimizers(ref, name, 0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        users = torch.randperm(5, generator=g)[torch.tensor([0, 1, 2, 3, 4, 0])]  # all of 0-4
        items = torch.randint(0, 4, (6, 3), generator=g)
        trainer.step(users, items)
        for o in opts:
            o.zero_grad()
        ref(users, items).backward()
        for o in opts:
            o.step()
        ref.project_(users, items)
    for a, b in zip(fused.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    # the touched rows: in the ball, some on its sphere
    norms = fused.user_emb.detach()[:5].norm(dim=1)
    assert (norms <= 0.37 * (1 + 1e-12)).all() and float(norms.max()) == pytest.approx(0.37), norms
    assert (fused.user_emb.detach()[5:].norm(dim=1) > 0.37).all()  # untouched: not projected


def check_bf16_steps_keep_the_fp32_update_on_average(backend, device):
    """One SGD step of mostly less than half a bf16 step: rounded to nearest, 85 % of the fp32
    update would be lost; rounded stochastically, the weights move by whole bf16 steps with the
    probabilities that keep the fp32 update on average."""
    torch.manual_seed(0)
    kw = {"dim": 64, "memory_slots": 3, "max_norm": None, "backend": backend, "device": device}
    m = lk.LRML(500, 400, dtype=torch.bfloat16, **kw)
    m32 = copy.deepcopy(m).float()
    start = [p.detach().float() for p in (m.user_emb, m.item_emb)]
    users = torch.arange(500, device=device)
    items = torch.randint(0, 400, (500, 5), generator=torch.Generator().manual_seed(1))
    items = items.to(device)
    for model in (m, m32):
        LRMLTrainer(model, "sgd", lr=1e-4).step(users, items)
    pairs = ((m.user_emb, m32.user_emb), (m.item_emb, m32.item_emb))
    for (p, p32), p0 in zip(pairs, start, strict=True):
        want = p32.detach() - p0
        nearest = p32.detach().bfloat16().float() - p0
        moved = p.detach().float() - p0
        lost = [(torch.sign(want) * (x - want)).sum() / want.abs().sum() for x in (nearest, moved)]
        assert p.dtype == torch.bfloat16 and lost[0] < -0.8 and abs(lost[1]) < 0.15, lost


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])  # (bf16: a GPU)
def test_bf16_updates_are_rounded_stochastically_without_bias(backend):
    check_bf16_steps_keep_the_fp32_update_on_average(backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_updates_are_rounded_stochastically_without_bias_gpu(backend):
    # the Triton row update's Philox bits (the trainer's update of CUDA tables, any backend)
    require_gpu_backend(backend)
    check_bf16_steps_keep_the_fp32_update_on_average(backend, "cuda")


def test_triton_update_reads_a_rounding_seed_per_step_and_parameter():
    pytest.importorskip("triton")
    m = lk.LRML(30, 25, dim=8, memory_slots=3)
    trainer = LRMLTrainer(m, "adam")
    trainer._impl = type("TritonBackend", (), {"name": "triton"})  # what step() sets
    for step in (1, 2):
        trainer._advance()
        assert trainer._hyper[:, 2].tolist() == [4 * step + i for i in range(4)]


def test_rowwise_adagrad_updates_only_touched_rows_with_one_accumulator_per_row():
    torch.manual_seed(0)
    m = lk.LRML(30, 25, dim=8, memory_slots=3, max_norm=None).double()
    before = m.user_emb.detach().clone()
    tr = LRMLTrainer(m, "rowwise_adagrad", lr=0.1)
    users = torch.tensor([1, 1, 4])
    items = torch.randint(0, 25, (3, 3))
    tr.step(users, items)
    changed = (m.user_emb != before).any(1)
    assert changed.nonzero().flatten().tolist() == [1, 4]
    assert tr.state["user_emb"]["sum"].shape == (30,)
    assert (tr.state["user_emb"]["sum"][[0, 2, 3]] == 0).all()


@pytest.mark.parametrize("name", ["adam", "rowwise_adagrad"])
def test_relation_lr_scale_zero_freezes_keys_and_memory_only(name):
    torch.manual_seed(0)
    m = lk.LRML(10, 10, dim=4, memory_slots=2)
    keys, memory, users = (t.detach().clone() for t in (m.keys, m.memory, m.user_emb))
    tr = LRMLTrainer(m, name, lr=0.1, relation_lr_scale=0.0)
    for _ in range(3):
        tr.step(torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]))
    assert torch.equal(m.keys, keys) and torch.equal(m.memory, memory)
    assert not torch.equal(m.user_emb[:2], users[:2])
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="relation_lr_scale must be finite and >= 0"):
            LRMLTrainer(m, name, relation_lr_scale=bad)


def test_skip_nonfinite_leaves_the_model_untouched():
    m = lk.LRML(10, 10, dim=4, memory_slots=2)
    with torch.no_grad():
        m.keys[0, 0] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    tr = LRMLTrainer(m, "adam", skip_nonfinite=True)
    tr.step(torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]))
    assert tr.skipped == 1 and tr.steps == 0
    for a, b in zip(m.parameters(), before, strict=True):
        assert torch.equal(a.detach().nan_to_num(), b.nan_to_num())


def test_state_dict_round_trip():
    torch.manual_seed(0)
    m = lk.LRML(10, 10, dim=4, memory_slots=2)
    tr = LRMLTrainer(m, "adam", relation_lr_scale=0.5)
    tr.step(torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]))
    m2 = copy.deepcopy(m)
    tr2 = LRMLTrainer(m2, "adam")
    tr2.load_state_dict(copy.deepcopy(tr.state_dict()))
    assert tr2.relation_lr_scale == 0.5
    u, i = torch.tensor([1, 2]), torch.tensor([[1, 5], [3, 0]])
    tr.step(u, i)
    tr2.step(u, i)
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="optimizer"):
        LRMLTrainer(m, "sgd").load_state_dict(tr.state_dict())


def test_bad_optimizer_name():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        LRMLTrainer(lk.LRML(3, 3, dim=2, memory_slots=1), "lbfgs")


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"lr": float("inf")}, "lr must be a finite number > 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"betas": (1.5, 0.999)}, r"betas\[0\] must lie in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, "betas.1. must be a finite number >= 0"),
        ({"adam_eps": float("nan")}, "adam_eps must be a finite number >= 0"),  # (NaN'd the model)
        ({"adagrad_eps": -1e-10}, "adagrad_eps must be a finite number >= 0"),
    ],
)
def test_bad_trainer_arguments(kw, words):
    with pytest.raises(ValueError, match=words):
        LRMLTrainer(lk.LRML(3, 3, dim=2, memory_slots=1), "adam", **kw)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        LRMLTrainer(lk.LRML(3, 3, dim=2, memory_slots=1), "adam").set_lr(-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["adam", "adagrad", "rowwise_adagrad", "sgd"])
def test_int32_indices_step_as_int64_ones(backend, name):
    torch.manual_seed(0)
    m = lk.LRML(9, 11, dim=5, memory_slots=3, backend=backend)
    m2 = copy.deepcopy(m)
    users, items = torch.tensor([0, 3, 3, 8]), torch.randint(0, 11, (4, 3))
    a, b = LRMLTrainer(m, name), LRMLTrainer(m2, name)
    for _ in range(3):
        a.step(users, items)
        b.step(users.int(), items.int())
    for p, q in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_model_cast_after_its_trainer_is_refused():
    m = lk.LRML(5, 5, dim=3, memory_slots=2, backend="torch")
    tr = LRMLTrainer(m, "adam")
    m.double()
    with pytest.raises(ValueError, match="moved or cast after the LRMLTrainer was made"):
        tr.step(torch.tensor([0, 1]), torch.tensor([[1, 2], [3, 4]]))
    LRMLTrainer(m, "adam").step(torch.tensor([0, 1]), torch.tensor([[1, 2], [3, 4]]))


@pytest.mark.skipif(why_unavailable("triton", "cpu") is not None, reason="no Triton interpreter")
@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_triton_steps_follow_an_lr_schedule_with_unchanged_launch_arguments(name, triton_launches):
    """What lets a CUDA graph replay the step: over steps whose lr changes (a schedule) and
    whose Adam bias corrections change, every Triton launch gets the same non-tensor arguments
    and the same parameter, state and scalar tensors, yet the steps match the torch backend's
    (host floats) step for step."""
    torch.manual_seed(0)
    fused = lk.LRML(30, 25, dim=8, memory_slots=3, backend="triton").double()
    ref = copy.deepcopy(fused)
    ref.backend = "torch"
    trainer, want = LRMLTrainer(fused, name, lr=0.05), LRMLTrainer(ref, name, lr=0.05)
    g = torch.Generator().manual_seed(1)
    per_step = []
    for t in range(5):
        lr = 0.05 * 0.5**t
        trainer.set_lr(lr)
        want.set_lr(lr)
        users = torch.randint(0, 10, (16,), generator=g)
        items = torch.randint(0, 8, (16, 4), generator=g)
        triton_launches.clear()
        torch.testing.assert_close(trainer.step(users, items), want.step(users, items))
        for a, b in zip(fused.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        per_step.append(triton_launches[:])
    kernels = [k for k, _ in per_step[0]]
    assert kernels.count("_row_update_kernel") == 4, kernels
    assert kernels.count("_sort_ids_kernel") == 2, kernels  # each table's ids: one launch
    held = [trainer._hyper, *fused.parameters()]
    held += [v for s in trainer.state.values() for v in s.values() if torch.is_tensor(v)]
    held = {("tensor", t.data_ptr()) for t in held}
    for launches in per_step[1:]:
        assert [k for k, _ in launches] == kernels
        for (_, first), (_, now) in zip(per_step[0], launches, strict=True):
            # Tensors the step allocates (batch, gradients, sort) may move in eager mode; a
            # graph's static inputs and memory pool fix them. Nothing else may change.
            keep = [i for i, v in enumerate(first) if v in held or not isinstance(v, tuple)]
            assert [first[i] for i in keep] == [now[i] for i in keep]


def test_cuda_graph_is_refused_where_it_cannot_work():
    m = lk.LRML(10, 10, dim=4, memory_slots=2)
    with pytest.raises(ValueError, match="cuda_graph=True: CUDA graphs need the model on a CUDA"):
        LRMLTrainer(m, "adam", cuda_graph=True)
    cuda = torch.device("cuda")  # the reasons past the device, asked without a GPU
    assert "'torch' backend" in LRMLTrainer(m, "adam")._graph_refusal(cuda, "torch")
    skipping = LRMLTrainer(m, "adam", skip_nonfinite=True)
    if why_unavailable("triton", "cpu") is None:
        assert "skip_nonfinite" in skipping._graph_refusal(cuda, "triton")
        assert LRMLTrainer(m, "adam")._graph_refusal(cuda, "triton") is None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_cuda_graph_step_matches_the_eager_step(name, backend):
    """cuda_graph=True against the eager trainer: 5 steps of new batches under an lr schedule
    (the first captures, the rest replay under sync debug mode "error"), then a new batch shape
    (a second graph) and the first shape again (a replay)."""
    require_gpu_backend(backend)
    torch.manual_seed(0)
    graphed_model = lk.LRML(300, 250, dim=100, memory_slots=20, backend=backend).cuda()
    eager_model = copy.deepcopy(graphed_model)
    graphed = LRMLTrainer(graphed_model, name, cuda_graph=True)
    eager = LRMLTrainer(eager_model, name)
    g = torch.Generator(device="cuda").manual_seed(1)
    got, want = [], []
    shapes = [(512, 5)] * 5 + [(256, 3), (256, 3), (512, 5)]
    for t, (B, C) in enumerate(shapes):
        lr = 0.01 * 0.7**t
        graphed.set_lr(lr)
        eager.set_lr(lr)
        users = torch.randint(0, 300, (B,), device="cuda", generator=g)
        items = torch.randint(0, 250, (B, C), device="cuda", generator=g)
        replay = t not in (0, 5)  # steps 0 and 5 capture (the capture synchronises once)
        if replay:
            torch.cuda.set_sync_debug_mode("error")
        try:
            got.append(graphed.step(users, items))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        want.append(eager.step(users, items))
        assert len(graphed._graphs) == (1 if t < 5 else 2)
    # each returned loss is the step's own (a copy, not the graph's overwritten output)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-5)
    pairs = list(zip(graphed_model.parameters(), eager_model.parameters(), strict=True))
    for a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key, value in graphed.state["item_emb"].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(value, eager.state["item_emb"][key], rtol=1e-5, atol=1e-7)
    assert graphed.state["keys"]["step"] == eager.state["keys"]["step"] == len(shapes)
    bitwise = all(torch.equal(a, b) for a, b in pairs)
    print(f"cuda graph vs eager, {backend} {name}: parameters bitwise equal: {bitwise}")


class _Rerun:
    """Stands in for a captured CUDA graph on the CPU: a replay runs the captured step again."""

    def __init__(self, run):
        self.replay = run


@pytest.mark.skipif(why_unavailable("triton", "cpu") is not None, reason="no Triton interpreter")
def test_graph_step_bookkeeping_gives_the_eager_steps(monkeypatch):
    """The graph step's own logic on the CPU (capture and replay stood in for by running the
    step on the graph's static inputs): one graph per batch shape, the batch copied in, the
    loss copied out, at most MAX_GRAPHS shapes (then eager), a new capture after
    load_state_dict, and the eager trainer's results bit for bit under an lr schedule."""
    from lrml_kernels.trainer import MAX_GRAPHS, _Graph

    def capture(self, users, items):
        static = _Graph(None, users.clone(), items.clone(), None)

        def run():  # as a replay: the loss written into the same tensor every time
            loss, *grads = self._gradients(static.users, static.items)
            self._update(static.users, static.items, *grads)
            static.loss = loss if static.loss is None else static.loss.copy_(loss)

        run()  # the warm-up step
        static.graph = _Rerun(run)
        return static.loss.clone(), static

    monkeypatch.setattr(LRMLTrainer, "_capture", capture)
    monkeypatch.setattr(LRMLTrainer, "_graph_refusal", lambda self, device, backend: None)
    torch.manual_seed(0)
    graphed_model = lk.LRML(30, 25, dim=8, memory_slots=3, backend="triton").double()
    eager_model = copy.deepcopy(graphed_model)
    graphed, eager = LRMLTrainer(graphed_model, "adam"), LRMLTrainer(eager_model, "adam")
    graphed.cuda_graph = True  # the option itself is refused on CPU tensors
    g = torch.Generator().manual_seed(1)
    shapes = [(16, 4), (16, 4), (8, 4), (16, 4), (4, 2), (5, 2), (6, 2), (16, 4)]
    got, want, held = [], [], []
    for t, (B, C) in enumerate(shapes):
        if t == len(shapes) - 1:  # reallocated state: every graph is captured again
            graphed.load_state_dict(copy.deepcopy(graphed.state_dict()))
        for tr in (graphed, eager):
            tr.set_lr(0.01 * 0.7**t)
        users = torch.randint(0, 10, (B,), generator=g)
        items = torch.randint(0, 8, (B, C), generator=g)
        got.append(graphed.step(users, items))
        want.append(eager.step(users, items))
        held.append(len(graphed._graphs))
    assert held == [1, 1, 2, 2, 3, MAX_GRAPHS, MAX_GRAPHS, 1]  # (6, 2): eager, no 5th graph
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))  # each its own copy
    for a, b in zip(graphed_model.parameters(), eager_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert graphed.steps == eager.steps == len(shapes)


def test_trainer_and_model_options_are_checked_at_construction():
    m = lk.LRML(10, 12, dim=8, memory_slots=3)
    bad = [
        (dict(betas=(0.9, 0.99, 0.5)), ValueError, "betas must be a pair"),
        (dict(betas=0.9), ValueError, "betas must be a pair"),
        (dict(skip_nonfinite="no"), TypeError, "skip_nonfinite must be True or False"),
        (dict(cuda_graph="no"), TypeError, "cuda_graph must be True or False"),
    ]
    for kw, exc, words in bad:
        with pytest.raises(exc, match=words):
            lk.LRMLTrainer(m, **kw)
    with pytest.raises(TypeError, match="model must be an lrml_kernels.LRML, got Linear"):
        lk.LRMLTrainer(torch.nn.Linear(2, 2))
    assert lk.LRMLTrainer(m, lr=np.float32(0.5)).lr == 0.5  # numpy numbers are numbers
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        lk.LRML(10, 12, dim=8, memory_slots=3, backend="gpu")
    with pytest.raises(TypeError, match="sparse must be True or False"):
        lk.LRML(10, 12, dim=8, memory_slots=3, sparse="no")


def test_trainer_refuses_a_frozen_table_rather_than_moving_it():
    m = lk.LRML(10, 12, dim=8, memory_slots=3, backend="torch")
    m.item_emb.requires_grad_(False)
    before = m.item_emb.detach().clone()
    with pytest.raises(ValueError, match="item_emb has requires_grad=False"):
        lk.LRMLTrainer(m).step(torch.tensor([0, 1]), torch.tensor([[5, 7], [2, 9]]))
    assert torch.equal(m.item_emb, before)
    cml = lk.LRML(10, 12, dim=8, memory_slots=3, relation="none", backend="torch")
    assert torch.isfinite(lk.LRMLTrainer(cml).step(torch.tensor([0]), torch.tensor([[5, 7]])))


def test_trainer_load_state_dict_checks_the_state_against_the_model():
    u, i = torch.tensor([0, 1]), torch.tensor([[5, 7], [2, 9]])
    t = lk.LRMLTrainer(lk.LRML(10, 12, dim=8, memory_slots=3, backend="torch"))
    t.step(u, i)
    # another model's state: refused when loaded (was: a misleading error at the next step, the
    # step counter advanced)
    other = lk.LRMLTrainer(lk.LRML(20, 12, dim=8, memory_slots=3, backend="torch"))
    with pytest.raises(ValueError, match=r"user_emb's state 'exp_avg' is \(10, 8\), .* \(20, 8\)"):
        other.load_state_dict(t.state_dict())
    assert other.steps == 0
    with pytest.raises(ValueError, match="adagrad needs"):
        m = lk.LRML(10, 12, dim=8, memory_slots=3, backend="torch")
        lk.LRMLTrainer(m, "adagrad").load_state_dict({**t.state_dict(), "optimizer": "adagrad"})
    # a float32 state in a float64 model takes the model's compute dtype
    t64 = lk.LRMLTrainer(lk.LRML(10, 12, dim=8, memory_slots=3, dtype=torch.float64))
    t64.load_state_dict(t.state_dict())
    assert t64.state["user_emb"]["exp_avg"].dtype == torch.float64
    assert torch.isfinite(t64.step(u, i))


@pytest.mark.parametrize("betas", [(1.0, 0.999), (0.9, 1.0)])
def test_trainer_refuses_a_beta_of_one(betas):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        LRMLTrainer(lk.LRML(3, 3, dim=2, memory_slots=1), "adam", betas=betas)


def test_trainer_refuses_reduction_none():
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        LRMLTrainer(lk.LRML(3, 3, dim=2, memory_slots=1), "adam", reduction="none")
