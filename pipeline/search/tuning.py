"""Recall as a measured, controlled property: sweep search settings on a sample against exact truth.

A seeded sample of queries is split in two: a *tuning* half on which ``nprobe`` (and the re-rank
factor, when re-ranking is on) is swept, and a *held-out* half on which the chosen setting is
measured, so the reported recall is not the one the choice was fitted to. Exact neighbours come
from :func:`pipeline.search.exact.exact_knn` (piece by piece on the workers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.io.store import RowStore
from pipeline.search.exact import exact_knn, recall_at_k
from pipeline.search.join import SearchPlan, search_batch, shared_index

__all__ = ["TunePoint", "RecallSample", "draw_sample", "sweep", "search_sample", "choose", "settings_grid",
           "TargetNotReached"]

log = logging.getLogger(__name__)


class TargetNotReached(PipelineError):
    """No setting in the sweep reaches the requested recall."""


@dataclass(frozen=True)
class TunePoint:
    nprobe: int | None
    rerank: int
    recall: float  # recall@k on the queries it was measured on
    seconds: float  # search time for those queries on one worker
    queries: int

    @property
    def qps(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "qps": round(self.qps, 1)}


@dataclass(frozen=True)
class RecallSample:
    """Queries (vectors, ids, global rows in a self-join) and their exact neighbours' ids."""

    vectors: np.ndarray
    ids: Any  # pyarrow Array
    rows: np.ndarray | None
    truth: list[list[Any]]  # exact neighbour ids per query, best first, own id excluded
    truth_scores: np.ndarray  # (queries, k) their exact scores (NaN-padded when fewer than k)

    def split(self) -> tuple[RecallSample, RecallSample]:
        half = len(self.truth) // 2
        return self.take(slice(0, half)), self.take(slice(half, None))

    def take(self, sel: slice) -> RecallSample:
        return RecallSample(self.vectors[sel], self.ids[sel], None if self.rows is None else self.rows[sel],
                            self.truth[sel], self.truth_scores[sel])


def draw_sample(
    client: Any, index_store: RowStore, query_store: RowStore, n: int, k: int, metric: str,
    exclude_self: bool, self_join: bool, seed: int,
) -> RecallSample:
    """``n`` seeded queries and their exact top-``k`` over the whole index (never loaded whole)."""
    rng = np.random.default_rng(seed + 7919)
    n = min(n, query_store.total_rows)
    rows = np.sort(rng.choice(query_store.total_rows, size=n, replace=False)).astype(np.int64)
    rng.shuffle(rows)  # tuning / held-out halves drawn alike
    vectors = np.ascontiguousarray(query_store.gather_vectors(rows))
    ids = query_store.gather_ids(rows)
    extra = 1 if exclude_self else 0
    scores, nbr = exact_knn(client, index_store, len(index_store.starts), vectors, k + extra, metric)
    nbr_ids = index_store.gather_ids(nbr.ravel()).to_pylist()
    own = ids.to_pylist()
    truth, truth_scores = [], np.full((n, k), np.nan, dtype=np.float32)
    for i in range(n):
        row_ids = nbr_ids[i * (k + extra) : (i + 1) * (k + extra)]
        keep = [j for j, v in enumerate(row_ids) if not (exclude_self and v == own[i])][:k]
        truth.append([row_ids[j] for j in keep])
        truth_scores[i, : len(keep)] = scores[i, keep]
    return RecallSample(vectors, ids, rows if self_join else None, truth, truth_scores)


def settings_grid(nlist: int | None, rerank_on: bool, max_nprobe: int = 2048) -> list[tuple[int | None, int]]:
    """nprobe in powers of two up to ``nlist``; re-rank factors 2..16 when re-ranking is on."""
    probes: list[int | None] = [None]
    if nlist:
        probes = [p for p in (2**i for i in range(12)) if p <= min(nlist, max_nprobe)]
        if probes[-1] != min(nlist, max_nprobe):
            probes.append(min(nlist, max_nprobe))
    factors = [2, 4, 8, 16] if rerank_on else [0]
    return [(p, f) for p in probes for f in factors]


def _search(plan: SearchPlan, index_store: RowStore, sample: RecallSample) -> tuple[list[list[Any]], float]:
    """The sample's neighbour ids under ``plan`` (one list per query) and the search time."""
    index = shared_index(plan)
    start = time.perf_counter()
    offsets, _, nbr_rows = search_batch(index, plan, sample.vectors, sample.rows, sample.ids, index_store)
    seconds = time.perf_counter() - start
    flat = index_store.gather_ids(nbr_rows).to_pylist()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)], seconds


def _measure(plan: SearchPlan, index_store: RowStore, sample: RecallSample,
             settings: Sequence[tuple[int | None, int]]) -> list[TunePoint]:
    points = []
    for nprobe, rerank in settings:
        found, seconds = _search(replace(plan, nprobe=nprobe, rerank=rerank), index_store, sample)
        points.append(TunePoint(nprobe, rerank, recall_at_k(found, sample.truth, plan.k), seconds, len(sample.truth)))
    return points


def search_sample(client: Any, plan: SearchPlan, index_store: RowStore, sample: RecallSample) -> list[list[Any]]:
    """Neighbour ids of the sample's queries under ``plan``, searched on a worker."""
    return client.submit(_search, plan, index_store, sample, pure=False).result()[0]


def sweep(client: Any, plan: SearchPlan, index_store: RowStore, sample: RecallSample,
          settings: Sequence[tuple[int | None, int]]) -> list[TunePoint]:
    """Recall and search time of each setting on ``sample``, measured on one worker."""
    return list(client.submit(_measure, plan, index_store, sample, list(settings), pure=False).result())


def choose(points: Sequence[TunePoint], target: float, key: str) -> TunePoint:
    """The fastest setting whose recall reaches ``target``; else a clear error saying what is reachable."""
    ok = [p for p in points if p.recall >= target]
    if ok:
        return min(ok, key=lambda p: (p.seconds, p.nprobe or 0, p.rerank))
    best = max(points, key=lambda p: p.recall)
    probes = [p.nprobe for p in points if p.nprobe is not None]
    swept = f"nprobe swept up to {max(probes)}; " if probes else ""
    rerank = "re-ranking (--rerank 8)" if best.rerank == 0 else "a larger --rerank"
    raise TargetNotReached(
        f"--target-recall {target}: the best setting swept (nprobe={best.nprobe}, rerank={best.rerank}) reaches "
        f"recall@k {best.recall:.3f} with {key!r} ({swept}more probes cannot help); to go higher try a larger "
        f"code (more PQ bytes, or SQ8), {rerank}, or a flat index (IVF...,Flat or Flat) for exact search"
    )
