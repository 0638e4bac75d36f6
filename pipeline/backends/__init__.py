"""The device seam: one small interface that stages call without branching on it.

A backend trains, adds, searches and does the exact arithmetic around FAISS: exact search of
the row store (the exact plan, and its self-join by pairs of pieces) and re-ranking of
candidates against it. Each Dask worker
chooses its own, where the work runs (:mod:`pipeline.backends.worker`); tasks ask their worker
for it.
"""

from __future__ import annotations

import logging
from typing import Protocol

import faiss
import numpy as np

from pipeline.backends.cpu import CpuBackend
from pipeline.backends.gpu import GpuBackend
from pipeline.io.store import RowStore

__all__ = ["Backend", "gpu_count", "CpuBackend", "GpuBackend"]

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    search_rows: int  # queries per search call

    def set_threads(self, n: int) -> None: ...

    def train(self, index: faiss.Index, x: np.ndarray) -> None: ...

    def add(self, index: faiss.Index, x: np.ndarray, ids: np.ndarray | None) -> None: ...

    def search(
        self, index: faiss.Index, x: np.ndarray, k: int, params: faiss.SearchParameters | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def exact_scores(self, q: np.ndarray, candidates: np.ndarray, metric: str) -> np.ndarray: ...

    def knn(self, q: np.ndarray, x: np.ndarray, k: int, metric: int) -> tuple[np.ndarray, np.ndarray]: ...

    def exact_search(self, q: np.ndarray, store: RowStore, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]: ...

    def rerank(self, q: np.ndarray, rows: np.ndarray, store: RowStore, metric: str) -> np.ndarray: ...

    def self_topk(self, x: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]: ...

    def pair_topk(self, a: np.ndarray, b: np.ndarray, k: int, metric: str, b_floor: np.ndarray
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]: ...


def gpu_count() -> int:
    """GPUs visible to faiss (0 for a CPU-only build of faiss)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0
