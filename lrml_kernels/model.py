"""The LRML ``nn.Module``: the four parameters and thin calls into :mod:`lrml_kernels.ops`."""

from __future__ import annotations

import math

import torch
from torch import nn

from lrml_kernels import backends, ops
from lrml_kernels.errors import BackendUnavailable
from lrml_kernels.reference import compute_dtype

#: ``relation`` of the model: the ops' relations, and "none": CML (Hsieh et al., WWW 2017), LRML's
#: special case r = 0. It runs as LRML with ``memory`` ≡ 0 (r = Mᵀa = 0 exactly, in every backend)
#: and ``keys`` / ``memory`` frozen; the kernels still compute the attention (skipping it is
#: kernel work not done yet), so CML costs what LRML costs.
MODEL_RELATIONS = (*ops.RELATIONS, "none")


class LRML(nn.Module):
    """Latent Relational Metric Learning (Tay et al., WWW 2018), SPEC.md semantics.

    Parameters: ``user_emb [num_users, dim]``, ``item_emb [num_items, dim]``,
    ``keys [memory_slots, dim]``, ``memory [memory_slots, dim]``, all initialised normal with std
    ``1/sqrt(dim)``. ``sparse=True`` makes the embedding gradients sparse COO tensors (for
    ``torch.optim.SparseAdam``, ``Adagrad`` and ``SGD``); ``max_norm`` is the radius of the
    unit-ball projection applied by :meth:`project_` (None disables it). ``relation`` is the
    training loss's choice (SPEC.md); :meth:`distances` and :meth:`recommend` rank per pair.
    ``relation="none"`` is CML (see :data:`MODEL_RELATIONS`): ``memory`` is zero and ``keys`` and
    ``memory`` do not train. ``generator``: a CPU ``torch.Generator`` to draw the initial values
    from (drawn on the CPU, then moved to ``device``: one seed, the same model on every device);
    None draws them from torch's default generator of ``device``.
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        dim: int = 100,
        memory_slots: int = 20,
        *,
        distance: str = "l2",
        relation: str = "pair",
        margin: float = 0.5,
        max_norm: float | None = 1.0,
        sparse: bool = False,
        backend: str = "auto",
        eps: float = 1e-3,
        validate: bool = True,
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, value in (
            ("num_users", num_users),
            ("num_items", num_items),
            ("dim", dim),
            ("memory_slots", memory_slots),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        ops._check_option("distance", distance, ops.DISTANCES)
        ops._check_option("relation", relation, MODEL_RELATIONS)
        ops.check_number("max_norm", max_norm, low=0, above=True, optional=True)
        ops.check_number("margin", margin)
        ops.check_number("eps", eps, low=0)
        backends.check_name(backend)
        if not isinstance(sparse, bool):
            raise TypeError(f"sparse must be True or False, got {sparse!r}")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator, got {generator.device}")
        std = 1.0 / math.sqrt(dim)

        def normal(rows: int) -> torch.Tensor:
            if generator is None:
                return torch.randn(rows, dim, device=device, dtype=dtype) * std
            return (torch.randn(rows, dim, dtype=dtype, generator=generator) * std).to(device)

        self.user_emb = nn.Parameter(normal(num_users))
        self.item_emb = nn.Parameter(normal(num_items))
        self.keys = nn.Parameter(normal(memory_slots))
        self.memory = nn.Parameter(normal(memory_slots))
        if relation == "none":  # CML: r = Mᵀa = 0 whatever the attention
            self.keys.requires_grad_(False)
            self.memory.requires_grad_(False)
            with torch.no_grad():
                self.memory.zero_()
        self.distance, self.relation, self.margin = distance, relation, float(margin)
        self.max_norm, self.sparse, self.backend = max_norm, sparse, backend
        self.eps, self.validate = float(eps), validate
        self._load_backend()

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(), ...: maybe another backend
        module = super()._apply(fn, *args, **kwargs)
        self._load_backend()
        return module

    def _load_backend(self) -> None:
        """Load the backend the model's device resolves to now, eagerly: a first call under
        ``torch.compile(fullgraph=True)`` cannot trace the loading (a lock, a dlopen). A backend
        that cannot run is left for the first call to report."""
        device = self.user_emb.device
        if device.type != "meta" and not torch.compiler.is_compiling():
            try:
                backends.resolve(self.backend, device)
            except BackendUnavailable:
                pass

    @property
    def kernel_relation(self) -> str:
        """The relation the ops compute the loss with ("pair" for CML: r is zero either way)."""
        return "pair" if self.relation == "none" else self.relation

    @property
    def num_users(self) -> int:
        return self.user_emb.shape[0]

    @property
    def num_items(self) -> int:
        return self.item_emb.shape[0]

    def _params(self):
        return self.user_emb, self.item_emb, self.keys, self.memory

    def forward(self, users: torch.Tensor, items: torch.Tensor, reduction: str = "sum"):
        """Hinge loss of a batch: users ``[B]``, items ``[B, C]`` (column 0 positive)."""
        return ops.lrml_hinge_loss(
            *self._params(),
            users,
            items,
            margin=self.margin,
            distance=self.distance,
            relation=self.kernel_relation,
            eps=self.eps,
            reduction=reduction,
            backend=self.backend,
            sparse_grad=self.sparse,
            validate=self.validate,
        )

    def distances(
        self, users: torch.Tensor, items: torch.Tensor, relation: str = "pair"
    ) -> torch.Tensor:
        """``D [B, C]`` of users ``[B]`` and items ``[B, C]`` (lower is a better match).

        Scoring is per pair: every ``(users[b], items[b, c])`` gets its own relation, whatever
        :attr:`relation` the model trains with, so a candidate's score never depends on the other
        candidates of its row. ``relation="shared"`` gives the training loss's distances instead
        (column 0's relation reused for every column): never rank with it, since column 0's
        relation tells which candidate is the positive.
        """
        return ops.lrml_distances(
            *self._params(),
            users,
            items,
            distance=self.distance,
            relation=relation,
            eps=self.eps,
            backend=self.backend,
            sparse_grad=self.sparse,
            validate=self.validate,
        )

    @torch.no_grad()
    def relations(self, users: torch.Tensor, items: torch.Tensor):
        """Attention ``a [B, N]`` and relation vector ``r [B, d]`` of the pairs
        ``(users[b], items[b])`` (users, items: ``[B]``), by the model's backend (forward only).
        """
        return ops.lrml_relations(
            *self._params(), users, items, backend=self.backend, validate=self.validate
        )

    @torch.no_grad()
    def recommend(self, users: torch.Tensor, k: int = 10, exclude=None):
        """Top-k items per user over the whole catalogue: ``(distances [B, k], ids [B, k])``.

        ``exclude``: CSR ``(indptr [B+1], indices)`` of items to leave out (e.g. training items).
        """
        return ops.lrml_topk(
            *self._params(),
            users,
            k,
            exclude=exclude,
            distance=self.distance,
            eps=self.eps,
            backend=self.backend,
            validate=self.validate,
        )

    @torch.no_grad()
    def project_(self, users: torch.Tensor | None = None, items: torch.Tensor | None = None):
        """Project user/item rows into the ball of radius ``max_norm`` (all rows, or those given).

        ``x <- x / max(1, ‖x‖₂ / max_norm)``; a no-op when ``max_norm`` is None. ``users`` /
        ``items``: integer index tensors of any shape, checked as the ops' indices are (their
        range only with ``validate``: a host sync on a GPU).
        """
        if self.max_norm is None:
            return self
        tables = (("users", self.user_emb, users), ("items", self.item_emb, items))
        given = [
            (name, ops.check_index_tensor(name, _flat(rows), 1, table.device), table)
            for name, table, rows in tables
            if rows is not None
        ]
        if self.validate:
            ops.check_index_ranges([(name, rows, table.shape[0]) for name, rows, table in given])
        for _, table, rows in tables:
            if rows is None:
                project_rows_(table, None, self.max_norm)
        for _, rows, table in given:
            project_rows_(table, torch.unique(rows.long()), self.max_norm)
        return self

    def extra_repr(self) -> str:
        return (
            f"num_users={self.num_users}, num_items={self.num_items}, dim={self.keys.shape[1]}, "
            f"memory_slots={self.keys.shape[0]}, distance={self.distance!r}, "
            f"relation={self.relation!r}, margin={self.margin}, max_norm={self.max_norm}, "
            f"sparse={self.sparse}, backend={self.backend!r}"
        )


def _flat(rows):
    return rows.reshape(-1) if isinstance(rows, torch.Tensor) else rows


def project_rows_(table: torch.Tensor, rows: torch.Tensor | None, max_norm: float) -> None:
    """In place: ``table[rows] /= max(1, ‖table[rows]‖ / max_norm)`` (all rows if rows is None)."""
    x = (table if rows is None else table[rows]).to(compute_dtype(table.dtype))
    x = x / (x.norm(dim=1, keepdim=True) / max_norm).clamp_min(1.0)
    if rows is None:
        table.copy_(x)
    else:
        table[rows] = x.to(table.dtype)
