"""One LRML training step with the optimizer fused into the backward, FBGEMM-style.

The backend returns the loss and per-row gradients (``[B, d]`` for users, ``[B, C, d]`` for
items); the batch's indices are de-duplicated, each touched row's gradient is summed, and only those
rows (and their optimizer state) are updated in place, then projected into the ``max_norm`` ball.
No ``[U, d]`` or ``[I, d]`` gradient is built: one step costs O(B·C·d + N·d) memory beyond the
tables and their optimizer state. ``keys`` and ``memory`` use the same optimizer densely, at the
learning rate ``lr × relation_lr_scale``. fp16/bf16 parameters are updated in fp32 from fp32
state; bf16 ones are written back stochastically rounded (:func:`stochastic_round_bf16` on the
torch-ops path; the cpu backend's C++ update and the Triton update draw the Triton kernel's
Philox bits), with bits drawn from a seed per step and parameter.

Optimizers (``optimizer=``), each matching its torch counterpart step for step:

================== ========================================= =======================================
name               embeddings (touched rows only)            keys / memory
================== ========================================= =======================================
``adam``           lazy Adam = ``torch.optim.SparseAdam``    ``torch.optim.Adam``
``adagrad``        ``torch.optim.Adagrad`` (sparse)          ``torch.optim.Adagrad``
``rowwise_adagrad`` one accumulator per row (FBGEMM)          one accumulator per row
``sgd``            ``torch.optim.SGD`` (sparse)              ``torch.optim.SGD``
================== ========================================= =======================================

``cuda_graph=True`` captures the whole step (the backend's gradients, both sorted row updates,
keys and memory) as one CUDA graph per batch shape, for small batches whose step is bound by the
host's kernel launches. The per-step scalars (learning rate, Adam's bias corrections) reach the
Triton updates through a small device tensor that every step fills with one non-blocking copy,
eager or replayed; :meth:`LRMLTrainer.step` documents when a graph is captured and replayed.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from lrml_kernels import backends, ops
from lrml_kernels.model import LRML
from lrml_kernels.precision import fp32_matmul_precision
from lrml_kernels.reference import compute_dtype

OPTIMIZERS = ("adam", "adagrad", "rowwise_adagrad", "sgd")
DEFAULT_LR = {"adam": 1e-3, "adagrad": 0.1, "rowwise_adagrad": 0.1, "sgd": 0.1}
_PARAMS = ("user_emb", "item_emb", "keys", "memory")  # the rows of the device scalars ``_hyper``
MAX_GRAPHS = 4  # batch shapes captured per trainer; further shapes run eagerly
# Seeds of the stochastic rounding of bf16 parameters: integers below this, so that the Triton
# update reads them exactly from its fp32 scalars (a 24-bit significand)
ROUND_SEEDS = 1 << 24
GRAPH_BACKENDS = ("triton", "cuda")
_STATE_KEYS = {  # the per-row state tensors, in the order of the Triton row update
    "adam": ("exp_avg", "exp_avg_sq"),
    "adagrad": ("sum",),
    "rowwise_adagrad": ("sum",),
    "sgd": (),
}


def check_relation_lr_scale(scale) -> float:
    """``scale`` as a float: a real number, finite and >= 0 (the keys' and memory's factor of
    the learning rate; 0 freezes them); otherwise ``ValueError``."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 <= scale < math.inf:
        raise ValueError(f"relation_lr_scale must be finite and >= 0, got {scale!r}")
    return float(scale)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 ``x`` (contiguous) in bf16, each value rounded up (away from zero) with probability
    equal to the fraction of a bf16 step it lies above the value below, so ``E[result] = x``.

    Adds 16 random low bits to the fp32 pattern and truncates them (the pattern's carry into the
    exponent is the next binade's value); non-finite values are rounded to nearest. Updates
    smaller than half a bf16 step (2⁻⁹ to 2⁻⁸ of a value) vanish under rounding to nearest and
    survive here on average, as in FBGEMM's half-precision embedding tables.
    """
    bits = torch.randint(
        0, 1 << 16, x.shape, dtype=torch.int32, generator=generator, device=x.device
    )
    up = (x.view(torch.int32) + bits).bitwise_and_(-(1 << 16)).view(torch.float32)
    return torch.where(torch.isfinite(x), up, x).to(torch.bfloat16)


@dataclass
class _Graph:
    """A captured step: the graph, its static inputs (users ``[B]``, items ``[B, C]``) and the
    loss tensor every replay overwrites."""

    graph: torch.cuda.CUDAGraph
    users: torch.Tensor
    items: torch.Tensor
    loss: torch.Tensor | None


class LRMLTrainer:
    """Fused sparse training steps for an :class:`~lrml_kernels.LRML` model.

    Args:
        model: the model; its ``backend``, ``distance``, ``relation``, ``margin``, ``eps`` and
            ``max_norm`` are used.
        optimizer: one of ``OPTIMIZERS``. lr: learning rate (default per optimizer: ``DEFAULT_LR``).
        relation_lr_scale: the keys' and memory's learning rate is ``lr × relation_lr_scale``
            (≥ 0; 0 freezes them). Every pair's gradient reaches these few dense parameters, so
            at the embeddings' rate they move the relation of every pair at every step.
        betas, adam_eps: Adam's coefficients. adagrad_eps: Adagrad's epsilon.
        reduction: "sum" (the authors' code) or "mean" over the batch rows.
        skip_nonfinite: check the loss and gradients of every step (one host sync) and skip the
            update when any is NaN/Inf; ``skipped`` counts such steps.
        process_group: data-parallel training with ``torch.distributed`` (default: the default
            group when it is initialised with more than one rank). Every rank passes a batch of
            the same shape; the touched row ids and their gradients are all-gathered and the
            keys/memory gradients all-reduced, so every replica applies the update of the
            combined batch and the replicas stay identical.
        cuda_graph: capture the step as a CUDA graph and replay it (see :meth:`step`). Needs
            the model's parameters on a CUDA device, the triton or cuda backend, one process and
            ``skip_nonfinite=False``; otherwise ``ValueError``.
    """

    def __init__(
        self,
        model: LRML,
        optimizer: str = "adam",
        lr: float | None = None,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        adagrad_eps: float = 1e-10,
        reduction: str = "sum",
        skip_nonfinite: bool = False,
        process_group=None,
        cuda_graph: bool = False,
        relation_lr_scale: float = 1.0,
    ):
        if not isinstance(model, LRML):
            raise TypeError(f"model must be an lrml_kernels.LRML, got {type(model).__name__}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        for name, flag in (("skip_nonfinite", skip_nonfinite), ("cuda_graph", cuda_graph)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.model, self.optimizer = model, optimizer
        self.lr = (
            DEFAULT_LR[optimizer] if lr is None else ops.check_number("lr", lr, low=0, above=True)
        )
        for name, beta in zip(("betas[0]", "betas[1]"), betas, strict=True):
            if not (ops.check_number(name, beta, low=0) < 1):
                raise ValueError(f"{name} must lie in [0, 1), got {beta!r}")
        self.relation_lr_scale = check_relation_lr_scale(relation_lr_scale)
        self.betas = (float(betas[0]), float(betas[1]))
        self.adam_eps = ops.check_number("adam_eps", adam_eps, low=0)
        self.adagrad_eps = ops.check_number("adagrad_eps", adagrad_eps, low=0)
        self.reduction = reduction
        self.skip_nonfinite, self.skipped = bool(skip_nonfinite), 0
        self._impl = backends.TORCH_BACKEND  # the backend of the current step
        self.group = process_group
        self.state = {name: self._init_state(p) for name, p in self._named_params()}
        self.steps = 0
        self._scalars: dict[str, tuple[float, float]] = {}  # name -> (lr, eps) of this step
        # (lr, eps, rounding seed) in a device tensor [4, 3] (rows: _PARAMS), with the state
        self._hyper = self._scalars_tensor(model.user_emb)
        self.cuda_graph = bool(cuda_graph)
        self._graphs: dict[tuple, _Graph] = {}  # batch shape and options -> captured step
        self._graph_ptrs: tuple = ()  # the storage the graphs were captured on
        if self.cuda_graph:
            why = self._graph_refusal(model.user_emb.device, model.backend)
            if why:
                raise ValueError(f"cuda_graph=True: {why}")

    def _check_nothing_frozen(self) -> None:
        """The fused step updates every table it trains: one frozen by ``requires_grad_(False)``
        is refused rather than moved (``relation="none"`` freezes keys and memory itself)."""
        m = self.model
        tables = self._named_params() if m.relation != "none" else self._named_params()[:2]
        frozen = [name for name, p in tables if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"LRMLTrainer updates every table, but {', '.join(frozen)} "
                f"{'has' if len(frozen) == 1 else 'have'} requires_grad=False: "
                "relation_lr_scale=0 freezes keys and memory; to freeze other tables, train with "
                "the model's autograd and a torch optimizer"
            )

    def _named_params(self):
        m = self.model
        return (
            ("user_emb", m.user_emb),
            ("item_emb", m.item_emb),
            ("keys", m.keys),
            ("memory", m.memory),
        )

    def _init_state(self, p: torch.Tensor) -> dict:
        f32 = {"device": p.device, "dtype": compute_dtype(p.dtype)}
        if self.optimizer == "adam":
            return {
                "step": 0,
                "exp_avg": torch.zeros(p.shape, **f32),
                "exp_avg_sq": torch.zeros(p.shape, **f32),
            }
        if self.optimizer == "adagrad":
            return {"step": 0, "sum": torch.zeros(p.shape, **f32)}
        if self.optimizer == "rowwise_adagrad":
            return {"step": 0, "sum": torch.zeros(p.shape[0], **f32)}
        return {"step": 0}

    @torch.no_grad()
    def step(self, users: torch.Tensor, items: torch.Tensor, *, validate: bool = False):
        """One step on a batch: users ``[B]``, items ``[B, C]``. Returns the detached loss.

        ``validate=True`` range-checks the indices (one host sync); the training loop checks its
        data once up front instead.

        With ``cuda_graph=True`` the first step of each batch shape (B, C and the index dtypes)
        runs eagerly on a side stream (the warm-up: kernels compiled, memory allocated) and is
        then captured, which synchronises the host once; every later step of that shape copies
        the batch into the graph's static inputs, replays the graph and returns a copy of its
        loss: no host sync. Up to ``MAX_GRAPHS`` shapes are kept, each in its own memory pool;
        further shapes and empty batches run eagerly. A graph is captured again when the
        tables or the optimizer state are reallocated (``load_state_dict``) or an option it
        baked in changes (the model's distance, relation, margin, eps, max_norm; the matmul
        precision); :meth:`set_lr` and the step counters reach it through the device scalars.
        """
        m = self.model
        self._check_nothing_frozen()
        self._follow_tables(m.user_emb)
        params, users, items = ops.prepare(
            m.user_emb,
            m.item_emb,
            m.keys,
            m.memory,
            users,
            items,
            m.distance,
            m.kernel_relation,
            m.eps,
            validate,
            False,
        )
        impl = backends.get(m.backend, params[0].device, users.shape[0])
        self._impl = impl
        if self.cuda_graph and users.shape[0] > 0:
            return self._graph_step(users, items)
        loss, g_users, g_items, g_keys, g_memory = self._gradients(users, items)
        if self._world() > 1:
            loss, users, items, g_users, g_items, g_keys, g_memory = self._all_gather(
                loss, users, items, g_users, g_items, g_keys, g_memory
            )
        if self.skip_nonfinite:
            grads = (loss, g_users, g_items, g_keys, g_memory)
            if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                self.skipped += 1
                return loss
        self._advance()
        self._update(users, items, g_users, g_items, g_keys, g_memory)
        return loss

    def _follow_tables(self, table: torch.Tensor) -> None:
        """A model moved or cast after its trainer was made (the model moves as a whole: its
        user table stands for the four): the device scalars follow it, the optimizer state
        cannot, so a step with state elsewhere is refused. Two comparisons when nothing moved."""
        dtype = compute_dtype(table.dtype)
        if self._hyper.device == table.device and self._hyper.dtype == dtype:
            return
        state = next((v for v in self.state["user_emb"].values() if torch.is_tensor(v)), None)
        if state is None or (state.device == table.device and state.dtype == dtype):
            self._hyper = self._scalars_tensor(table)
            return
        raise ValueError(
            f"the model's tables are {table.dtype} on {table.device} but this trainer's "
            f"optimizer state is {state.dtype} on {state.device}: the model was moved or cast "
            "after the LRMLTrainer was made; make the trainer after moving or casting the model"
        )

    def _gradients(self, users, items):
        """``(loss, g_user_rows [B, d], g_item_rows [B, C, d], g_keys, g_memory)``."""
        m = self.model
        return self._impl.hinge_loss_grads(
            m.user_emb, m.item_emb, m.keys, m.memory, users, items, m.margin, m.distance,
            m.kernel_relation, m.eps, self.reduction,
        )  # fmt: skip

    def _update(self, users, items, g_users, g_items, g_keys, g_memory) -> None:
        """Every update of a step, with the scalars :meth:`_advance` set."""
        m = self.model
        self._update_rows("user_emb", m.user_emb, users, g_users, m.max_norm)
        self._update_rows("item_emb", m.item_emb, items, g_items, m.max_norm)
        if m.relation != "none":  # CML: keys and memory stay as they are (memory ≡ 0)
            self._update_dense("keys", m.keys, g_keys)
            self._update_dense("memory", m.memory, g_memory)

    def _advance(self) -> None:
        """Count one more step and set its scalars: the step counters of the updated parameters,
        their ``(lr, eps)`` on the host and, where the Triton update reads them, with the
        rounding seeds in the device tensor ``_hyper`` (one non-blocking host-to-device copy
        from pinned memory; the caching host allocator keeps that memory until the copy is
        done, so nothing waits)."""
        self.steps += 1
        names = _PARAMS if self.model.relation != "none" else _PARAMS[:2]
        for name in names:
            self.state[name]["step"] += 1
            self._scalars[name] = self._step_scalars(name)
        table = self.model.user_emb
        if self._gpu_row_update(table) is None:
            return
        hyper = self._hyper
        values = [
            (*self._scalars.get(name, (0.0, 0.0)), self._round_seed(name)) for name in _PARAMS
        ]
        cuda = table.device.type == "cuda"
        hyper.copy_(torch.tensor(values, dtype=hyper.dtype, pin_memory=cuda), non_blocking=cuda)

    @staticmethod
    def _scalars_tensor(table):
        """A zero ``[4, 3]`` tensor for the device scalars, on ``table``'s device in its compute
        dtype."""
        return torch.zeros(len(_PARAMS), 3, dtype=compute_dtype(table.dtype), device=table.device)

    def _lr(self, name: str) -> float:
        """The learning rate of ``name`` (before Adam's bias corrections)."""
        return self.lr * self.relation_lr_scale if name in ("keys", "memory") else self.lr

    def _step_scalars(self, name: str) -> tuple[float, float]:
        """``(lr, eps)`` of this step's update of ``name``: for Adam the bias-corrected step
        size, and for keys and memory (``torch.optim.Adam``) the epsilon ``eps·sqrt(1 - β2^t)``
        that makes SparseAdam's update theirs."""
        lr = self._lr(name)
        if self.optimizer != "adam":
            return lr, self.adagrad_eps
        b1, b2 = self.betas
        t = self.state[name]["step"]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        step_size = lr * math.sqrt(bc2) / bc1
        if name in ("keys", "memory"):
            return step_size, self.adam_eps * math.sqrt(bc2)
        return step_size, self.adam_eps

    def _graph_refusal(self, device: torch.device, backend: str) -> str | None:
        """None if the step on ``device`` with ``backend`` ("auto" or a name) can be captured
        as a CUDA graph, else why not."""
        if device.type != "cuda":
            return f"CUDA graphs need the model on a CUDA device, it is on {device}"
        backend = backends.resolve(backend, device)
        if backend not in GRAPH_BACKENDS:
            return (
                f"the {backend!r} backend cannot be captured; use one of {GRAPH_BACKENDS} "
                "(their steps are free of host syncs)"
            )
        try:
            import lrml_kernels.triton.row_update  # noqa: F401
        except ImportError as exc:
            return f"the captured updates are Triton kernels, and Triton cannot be imported ({exc})"
        if self.skip_nonfinite:
            return "skip_nonfinite=True reads every step's loss on the host, which a graph cannot"
        if self._world() > 1:
            return "the data-parallel step (more than one process) cannot be captured"
        return None

    def _graph_step(self, users, items):
        """One step through the CUDA graph of this batch's shape (captured on its first step)."""
        m = self.model
        key = (
            tuple(items.shape), users.dtype, items.dtype, users.device, self._impl.name,
            m.distance, m.relation, m.margin, m.eps, m.max_norm,
            fp32_matmul_precision(), tuple(self.betas),  # (lr, eps, seeds: _hyper, not baked)
        )  # fmt: skip
        graph = self._graphs.get(key)
        if graph is None:
            why = self._graph_refusal(users.device, self._impl.name)
            if why:
                raise ValueError(f"cuda_graph=True: {why}")
        self._advance()
        ptrs = self._graph_storage()
        if ptrs != self._graph_ptrs:  # tables or state reallocated: every graph is stale
            self._graphs.clear()
            self._graph_ptrs, graph = ptrs, None
        if graph is not None:
            graph.users.copy_(users)
            graph.items.copy_(items)
            graph.graph.replay()
            return graph.loss.clone()
        if len(self._graphs) < MAX_GRAPHS:
            loss, self._graphs[key] = self._capture(users, items)
            return loss
        loss, *grads = self._gradients(users, items)
        self._update(users, items, *grads)
        return loss

    def _capture(self, users, items):
        """This step, run eagerly on a side stream (the warm-up the CUDA graph docs ask for:
        Triton compiles; above SORT_MAX ids torch.sort's workspace is allocated), then captured
        on static copies of the batch (a capture runs nothing). Returns the step's loss and the
        graph."""
        static = _Graph(torch.cuda.CUDAGraph(), users.clone(), items.clone(), None)
        current = torch.cuda.current_stream(users.device)
        side = torch.cuda.Stream(users.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            loss, *grads = self._gradients(static.users, static.items)
            self._update(static.users, static.items, *grads)
        current.wait_stream(side)
        loss.record_stream(current)
        del grads
        # On the warm-up's stream (libraries that cache handles per stream have them); an
        # unsafe call (a sync, a cudaMalloc) of this thread fails the capture, another thread's
        # (the caller's data loading, pinning) does not.
        with torch.cuda.graph(static.graph, stream=side, capture_error_mode="thread_local"):
            static.loss, *grads = self._gradients(static.users, static.items)
            self._update(static.users, static.items, *grads)
        return loss, static

    def _graph_storage(self) -> tuple:
        """The addresses a captured graph reads and writes: tables, optimizer state, scalars."""
        tensors = [p for _, p in self._named_params()] + [self._hyper]
        tensors += [v for st in self.state.values() for v in st.values() if torch.is_tensor(v)]
        return tuple(t.data_ptr() for t in tensors)

    def set_lr(self, lr: float) -> None:
        """Change the learning rate (a schedule calls this before a step)."""
        self.lr = ops.check_number("lr", lr, low=0, above=True)

    def _world(self) -> int:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.group)

    def _all_gather(self, loss, users, items, g_users, g_items, g_keys, g_memory):
        """The combined batch of every rank: gathered rows and gradients, summed keys/memory."""
        dist = torch.distributed
        world = self._world()

        def gather(t):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=self.group)
            return torch.cat(parts)

        if self.reduction == "mean":  # the mean over the combined batch
            loss, g_users, g_items = loss / world, g_users / world, g_items / world
            g_keys, g_memory = g_keys / world, g_memory / world
        dense = torch.cat([loss.reshape(1).to(g_keys.dtype), g_keys.flatten(), g_memory.flatten()])
        dist.all_reduce(dense, group=self.group)
        n = g_keys.numel()
        loss = dense[0].to(loss.dtype)
        g_keys, g_memory = dense[1 : 1 + n].view_as(g_keys), dense[1 + n :].view_as(g_memory)
        users, items = gather(users.to(torch.int64)), gather(items.to(torch.int64))
        return loss, users, items, gather(g_users), gather(g_items), g_keys, g_memory

    def _update_rows(self, name, table, idx, grad_rows, max_norm):
        """Sum the gradient of each touched row, update those rows, project them, write once."""
        state = self.state[name]
        lr, eps = self._scalars[name]  # adam: lr is the bias-corrected step size (SparseAdam)
        states = tuple(state[k] for k in _STATE_KEYS[self.optimizer])
        # cpu backend: de-duplication, the optimizer and the projection in one C++ call (a bf16
        # table rounded with the Triton row update's bits for this seed)
        fused = getattr(self._impl, "row_update_", None)
        if fused is not None and fused(
            table.data, states, idx, grad_rows, self.optimizer, lr, eps, self.betas, max_norm,
            self._round_seed(name),
        ):  # fmt: skip
            return
        fused_gpu = self._gpu_row_update(table)
        if fused_gpu is not None:  # GPU backends: sort, then one Triton kernel; no host sync
            fused_gpu(
                table.data, idx, grad_rows, self.optimizer, self._hyper[_PARAMS.index(name)],
                states, betas=self.betas, max_norm=max_norm,
            )  # fmt: skip
            return
        rows, inverse = torch.unique(idx.reshape(-1).long(), return_inverse=True)
        d = table.shape[1]
        ct = compute_dtype(table.dtype)
        grad = torch.zeros(rows.shape[0], d, device=table.device, dtype=ct)
        grad.index_add_(0, inverse, grad_rows.reshape(-1, d).to(ct))
        if self.optimizer == "adam":
            b1, b2 = self.betas
            x = table.index_select(0, rows).to(ct)  # in place on the gathered rows
            m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - b1)
            v = state["exp_avg_sq"].index_select(0, rows)
            v.add_(grad.mul_(grad).sub_(v), alpha=1 - b2)
            state["exp_avg"].index_copy_(0, rows, m)
            state["exp_avg_sq"].index_copy_(0, rows, v)
            x.addcdiv_(m, v.sqrt_().add_(eps), value=-lr)
        else:
            x = self._apply(state, table.index_select(0, rows).to(ct), grad, rows, lr)
        if max_norm is not None:  # x / max(1, |x| / max_norm), as LRML.project_()
            x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).div_(max_norm).clamp_min_(1.0))
        table.index_copy_(0, rows, self._round(x, table.dtype, name))

    def _gpu_row_update(self, table):
        """The Triton row update for CUDA tables (and CPU tables of the interpreted triton
        backend, for tests), or None where it does not apply or Triton cannot be imported."""
        if table.device.type != "cuda" and getattr(self._impl, "name", None) != "triton":
            return None
        try:
            from lrml_kernels.triton.row_update import row_update_
        except ImportError:
            return None
        return row_update_

    def _update_dense(self, name, param, grad):
        state = self.state[name]
        if self._gpu_row_update(param) is not None:  # GPU backends: one Triton launch
            from lrml_kernels.triton.row_update import dense_update_

            dense_update_(
                param.data, grad, self.optimizer, self._hyper[_PARAMS.index(name)],
                tuple(state[k] for k in _STATE_KEYS[self.optimizer]), betas=self.betas,
            )  # fmt: skip
            return
        ct = compute_dtype(param.dtype)
        grad, x = grad.to(ct), param.to(ct)
        if self.optimizer == "adam":  # torch.optim.Adam
            b1, b2 = self.betas
            state["exp_avg"].lerp_(grad, 1 - b1)
            state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(self.adam_eps)
            x = x.addcdiv(state["exp_avg"], denom, value=-self._lr(name) / bc1)
        else:
            x = self._apply(state, x, grad, None, self._lr(name))
        param.copy_(self._round(x, param.dtype, name))

    def _round(self, x, dtype, name):
        """The updated values ``x`` (compute dtype) in the parameter's ``dtype``: bf16 rounded
        stochastically (:func:`stochastic_round_bf16`, bits drawn from :meth:`_round_seed`, so a
        resumed run draws the same), other dtypes to nearest."""
        if dtype != torch.bfloat16:
            return x.to(dtype)
        g = torch.Generator(x.device).manual_seed(self._round_seed(name))
        return stochastic_round_bf16(x, g)

    def _round_seed(self, name: str) -> int:
        """The seed of this step's stochastic rounding of ``name`` (bf16 parameters): one per
        step and parameter, below ``ROUND_SEEDS``."""
        return (self.steps * len(_PARAMS) + _PARAMS.index(name)) % ROUND_SEEDS

    def _apply(self, state, x, grad, rows, lr):
        """Adagrad / row-wise Adagrad / SGD at ``lr`` on rows ``x`` (all rows when ``rows`` is
        None)."""
        if self.optimizer == "sgd":
            return x - lr * grad
        # Adagrad: one accumulator per element; row-wise Adagrad: one per row (mean of g²).
        square = grad * grad if self.optimizer == "adagrad" else (grad * grad).mean(1)
        if rows is None:
            acc = state["sum"] = state["sum"] + square
        else:
            acc = state["sum"][rows] + square
            state["sum"][rows] = acc
        denom = acc.sqrt() + self.adagrad_eps
        return x - lr * grad / (denom if self.optimizer == "adagrad" else denom[:, None])

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "relation_lr_scale": self.relation_lr_scale,
            "steps": self.steps,
            "state": self.state,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["optimizer"] != self.optimizer:
            raise ValueError(
                f"checkpoint optimizer {sd['optimizer']!r} differs from {self.optimizer!r}"
            )
        state = {}
        for name, p in self._named_params():  # checked against a fresh state of this model
            want, got = self._init_state(p), sd["state"][name]
            if set(got) != set(want):
                raise ValueError(f"{name}'s state holds {sorted(got)}, {self.optimizer} needs "
                                 f"{sorted(want)}")  # fmt: skip
            state[name] = {}
            for k, t in want.items():
                v = got[k]
                if torch.is_tensor(t):
                    if not torch.is_tensor(v) or v.shape != t.shape:
                        shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
                        raise ValueError(
                            f"{name}'s state {k!r} is {shape}, this model's table needs "
                            f"{tuple(t.shape)}: the state of another model"
                        )
                    v = v.to(t.device, t.dtype)  # (the model's compute dtype: fp32 -> fp64, ...)
                state[name][k] = v
        self.lr, self.steps = sd["lr"], sd["steps"]
        self.relation_lr_scale = sd.get("relation_lr_scale", 1.0)  # (1.0 before the option)
        self.state = state
