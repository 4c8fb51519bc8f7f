"""Training batches, each prepared while the step before it runs.

A batch of the training loop is its slice of the epoch's permutation, the users and positive
items gathered from the training arrays, ``negatives`` items per row drawn by
:func:`lrml_kernels.data.sample_negatives`, and the ``[B, 1 + negatives]`` items (the positive
first). On the CPU with the C++ extension one op, ``training_batch``, makes all of it but the
permutation: the gathers (prefetched) and the draws, the same numbers as the torch ops. The batch
is latency-bound: its rows, the users' CSR rows and their searches are random reads beyond cache
(Netflix size, 4096 × 4 negatives, int32 item ids: about 0.9 ms on one thread, 0.47 ms on two,
for rows a step has just pushed out of the caches; 0.7 and 0.37 ms when they are cached).
:class:`BatchPipeline` prepares batch k + 1 while step k runs:

- on the CPU in one background thread where a core is left over by the step's threads
  (``torch.get_num_threads()`` below the cores this process may use): the gathers, the draws and
  the C++ sampler release the GIL, so the thread works while the main thread is inside the C++
  step. Where the step's threads take every core, the thread would only preempt them (each
  OpenMP region of the step waits for its slowest thread), so the batch is prepared in line
  instead: on 2 cores with 2 threads, Netflix size, in line gave 66-69 % of the step alone
  against 60-63 % with the thread (2026-12-04, ``benchmarks/bench_train_loop.py``'s set-up);
- on a GPU on a side stream: the batch's kernels are queued on it and the main stream waits for an
  event recorded after them (no host sync); the batch's tensors are marked as used by the main
  stream (``record_stream``), so the caching allocator does not hand their memory to the side
  stream's next batch before the step that reads them has run.

The epoch's order (:class:`EpochOrder`) is a seeded permutation of the rows, of which each rank
takes every ``world``-th entry.

Batches are prepared strictly in order on one generator, one at a time: the negatives are the
same, bit for bit, as those of a loop that prepares each batch just before its step. Each batch
carries the generator's state after its own draw, which is what a checkpoint taken after its step
must save (the generator itself is already past the next batch).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from lrml_kernels import data as lkdata
from lrml_kernels.data._compiled import data_op
from lrml_kernels.data.sampling import MAX_TRIES, sampler_seed

_MASK32 = (1 << 32) - 1
_FEISTEL_ROUNDS = 4
_CHUNK = 1 << 14  # entries of the CPU order computed at once (temporaries stay in L2)


class EpochOrder:
    """The order of one epoch: a random permutation of ``range(n)`` that depends only on
    ``(seed, epoch)`` (the same on every rank and on resume), of which rank ``rank`` takes the
    entries ``rank, rank + world, ...`` (``n // world`` of them: every rank the same number).

    On a GPU the permutation is ``torch.randperm`` (milliseconds for 100M rows). On the CPU that
    takes seconds per epoch and 8 bytes a row (7 s and 800 MB at 100M rows on 2 cores, before the
    first step), so there each batch's entries are computed when it is prepared: a keyed
    bijection of ``[0, a·b)`` (``a = ceil(sqrt n)``, ``b = ceil(n / a)``), a 4-round Feistel
    network alternating between the two sides (Black and Rogaway's construction for domains that
    are not a power of two) with a 32-bit integer hash as round function, its values ``>= n``
    walked through it again until they fall in range (fewer than one in ``b`` do). Computed by
    the extension's ``epoch_order`` where it loads (0.05 ms per 4096 entries on one thread,
    against 0.13 ms for the torch ops it replaces), else by those ops: the same numbers.
    """

    def __init__(self, n: int, seed: int, epoch: int, device, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world = n, rank, world
        self.size = n // world
        gen = torch.Generator(device=device)
        # (folded into the generator's [0, 2**64): seeds from 2**64 / 1_000_003 ~ 1.8e13 on
        # overflowed it; every smaller seed keeps its orders)
        gen.manual_seed((seed * 1_000_003 + epoch) % (1 << 64))
        self._perm = None
        if torch.device(device).type == "cuda":
            perm = torch.randperm(n, device=device, generator=gen)
            self._perm = perm[rank : self.size * world : world]
        else:
            self._keys = torch.randint(0, 1 << 32, (_FEISTEL_ROUNDS,), generator=gen)
            self._a = math.isqrt(n - 1) + 1  # ceil(sqrt(n)) for n >= 1
            self._b = -(-n // self._a)
            self._chunk_start, self._chunk = 0, torch.empty(0, dtype=torch.int64)
            self._op = data_op("epoch_order")  # the same numbers in one C++ loop

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Entries ``lo .. hi - 1`` of this rank's order: row ids, int64 ``[hi - lo]``."""
        if self._perm is not None:
            return self._perm[lo:hi]
        start = self._chunk_start
        if not (start <= lo and hi <= start + self._chunk.numel()):
            # computed _CHUNK entries at a time: a few dozen small ops per chunk, not per batch
            start, end = lo, min(self.size, max(hi, lo + _CHUNK))
            if self._op is not None:
                x = self._op(
                    self._keys, start, end - start, self.n, self.world, self.rank,
                    self._a, self._b,
                )  # fmt: skip
            else:
                x = self._permute(torch.arange(start, end) * self.world + self.rank)
                out = x >= self.n
                while bool(out.any()):  # cycle walking (on the CPU: no device to wait for)
                    x = torch.where(out, self._permute(x), x)
                    out = x >= self.n
            self._chunk_start, self._chunk = start, x
        return self._chunk[lo - start : hi - start]

    def _permute(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._a, self._b
        left, right = x // b, x % b  # left in [0, a), right in [0, b)
        for i, key in enumerate(self._keys.tolist()):
            left, right = right, (left + _hash32(right ^ key)) % (a if i % 2 == 0 else b)
        return left * b + right  # after an even number of rounds: left in [0, a) again

    def __len__(self) -> int:
        return self.size


def _usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS tells it), shared with
    the other processes torchrun started on this machine (``LOCAL_WORLD_SIZE``): each rank's own
    threads and batch thread would otherwise oversubscribe them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, (cores or 1) // local)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in ``[0, 2^32)`` (products stay below 2^63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


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
        users, items: the training interactions, ``[n]`` int32 or int64 on the training device
            (each either; where they differ, the CPU's ``training_batch`` gets both as int64).
        batch_size: rows per batch (the last batch of an epoch may be shorter).
        num_items, negatives, exclude_csr: what :func:`lrml_kernels.data.sample_negatives` draws
            from (``exclude_csr``: ``(indptr, indices)`` on the training device, or None).
        generator: the negatives' ``torch.Generator`` on the training device; while an epoch runs
            only the pipeline draws from it.
        popularity: the popularity CDF of the negatives (:func:`lrml_kernels.data.popularity_cdf`)
            on the training device, or None (uniform negatives).
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
        popularity: torch.Tensor | None = None,
    ):
        self.users, self.items, self.batch_size = users, items, batch_size
        self.num_items, self.negatives = num_items, negatives
        self.generator, self.exclude_csr, self.popularity = generator, exclude_csr, popularity
        self.device = users.device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pool = None
        if self._stream is None and torch.get_num_threads() < _usable_cores():
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="lrml-batches")
        # On the CPU with the extension: the gathers and the draws in one op (the same batch)
        self._batch_op = None
        if self.device.type == "cpu" and exclude_csr is not None:
            self._batch_op = data_op("training_batch")
            # indptr int64; the indices as they are (int32 or int64: the op searches either)
            self._csr = (exclude_csr[0].long().contiguous(), exclude_csr[1].contiguous())
            if self._batch_op is not None and users.dtype != items.dtype:
                # the op gathers both columns with one index type: int32 users beside int64
                # items (an Interactions may hold them so) are widened once, not refused
                self.users, self.items = users.long(), items.long()

    def epoch(self, order: EpochOrder, start: int, stop: int) -> Iterator[Batch]:
        """Batches ``start .. stop - 1`` of the epoch in ``order`` (on the training device);
        batch k + 1 is under way while batch k is being used."""
        if self._stream is not None:  # the side stream reads the order and arrays after main
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        pending = self._submit(order, start) if start < stop else None
        try:
            for k in range(start, stop):
                batch = self._take(pending)
                pending = self._submit(order, k + 1) if k + 1 < stop else None
                yield batch
        finally:
            if pending is not None and self._stream is not None:
                # Left early: the batch under way still reads the order and the arrays on the
                # side stream; whatever the main stream does with their memory next waits for it.
                torch.cuda.current_stream(self.device).wait_stream(self._stream)

    def close(self) -> None:
        """Wait for the batch under way, if any (a loop that stopped early), and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _prepare(self, order: EpochOrder, k: int) -> Batch:
        idx = order.rows(k * self.batch_size, min((k + 1) * self.batch_size, len(order)))
        if self._batch_op is not None:
            seed = int(sampler_seed(self.generator, self.device))
            users, items = self._batch_op(
                idx, self.users, self.items, *self._csr, self.popularity, self.num_items,
                self.negatives, seed, MAX_TRIES,
                self._pool is None,  # on the background thread: that thread alone
            )  # fmt: skip
            return Batch(users, items, self.generator.get_state())
        users, pos = self.users[idx].long(), self.items[idx].long()
        neg = lkdata.sample_negatives(
            users,
            self.num_items,
            self.negatives,
            generator=self.generator,
            exclude_csr=self.exclude_csr,
            popularity=self.popularity,
        )
        items = torch.cat([pos[:, None], neg], dim=1)
        return Batch(users, items, self.generator.get_state())

    def _submit(self, order, k):
        if self._pool is not None:
            return self._pool.submit(self._prepare, order, k)
        if self._stream is None:  # no core to spare: prepared in line
            return self._prepare(order, k)
        with torch.cuda.stream(self._stream):
            batch = self._prepare(order, k)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return batch, ready

    def _take(self, pending) -> Batch:
        if self._pool is not None:
            return pending.result()
        if self._stream is None:
            return pending
        batch, ready = pending
        main = torch.cuda.current_stream(self.device)
        main.wait_event(ready)
        batch.users.record_stream(main)
        batch.items.record_stream(main)
        return batch
