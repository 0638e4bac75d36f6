"""FAISS's exact search (``faiss.knn``) on its two paths, side by side: one query at a time (SIMD)
and BLAS blocks, for the query counts a recall sample brings (20 to 2,000) against one stored piece.

    python scripts/exact_paths.py [--rows 50000] [--dims 64 128 384]

FAISS chooses the path by ``faiss.cvar.distance_compute_blas_threshold`` against queries x d (here
set to 20 for the second pair of columns, so every call takes BLAS). The last pair is the tool's own
products (``pipeline.backends.lists.blas_knn``, on FAISS's thread count), which the CPU backend
takes where FAISS would score one query at a time. Milliseconds per call, best of three, k = 22.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import faiss
import numpy as np

from pipeline.backends.lists import blas_knn


def _best(search: Callable[[], object]) -> float:
    search()  # warm
    times = []
    for _ in range(3):
        start = time.perf_counter()
        search()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def _faiss(q: np.ndarray, x: np.ndarray, metric: int, threshold: int) -> float:
    faiss.cvar.distance_compute_blas_threshold = threshold
    return _best(lambda: faiss.knn(q, x, 22, metric=metric))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 384])
    parser.add_argument("--queries", type=int, nargs="+", default=[20, 100, 250, 500, 1000, 2000])
    args = parser.parse_args()
    default = faiss.cvar.distance_compute_blas_threshold
    rng = np.random.default_rng(0)
    print(f"faiss {faiss.__version__}, its threshold {default}, {faiss.omp_get_max_threads()} threads")
    print("| d | queries | default: ip ms | l2 ms | threshold 20: ip ms | l2 ms | blas_knn: ip ms | l2 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.dims:
        x = rng.standard_normal((args.rows, d)).astype(np.float32)
        for nq in args.queries:
            q = np.ascontiguousarray(x[:nq])
            cells = [
                _faiss(q, x, metric, threshold)
                for threshold in (default, 20)
                for metric in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2)
            ]
            threads = faiss.omp_get_max_threads()
            cells += [
                _best(lambda m=metric, q=q, x=x, t=threads: blas_knn(q, x, 22, m, t))
                for metric in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2)
            ]
            print(f"| {d} | {nq} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    faiss.cvar.distance_compute_blas_threshold = default


if __name__ == "__main__":
    main()
