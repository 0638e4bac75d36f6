"""The kernels below the backends: arithmetic against the row store itself, exact top-k
streamed piece by piece, and the exact re-ranking of candidates, on the host or on an array held
by a device.

Free of any backend so that both backends build on it (and search modules that merge partial
lists use its merges directly): the CPU backend streams pieces and
gathers candidates on the host; the GPU backend holds the whole store on its device when it fits
(:class:`ResidentRows` over CuPy) and streams otherwise. Scores follow FAISS's conventions:
similarity for ip/cosine (vectors normalised already), squared distance for l2.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import faiss
import numpy as np

from pipeline.io.store import RowStore
from pipeline.kinds import Metric

__all__ = [
    "FAISS_METRICS",
    "ivf_of",
    "merge_topk",
    "piece_topk",
    "streamed_exact",
    "host_rerank",
    "worst_score",
    "ResidentRows",
    "RERANK_CHUNK_BYTES",
    "pair_topk",
    "self_topk",
    "knn_topk",
    "shifted",
    "PAIR_TILE",
]

FAISS_METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT, "cosine": faiss.METRIC_INNER_PRODUCT}
RERANK_CHUNK_BYTES = 16 << 20  # candidate vectors gathered at once while re-ranking

Knn = Callable[[np.ndarray, np.ndarray, int, Metric], tuple[np.ndarray, np.ndarray]]
Scores = Callable[[np.ndarray, np.ndarray, Metric], np.ndarray]


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF layer inside ``index`` (through pre-transforms), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


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


def piece_topk(
    knn: Knn, store: RowStore, piece: int, queries: np.ndarray, *, k: int, metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries`` within one stored piece, higher scores first (l2 negated),
    as global rows. ``knn(queries, vectors, k, faiss_metric)`` is a backend's: FAISS works through
    the piece in GEMM tiles, so memory stays bounded and BLAS (or cuBLAS) does the work."""
    scores, rows = _scored(knn, queries, store.mapped_vectors(piece), k, metric)
    return scores, rows + store.starts[piece]


