"""The device seam: one small interface that stages call without branching on it.

A backend trains, adds, searches and does the exact arithmetic around FAISS: exact search of
the row store (the exact plan, and its self-join by pairs of pieces) and re-ranking of
candidates against it. Each Dask worker
chooses its own, where the work runs (:mod:`pipeline.backends.worker`); tasks ask their worker
for it.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import Protocol

import faiss
import numpy as np

from pipeline.backends.cpu import CpuBackend
from pipeline.backends.gpu import GpuBackend
from pipeline.backends.lists import GroupSearch
from pipeline.io.store import RowStore
from pipeline.kinds import Metric

__all__ = ["Backend", "gpu_count", "CpuBackend", "GpuBackend"]

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What every stage asks of its worker's device. Arrays are C-contiguous float32 rows;
    ``metric`` is the job's (:data:`pipeline.kinds.Metric`; cosine rows arrive L2-normalised, so
    it is searched as inner product). Scores are similarities (higher first) for ``ip`` and
    ``cosine`` and squared distances (lower first) for ``l2``; rows are global row numbers.

    Examples
    --------
    >>> from pipeline.backends.worker import worker_device
    >>> with worker_device() as be:  # doctest: +SKIP
    ...     scores, rows = be.exact_search(queries, store, k=10, metric="cosine")
    """

    name: str  # "cpu" or "gpu"
    search_rows: int  # queries per search call

    def set_threads(self, n: int) -> None:
        """Use ``n`` threads for FAISS (and BLAS) in the calling thread."""

    def train(self, index: faiss.Index, x: np.ndarray) -> None:
        """Train ``index`` (its quantizer, codebooks) on the sample ``x``."""

    def add(self, index: faiss.Index, x: np.ndarray, ids: np.ndarray | None) -> None:
        """Encode ``x`` into the trained ``index`` under ``ids`` (None: positions in adding order)."""

    def search(
        self,
        index: faiss.Index,
        x: np.ndarray,
        k: int,
        params: faiss.SearchParameters | None = None,
        *,
        assign: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``index.search`` of ``x``: (scores, ids), each ``(len(x), k)``, ``-1`` ids past what was found.
        ``assign``: each query's ``nprobe`` lists where the caller assigned them already (a self-join
        keeps them with its lists for input updates); a backend may search by them or assign again."""

    def group_search(self, ivf: faiss.IndexIVF, first: int, last: int) -> AbstractContextManager[GroupSearch]:
        """Hold ``ivf``'s lists ``[first, last)`` (a routed join's list group) for the block and
        give their search (:class:`pipeline.backends.lists.GroupSearch`): each query's ``k`` best
        among its given lists, as ``index.search`` would find them there."""

    def exact_scores(self, q: np.ndarray, candidates: np.ndarray, metric: Metric) -> np.ndarray:
        """``(n, c)`` exact scores of each query ``q[i]`` against its ``candidates[i]`` (``(n, c, d)``)."""

    def knn(
        self, q: np.ndarray, x: np.ndarray, k: int, metric: Metric, *, whole: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of ``q`` among the rows of ``x``: (scores, local rows of ``x``).
        ``whole``: the caller always scores these queries together (a seeded recall sample), so
        their scores may hang on the batch; otherwise a row's scores are the same in any batch
        (a part redone alone gives the same bytes)."""

    def exact_search(self, q: np.ndarray, store: RowStore, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of ``q`` over the whole row store, piece by piece: (scores, global rows)."""

    def rerank(self, q: np.ndarray, rows: np.ndarray, store: RowStore, metric: Metric) -> np.ndarray:
        """Exact scores of each query against its candidate global ``rows`` (``-1`` rows score worst)."""

    def self_topk(self, x: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of every row of ``x`` among the rows of ``x`` (itself included), local rows."""

    def pair_topk(
        self, a: np.ndarray, b: np.ndarray, k: int, metric: Metric, b_floor: np.ndarray
    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Exact top-``k`` of ``a``'s rows among ``b``'s and of ``b``'s among ``a``'s, from one product
        per tile: the symmetric half of a self-join, each pair of pieces scored once for both.
        ``b_floor`` is a lower bound of each ``b`` row's final k-th score (scores below it are
        dropped early). Scores higher-better (l2 negated), local indices, ``-1`` padded."""


def gpu_count() -> int:
    """GPUs visible to faiss (0 for a CPU-only build of faiss)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0
