"""Arithmetic against the row store itself: exact top-k streamed piece by piece, and the exact
re-ranking of candidates, on the host or on an array held by a device.

Free of any backend so that both backends build on it: the CPU backend streams pieces and
gathers candidates on the host; the GPU backend holds the whole store on its device when it fits
(:class:`ResidentRows` over CuPy) and streams otherwise. Scores follow FAISS's conventions:
similarity for ip/cosine (vectors normalised already), squared distance for l2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from pipeline.index.choice import FAISS_METRICS
from pipeline.io.store import RowStore

__all__ = ["merge_topk", "piece_topk", "streamed_exact", "host_rerank", "worst_score", "ResidentRows",
           "RERANK_CHUNK_BYTES"]

RERANK_CHUNK_BYTES = 16 << 20  # candidate vectors gathered at once while re-ranking

Knn = Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
Scores = Callable[[np.ndarray, np.ndarray, str], np.ndarray]


def merge_topk(parts: Iterable[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge partial (scores, rows) lists, higher scores first, into the best ``k`` per query.

    Parts stream in: each is merged into the running top ``k`` and released, so memory is
    queries x 2k whatever the number of parts. Equal scores keep the smaller row, as one sort of
    everything would; ``faiss.ResultHeap`` drops an arbitrary one of tied rows at the boundary
    (found by the property test), which would make the exact ground truth vary between runs.
    """
    top: tuple[np.ndarray, np.ndarray] | None = None
    for scores, rows in parts:
        if top is not None:
            scores, rows = np.concatenate([top[0], scores], axis=1), np.concatenate([top[1], rows], axis=1)
        order = np.lexsort((rows, -scores), axis=1)[:, :k]
        top = np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)
    assert top is not None, "merge_topk needs at least one part"
    return top


def piece_topk(knn: Knn, store: RowStore, piece: int, queries: np.ndarray, k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries`` within one stored piece, higher scores first (l2 negated),
    as global rows. ``knn(queries, vectors, k, faiss_metric)`` is a backend's: FAISS works through
    the piece in GEMM tiles, so memory stays bounded and BLAS (or cuBLAS) does the work."""
    x = store.mapped_vectors(piece)
    dist, rows = knn(queries, x, min(k, x.shape[0]), FAISS_METRICS[metric])
    return (-dist if metric == "l2" else dist), rows + store.starts[piece]


def streamed_exact(knn: Knn, queries: np.ndarray, store: RowStore, k: int,
                   metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores in the metric's convention, global rows) of ``queries`` over every
    stored piece, read one piece at a time (:func:`piece_topk`); :func:`merge_topk` keeps the best."""
    parts = (piece_topk(knn, store, p, queries, k, metric) for p in range(len(store.starts)))
    scores, rows = merge_topk(parts, k)
    return (-scores if metric == "l2" else scores), rows


def worst_score(metric: str) -> float:
    """The score a missing candidate gets, so that it sorts last."""
    return np.inf if metric == "l2" else -np.inf


def host_rerank(scores: Scores, q: np.ndarray, rows: np.ndarray, store: RowStore, metric: str) -> np.ndarray:
    """Exact scores (n, c) of each query against its candidate rows (``-1``: none, scored worst),
    candidates gathered on the host from the memory-mapped store in chunks of ~16 MiB: small
    enough for the allocator to reuse warm memory (a fresh multi-GB buffer per batch spends more
    time in page faults than in math). ``scores(q, candidates, metric)`` does the arithmetic."""
    out = np.empty(rows.shape, dtype=np.float32)
    valid = rows >= 0
    step = max(1, RERANK_CHUNK_BYTES // max(1, rows.shape[1] * q.shape[1] * 4))
    for lo in range(0, len(q), step):
        cand = store.gather_vectors(np.where(valid[lo : lo + step], rows[lo : lo + step], 0))
        out[lo : lo + step] = scores(q[lo : lo + step], cand, metric)
    out[~valid] = worst_score(metric)
    return out


class ResidentRows:
    """Every vector of a row store held in one array of an array module ``xp`` (CuPy: the GPU's
    memory; NumPy in tests), so that re-ranking gathers candidates where they live instead of
    row by row from the host's memory maps.

    ``to_host`` copies a result back (``cupy.asnumpy``; ``np.asarray`` for NumPy).
    """

    def __init__(self, xp: Any, store: RowStore, to_host: Callable[[Any], np.ndarray] = np.asarray) -> None:
        self.xp = xp
        self.to_host = to_host
        dim = store.mapped_vectors(0).shape[1] if len(store.starts) else 0
        self.base = xp.empty((store.total_rows, dim), dtype=xp.float32)
        bounds = [*store.starts.tolist(), store.total_rows]
        for piece in range(len(store.starts)):  # piece by piece: host memory holds one piece at a time
            self.base[bounds[piece] : bounds[piece + 1]] = xp.asarray(store.vectors(piece))
        self.norms = (self.base * self.base).sum(axis=1)

    @staticmethod
    def nbytes(store: RowStore, dim: int) -> int:
        """Device bytes the store takes resident: its vectors and their squared norms."""
        return int(store.total_rows) * (4 * int(dim) + 4)

    def rerank(self, q: np.ndarray, rows: np.ndarray, metric: str, chunk_bytes: int = 256 << 20) -> np.ndarray:
        """As :func:`host_rerank`, on ``xp``: candidates gathered in device memory, scored by a
        batched matrix product, in chunks of at most ``chunk_bytes`` of gathered vectors."""
        xp = self.xp
        out = np.empty(rows.shape, dtype=np.float32)
        step = max(1, chunk_bytes // max(1, rows.shape[1] * self.base.shape[1] * 4))
        for lo in range(0, len(q), step):
            r = xp.asarray(rows[lo : lo + step])
            valid = r >= 0
            safe = xp.where(valid, r, 0)
            qd = xp.asarray(q[lo : lo + step], dtype=xp.float32)
            cand = self.base[safe]  # (n, c, d), gathered on the device
            dots = xp.matmul(cand, qd[:, :, None])[:, :, 0]
            if metric == "l2":
                dots = self.norms[safe] - 2 * dots + (qd * qd).sum(axis=1)[:, None]
            dots = xp.where(valid, dots, worst_score(metric))
            out[lo : lo + step] = self.to_host(dots.astype(xp.float32))
        return out