def streamed_exact(
    knn: Knn, queries: np.ndarray, store: RowStore, k: int, metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores in the metric's convention, global rows) of ``queries`` over every
    stored piece, read one piece at a time (:func:`piece_topk`); :func:`merge_topk` keeps the best."""
    parts = (piece_topk(knn, store, p, queries, k=k, metric=metric) for p in store.live)
    scores, rows = merge_topk(parts, k)
    return (-scores if metric == "l2" else scores), rows


def worst_score(metric: Metric) -> float:
    """The score a missing candidate gets, so that it sorts last."""
    return np.inf if metric == "l2" else -np.inf


def host_rerank(scores: Scores, q: np.ndarray, rows: np.ndarray, store: RowStore, metric: Metric) -> np.ndarray:
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
        dim = store.mapped_vectors(store.live[0]).shape[1] if store.live else 0
        self.base = xp.zeros((store.total_rows, dim), dtype=xp.float32)  # holes (retired rows) stay zero
        bounds = [*store.starts.tolist(), store.total_rows]
        for piece in store.live:  # piece by piece: host memory holds one piece at a time
            self.base[bounds[piece] : bounds[piece + 1]] = xp.asarray(store.vectors(piece))
        self.norms = (self.base * self.base).sum(axis=1)

    @staticmethod
    def nbytes(store: RowStore, dim: int) -> int:
        """Device bytes the store takes resident: its vectors and their squared norms."""
        return int(store.total_rows) * (4 * int(dim) + 4)

    def rerank(self, q: np.ndarray, rows: np.ndarray, metric: Metric, chunk_bytes: int = 256 << 20) -> np.ndarray:
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


PAIR_TILE = 4096  # rows a side of one product tile in :func:`pair_topk` (64 MiB of float32 scores)
# blocks of self_topk: their own k-th scores are the floors, so larger blocks keep fewer scores
# (the sizes measured: docs/benchmarks.md)
SELF_BLOCK = 2 * PAIR_TILE
FLOOR_HITS_PER_ROW = 8  # past this many kept scores per row of a tile, that tile's b side goes through heaps


def _heap(n: int, k: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """FAISS heaps keeping the ``k`` largest scores of ``n`` rows, over arrays we own."""
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    rows = np.full((n, k), -1, dtype=np.int64)
    heap = faiss.float_minheap_array_t()
    heap.nh, heap.k, heap.val, heap.ids = n, k, faiss.swig_ptr(scores), faiss.swig_ptr(rows)
    return heap, scores, rows


def pair_topk(
    a: np.ndarray,
    b: np.ndarray,
    k: int,
    metric: Metric,
    b_floor: np.ndarray,
    *,
    tile: int = PAIR_TILE,
    floor_hits: int = FLOOR_HITS_PER_ROW,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Exact top-``k`` of ``a``'s rows among ``b``'s and of ``b``'s rows among ``a``'s, from one
    matrix product per tile instead of two: the symmetric half of a self-join.

    ``a``'s side goes through FAISS heaps (``addn``: sequential ids, no id matrix). ``b``'s side
    keeps only the scores at or above ``b_floor``, a lower bound of each ``b`` row's final
    ``k``-th score (its ``k``-th best within its own piece: anything lower can never enter its
    top ``k``), then sorts those few; this avoids transposing every tile, which costs as much as
    the product. A tile where the floor keeps more than ``floor_hits`` a row is transposed
    into heaps instead, and what is kept is cut to each row's best ``k`` whenever it grows past
    that many a row, so memory stays bounded on any data. Scores are higher-better (l2
    distances negated), indices local to the other side, ``-1`` padded, best first.
    """
    l2 = metric == "l2"
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    a_heap, a_scores, a_rows = _heap(len(a), k)
    b_heap, b_scores, b_rows = _heap(len(b), k)
    a_norms = np.einsum("ij,ij->i", a, a) if l2 else np.zeros(len(a), dtype=np.float32)
    b_norms = np.einsum("ij,ij->i", b, b) if l2 else np.zeros(len(b), dtype=np.float32)
    # compared with 2ab - |a|^2 (l2) or ab (ip): the score plus |b|^2
    floor = np.asarray(b_floor, dtype=np.float32) + b_norms
    buffer = np.empty(min(tile, len(a)) * min(tile, len(b)), dtype=np.float32)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (b row, a row, score) kept for b's side
    held = 0
    for i0 in range(0, len(a), tile):
        ta = a[i0 : i0 + tile]
        for j0 in range(0, len(b), tile):
            tb = b[j0 : j0 + tile]
            g = np.matmul(ta, tb.T, out=buffer[: len(ta) * len(tb)].reshape(len(ta), len(tb)))
            if l2:
                g *= 2
                g -= a_norms[i0 : i0 + len(ta), None]
            rows, cols = _where(g >= floor[None, j0 : j0 + len(tb)])
            if len(rows) <= floor_hits * len(tb):
                found.append((cols + j0, rows + i0, g[rows, cols] - b_norms[cols + j0]))
                held += len(rows)
                if held > floor_hits * len(b):  # keep b's best k a row so far: memory stays k a row
                    best, at = _best_per_row(found, len(b), k)
                    line, slot = np.nonzero(at >= 0)
                    found, held = [(line, at[line, slot], best[line, slot])], len(line)
            else:
                flipped = np.ascontiguousarray(g.T)  # held while FAISS reads it
                b_heap.addn(len(ta), faiss.swig_ptr(flipped), i0, j0, len(tb))
            if l2:
                g += a_norms[i0 : i0 + len(ta), None]
                g -= b_norms[None, j0 : j0 + len(tb)]  # 2ab - |b|^2: a's ranking (its own |a|^2 added below)
            a_heap.addn(len(tb), faiss.swig_ptr(g), j0, i0, len(ta))
    a_heap.reorder()
    b_heap.reorder()
    a_scores -= a_norms[:, None]
    b_scores -= b_norms[:, None]
    return (a_scores, a_rows), merge_topk([(b_scores, b_rows), _best_per_row(found, len(b), k)], k)


def self_topk(
    knn: Knn, x: np.ndarray, k: int, metric: Metric, *, block: int = SELF_BLOCK, floor_hits: int = FLOOR_HITS_PER_ROW
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of each row of ``x`` among the rows of ``x`` (itself included), higher
    scores first, local rows: exact search of each block of ``block`` rows against itself
    (``knn``, a backend's), whose ``k``-th scores are the floors with which every pair of blocks
    is then scored once for both (:func:`pair_topk`, with ``floor_hits``)."""
    starts = list(range(0, len(x), block))
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for b0 in starts:
        scores, rows = knn_topk(knn, x[b0 : b0 + block], x[b0 : b0 + block], k, metric)
        parts.append([(scores, shifted(rows, b0))])
    for i, i0 in enumerate(starts):
        for j in range(i + 1, len(starts)):
            j0 = starts[j]
            a, b, floor = x[i0 : i0 + block], x[j0 : j0 + block], parts[j][0][0][:, -1]
            (sa, ra), (sb, rb) = pair_topk(a, b, k, metric, floor, floor_hits=floor_hits)
            parts[i].append((sa, shifted(ra, j0)))
            parts[j].append((sb, shifted(rb, i0)))
    merged = [merge_topk(p, k) for p in parts]
    return np.concatenate([m[0] for m in merged]), np.concatenate([m[1] for m in merged])


def _scored(knn: Knn, q: np.ndarray, x: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """``knn``'s top ``min(k, len(x))`` of ``q`` among ``x``, scores higher-better (l2 negated)."""
    dist, rows = knn(q, x, min(k, len(x)), metric)
    return (-dist if metric == "l2" else dist), rows


def shifted(rows: np.ndarray, start: int) -> np.ndarray:
    """Local rows as rows of a larger whole starting at ``start``, ``-1`` (none) kept."""
    return np.where(rows >= 0, rows + start, -1)


def knn_topk(knn: Knn, q: np.ndarray, x: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """``knn``'s exact top-``k`` of ``q`` among ``x`` as :func:`pair_topk` gives it: scores
    higher-better, local rows, ``(len(q), k)`` padded with the worst score and row ``-1``."""
    scores, rows = _scored(knn, q, x, k, metric)
    pad = k - scores.shape[1]
    if pad <= 0:
        return scores, rows
    return (
        np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf),
        np.pad(rows, ((0, 0), (0, pad)), constant_values=-1),
    )


def _where(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a sparse 2-D boolean matrix, eight entries at a time: the few true
    entries are found among the non-zero 64-bit words (``np.nonzero`` alone tests every byte,
    which costs more than the comparison that made the mask)."""
    flat = mask.reshape(-1)
    whole = len(flat) // 8 * 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    spots = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    hits = np.concatenate([spots[flat[spots]], whole + np.flatnonzero(flat[whole:])])
    return np.divmod(hits, mask.shape[1])


def _best_per_row(
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (score, column) of each of ``n`` rows among (row, column, score) triples."""
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    cols = np.full((n, k), -1, dtype=np.int64)
    if not found:
        return scores, cols
    row = np.concatenate([f[0] for f in found])
    col = np.concatenate([f[1] for f in found])
    score = np.concatenate([f[2] for f in found]).astype(np.float32)
    order = np.lexsort((col, -score, row))
    row, col, score = row[order], col[order], score[order]
    first = np.searchsorted(row, row, side="left")
    rank = np.arange(len(row)) - first
    keep = rank < k
    scores[row[keep], rank[keep]] = score[keep]
    cols[row[keep], rank[keep]] = col[keep]
    return scores, cols
