"""Exact ground truth on a sample of queries, and recall against it.

The exact search runs piece by piece on the workers (each task scores the sample against one
stored piece and keeps its top k); the partial lists are merged exactly here. Memory is the
sample times k, never the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from pipeline.index.choice import FAISS_METRICS
from pipeline.io.store import RowStore

__all__ = [
    "exact_knn",
    "merge_topk",
    "recall_at_k",
    "recall_summary",
    "tie_aware_recall",
    "tie_aware_hits",
    "pair_scores",
]


def _exact_piece(
    store: RowStore, piece: int, queries: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of ``queries`` within one piece; higher scores first (l2 negated)."""
    x = store.vectors(piece)
    # faiss.knn works through the piece in blocks: memory stays bounded, BLAS does the work
    dist, rows = faiss.knn(queries, x, min(k, x.shape[0]), metric=FAISS_METRICS[metric])
    return (-dist if metric == "l2" else dist), rows + store.starts[piece]


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge partial (scores, rows) lists, higher scores first, into the best ``k`` per query."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    rows = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((rows, -scores), axis=1)[:, :k] if scores.ndim == 2 else None
    assert order is not None
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def exact_knn(
    client: Any, store: RowStore, n_pieces: int, queries: np.ndarray, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, global rows) of ``queries`` over every stored piece.

    Scores follow the metric's convention: similarity for ip/cosine, squared distance for l2.
    """
    futures = [client.submit(_exact_piece, store, p, queries, k, metric, pure=False) for p in range(n_pieces)]
    scores, rows = merge_topk(client.gather(futures), k)
    return (-scores if metric == "l2" else scores), rows


def recall_at_k(
    found: np.ndarray | Sequence[Sequence[Any]], truth: np.ndarray | Sequence[Sequence[Any]], k: int
) -> float:
    """Mean share of each query's true ``k`` neighbours present among its first ``k`` found."""
    hits = [len(set(list(f)[:k]) & set(list(t)[:k])) / max(1, min(k, len(t))) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else float("nan")


TIE_EPS = 1e-5  # relative: exact scores of one pair computed two ways (GEMM, einsum) agree far closer


def tie_aware_recall(found_scores: Sequence[np.ndarray], truth_scores: np.ndarray, k: int, metric: str) -> float:
    """Mean of :func:`tie_aware_hits` (NaN without queries)."""
    hits = tie_aware_hits(found_scores, truth_scores, k, metric)
    return float(hits.mean()) if hits.size else float("nan")


def tie_aware_hits(found_scores: Sequence[np.ndarray], truth_scores: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Per query, recall@k as big-ann-benchmarks counts it: a found neighbour counts when its exact score is at
    least as good as the query's k-th true score (within a small epsilon), so rows that tie with
    the k-th neighbour (exact duplicates) are not misses.

    ``found_scores``: per query, the exact scores of the first ``k`` neighbours returned.
    ``truth_scores``: (queries, k) exact top-k scores, NaN-padded where fewer than k exist.
    """
    hits = []
    for got, truth in zip(found_scores, truth_scores):
        valid = truth[~np.isnan(truth)]
        if not valid.size:
            continue
        kth = float(valid[-1])
        eps = TIE_EPS * max(1.0, abs(kth))
        got = np.asarray(got, dtype=np.float64)[:k]
        good = got <= kth + eps if metric == "l2" else got >= kth - eps
        hits.append(min(int(good.sum()), valid.size) / valid.size)
    return np.asarray(hits, dtype=np.float64)


def pair_scores(queries: np.ndarray, vectors: np.ndarray, metric: str) -> np.ndarray:
    """Exact score of each query row with the vector on the same row (FAISS's conventions)."""
    if metric == "l2":
        diff = queries - vectors
        return np.einsum("ij,ij->i", diff, diff)
    return np.einsum("ij,ij->i", queries, vectors)


def recall_summary(found: Sequence[Sequence[Any]], truth: Sequence[Sequence[Any]], truth_scores: np.ndarray,
                   k: int) -> dict[str, Any]:
    """recall@1, @10 and @k, and how far inside the true top-k the misses were.

    A miss's *score gap* is the distance between its exact score and the exact k-th score: a small
    gap means a near-tie at the boundary (cheap to lose), a large one a true neighbour the index
    did not find.
    """
    out: dict[str, Any] = {"queries": len(truth), "k": k}
    for r in sorted({1, min(10, k), k}):
        out[f"recall@{r}"] = round(recall_at_k([list(f)[:r] for f in found], [list(t)[:r] for t in truth], r), 4)
    gaps = []
    for f, t, s in zip(found, truth, truth_scores):
        got = set(list(f)[:k])
        kth = s[len(t) - 1] if len(t) else np.nan
        gaps += [abs(float(s[j]) - float(kth)) for j, tid in enumerate(t) if tid not in got]
    g = np.asarray(gaps, dtype=np.float64)
    out["misses"] = int(g.size)
    if g.size:
        out["miss_score_gap"] = {"median": round(float(np.median(g)), 5), "p90": round(float(np.quantile(g, 0.9)), 5),
                                 "max": round(float(g.max()), 5)}
    return out
