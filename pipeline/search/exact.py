"""Exact ground truth on a sample of queries (recall itself is counted in :mod:`pipeline.search.recall`).

The exact search runs piece by piece on the workers (each task scores the sample against one
stored piece and keeps its top k); the partial lists are merged exactly here. Memory is the
sample times k, never the dataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from pipeline.backends.kernels import merge_topk, piece_topk
from pipeline.backends.worker import worker_device
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.runtime.progress import Progress
from pipeline.runtime.runner import result_of, submit

__all__ = ["exact_knn", "merge_topk", "pair_scores"]


@dataclass(frozen=True, kw_only=True)
class ExactPieceTask:
    """Exact top-``k`` of ``queries`` within one stored piece; higher scores first (l2 negated)."""

    store: RowStore
    piece: int
    queries: np.ndarray
    k: int
    metric: Metric

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        with worker_device() as be:
            # a sample's queries are always scored together: products where FAISS would go one by one
            knn = partial(be.knn, whole=True)
            return piece_topk(knn, self.store, self.piece, self.queries, k=self.k, metric=self.metric)


def exact_knn(
    client: Any, store: RowStore, n_pieces: int, *, queries: np.ndarray, k: int, metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, global rows) of ``queries`` over every stored piece.

    Scores follow the metric's convention: similarity for ip/cosine, squared distance for l2.
    """
    pieces = [p for p in store.live if p < n_pieces]
    tasks = [ExactPieceTask(store=store, piece=p, queries=queries, k=k, metric=metric) for p in pieces]
    futures = [submit(client, task, "ground_truth") for task in tasks]
    progress = Progress(f"exact neighbours of {len(queries):,} sampled queries", store.rows)

    def parts() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for p in pieces:  # in piece order (deterministic ties), each part released once merged
            part = result_of(futures.pop(0))
            progress.advance(store.piece_rows(p))
            yield part

    scores, rows = merge_topk(parts(), k)
    progress.close()
    return (-scores if metric == "l2" else scores), rows


def pair_scores(queries: np.ndarray, vectors: np.ndarray, metric: Metric) -> np.ndarray:
    """Exact score of each query row with the vector on the same row (FAISS's conventions)."""
    if metric == "l2":
        diff = queries - vectors
        return np.einsum("ij,ij->i", diff, diff)
    return np.einsum("ij,ij->i", queries, vectors)
