"""Training batches, each prepared while the step before it runs.

A batch of the training loop is its slice of the epoch's permutation, the users and positive
items gathered from the training arrays, ``negatives`` items per row drawn by
:func:`lrml_kernels.data.sample_negatives`, and the ``[B, 1 + negatives]`` items (the positive
first). :class:`BatchPipeline` prepares batch k + 1 while step k runs:

- on the CPU in one background thread: the gathers, the draws and the C++ sampler release the GIL,
  so the thread works while the main thread is inside the C++ step;
- on a GPU on a side stream: the batch's kernels are queued on it and the main stream waits for an
  event recorded after them (no host sync); the batch's tensors are marked as used by the main
  stream (``record_stream``), so the caching allocator does not hand their memory to the side
  stream's next batch before the step that reads them has run.

Batches are prepared strictly in order on one generator, one at a time: the negatives are the
same, bit for bit, as those of a loop that prepares each batch just before its step. Each batch
carries the generator's state after its own draw, which is what a checkpoint taken after its step
must save (the generator itself is already past the next batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lrml_kernels import data as lkdata


@dataclass
class Batch:
    """One step's input: ``users [B]`` and ``items [B, 1 + negatives]``, int64 on the training
    device; ``gen_state``: the negatives generator's state after this batch was drawn."""

    users: torch.Tensor
    items: torch.Tensor
    gen_state: torch.Tensor


class BatchPipeline:
    """The batches of each epoch, prepared one step ahead (see the module docstring).

    Args:
        users, items: the training interactions, ``[n]`` int32 or int64 on the training device.
        batch_size: rows per batch (the last batch of an epoch may be shorter).
        num_items, negatives, exclude_csr: what :func:`lrml_kernels.data.sample_negatives` draws
            from (``exclude_csr``: ``(indptr, indices)`` on the training device, or None).
        generator: the negatives' ``torch.Generator`` on the training device; while an epoch runs
            only the pipeline draws from it.
    """

    def __init__(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        batch_size: int,
        num_items: int,
        negatives: int,
        generator: torch.Generator,
        exclude_csr: tuple[torch.Tensor, torch.Tensor] | None,
    ):
        self.users, self.items, self.batch_size = users, items, batch_size
        self.num_items, self.negatives = num_items, negatives
        self.generator, self.exclude_csr = generator, exclude_csr
        self.device = users.device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pool = None
        if self._stream is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lrml-batches")

    def epoch(self, perm: torch.Tensor, start: int, stop: int) -> Iterator[Batch]:
        """Batches ``start .. stop - 1`` of the epoch ordered by ``perm`` (row ids ``[n_local]``
        on the training device); batch k + 1 is under way while batch k is being used."""
        if self._stream is not None:  # the side stream reads perm (and the arrays) after main
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        pending = self._submit(perm, start) if start < stop else None
        for k in range(start, stop):
            batch = self._take(pending)
            pending = self._submit(perm, k + 1) if k + 1 < stop else None
            yield batch

    def close(self) -> None:
        """Wait for the batch under way, if any (a loop that stopped early), and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _prepare(self, perm: torch.Tensor, k: int) -> Batch:
        idx = perm[k * self.batch_size : (k + 1) * self.batch_size]
        users, pos = self.users[idx].long(), self.items[idx].long()
        neg = lkdata.sample_negatives(
            users,
            self.num_items,
            self.negatives,
            generator=self.generator,
            exclude_csr=self.exclude_csr,
        )
        items = torch.cat([pos[:, None], neg], dim=1)
        return Batch(users, items, self.generator.get_state())

    def _submit(self, perm, k):
        if self._pool is not None:
            return self._pool.submit(self._prepare, perm, k)
        with torch.cuda.stream(self._stream):
            batch = self._prepare(perm, k)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return batch, ready

    def _take(self, pending) -> Batch:
        if self._pool is not None:
            return pending.result()
        batch, ready = pending
        main = torch.cuda.current_stream(self.device)
        main.wait_event(ready)
        batch.users.record_stream(main)
        batch.items.record_stream(main)
        return batch
