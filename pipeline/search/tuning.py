"""Recall as a measured, controlled property: sweep search settings on a sample against exact truth.

A seeded sample of queries is split in two: a *tuning* half on which ``nprobe`` (and the re-rank
factor, when re-ranking is on) is swept, and a *held-out* half on which the chosen setting is
measured, so the reported recall is not the one the choice was fitted to. Exact neighbours come
from :func:`pipeline.search.exact.exact_knn` (piece by piece on the workers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from pipeline.backends.lists import coarse_centroids, is_ivf_flat
from pipeline.backends.worker import worker_device
from pipeline.errors import PipelineError
from pipeline.index.choice import has_exact_codes
from pipeline.index.fill import load_lists, row_lists
from pipeline.index.shape import index_shape
from pipeline.io.store import GatherRows, RowStore
from pipeline.kinds import Metric
from pipeline.results import TunePointRecord
from pipeline.runtime.progress import PieceProgress, watch
from pipeline.runtime.runner import result_of, submit, unwrap
from pipeline.search.exact import exact_knn, pair_scores
from pipeline.search.join import SearchPlan, search_batch, shared_index
from pipeline.search.probes import hits_at, list_ranks, neighbour_lists
from pipeline.search.recall import recall_at_k, tie_aware_hits

__all__ = [
    "TunePoint",
    "RecallSample",
    "draw_sample",
    "exact_truth",
    "joined",
    "sample_of",
    "searched_sample",
    "sweep",
    "walk",
    "search_sample",
    "choose",
    "probe_steps",
    "RERANK_FACTORS",
    "REFINE_STEPS",
    "BelowTarget",
    "query_cost",
    "query_groups",
    "CONFIDENCE",
]

log = logging.getLogger(__name__)


class BelowTarget(PipelineError):
    """The job finished, but its measured recall is below its target."""


@dataclass(frozen=True)
class TunePoint:
    nprobe: int | None
    rerank: int
    recall: float  # tie-aware recall@k on the queries it was measured on (what targets are checked against)
    strict: float  # recall@k counting only the exact ids of the true top k
    stderr: float  # standard error of ``recall`` over the sample's queries
    seconds: float  # search time for those queries on one worker (0 when computed)
    queries: int
    computed: bool = False  # read off the true neighbours' list ranks (IVF-Flat), not searched
    cost: float = 0.0  # modelled work per query (:func:`query_cost`): what settings are chosen by

    @property
    def bound(self) -> float:
        """The lower confidence bound of ``recall`` (:data:`CONFIDENCE`, cluster-robust)."""
        return self.recall - CONFIDENCE_Z * self.stderr

    def passes(self, target: float) -> bool:
        """Whether ``target`` is reached with confidence: two standard errors below the sample's
        recall, so the held-out half (and the whole join) lands above it too."""
        return self.bound >= target

    @property
    def qps(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else 0.0  # 0: not timed (computed)

    def record(self) -> TunePointRecord:
        return TunePointRecord(**asdict(self), qps=round(self.qps, 1), bound=round(self.bound, 4))


@dataclass(frozen=True)
class RecallSample:
    """Queries (vectors, ids, global rows in a self-join) and their exact neighbours' ids.

    ``deep_rows``/``deep_scores``: where drawn with a spare, the exact neighbours past ``k`` too
    (the truth an input update keeps, :mod:`pipeline.search.truth`), and ``known`` how many of
    each query's are exact (``inf``: every row is listed)."""

    vectors: np.ndarray
    ids: Any  # pyarrow Array
    rows: np.ndarray | None
    truth: list[list[Any]]  # exact neighbour ids per query, best first, own id excluded
    truth_scores: np.ndarray  # (queries, k) their exact scores (NaN-padded when fewer than k)
    truth_rows: np.ndarray | None = None  # (queries, k) the neighbours' global rows in the index (-1 padded)
    deep_rows: np.ndarray | None = None  # (queries, depth) as truth_rows, past k
    deep_scores: np.ndarray | None = None  # (queries, depth)
    known: np.ndarray | None = None  # (queries,) float: exact entries of deep_rows per query

    def split(self) -> tuple[RecallSample, RecallSample]:
        half = len(self.truth) // 2
        return self.take(slice(0, half)), self.take(slice(half, None))

    def take(self, sel: slice | np.ndarray) -> RecallSample:
        def part(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[sel]

        picked = np.arange(len(self.truth))[sel]
        return RecallSample(
            self.vectors[sel],
            self.ids.take(pa.array(picked, type=pa.int64())),
            part(self.rows),
            [self.truth[i] for i in picked.tolist()],
            self.truth_scores[sel],
            part(self.truth_rows),
            part(self.deep_rows),
            part(self.deep_scores),
            part(self.known),
        )

    def valid_groups(self) -> np.ndarray:
        """:func:`query_groups` of the queries with any true neighbour (those recall is averaged over)."""
        return query_groups(self.vectors)[(~np.isnan(self.truth_scores)).sum(axis=1) > 0]


def joined(samples: Sequence[RecallSample]) -> RecallSample:
    """The queries of ``samples`` one after another (each drawn alike: rows, deep truth or not)."""

    def stack(name: str) -> np.ndarray | None:
        parts = [getattr(s, name) for s in samples]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    vectors = stack("vectors")
    truth_scores = stack("truth_scores")
    assert vectors is not None and truth_scores is not None
    return RecallSample(
        vectors,
        pa.concat_arrays([s.ids for s in samples]),
        stack("rows"),
        [t for s in samples for t in s.truth],
        truth_scores,
        stack("truth_rows"),
        stack("deep_rows"),
        stack("deep_scores"),
        stack("known"),
    )


def exact_truth(
    client: Any,
    index_store: RowStore,
    vectors: np.ndarray,
    ids: Any,
    *,
    depth: int,
    metric: Metric,
    exclude_self: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, scores, known)``: each query's exact top-``depth`` global rows (-1 padded) and
    scores (the metric's convention, NaN padded) over ``index_store``'s live pieces, its own id
    excluded; ``known`` is ``depth``, or ``inf`` where fewer were found (every row is listed)."""
    n = len(vectors)
    extra = 1 if exclude_self else 0
    scores, nbr = exact_knn(
        client, index_store, len(index_store.starts), queries=vectors, k=depth + extra, metric=metric
    )
    found = nbr >= 0
    own = np.zeros(nbr.shape, dtype=bool)
    if exclude_self and found.any():
        _, listed = result_of(submit(client, GatherRows(store=index_store, rows=nbr[found], vectors=False), "recall"))
        ids_of = np.empty(nbr.shape, dtype=object)
        ids_of[found] = listed.to_pylist()
        own_ids = np.array(ids.to_pylist(), dtype=object)
        own[found] = ids_of[found] == np.broadcast_to(own_ids[:, None], nbr.shape)[found]
    keep = found & ~own
    order = np.argsort(~keep, axis=1, kind="stable")[:, :depth]  # kept entries first, in rank order
    rows = np.where(np.take_along_axis(keep, order, axis=1), np.take_along_axis(nbr, order, axis=1), -1)
    out_scores = np.where(rows >= 0, np.take_along_axis(scores, order, axis=1), np.nan).astype(np.float32)
    count = (rows >= 0).sum(axis=1)
    known = np.where(count >= depth, float(depth), np.inf) if n else np.zeros(0)
    return rows.astype(np.int64), out_scores, known


def sample_of(
    client: Any,
    index_store: RowStore,
    vectors: np.ndarray,
    ids: Any,
    rows: np.ndarray | None,
    *,
    deep_rows: np.ndarray,
    deep_scores: np.ndarray,
    known: np.ndarray,
    k: int,
) -> RecallSample:
    """A recall sample of queries whose exact neighbours (``deep_rows``, best first) are known:
    the first ``k`` are its truth, their ids read from ``index_store``."""
    top = deep_rows[:, :k]
    if top.shape[1] < k:
        top = np.hstack([top, np.full((len(top), k - top.shape[1]), -1, dtype=np.int64)])
    valid = top >= 0
    names: list[Any] = []
    if valid.any():
        _, listed = result_of(submit(client, GatherRows(store=index_store, rows=top[valid], vectors=False), "recall"))
        names = listed.to_pylist()
    counts = valid.sum(axis=1)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    truth = [names[bounds[i] : bounds[i + 1]] for i in range(len(top))]
    scores = np.full((len(top), k), np.nan, dtype=np.float32)
    width = min(k, deep_scores.shape[1])
    scores[:, :width] = deep_scores[:, :width]
    return RecallSample(vectors, ids, rows, truth, scores, top, deep_rows, deep_scores, known)


def draw_sample(
    client: Any,
    index_store: RowStore,
    query_store: RowStore,
    *,
    n: int,
    k: int,
    metric: Metric,
    exclude_self: bool,
    self_join: bool,
    seed: int,
    also: tuple[RowStore, int] | None = None,
    spare: int = 0,
) -> RecallSample:
    """``n`` seeded queries and their exact top-``k`` over the whole index (never loaded whole).

    ``also``: a view of ``query_store`` (some of its pieces) and how many more queries to draw
    from it, appended after the first ``n``: two samples for one exact pass over the index.
    ``spare``: exact neighbours past ``k`` kept too (``deep_rows``), for updates."""
    rng = np.random.default_rng(seed + 7919)
    rows = query_store.sample_rows(rng, n)
    rng.shuffle(rows)  # tuning / held-out halves drawn alike
    if also is not None:
        rows = np.concatenate([rows, also[0].sample_rows(rng, also[1])])
    return searched_sample(
        client,
        index_store,
        query_store,
        rows,
        k=k,
        depth=k + spare,
        metric=metric,
        exclude_self=exclude_self,
        self_join=self_join,
    )


def searched_sample(
    client: Any,
    index_store: RowStore,
    query_store: RowStore,
    rows: np.ndarray,
    *,
    k: int,
    depth: int,
    metric: Metric,
    exclude_self: bool,
    self_join: bool,
) -> RecallSample:
    """The queries at global ``rows`` of ``query_store``, their exact top-``depth`` searched over
    every row of ``index_store`` (:func:`exact_truth`), as a recall sample of ``k``."""
    vectors, ids = result_of(submit(client, GatherRows(store=query_store, rows=rows), "recall"))
    deep_rows, deep_scores, known = exact_truth(
        client, index_store, vectors, ids, depth=depth, metric=metric, exclude_self=exclude_self
    )
    return sample_of(
        client,
        index_store,
        vectors,
        ids,
        rows if self_join else None,
        deep_rows=deep_rows,
        deep_scores=deep_scores,
        known=known,
        k=k,
    )


RERANK_WEIGHT = 4.0  # a re-ranked candidate is a row gathered at random from the store: ~4x a streamed one


def query_cost(index: faiss.Index | None, *, ntotal: int, dim: int, k: int, nprobe: int | None, rerank: int) -> float:
    """Work per query of one search setting, in one-dimension multiply-adds (or code-byte lookups):
    a deterministic cost from the index's shape, so the same input and settings choose the same
    plan on any machine (never a timing).

    IVF: the coarse quantizer (``nlist x dim``, less through a two-level one), then ``nprobe``
    lists of ``ntotal / nlist`` entries, each costing its code's width (``dim`` for Flat and
    scalar codes, one lookup per byte for PQ); re-ranking gathers ``k x rerank`` rows of ``dim``
    floats at random. ``None`` (exact search over the row store): ``ntotal x dim``. Other
    indexes: the re-rank term alone (their own search cost does not change between the settings compared)."""
    gathered = RERANK_WEIGHT * k * rerank * dim if rerank else 0.0
    if index is None:
        return float(ntotal) * dim
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or not nprobe:
        return gathered
    entry = min(dim, int(ivf.code_size))
    return coarse_centroids(ivf) * dim + nprobe * (ntotal / max(1, ivf.nlist)) * entry + gathered


RERANK_FACTORS = (2, 4, 8, 16, 32)
START_FACTOR = 4  # the factor the nprobe climb uses: most settings chosen use 2 or 4
WIDE_FACTORS = (64, 128)  # tried only when the codes are too coarse for 32 (costly: k x 128 gathered rows)
CONFIDENCE_Z = 2.0  # a setting passes when its sample recall minus two standard errors reaches the target
CONFIDENCE = 0.977  # the one-sided confidence of that lower bound (normal approximation)


def probe_steps(nlist: int | None, max_nprobe: int = 2048) -> list[int | None]:
    """nprobe in powers of two up to ``nlist`` (and ``nlist`` itself); ``[None]`` without lists."""
    if not nlist:
        return [None]
    top = min(nlist, max_nprobe)
    probes: list[int | None] = [p for p in (2**i for i in range(12)) if p <= top]
    if probes[-1] != top:
        probes.append(top)
    return probes


def _search(
    plan: SearchPlan, index_store: RowStore, sample: RecallSample
) -> tuple[list[list[Any]], list[np.ndarray], float]:
    """The sample's neighbour ids under ``plan`` (one list per query), their exact scores, and the
    search time."""
    index = shared_index(plan)
    start = time.perf_counter()
    offsets, exact, nbr_rows = search_batch(
        index, plan, sample.vectors, q_rows=sample.rows, q_ids=sample.ids, index_store=index_store
    )
    seconds = time.perf_counter() - start
    flat = index_store.gather_ids(nbr_rows).to_pylist()
    if not (index is None or plan.rerank or has_exact_codes(index)):  # lossy codes: score what was found exactly
        line = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
        exact = pair_scores(sample.vectors[line], index_store.gather_vectors(nbr_rows), plan.metric)
    ids = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    scores = [exact[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return ids, scores, seconds


def _mean_and_stderr(hits: np.ndarray, groups: np.ndarray | None = None) -> tuple[float, float]:
    """Mean per-query recall and its standard error, cluster-robust over ``groups`` (queries with
    identical vectors, one group each): copies of one query find the same lists and move
    together, so on duplicate-heavy data a sample holds fewer independent queries than rows, and
    the plain standard error would understate the noise. Singleton groups give the plain one."""
    if not hits.size:
        return float("nan"), 0.0
    recall = float(hits.mean())
    if hits.size < 2:
        return recall, 0.0
    if groups is None:
        return recall, float(hits.std(ddof=1) / np.sqrt(hits.size))
    _, members = np.unique(groups, return_inverse=True)
    g = int(members.max()) + 1
    if g < 2:  # one distinct query: no spread can be estimated; the bound is as wide as recall allows
        return recall, 1.0
    deviation = np.bincount(members, weights=hits - recall, minlength=g)
    return recall, float(np.sqrt(g / (g - 1) * float((deviation**2).sum())) / hits.size)


def query_groups(vectors: np.ndarray) -> np.ndarray:
    """A label per query, equal for identical vectors (for :func:`_mean_and_stderr`)."""
    rows = np.ascontiguousarray(vectors)
    if rows.ndim != 2 or not len(rows):
        return np.zeros(len(rows), dtype=np.int64)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    return np.unique(keys, return_inverse=True)[1].astype(np.int64).ravel()


def _point(plan: SearchPlan, index_store: RowStore, sample: RecallSample, nprobe: int | None, rerank: int) -> TunePoint:
    found, scores, seconds = _search(replace(plan, nprobe=nprobe, rerank=rerank), index_store, sample)
    recall, stderr = _mean_and_stderr(
        tie_aware_hits(scores, sample.truth_scores, plan.k, plan.metric), sample.valid_groups()
    )
    cost = query_cost(
        shared_index(plan),
        ntotal=index_store.total_rows,
        dim=sample.vectors.shape[1],
        k=plan.k,
        nprobe=nprobe,
        rerank=rerank,
    )
    return TunePoint(
        nprobe, rerank, recall, recall_at_k(found, sample.truth, plan.k), stderr, seconds, len(sample.truth), cost=cost
    )


@dataclass(frozen=True, kw_only=True)
class SweepTask:
    """Recall and search time of each (nprobe, re-rank factor) setting on ``sample``."""

    plan: SearchPlan
    index_store: RowStore
    sample: RecallSample
    settings: tuple[tuple[int | None, int], ...]

    def run(self) -> list[TunePoint]:
        return [_point(self.plan, self.index_store, self.sample, nprobe, rerank) for nprobe, rerank in self.settings]


@dataclass(frozen=True, kw_only=True)
class SampleSearch:
    """The sample's neighbour ids under ``plan``, their exact scores and the search time."""

    plan: SearchPlan
    index_store: RowStore
    sample: RecallSample

    def run(self) -> tuple[list[list[Any]], list[np.ndarray], float]:
        return _search(self.plan, self.index_store, self.sample)


Measure = Callable[[int | None, int], TunePoint]  # (nprobe, re-rank factor) -> its measured point


def _walk(setting: Measure, *, probes: Sequence[int | None], factors: Sequence[int], target: float) -> list[TunePoint]:
    """The staircase walk over settings measured by ``setting``: nprobe upwards at a modest
    re-rank factor until the target is reached, refined by bisection towards the last failing
    nprobe (:func:`_refine`), then the factor downwards at that nprobe (and at the next step up,
    where a smaller factor may be cheaper); where no nprobe reaches it, larger factors at the
    plateau. About ``len(probes) + len(factors) + REFINE_STEPS`` searches, almost all of them
    gathering few candidates: the climb costs k x ``START_FACTOR`` exact scores a query, not k x 32.
    """
    factors = sorted(factors)
    start = next((i for i, f in enumerate(factors) if f >= START_FACTOR), 0)
    points: list[TunePoint] = []
    found: TunePoint | None = None
    progress = PieceProgress("tune", 0)

    def measure(nprobe: int | None, rerank: int) -> TunePoint:
        measured = setting(nprobe, rerank)
        points.append(measured)
        progress.note(
            f"{len(points)} settings tried; last nprobe={nprobe} rerank={rerank}: recall {measured.recall:.3f}"
        )
        return measured

    below: int | None = None  # the largest nprobe of the climb that fell short
    for nprobe in probes:
        point = measure(nprobe, factors[start])
        if point.passes(target):
            found = point
            break
        below = nprobe
    if found is not None and below is not None and found.nprobe is not None:
        found = _refine(measure, below, found, factor=factors[start], target=target)
    if found is not None:
        at = found.nprobe
        for f in reversed(factors[:start]):  # smaller factors at the passing nprobe
            point = measure(at, f)
            if not point.passes(target):
                more = [p for p in probes if p is not None and at is not None and p > at][:1]
                if more:  # twice the lists may pass with the smaller factor, and cost less
                    measure(more[0], f)
                break
        return points
    # no nprobe reached the target at the start factor: the codes rank true neighbours too low;
    # widen the re-rank where more lists stopped helping (the smallest nprobe within 0.002 of the best)
    top = max(p.recall for p in points)
    plateau = min((p.nprobe or 0 for p in points if p.recall >= top - 0.002), default=0) or None
    wider = list(factors[start + 1 :]) + (list(WIDE_FACTORS) if tuple(factors) == RERANK_FACTORS else [])
    for factor in wider:
        point = measure(plateau, factor)
        if point.passes(target):
            break
    return points


REFINE_STEPS = 3  # bisections between the climb's last failing and first passing nprobe


def _refine(
    measure: Callable[[int, int], TunePoint],
    below: int,
    found: TunePoint,
    *,
    factor: int,
    target: float,
    steps: int = REFINE_STEPS,
) -> TunePoint:
    """The smallest passing nprobe between ``below`` (fails) and ``found.nprobe`` (passes), by at
    most ``steps`` bisections: the powers-of-two climb overshoots by a third on average, and every
    probed list is scanned by every query of the join, so a finer nprobe is a proportionally
    cheaper join."""
    low, high = below, found
    for _ in range(steps):
        assert high.nprobe is not None
        mid = (low + high.nprobe) // 2
        if mid <= low:
            break
        point = measure(mid, factor)
        if point.passes(target):
            high = point
        else:
            low = mid
    return high


def _computed_walk(
    ivf: faiss.IndexIVF,
    sample: RecallSample,
    probes: Sequence[int],
    target: float,
    lists_of_rows: np.ndarray | None = None,
) -> list[TunePoint]:
    """The walk of :func:`_walk` for IVF-Flat, each setting's recall computed from the true
    neighbours' list ranks (:mod:`pipeline.search.probes`) rather than searched: powers of two
    until one passes, then bisection down to the smallest passing nprobe (not three steps: each
    point costs microseconds). The points carry no search time (``computed``)."""
    points: list[TunePoint] = []
    compute = _computed_points(ivf, sample, lists_of_rows)

    def measure(nprobe: int) -> TunePoint:
        points.append(compute(nprobe))
        return points[-1]

    low = 0  # the largest nprobe known to fall short
    for nprobe in probes:
        found = measure(nprobe)
        if found.passes(target):  # bisect all the way: enough steps to narrow the gap to one list
            steps = max(1, nprobe - low).bit_length()
            _refine(lambda p, _: measure(p), low, found, factor=0, target=target, steps=steps)
            break
        low = nprobe
    return points


def _computed_points(
    ivf: faiss.IndexIVF, sample: RecallSample, lists_of_rows: np.ndarray | None = None
) -> Callable[[int], TunePoint]:
    """A function of nprobe giving the recall an IVF-Flat search at that nprobe would have on
    ``sample``, computed from the true neighbours' list ranks: a true neighbour is found exactly
    when its list is among the nprobe probed (exact codes rank it above every other candidate).
    It reads the centroids and where each true neighbour was filled (``lists_of_rows``, else the
    lists' ids), never the stored vectors."""
    assert sample.truth_rows is not None
    ranks = list_ranks(ivf, sample.vectors, neighbour_lists(ivf, sample.truth_rows, lists_of_rows))
    n_valid = (~np.isnan(sample.truth_scores)).sum(axis=1)
    k = sample.truth_scores.shape[1]

    def point(nprobe: int) -> TunePoint:
        recall, stderr = _mean_and_stderr(hits_at(ranks, n_valid, nprobe), sample.valid_groups())
        cost = query_cost(ivf, ntotal=int(ivf.ntotal), dim=int(ivf.d), k=k, nprobe=nprobe, rerank=0)
        return TunePoint(nprobe, 0, recall, recall, stderr, 0.0, len(sample.truth), computed=True, cost=cost)

    return point


@dataclass(frozen=True, kw_only=True)
class ComputedSweep:
    """Each nprobe's recall on ``sample`` for an IVF-Flat index without re-ranking, computed from
    list ranks (see :func:`_computed_points`): what a held-out check needs without reading the
    index's vectors, so a worker smaller than the index can run it."""

    plan: SearchPlan
    sample: RecallSample
    nprobes: tuple[int, ...]

    def run(self) -> list[TunePoint]:
        index, lists_of_rows = _ranked_index(self.plan)
        with worker_device():  # the quantizer's search on the worker's threads
            point = _computed_points(faiss.extract_index_ivf(index), self.sample, lists_of_rows)
            return [point(n) for n in self.nprobes]


def _ranked_index(plan: SearchPlan) -> tuple[faiss.Index, np.ndarray | None]:
    """The plan's index for a recall computed from list ranks, with the fill's map from row to list
    where it wrote one: then without the lists' contents (:func:`pipeline.index.fill.load_lists`
    of no list: a machine staging per node fetches the quantizer and the map, not the list file);
    else whole, its lists' ids read to find the rows."""
    lists_of_rows = row_lists(plan.index_dir)
    index = load_lists(plan.index_dir, 0, 0) if lists_of_rows is not None else shared_index(plan)
    assert index is not None
    return index, lists_of_rows


@dataclass(frozen=True, kw_only=True)
class TuneTask:
    """The walk over ``probes`` and re-rank ``factors`` towards ``target`` on ``sample``: computed
    where the index is IVF-Flat and only nprobe is tuned, searched otherwise."""

    plan: SearchPlan
    index_store: RowStore
    sample: RecallSample
    probes: tuple[int | None, ...]
    factors: tuple[int, ...]
    target: float

    def run(self) -> list[TunePoint]:
        plan, sample, factors, target = self.plan, self.sample, self.factors, self.target
        steps = [p for p in self.probes if p is not None]
        if plan.strategy != "exact" and tuple(factors) == (0,) and len(steps) > 1 and sample.truth_rows is not None:
            index, lists_of_rows = _ranked_index(plan)
            if is_ivf_flat(index):
                with worker_device():  # the quantizer's search on the worker's threads
                    return _computed_walk(faiss.extract_index_ivf(index), sample, steps, target, lists_of_rows)

        def point(nprobe: int | None, rerank: int) -> TunePoint:
            return _point(plan, self.index_store, sample, nprobe, rerank)

        return _walk(point, probes=self.probes, factors=factors, target=target)


def walk(
    client: Any,
    plan: SearchPlan,
    index_store: RowStore,
    *,
    sample: RecallSample,
    nlist: int | None,
    factors: Sequence[int],
    target: float,
    nprobe: int | None = None,
) -> list[TunePoint]:
    """Every setting the staircase walk measured (or computed) on ``sample`` (on one worker), in order.

    ``nprobe`` given: only the re-rank factor is walked; ``factors`` of one value: only nprobe.
    """
    probes = [nprobe] if nprobe is not None else probe_steps(nlist)
    task = TuneTask(
        plan=plan,
        index_store=index_store,
        sample=sample,
        probes=tuple(probes),
        factors=tuple(factors),
        target=target,
    )
    future = submit(client, task, "tune")
    return list(unwrap(watch(client, future, "tune", f"sweeping nprobe on {len(sample.truth):,} sampled queries")))


def search_sample(
    client: Any, plan: SearchPlan, index_store: RowStore, sample: RecallSample
) -> tuple[list[list[Any]], list[np.ndarray]]:
    """Neighbour ids of the sample's queries under ``plan`` and their exact scores, searched on a worker."""
    ids, scores, _ = result_of(
        submit(client, SampleSearch(plan=plan, index_store=index_store, sample=sample), "recall")
    )
    return ids, scores


def sweep(
    client: Any,
    plan: SearchPlan,
    index_store: RowStore,
    sample: RecallSample,
    settings: Sequence[tuple[int | None, int]],
    *,
    computed: bool = False,
) -> list[TunePoint]:
    """Recall and search time of each setting on ``sample``, measured on one worker.

    ``computed``: where the plan is IVF-Flat without re-ranking, each recall is computed from list
    ranks instead of searched (the routed join's check: the worker never reads the index's vectors)."""
    flat = computed and plan.strategy == "index" and index_shape(client, plan.index_dir, "recall").ivf_flat
    exact_codes = flat and sample.truth_rows is not None
    if exact_codes and all(n is not None and r == 0 for n, r in settings):
        nprobes = tuple(int(n) for n, _ in settings if n is not None)
        return list(result_of(submit(client, ComputedSweep(plan=plan, sample=sample, nprobes=nprobes), "recall")))
    task = SweepTask(plan=plan, index_store=index_store, sample=sample, settings=tuple(settings))
    return list(result_of(submit(client, task, "recall")))


def choose(points: Sequence[TunePoint], target: float) -> TunePoint:
    """The cheapest setting (:func:`query_cost`) whose (tie-aware) recall reaches ``target``; else
    the one with the best recall, the cheaper among equals. Never by a timing: the same sample
    chooses the same setting on every run."""
    ok = [p for p in points if p.passes(target)]
    if not ok:
        return min(points, key=lambda p: (-p.recall, p.cost, p.nprobe or 0, p.rerank))
    return min(ok, key=lambda p: (p.cost, p.nprobe or 0, p.rerank))
