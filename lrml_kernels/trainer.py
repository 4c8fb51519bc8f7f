"""One LRML training step with the optimizer fused into the backward, FBGEMM-style.

The backend returns the loss and per-row gradients (``[B, d]`` for users, ``[B, C, d]`` for
items); the batch's indices are de-duplicated, each touched row's gradient is summed, and only those
rows (and their optimizer state) are updated in place, then projected into the ``max_norm`` ball.
No ``[U, d]`` or ``[I, d]`` gradient is built: one step costs O(B·C·d + N·d) memory beyond the
tables and their optimizer state. ``keys`` and ``memory`` use the same optimizer densely.

Optimizers (``optimizer=``), each matching its torch counterpart step for step:

================== ========================================= =======================================
name               embeddings (touched rows only)            keys / memory
================== ========================================= =======================================
``adam``           lazy Adam = ``torch.optim.SparseAdam``    ``torch.optim.Adam``
``adagrad``        ``torch.optim.Adagrad`` (sparse)          ``torch.optim.Adagrad``
``rowwise_adagrad`` one accumulator per row (FBGEMM)          one accumulator per row
``sgd``            ``torch.optim.SGD`` (sparse)              ``torch.optim.SGD``
================== ========================================= =======================================
"""

from __future__ import annotations

import math

import torch

from lrml_kernels import backends, ops
from lrml_kernels.model import LRML
from lrml_kernels.reference import compute_dtype

OPTIMIZERS = ("adam", "adagrad", "rowwise_adagrad", "sgd")
DEFAULT_LR = {"adam": 1e-3, "adagrad": 0.1, "rowwise_adagrad": 0.1, "sgd": 0.1}
_STATE_KEYS = {  # the per-row state tensors, in the order of the Triton row update
    "adam": ("exp_avg", "exp_avg_sq"),
    "adagrad": ("sum",),
    "rowwise_adagrad": ("sum",),
    "sgd": (),
}


