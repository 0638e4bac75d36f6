"""The CPU backend: faiss-cpu and NumPy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.backends.kernels import FAISS_METRICS, host_rerank, ivf_of, pair_topk, self_topk, streamed_exact
from pipeline.backends.lists import (
    LIST_MAJOR_MIN_QUERIES,
    GroupSearch,
    add_with_assignments,
    blas_knn,
    coarse_assign,
    is_ivf_flat,
    list_major_search,
    pack_like,
    packed,
    search_assigned,
    two_level,
)
from pipeline.io.store import RowStore
from pipeline.kinds import Metric

__all__ = ["CpuBackend"]

ADD_ROWS = 65_536  # rows assigned to their lists at once when adding through a two-level quantizer


# from this many queries a whole batch FAISS would score one query at a time is scored by products
# (per 50,000 rows on 2 cores, d = 64 to 384: 100 queries 15-54 ms against 41-262 ms; at 10 to 30
# queries the two are close; scripts/exact_paths.py)
BLAS_MIN_QUERIES = 32


class CpuBackend:
    name = "cpu"
    search_rows = 1024  # queries per FAISS call: measured fastest (cache-friendly) on fast-scan and IVF-PQ

    threads: int | None = None  # the worker's cores for FAISS and BLAS (None: the libraries' defaults)

    def set_threads(self, n: int) -> None:
        """Use ``n`` threads in this thread's FAISS calls (OpenMP's count is per calling thread, so
        the worker sets it as each task takes the device) and in the NumPy products of the exact
        self-join (:meth:`_blas`): Dask starts worker processes with ``OPENBLAS_NUM_THREADS=1``,
        which would leave those on one core."""
        self.threads = max(1, int(n))
        faiss.omp_set_num_threads(self.threads)

    def _blas(self) -> threadpool_limits:
        """BLAS on this worker's threads for the block. A limit set for good would tie OpenBLAS to
        the thread that set it (threadpoolctl ignores limits from other threads), so every block
        that needs one sets its own."""
        return threadpool_limits(self.threads, user_api="blas")

    def train(self, index: faiss.Index, x: np.ndarray) -> None:
        index.train(x)

    def add(self, index: faiss.Index, x: np.ndarray, ids: np.ndarray | None) -> None:
        """``index.add``; an IVF index with a two-level quantizer gets its rows' lists from
        :func:`coarse_assign` (list by list, BLAS) instead of one quantizer search per row."""
        ivf = ivf_of(index)
        if ivf is not None and two_level(ivf.quantizer) is not None:

            def nearest(quantizer: faiss.Index, xb: np.ndarray) -> np.ndarray:
                return coarse_assign(quantizer, xb, 1)[:, 0]

            add_with_assignments(index, x, ids, nearest, ADD_ROWS)
        elif ids is None:
            index.add(x)
        else:
            index.add_with_ids(x, ids)

    def search(
        self,
        index: faiss.Index,
        x: np.ndarray,
        k: int,
        params: faiss.SearchParameters | None = None,
        *,
        assign: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``index.search``; a large batch on an IVF-Flat index is searched list by list instead
        (:mod:`pipeline.backends.lists`: the same result, BLAS speed), by ``assign`` where given."""
        nprobe = getattr(params, "nprobe", None)
        if nprobe and len(x) >= LIST_MAJOR_MIN_QUERIES and is_ivf_flat(index):
            ivf = cast(faiss.IndexIVFFlat, faiss.downcast_index(index))
            return list_major_search(ivf, x, k, nprobe, self.threads, assign=assign)
        return index.search(x, k, params=params)

    @contextlib.contextmanager
    def group_search(self, ivf: faiss.IndexIVF, first: int, last: int) -> Iterator[GroupSearch]:
        """A search of ``ivf``'s lists ``[first, last)`` for the block: on the host, the lists read
        where they lie: IVF-Flat by products over each query's given lists
        (:func:`list_major_search`), lossy codes by FAISS's ``search_preassigned``."""
        flat = is_ivf_flat(ivf)

        def search(
            x: np.ndarray, k: int, assign: np.ndarray, coarse: np.ndarray | None = None
        ) -> tuple[np.ndarray, np.ndarray]:
            if flat:
                return list_major_search(
                    cast(faiss.IndexIVFFlat, ivf), x, k, int(assign.shape[1]), self.threads, assign=assign
                )
            keys = packed(assign)  # FAISS reads at most nlist columns
            near = np.zeros(keys.shape, np.float32) if coarse is None else pack_like(assign, coarse)
            return search_assigned(ivf, np.ascontiguousarray(x, dtype=np.float32), k, keys, near)

        yield search

    def exact_scores(self, q: np.ndarray, candidates: np.ndarray, metric: Metric) -> np.ndarray:
        """Scores of each query against its own candidates: ``q`` (n, d), ``candidates`` (n, c, d).

        Inner product for ``ip``/``cosine`` (vectors already normalised), squared L2 for ``l2``,
        matching what FAISS reports.
        """
        dots = np.einsum("nd,ncd->nc", q, candidates, optimize=True)
        if metric == "l2":
            return (np.einsum("ncd,ncd->nc", candidates, candidates) - 2 * dots + (q * q).sum(1)[:, None]).astype(
                np.float32
            )
        return dots.astype(np.float32, copy=False)

    def knn(
        self, q: np.ndarray, x: np.ndarray, k: int, metric: Metric, *, whole: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of ``q`` among the rows of ``x`` (FAISS's blocked GEMM and k-selection).
        A ``whole`` batch that FAISS would score one query at a time (under
        ``distance_compute_blas_threshold / d`` queries) is scored by products instead
        (:func:`pipeline.backends.lists.blas_knn`; per 50,000 rows of d = 128 on 2 cores, 500
        queries 75 ms against 329 ms), whose bits hang on the batch."""
        if whole and BLAS_MIN_QUERIES <= len(q) and len(q) * q.shape[1] < faiss.cvar.distance_compute_blas_threshold:
            x32 = np.ascontiguousarray(x, dtype=np.float32)
            return blas_knn(np.ascontiguousarray(q, dtype=np.float32), x32, k, FAISS_METRICS[metric], self.threads or 1)
        return faiss.knn(q, x, k, metric=FAISS_METRICS[metric])

    def exact_search(self, q: np.ndarray, store: RowStore, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` (scores, global rows) of ``q`` over the row store, piece by piece."""
        return streamed_exact(self.knn, q, store, k, metric)

    def rerank(self, q: np.ndarray, rows: np.ndarray, store: RowStore, metric: Metric) -> np.ndarray:
        """Exact scores of each query against its candidate rows (``-1`` scores worst), gathered on the host."""
        return host_rerank(self.exact_scores, q, rows, store, metric)

    def self_topk(self, x: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of ``x``'s rows among themselves, blocks against themselves and pairs of
        blocks scored once for both (:func:`pipeline.backends.kernels.self_topk`)."""
        with self._blas():
            return self_topk(self.knn, x, k, metric)

    def pair_topk(
        self, a: np.ndarray, b: np.ndarray, k: int, metric: Metric, b_floor: np.ndarray
    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Both sides' exact top-``k`` from one product per tile (:func:`pipeline.backends.kernels.pair_topk`)."""
        with self._blas():
            return pair_topk(a, b, k, metric, b_floor)
