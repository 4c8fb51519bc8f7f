"""Side-by-side CPU timings of the C++ extension against the eager and compiled reference.

    python csrc/tools/bench_cpu.py [--only-ref] [--topk] [--reps R] [--threads T]

Hinge loss fwd+bwd (B=4096, C=5, d=100, N=20, Netflix-size tables, fp32, sparse embedding grads)
for both relation modes: the eager reference, the compiled reference, the extension through the
public op and autograd (lk.lrml_hinge_loss(..., backend="cpu", sparse_grad=True) + backward) and
hinge_loss_grads (no autograd), timed round-robin in one process; top-k (2,048 users x 17,770
items, k=10, exclusions) against a chunked
materialising plain-PyTorch implementation. Prints best-of-n times and ratios.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from lrml_kernels import reference

U, I, D, N, B, C = 480_189, 17_770, 100, 20, 4096, 5


def best(fn, reps=7, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    P = (torch.randn(U, D, generator=g) * 0.1).requires_grad_()
    Q = (torch.randn(I, D, generator=g) * 0.1).requires_grad_()
    K = (torch.randn(N, D, generator=g) * 0.1).requires_grad_()
    M = (torch.randn(N, D, generator=g) * 0.1).requires_grad_()
    users = torch.randint(0, U, (B,), generator=g)
    items = torch.randint(0, I, (B, C), generator=g)
    return P, Q, K, M, users, items


def step(loss_fn, P, Q, K, M, users, items, relation):
    for t in (P, Q, K, M):
        t.grad = None
    loss = loss_fn(P, Q, K, M, users, items, relation=relation, sparse_grad=True)
    loss.backward()


def best_interleaved(fns, reps=9, warmup=2):
    """Best-of-``reps`` wall and process-CPU seconds of each function, taken round-robin.

    On a shared machine the load changes while a benchmark runs; interleaving the candidates
    exposes them to the same conditions, and the minimum is the least disturbed run. CPU time
    (all threads of this process) is reported too: it does not count time spent descheduled.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall = {k: float("inf") for k in fns}
    cpu = dict(wall)
    for _ in range(reps):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k] = min(wall[k], time.perf_counter() - t0)
            cpu[k] = min(cpu[k], time.process_time() - c0)
    return wall, cpu


def bench_hinge(only_ref: bool, reps: int):
    P, Q, K, M, users, items = make()
    # Calls cycle through 7 batches: consecutive calls (of any candidate) gather different rows,
    # as in training, instead of finding the previous call's rows in cache.
    g = torch.Generator().manual_seed(1)
    batches = itertools.cycle(
        [(users, items)]
        + [(torch.randint(0, U, (B,), generator=g), torch.randint(0, I, (B, C), generator=g))
           for _ in range(6)]
    )  # fmt: skip
    ref = reference.lrml_hinge_loss
    # Inductor cannot compile a backward that produces sparse COO gradients, so the compiled
    # reference gathers with nn.Embedding(sparse=True) semantics eagerly and compiles the rest
    # (distances from the gathered rows, hinge, and their backward to the rows, keys, memory).
    rest = torch.compile(
        lambda p, q, K, M, relation: reference.hinge_from_distances(
            reference.distances_from_rows(p, q, K, M, relation=relation)
        )
    )

    def compiled(P, Q, K, M, users, items, relation, sparse_grad):
        p, q = reference.gather_rows(P, Q, users, items, sparse_grad=sparse_grad)
        return rest(p, q, K, M, relation)

    if not only_ref:
        import lrml_kernels as lk
        from lrml_kernels import extension

        ext = extension.backend("cpu")

        def public(P, Q, K, M, users, items, relation, sparse_grad):
            return lk.lrml_hinge_loss(
                P, Q, K, M, users, items, relation=relation, backend="cpu", sparse_grad=sparse_grad
            )

    macs = {"pair": 6 * N * D * B * C, "shared": 6 * N * D * B}
    print(
        f"B={B} C={C} d={D} N={N}, tables {U}x{D} / {I}x{D} fp32, sparse grads, "
        f"{torch.get_num_threads()} threads; best of {reps}, wall (process CPU) ms",
        flush=True,
    )
    for relation in ("pair", "shared"):
        tables = (P, Q, K, M)

        def run(loss_fn):
            u, it = next(batches)  # every call a batch the previous calls did not touch
            step(loss_fn, *tables, u, it, relation)  # noqa: B023

        fns = {
            "eager": lambda: run(ref),
            "compiled": lambda: run(compiled),
        }
        if not only_ref:
            detached = tuple(t.detach() for t in tables)

            def grads_only():
                u, it = next(batches)
                ext.hinge_loss_grads(*detached, u, it, 0.5, "l2", relation, 1e-3, "sum")  # noqa: B023

            fns["ext autograd"] = lambda: run(public)
            fns["hinge_loss_grads"] = grads_only
        wall, cpu = best_interleaved(fns, reps)
        parts = [f"{k} {wall[k] * 1e3:7.2f} ({cpu[k] * 1e3:7.2f})" for k in fns]
        print(f"hinge {relation:6s} " + "  ".join(parts), flush=True)
        for k in ("ext autograd", "hinge_loss_grads"):
            if k in wall:
                gmacs = macs[relation] / wall[k] / 1e9
                print(
                    f"    {k:16s} x{wall['eager'] / wall[k]:5.1f} eager  "
                    f"x{wall['compiled'] / wall[k]:5.1f} compiled  "
                    f"({gmacs:.0f} GMAC/s of the {macs[relation] / 1e6:.0f}M attention MACs)",
                    flush=True,
                )