class LRMLTrainer:
    """Fused sparse training steps for an :class:`~lrml_kernels.LRML` model.

    Args:
        model: the model; its ``backend``, ``distance``, ``relation``, ``margin``, ``eps`` and
            ``max_norm`` are used.
        optimizer: one of ``OPTIMIZERS``. lr: learning rate (default per optimizer: ``DEFAULT_LR``).
        betas, adam_eps: Adam's coefficients. adagrad_eps: Adagrad's epsilon.
        reduction: "sum" (the authors' code) or "mean" over the batch rows.
        skip_nonfinite: check the loss and gradients of every step (one host sync) and skip the
            update when any is NaN/Inf; ``skipped`` counts such steps.
        process_group: data-parallel training with ``torch.distributed`` (default: the default
            group when it is initialised with more than one rank). Every rank passes a batch of
            the same shape; the touched row ids and their gradients are all-gathered and the
            keys/memory gradients all-reduced, so every replica applies the update of the
            combined batch and the replicas stay identical.
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
    ):
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.model, self.optimizer = model, optimizer
        self.lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.betas, self.adam_eps, self.adagrad_eps = betas, adam_eps, adagrad_eps
        self.reduction = reduction
        self.skip_nonfinite, self.skipped = skip_nonfinite, 0
        self._impl = backends.TORCH_BACKEND  # the backend of the current step
        self.group = process_group
        self.state = {name: self._init_state(p) for name, p in self._named_params()}
        self.steps = 0

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
        """
        m = self.model
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
        loss, g_users, g_items, g_keys, g_memory = impl.hinge_loss_grads(
            *params, users, items, m.margin, m.distance, m.kernel_relation, m.eps, self.reduction
        )
        if self._world() > 1:
            loss, users, items, g_users, g_items, g_keys, g_memory = self._all_gather(
                loss, users, items, g_users, g_items, g_keys, g_memory
            )
        if self.skip_nonfinite:
            grads = (loss, g_users, g_items, g_keys, g_memory)
            if not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
                self.skipped += 1
                return loss
        self.steps += 1
        self._update_rows("user_emb", m.user_emb, users, g_users, m.max_norm)
        self._update_rows("item_emb", m.item_emb, items, g_items, m.max_norm)
        if m.relation != "none":  # CML: keys and memory stay as they are (memory ≡ 0)
            self._update_dense("keys", m.keys, g_keys)
            self._update_dense("memory", m.memory, g_memory)
        return loss

    def set_lr(self, lr: float) -> None:
        """Change the learning rate (a schedule calls this before a step)."""
        self.lr = float(lr)

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
        state["step"] += 1
        if self.optimizer == "adam":  # torch.optim.SparseAdam
            b1, b2 = self.betas
            bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
            step_size = self.lr * math.sqrt(bc2) / bc1
            # cpu backend: de-duplication, Adam and projection in one C++ call
            fused = getattr(self._impl, "row_adam_", None)
            if fused is not None and fused(
                table.data, state["exp_avg"], state["exp_avg_sq"], idx, grad_rows, self.betas,
                self.adam_eps, step_size, max_norm,
            ):  # fmt: skip
                return
        fused_gpu = self._gpu_row_update(table)
        if fused_gpu is not None:  # GPU backends: sort, then one Triton kernel; no host sync
            adam = self.optimizer == "adam"
            fused_gpu(
                table.data, idx, grad_rows, self.optimizer, step_size if adam else self.lr,
                tuple(state[k] for k in _STATE_KEYS[self.optimizer]), betas=self.betas,
                eps=self.adam_eps if adam else self.adagrad_eps, max_norm=max_norm,
            )  # fmt: skip
            return
        rows, inverse = torch.unique(idx.reshape(-1), return_inverse=True)
        d = table.shape[1]
        ct = compute_dtype(table.dtype)
        grad = torch.zeros(rows.shape[0], d, device=table.device, dtype=ct)
        grad.index_add_(0, inverse, grad_rows.reshape(-1, d).to(ct))
        if self.optimizer == "adam":
            x = table.index_select(0, rows).to(ct)  # in place on the gathered rows
            m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - b1)
            v = state["exp_avg_sq"].index_select(0, rows)
            v.add_(grad.mul_(grad).sub_(v), alpha=1 - b2)
            state["exp_avg"].index_copy_(0, rows, m)
            state["exp_avg_sq"].index_copy_(0, rows, v)
            x.addcdiv_(m, v.sqrt_().add_(self.adam_eps), value=-step_size)
        else:
            x = self._apply(state, table.index_select(0, rows).to(ct), grad, rows)
        if max_norm is not None:  # x / max(1, |x| / max_norm), as LRML.project_()
            x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).div_(max_norm).clamp_min_(1.0))
        table.index_copy_(0, rows, x.to(table.dtype))

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
        state["step"] += 1
        if self._gpu_row_update(param) is not None:  # GPU backends: one Triton launch
            from lrml_kernels.triton.row_update import dense_update_

            lr, eps = self.lr, self.adagrad_eps
            if self.optimizer == "adam":  # Adam = SparseAdam's update with eps·sqrt(bc2)
                b1, b2 = self.betas
                bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                lr, eps = self.lr * math.sqrt(bc2) / bc1, self.adam_eps * math.sqrt(bc2)
            dense_update_(
                param.data, grad, self.optimizer, lr,
                tuple(state[k] for k in _STATE_KEYS[self.optimizer]), betas=self.betas, eps=eps,
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
            x = x.addcdiv(state["exp_avg"], denom, value=-self.lr / bc1)
        else:
            x = self._apply(state, x, grad, None)
        param.copy_(x.to(param.dtype))

    def _apply(self, state, x, grad, rows):
        """Adagrad / row-wise Adagrad / SGD on rows ``x`` (all rows when ``rows`` is None)."""
        if self.optimizer == "sgd":
            return x - self.lr * grad
        # Adagrad: one accumulator per element; row-wise Adagrad: one per row (mean of g²).
        square = grad * grad if self.optimizer == "adagrad" else (grad * grad).mean(1)
        if rows is None:
            acc = state["sum"] = state["sum"] + square
        else:
            acc = state["sum"][rows] + square
            state["sum"][rows] = acc
        denom = acc.sqrt() + self.adagrad_eps
        return x - self.lr * grad / (denom if self.optimizer == "adagrad" else denom[:, None])

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "lr": self.lr,
            "steps": self.steps,
            "state": self.state,
        }

    def load_state_dict(self, sd: dict) -> None:
        if sd["optimizer"] != self.optimizer:
            raise ValueError(
                f"checkpoint optimizer {sd['optimizer']!r} differs from {self.optimizer!r}"
            )
        self.lr, self.steps = sd["lr"], sd["steps"]
        self.state = {
            name: {
                k: (v.to(p.device) if torch.is_tensor(v) else v)
                for k, v in sd["state"][name].items()
            }
            for name, p in self._named_params()
        }
