"""Recall: how much of the exact answer a search returned, one home for the arithmetic.

Two counts: *strict* (the ids of the true top k) and *tie-aware*, as big-ann-benchmarks counts it:
a returned neighbour counts when its exact score is at least as good as the k-th true score,
within a small relative epsilon, so exact duplicates that tie with the k-th neighbour are not
misses. Targets are checked against the tie-aware count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.kinds import Metric
from pipeline.results import RecallSummary

__all__ = ["TIE_EPS", "recall_at_k", "tie_aware_hits", "tie_aware_recall", "recall_summary"]


def recall_at_k(
    found: np.ndarray | Sequence[Sequence[Any]], truth: np.ndarray | Sequence[Sequence[Any]], k: int
) -> float:
    """Mean share of each query's true ``k`` neighbours present among its first ``k`` found."""
    hits = [len(set(list(f)[:k]) & set(list(t)[:k])) / max(1, min(k, len(t))) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else float("nan")


TIE_EPS = 1e-5  # relative: exact scores of one pair computed two ways (GEMM, einsum) agree far closer


def tie_aware_recall(found_scores: Sequence[np.ndarray], truth_scores: np.ndarray, k: int, metric: Metric) -> float:
    """Mean of :func:`tie_aware_hits` (NaN without queries)."""
    hits = tie_aware_hits(found_scores, truth_scores, k, metric)
    return float(hits.mean()) if hits.size else float("nan")


def tie_aware_hits(found_scores: Sequence[np.ndarray], truth_scores: np.ndarray, k: int, metric: Metric) -> np.ndarray:
    """Per query, recall@k as big-ann-benchmarks counts it: a found neighbour counts when its exact score is at
    least as good as the query's k-th true score (within a small epsilon), so rows that tie with
    the k-th neighbour (exact duplicates) are not misses.

    ``found_scores``: per query, the exact scores of the first ``k`` neighbours returned.
    ``truth_scores``: (queries, k) exact top-k scores, NaN-padded where fewer than k exist.
    """
    truth = np.asarray(truth_scores, dtype=np.float64).reshape(len(truth_scores), -1)
    n_valid = (~np.isnan(truth)).sum(axis=1)
    got = np.full((len(truth), k), np.nan)
    for i, scores in enumerate(found_scores):  # ragged lists into one padded matrix (NaN: nothing found)
        row = np.asarray(scores, dtype=np.float64)[:k]
        got[i, : row.size] = row
    has = n_valid > 0
    kth = np.where(has, truth[np.arange(len(truth)), np.maximum(n_valid - 1, 0)], 0.0)
    eps = TIE_EPS * np.maximum(1.0, np.abs(kth))
    good = got <= (kth + eps)[:, None] if metric == "l2" else got >= (kth - eps)[:, None]  # NaN compares False
    return (np.minimum(good.sum(axis=1), n_valid) / np.maximum(n_valid, 1))[has]


def recall_summary(
    found: Sequence[Sequence[Any]],
    truth: Sequence[Sequence[Any]],
    truth_scores: np.ndarray,
    *,
    k: int,
    found_scores: Sequence[np.ndarray] | None = None,
    metric: Metric = "cosine",
) -> RecallSummary:
    """recall@1, @10 and @k (strict), tie-aware recall@k when the found neighbours' exact scores are
    known, and how far inside the true top-k the misses were.

    A miss's *score gap* is the distance between its exact score and the exact k-th score: a small
    gap means a near-tie at the boundary (cheap to lose), a large one a true neighbour the index
    did not find.
    """
    strict = {
        r: round(recall_at_k([list(f)[:r] for f in found], [list(t)[:r] for t in truth], r), 4)
        for r in sorted({1, min(10, k), k})
    }
    tie = round(tie_aware_recall(found_scores, truth_scores, k, metric), 4) if found_scores is not None else None
    gaps = []
    for f, t, s in zip(found, truth, truth_scores):
        got = set(list(f)[:k])
        kth = s[len(t) - 1] if len(t) else np.nan
        gaps += [abs(float(s[j]) - float(kth)) for j, tid in enumerate(t) if tid not in got]
    g = np.asarray(gaps, dtype=np.float64)
    gap = (
        {
            "median": round(float(np.median(g)), 5),
            "p90": round(float(np.quantile(g, 0.9)), 5),
            "max": round(float(g.max()), 5),
        }
        if g.size
        else None
    )
    return RecallSummary(len(truth), k, strict, tie, int(g.size), gap)