def chunked_topk(P, Q, K, M, users, k, exclude, chunk=64):
    """Plain PyTorch, materialising [chunk, I, d]: the baseline of issue 6."""
    out_d, out_i = [], []
    indptr, indices = exclude
    for s in range(0, users.shape[0], chunk):
        p = P[users[s : s + chunk]][:, None, :]  # [c, 1, d]
        sv = p * Q[None]  # [c, I, d]
        a = torch.softmax(sv @ K.T, -1)
        e = p + a @ M - Q[None]
        dist = torch.sqrt((e * e).sum(-1) + 1e-3)
        n = p.shape[0]
        lo, hi = indptr[s : s + n], indptr[s + 1 : s + n + 1]
        rows = torch.repeat_interleave(torch.arange(n), hi - lo)
        dist[rows, indices[lo[0] : hi[-1]]] = float("inf")
        dd, ii = torch.topk(dist, k, largest=False)
        out_d.append(dd)
        out_i.append(ii)
    return torch.cat(out_d), torch.cat(out_i)


def bench_topk(only_ref: bool):
    g = torch.Generator().manual_seed(1)
    nu = 2048
    P = torch.randn(nu, D, generator=g) * 0.1
    Q = torch.randn(I, D, generator=g) * 0.1
    K = torch.randn(N, D, generator=g) * 0.1
    M = torch.randn(N, D, generator=g) * 0.1
    users = torch.arange(nu)
    counts = torch.randint(0, 200, (nu,), generator=g)
    indptr = torch.zeros(nu + 1, dtype=torch.int64)
    indptr[1:] = counts.cumsum(0)
    indices = torch.cat([torch.randperm(I, generator=g)[:c].sort().values for c in counts])
    exclude = (indptr, indices)
    t_ref = best(lambda: chunked_topk(P, Q, K, M, users, 10, exclude), reps=1, warmup=0)
    line = f"topk l2 chunked-materialising {t_ref:.2f} s"
    if not only_ref:
        import resource

        from lrml_kernels import extension

        ext = extension.backend("cpu")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t_ext = best(lambda: ext.topk(P, Q, K, M, users, 10, exclude, "l2", 1e-3), reps=3)
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        grow = (rss1 - rss0) / 1024
        line += f"  ext {t_ext:.3f} s (x{t_ref / t_ext:.1f}), peak RSS growth {grow:.0f} MB"
    print(line, flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--only-ref", action="store_true")
    ap.add_argument("--topk", action="store_true")
    ap.add_argument("--no-hinge", action="store_true")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_hinge:
        bench_hinge(args.only_ref, args.reps)
    if args.topk:
        bench_topk(args.only_ref)
