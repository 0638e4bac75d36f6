"""The list-major walk (``pipeline.backends.lists.walk_lists``) on one thread: what its time goes to,
and how it moves with the queries each list meets per batch and with the heap's width.

    python scripts/walk_benchmark.py [--rows 1000000] [--dim 64 128] [--nprobe 7] [--threads 2]

Generates ``--rows`` clustered rows (``pipeline.io.sample_data.clustered_vectors``), puts them in an
IVF-Flat index with lists of about ``LIST_ROWS`` rows (as the planner would), and walks batches of
held-out queries sized so that each list meets 64 to 512 of them, at the heap widths of a plain join
(``k + 1``: the query's own row) and of a self-join that keeps spare candidates for updates
(``2k + 1``). One thread, one BLAS thread: per-core numbers, each the best of ``--repeat`` runs.

The breakdown walks the same lists and queries with the products alone (the gathered queries times
each list's vectors, norms added), so ``heap`` is the rest (bookkeeping included): FAISS's ``ResultHeap`` taking every
score. The peak column is one thread's ``float32`` product of two 2048 x 2048 matrices.

``--threads N`` (N > 1) adds a column: the same batch through ``list_major_search`` on N threads
(each walks a share of the queries over the batch's shared list views), us a query of the batch.
Run it from a worktree of older code to compare a change side by side.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.backends.lists import CHUNK_SCORES, list_major_search, list_views, walk_lists
from pipeline.index.choice import LIST_ROWS
from pipeline.io.sample_data import clustered_vectors


def products_only(index: faiss.IndexIVFFlat, x: np.ndarray, assign: np.ndarray) -> float:
    """Seconds for the walk's products alone: the lists' views made and each list's queries (chunked
    as the walk does) times its vectors, squared norms added, as ``walk_lists`` does them; no heap."""
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    lists, queries = flat[order], order // assign.shape[1]
    starts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]])
    ends = np.r_[starts[1:], len(lists)]
    scaled = x * np.float32(-2.0)
    start = time.perf_counter()
    views = list_views(index, lists[starts])
    for lo, hi, number in zip(starts.tolist(), ends.tolist(), lists[starts].tolist(), strict=True):
        view = views.get(number)
        if view is None:
            continue
        norms = view.norms()
        step = max(1, CHUNK_SCORES // len(view.ids))
        for a in range(lo, hi, step):
            part = scaled[queries[a : min(hi, a + step)]] @ view.stored.T
            part += norms
    return time.perf_counter() - start


def walk_seconds(index: faiss.IndexIVFFlat, x: np.ndarray, assign: np.ndarray, width: int) -> float:
    start = time.perf_counter()
    walk_lists(index, x, assign, width, False)
    return time.perf_counter() - start


def batch_seconds(index: faiss.IndexIVFFlat, x: np.ndarray, assign: np.ndarray, width: int, threads: int) -> float:
    """The batch through ``list_major_search`` on ``threads`` threads (its lists given: no assignment)."""
    start = time.perf_counter()
    list_major_search(index, x, width, assign.shape[1], threads, assign=assign)
    return time.perf_counter() - start


def peak_gflops() -> float:
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--nprobe", type=int, default=7)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--per-list", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs of each")
    ap.add_argument("--threads", type=int, default=1, help="also time the batch on this many threads")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    with threadpool_limits(1):
        peak = peak_gflops()
        print(f"one thread's float32 product peak: {peak:.1f} GFLOP/s")
        more = args.threads > 1
        print(
            "| d | queries a list | heap width | us a query | GFLOP/s | share of peak | products alone | heap |"
            + (f" us a query, {args.threads} threads |" if more else "")
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if more else ""))
        for dim in args.dim:
            x = clustered_vectors(args.rows + 600_000, dim, seed=1)
            base, held = x[: args.rows], x[args.rows :]
            nlist = max(1, args.rows // LIST_ROWS)
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
            index.train(base[:: max(1, args.rows // (64 * nlist))])
            index.add(base)
            for per_list in args.per_list:
                nq = min(len(held), per_list * nlist // args.nprobe)
                q = np.ascontiguousarray(held[:nq])
                assign = index.quantizer.search(q, args.nprobe)[1]
                flops = 2.0 * dim * float(sum(index.invlists.list_size(int(i)) for i in assign.ravel()))
                alone = min(products_only(index, q, assign) for _ in range(args.repeat))
                for width in (args.k + 1, 2 * args.k + 1):
                    took = min(walk_seconds(index, q, assign, width) for _ in range(args.repeat))
                    threaded = ""
                    if more:
                        both = min(batch_seconds(index, q, assign, width, args.threads) for _ in range(args.repeat))
                        threaded = f" {1e6 * both / nq:.1f} |"
                    print(
                        f"| {dim} | {per_list} | {width} | {1e6 * took / nq:.1f} | {flops / took / 1e9:.1f} | "
                        f"{flops / took / 1e9 / peak:.0%} | {alone / took:.0%} | {1 - alone / took:.0%} |{threaded}"
                    )


if __name__ == "__main__":
    main()
