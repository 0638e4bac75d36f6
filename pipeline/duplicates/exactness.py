"""Dedup pair recall: the share of the exact above-threshold pairs of sampled rows that the dedup found."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.backends.kernels import FAISS_METRICS
from pipeline.backends.worker import worker_device
from pipeline.duplicates.plan import DedupPlan
from pipeline.io.store import GatherRows, RowStore
from pipeline.kinds import Metric
from pipeline.results import PairRecall
from pipeline.runtime.runner import gather, result_of, submit
from pipeline.shuffle.edges import passes, read_edges

__all__ = ["pair_recall", "exact_pairs", "sampled_exact_pairs"]


def exact_pairs(queries: np.ndarray, vectors: np.ndarray, threshold: float, metric: Metric) -> tuple[np.ndarray, ...]:
    """Every (query, vector) pair whose exact score passes ``threshold`` (``>=``; ``<=`` for l2),
    with FAISS's range search (BLAS-blocked). Returns query positions, vector positions, scores."""
    index = faiss.IndexFlat(vectors.shape[1], FAISS_METRICS[metric])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    # FAISS's range is strict (> for similarities, < for distances): widen it by one float step
    radius = float(np.nextafter(np.float32(threshold), np.float32(np.inf if metric == "l2" else -np.inf)))
    lims, scores, cols = index.range_search(np.ascontiguousarray(queries, dtype=np.float32), radius)
    rows = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
    keep = passes(scores, threshold, metric)
    return rows[keep], cols[keep], scores[keep]


@dataclass(frozen=True, kw_only=True)
class ExactPairsTask:
    """The (query row, stored row) pairs of one stored piece whose exact score with the queries
    ``q`` (rows ``q_rows``) passes the threshold, a row never paired with itself."""

    store: RowStore
    piece: int
    q_rows: np.ndarray
    q: np.ndarray
    threshold: float
    metric: Metric

    def run(self) -> tuple[np.ndarray, np.ndarray]:
        store, piece, q_rows, q, threshold, metric = (
            self.store,
            self.piece,
            self.q_rows,
            self.q,
            self.threshold,
            self.metric,
        )
        with worker_device():
            i, j, _ = exact_pairs(q, store.vectors(piece), threshold, metric)
        j = j + int(store.starts[piece])
        keep = j != q_rows[i]
        return q_rows[i[keep]], j[keep]


def sampled_exact_pairs(client: Any, plan: DedupPlan, store: RowStore, rows: np.ndarray) -> set[tuple[int, int]]:
    """Every (sampled row, other row) pair whose exact score passes the threshold, by range search
    over every stored piece on the workers."""
    q, _ = result_of(submit(client, GatherRows(store=store, rows=rows), "pair_recall"))
    parts = gather(
        client,
        [
            submit(
                client,
                ExactPairsTask(store=store, piece=p, q_rows=rows, q=q, threshold=plan.threshold, metric=plan.metric),
                "pair_recall",
            )
            for p in store.live
        ],
    )
    return {(int(a), int(b)) for qa, xb in parts for a, b in zip(qa, xb)}


@dataclass(frozen=True, kw_only=True)
class FoundPairs:
    """The sampled rows' pairs in the symmetric adjacency, and how many of them fail the threshold
    by their exact scores (read and scored on a worker: the driver holds no rows)."""

    plan: DedupPlan
    store: RowStore
    adj_dir: str
    adj_starts: np.ndarray
    rows: np.ndarray

    def run(self) -> tuple[set[tuple[int, int]], int]:
        found: set[tuple[int, int]] = set()
        part_of = np.searchsorted(self.adj_starts, self.rows, side="right") - 1
        for p in np.unique(part_of):
            src, dst, _ = read_edges(Path(self.adj_dir) / f"part-{int(p):05d}.parquet")
            sel = np.isin(src, self.rows)
            found |= {(int(a), int(b)) for a, b in zip(src[sel], dst[sel])}
        if not found:
            return found, 0
        fa = np.array([a for a, _ in found])
        fb = np.array([b for _, b in found])
        xa, xb = self.store.gather_vectors(fa), self.store.gather_vectors(fb)
        with worker_device() as be:
            sc = be.exact_scores(xa, xb[:, None, :], self.plan.metric)[:, 0]
        return found, int((~passes(sc, self.plan.threshold, self.plan.metric)).sum())


def pair_recall(
    client: Any, plan: DedupPlan, *, store: RowStore, output: Path, queries: int, seed: int, adj_starts: np.ndarray
) -> PairRecall:
    """Share of the exact above-threshold pairs of sampled rows that the dedup found.

    Exact pairs come from range search over every stored piece (on the workers); found pairs are
    the sampled rows' entries in the symmetric adjacency. Found pairs whose exact score fails the
    threshold are counted too (none, when re-ranking made the scores exact).
    """
    rng = np.random.default_rng(seed)
    rows = store.sample_rows(rng, queries)
    exact = sampled_exact_pairs(client, plan, store, rows)
    task = FoundPairs(plan=plan, store=store, adj_dir=str(output / "_dedup" / "adj"), adj_starts=adj_starts, rows=rows)
    found, wrong = result_of(submit(client, task, "pair_recall"))
    hit = len(exact & found)
    return PairRecall(int(rows.size), len(exact), len(found), round(hit / len(exact), 4) if exact else None, wrong)
