"""The k-NN join: query pieces searched on the workers, one neighbour table per piece.

Each task takes its index from a per-process cache (loaded once per worker, not per task),
searches its queries in batches sized from a memory budget, optionally re-ranks ``k * rerank``
candidates exactly against the stored vectors, drops the query's own id (not position 0), maps
global rows back to input ids and writes ``part-NNNNN.parquet`` atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.backends import Backend
from pipeline.backends.lists import coarse_assign, is_ivf_flat, list_bytes_read, list_major_rows
from pipeline.backends.worker import worker_device
from pipeline.index.fill import load_index
from pipeline.index.ordered import has_ordered
from pipeline.index.shape import index_shape
from pipeline.io import nodes
from pipeline.io.atomic import atomic_path
from pipeline.io.owned import discard
from pipeline.io.parquet import Piece, PieceRun, piece_runs
from pipeline.io.store import RowStore
from pipeline.kinds import Metric, Strategy
from pipeline.results import ListReads, to_dict
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.progress import PieceProgress
from pipeline.runtime.runner import run_tasks, say_resuming, worker_name
from pipeline.search.pairs import PAIRS_DIR, PairLayout, drop_pairs, exact_pairs, piece_lists, plan_groups
from pipeline.search.routed import (
    ROUTED_DIR,
    RoutedLayout,
    merge_run_rows,
    plan_list_groups,
    route_and_score,
    routed_lists,
    spread,
)
from pipeline.shuffle.edges import write_knn

__all__ = [
    "SearchPlan",
    "join_pieces",
    "search_batch",
    "candidates_per_query",
    "knn_path",
    "to_padded",
    "BATCH_BYTES",
    "listed_table",
    "shared_index",
    "search_params",
]

log = logging.getLogger(__name__)

BATCH_BYTES = 256 << 20  # working memory for one search batch (candidates, gathered vectors)
ROW_GROUP_ROWS = 65_536  # result rows buffered per Parquet row group
# neighbour tables hold ids and scores that hardly repeat: a dictionary per column is tried, outgrows
# its page and is dropped, so writing without one is 2.4x faster and 17% smaller (50,000 x 10 lists)
TABLE_OPTIONS: dict[str, Any] = {"use_dictionary": False}
EXACT_QUERY_ROWS = 4096  # queries per block under the exact plan (FAISS's own BLAS query block)


@dataclass(frozen=True)
class SearchPlan:
    """Resolved search settings (no ``auto`` left) and where the index lives."""

    index_dir: str
    metric: Metric
    k: int
    nprobe: int | None
    rerank: int
    exclude_self: bool
    self_join: bool  # queries are the indexed rows: exclude by row, not by id
    knn_dir: str | None = None  # also write each piece's lists as global rows here (dedup, graph)
    strategy: Strategy = "index"  # index: search the FAISS index; exact: GEMM over the row store, piece by piece
    spare: int = 0  # candidates kept past k in the lists of ``knn_dir`` (see :mod:`pipeline.search.update`)


def candidates_per_query(plan: SearchPlan, ntotal: int) -> int:
    """How many results to ask the index for, before re-ranking and self-exclusion (the spare
    candidates come out of the re-ranking pool where it is deep enough)."""
    want = max(plan.k * max(plan.rerank, 1), plan.k + plan.spare) + (1 if plan.exclude_self else 0)
    return min(want, ntotal)


def kept_per_query(plan: SearchPlan, ntotal: int) -> int:
    """How many exactly scored candidates a query's lists need: ``k`` and the spare, and one more
    where the query's own row is dropped."""
    return min(plan.k + plan.spare + (1 if plan.exclude_self else 0), ntotal)


def shared_index(plan: SearchPlan) -> faiss.Index | None:
    """The plan's index, loaded once per process and shared by its tasks: never modified (the
    search settings travel with each call, see :func:`search_params`). None for the exact plan,
    which searches the row store itself."""
    return None if plan.strategy == "exact" else load_index(plan.index_dir)


def search_params(index: faiss.Index, nprobe: int | None) -> faiss.SearchParameters | None:
    """Per-call search settings for ``index``: ``nprobe`` for its IVF layer (through a refine
    wrapper too), so concurrent searches with other settings never race on a shared index."""
    if nprobe is None or faiss.try_extract_index_ivf(index) is None:
        return None
    ivf = faiss.SearchParametersIVF()
    ivf.nprobe = int(nprobe)
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexRefine):
        refine = faiss.IndexRefineSearchParameters()
        refine.k_factor = float(outer.k_factor)
        refine.base_index_params = ivf
        cast(Any, refine).keep = ivf  # FAISS holds a raw pointer: the base parameters must live as long
        return refine
    return ivf


KEPT_PROBES_MAX = 64  # probes a query keeps with its lists at most (256 bytes, about a k=10 list's own size)


def kept_probes(plan: SearchPlan, index: faiss.Index | None, backend: str) -> faiss.IndexIVFFlat | None:
    """The IVF-Flat index whose queries' lists a self-join assigns itself and keeps with its lists
    (``knn/``), for an input update's patch to score each query against the new rows of the
    lists it probes without assigning it again: a CPU list-major join assigns them anyway. None
    where the lists are not kept or the search is another kind."""
    if not (plan.knn_dir and plan.self_join and plan.strategy == "index" and plan.nprobe and not plan.rerank):
        return None
    if plan.nprobe > KEPT_PROBES_MAX:  # 4 bytes a probe: past this the lists' file would mostly hold probes
        return None
    if backend != "cpu" or index is None or not is_ivf_flat(index):
        return None
    return cast(faiss.IndexIVFFlat, faiss.downcast_index(index))


def search_batch(
    index: faiss.Index | None,
    plan: SearchPlan,
    q: np.ndarray,
    *,
    q_rows: np.ndarray | None,
    q_ids: pa.Array,
    index_store: RowStore,
    found: tuple[np.ndarray, np.ndarray] | None = None,
    assign: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search one batch; return (row offsets, scores, neighbour global rows) in list layout.

    ``q_rows`` are the queries' global rows when the queries are the indexed rows (self-join);
    otherwise self-exclusion compares ids. ``found``: the batch's exact lists, computed already
    (the exact self-join by pairs, :mod:`pipeline.search.pairs`): only the rest is done here.
    ``assign``: the queries' lists, assigned already (:func:`kept_probes`).
    """
    with worker_device() as be:  # the worker's device, one batch at a time
        return _search_batch(
            be, index, plan, q, q_rows=q_rows, q_ids=q_ids, index_store=index_store, found=found, assign=assign
        )


def _search_batch(
    be: Backend,
    index: faiss.Index | None,
    plan: SearchPlan,
    q: np.ndarray,
    *,
    q_rows: np.ndarray | None,
    q_ids: pa.Array,
    index_store: RowStore,
    found: tuple[np.ndarray, np.ndarray] | None = None,
    assign: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    width = candidates_per_query(plan, index_store.rows if index is None else int(index.ntotal))
    if found is not None:
        scores, rows = found
    elif index is None:  # the exact plan: scores are exact already
        scores, rows = be.exact_search(q, index_store, width, plan.metric)
    else:
        scores, rows = be.search(index, q, width, search_params(index, plan.nprobe), assign=assign)
    higher_better = plan.metric != "l2"
    valid = rows >= 0
    if plan.rerank and index is not None and found is None:  # found lists are exact already
        exact = be.rerank(q, rows, index_store, plan.metric)  # the device's own way: host gathers or resident rows
        order = np.argsort(-exact if higher_better else exact, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        scores = np.take_along_axis(exact, order, axis=1)
        valid = rows >= 0
    if plan.exclude_self:
        if plan.self_join:
            assert q_rows is not None
            valid &= rows != q_rows[:, None]
        else:
            cand_ids = index_store.gather_ids(np.where(valid, rows, 0))
            own = q_ids.take(pa.array(np.repeat(np.arange(len(q_ids)), rows.shape[1])))
            valid &= ~pc.equal(cand_ids, own).to_numpy(zero_copy_only=False).reshape(rows.shape)
    # keep the first k (and the spare) valid entries of each row, in order (row-major selection
    # keeps each row's order: no sort)
    kept = valid & (np.cumsum(valid, axis=1, dtype=np.int32) <= plan.k + plan.spare)
    offsets = np.zeros(len(q) + 1, dtype=np.int32)
    np.cumsum(kept.sum(axis=1), out=offsets[1:])
    return offsets, scores[kept].astype(np.float32), rows[kept]


@dataclass(frozen=True)
class Joined:
    """One joined piece: queries that got fewer than k neighbours, the bytes of inverted lists its
    searches walked, and the worker that ran it."""

    short: int
    list_bytes: int = 0
    worker: str = ""


class ReadTally:
    """Bytes of inverted lists read, by phase and by worker, as tasks finish."""

    def __init__(self) -> None:
        self.by_phase: dict[str, int] = {}
        self.by_worker: dict[str, int] = {}

    def add(self, phase: str, worker: str, nbytes: int) -> None:
        self.by_phase[phase] = self.by_phase.get(phase, 0) + int(nbytes)
        self.by_worker[worker or "?"] = self.by_worker.get(worker or "?", 0) + int(nbytes)

    def done(self) -> ListReads:
        return ListReads(by_phase=dict(self.by_phase), by_worker=dict(self.by_worker))


@dataclass(frozen=True, kw_only=True)
class JoinTask:
    """Search a run of query pieces (one, or consecutive ones too small alone for the batch the
    plan wants) in batches that fit ``budget_rows`` (and the worker's backend), and write each
    piece's neighbour table to its ``outs`` entry (and, with ``plan.knn_dir``, its lists as global
    rows). With ``pairs``, the single piece's lists come from the join by pairs; with ``routed``,
    the run's lists come from the routed join, merged for the whole run at once (nothing is
    searched, so no query vector is read). Returns how many queries got fewer than ``k``
    neighbours."""

    plan: SearchPlan
    index_store: RowStore
    query_store: RowStore
    pieces: tuple[Piece, ...]
    outs: tuple[str, ...]
    budget_rows: int
    pairs: PairLayout | None = None
    routed: RoutedLayout | None = None  # the piece's lists come from the routed join (exact scores)

    def run(self) -> Joined:
        read_before = list_bytes_read()
        plan, index_store, budget_rows = self.plan, self.index_store, self.budget_rows
        assert len(self.pieces) == len(self.outs) and (len(self.pieces) == 1 or self.pairs is None)
        with worker_device() as be:
            # the exact plan scores whole query blocks against each stored piece: larger blocks keep
            # the GEMM tiles full and read the store fewer times
            rows = be.search_rows if plan.strategy == "index" else max(be.search_rows, EXACT_QUERY_ROWS)
            backend = be.name
        index = shared_index(plan)
        probed = kept_probes(plan, index, backend) if self.pairs is None and self.routed is None else None
        if index is not None and is_ivf_flat(index):  # list-major search: the more queries per list, the better
            rows = max(rows, list_major_rows(faiss.extract_index_ivf(index).nlist, plan.nprobe))
        batch_rows = max(1, min(rows, budget_rows))
        lists = None
        if self.pairs is not None:
            lists = piece_lists(self.pairs, self.pieces[0], candidates_per_query(plan, index_store.rows), plan.metric)
        elif self.routed is not None:
            lists = routed_lists(self.routed, self.pieces)
            batch_rows = max(1, min(budget_rows, be.search_rows))  # nothing left to search: writing batches
        log.debug(
            "join pieces %s: %d queries in batches of %d (%s)",
            [p.index for p in self.pieces],
            sum(p.rows for p in self.pieces),
            batch_rows,
            plan.strategy,
        )
        # plain reads, nothing mapped; lists found already need no query vector
        vectors = {p.index: self.query_store.vectors(p.index) for p in self.pieces} if lists is None else {}
        base = dict(zip((p.index for p in self.pieces), np.cumsum([0] + [p.rows for p in self.pieces]).tolist()))
        progress = PieceProgress("join", self.pieces[0].index)  # the run's rows, as run_tasks counts them
        with ExitStack() as stack:
            sinks = [
                _TableSink(plan, index_store, p, stack.enter_context(atomic_path(out)))
                for p, out in zip(self.pieces, self.outs, strict=True)
            ]
            at = {p.index: i for i, p in enumerate(self.pieces)}
            for batch in _batches(self.pieces, batch_rows):
                q = (
                    np.concatenate([vectors[p.index][lo:hi] for p, lo, hi in batch])
                    if lists is None
                    else np.zeros((sum(hi - lo for _, lo, hi in batch), 0), np.float32)
                )
                q_ids = pa.concat_arrays([self.query_store.ids(p.index).slice(lo, hi - lo) for p, lo, hi in batch])
                q_rows = (
                    np.concatenate([np.arange(p.start + lo, p.start + hi, dtype=np.int64) for p, lo, hi in batch])
                    if plan.self_join
                    else None
                )
                lo = base[batch[0][0].index] + batch[0][1]  # the batch's rows of the run (consecutive)
                found = None if lists is None else (lists[0][lo : lo + len(q)], lists[1][lo : lo + len(q)])
                q = np.ascontiguousarray(q)
                assign = None
                if probed is not None:  # assigned here, kept with the lists (the search takes them)
                    with worker_device():
                        assign = coarse_assign(probed.quantizer, q, min(int(plan.nprobe or 1), int(probed.nlist)))
                offsets, scores, nbr_rows = search_batch(
                    index, plan, q, q_rows=q_rows, q_ids=q_ids, index_store=index_store, found=found, assign=assign
                )
                first = 0
                for p, lo, hi in batch:  # each piece's share of the batch, in list layout
                    a, b = int(offsets[first]), int(offsets[first + hi - lo])
                    share = offsets[first : first + hi - lo + 1] - a
                    ids = q_ids.slice(first, hi - lo)
                    probes = None if assign is None else assign[first : first + hi - lo]
                    sinks[at[p.index]].add(
                        lo, hi, offsets=share, scores=scores[a:b], nbr_rows=nbr_rows[a:b], q_ids=ids, probes=probes
                    )
                    first += hi - lo
                progress.advance(first)
            for sink in sinks:
                sink.close()
        for sink in sinks:
            sink.finish()
        short = sum(sink.short for sink in sinks)
        return Joined(short=short, list_bytes=list_bytes_read() - read_before, worker=worker_name())


def listed_table(q_ids: pa.Array, offsets: np.ndarray, nbr_ids: pa.Array, scores: np.ndarray) -> pa.Table:
    """A neighbour table (``query_id``, ``neighbor_id``, ``score``) from lists in list layout."""
    return pa.table(
        {
            "query_id": q_ids,
            "neighbor_id": pa.ListArray.from_arrays(pa.array(offsets), nbr_ids),
            "score": pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores, type=pa.float32())),
        }
    )


def _batches(pieces: Sequence[Piece], batch_rows: int) -> list[list[tuple[Piece, int, int]]]:
    """Consecutive batches of at most ``batch_rows`` queries over a run of pieces, each a list of
    ``(piece, lo, hi)``: rows ``[lo, hi)`` of a piece, in piece and row order."""
    batches: list[list[tuple[Piece, int, int]]] = [[]]
    room = batch_rows
    for p in pieces:
        lo = 0
        while lo < p.rows:
            if room == 0:
                batches.append([])
                room = batch_rows
            hi = min(p.rows, lo + room)
            batches[-1].append((p, lo, hi))
            room -= hi - lo
            lo = hi
    return [b for b in batches if b]


class _TableSink:
    """One piece's outputs as its batches arrive: its neighbour table, written to ``tmp`` (an
    :func:`atomic_path`) in row groups of ``ROW_GROUP_ROWS``, and with ``plan.knn_dir`` its lists as
    global rows, spare included (:meth:`finish` writes them once the table is in place)."""

    def __init__(self, plan: SearchPlan, index_store: RowStore, piece: Piece, tmp: Path) -> None:
        self.plan, self.index_store, self.piece, self.tmp = plan, index_store, piece, tmp
        self.short = 0
        self.writer: pq.ParquetWriter | None = None
        self.buffered: list[pa.Table] = []
        width = plan.k + plan.spare
        self.knn_rows = np.full((piece.rows, width), -1, dtype=np.int64) if plan.knn_dir else None
        self.knn_scores = np.full((piece.rows, width), np.nan, dtype=np.float32) if plan.knn_dir else None
        self.knn_probes: np.ndarray | None = None  # the queries' lists, where the join assigned them itself
        self.probed = 0

    def add(
        self,
        lo: int,
        hi: int,
        *,
        offsets: np.ndarray,
        scores: np.ndarray,
        nbr_rows: np.ndarray,
        q_ids: pa.Array,
        probes: np.ndarray | None = None,
    ) -> None:
        """Rows ``[lo, hi)`` of the piece, their lists in list layout (``offsets`` from 0), and
        where given the lists each query probed."""
        plan = self.plan
        if self.knn_rows is not None and self.knn_scores is not None:
            to_padded(self.knn_rows, self.knn_scores, lo, offsets=offsets, rows=nbr_rows, scores=scores)
            if probes is not None:
                if self.knn_probes is None:
                    self.knn_probes = np.full((self.piece.rows, probes.shape[1]), -1, dtype=np.int32)
                self.knn_probes[lo:hi] = probes
                self.probed += hi - lo
        if plan.spare:  # the table lists the first k; the spare are kept in knn/ only
            offsets, scores, nbr_rows = first_k(offsets, scores, nbr_rows, plan.k)
        self.short += int((np.diff(offsets) < plan.k).sum())
        table = listed_table(q_ids, offsets, self.index_store.gather_ids(nbr_rows), scores)
        if self.writer is None:
            self.writer = pq.ParquetWriter(str(self.tmp), table.schema, **TABLE_OPTIONS)
        self.buffered.append(table)
        if sum(len(t) for t in self.buffered) >= ROW_GROUP_ROWS or hi == self.piece.rows:
            self.writer.write_table(pa.concat_tables(self.buffered))
            self.buffered = []

    def close(self) -> None:
        """Close the table (before its temporary file is renamed into place)."""
        if self.writer is None:
            raise ValueError(f"empty query piece {self.piece.index}")
        self.writer.close()

    def finish(self) -> None:
        """Write the lists as global rows, after the table is in place."""
        if self.knn_rows is not None and self.knn_scores is not None:
            probes = self.knn_probes if self.probed == self.piece.rows else None  # every query's, or none
            path = knn_path(self.plan.knn_dir, self.piece.index)
            write_knn(path, self.knn_rows, self.knn_scores, k=self.plan.k, probes=probes)


# smaller pieces are joined a task each (small inputs: a killed join keeps fine steps), but for a routed join's
# merge, whose reads a run saves (each group's files once a run)
MIN_RUN_PIECE_ROWS = 16_384


def first_k(
    offsets: np.ndarray, scores: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lists in list layout cut to their first ``k`` entries."""
    counts = np.diff(offsets)
    slot = np.arange(rows.size) - np.repeat(offsets[:-1], counts)
    keep = slot < k
    cut = np.zeros_like(offsets)
    np.cumsum(np.minimum(counts, k), out=cut[1:])
    return cut, scores[keep], rows[keep]


def to_padded(
    rows_out: np.ndarray,
    scores_out: np.ndarray,
    first: int,
    *,
    offsets: np.ndarray,
    rows: np.ndarray,
    scores: np.ndarray,
) -> None:
    """Scatter lists in list layout (``offsets``) into ``-1``-padded arrays, from line ``first`` on."""
    counts = np.diff(offsets)
    line = first + np.repeat(np.arange(counts.size), counts)
    slot = np.arange(rows.size) - np.repeat(offsets[:-1], counts)
    rows_out[line, slot] = rows
    scores_out[line, slot] = scores


def knn_path(knn_dir: str | Path | None, piece: int) -> Path:
    """Where the join writes one piece's neighbour lists as global rows."""
    return Path(str(knn_dir)) / f"part-{piece:05d}.npz"


def join_pieces(
    client: Any,
    plan: SearchPlan,
    index_store: RowStore,
    query_store: RowStore,
    *,
    pieces: Sequence[Piece],
    out_dir: Path,
    manifest: Manifest,
    dim: int,
    by_pairs: bool = False,
    routed: bool = False,
    workers: int = 1,
    group_bytes: int | None = None,
    run_rows: int = 0,
) -> float:
    """Search every query piece not yet done; write ``out_dir/part-NNNNN.parquet``; return wall time.

    ``by_pairs``: an exact self-join computes every piece's lists first, each pair of pieces
    scored once for both (:mod:`pipeline.search.pairs`), unless pieces were joined another way
    already (an appended join goes on piece by piece). ``routed``: an IVF-Flat index without
    re-ranking is joined by list groups, each read once (:mod:`pipeline.search.routed`).
    ``run_rows``: the batch the plan wants (list-major search: enough queries for each list); a
    join task then takes consecutive pieces up to that many rows in all (:func:`piece_runs`)."""
    width = plan.k * max(plan.rerank, 1) + 1
    per_query = width * 16 + 4 * dim  # ids, scores and order per candidate, plus the query
    budget_rows = int(max(1, BATCH_BYTES // per_query))  # each worker caps it at its backend's batch size
    out = {p.index: str(out_dir / f"part-{p.index:05d}.parquet") for p in pieces}
    done = manifest.done_pieces("join")
    short = [0]
    began = bool(manifest.done_pieces("exact_diagonal"))  # a join by pairs killed part way goes on by pairs
    layout = (
        plan_groups(index_store, dim, out_dir.parent / PAIRS_DIR)
        if by_pairs and plan.strategy == "exact" and plan.self_join and (began or not done)
        else None
    )
    paired = (
        0.0
        if layout is None
        else exact_pairs(
            client,
            index_store,
            layout=layout,
            width=candidates_per_query(plan, index_store.rows),
            metric=plan.metric,
            manifest=manifest,
        )
    )

    todo = [p for p in pieces if p.index not in done]
    reads = ReadTally()
    routes = None
    shape = (
        index_shape(client, plan.index_dir, "join") if routed and layout is None and plan.strategy == "index" else None
    )
    # lossy codes are routed where the fill wrote their vectors in list order, to re-rank in the group
    rerank = bool(plan.rerank) and shape is not None and has_ordered(plan.index_dir)
    if shape is not None and (shape.ivf_flat and not plan.rerank or rerank) and plan.nprobe and todo:
        routes = RoutedLayout(
            folder=str(out_dir.parent / ROUTED_DIR),
            groups=plan_list_groups(
                shape, group_bytes, min_groups=workers, row_bytes=shape.code_size + 4 * dim + 8 if rerank else None
            ),
            nprobe=int(plan.nprobe),
            # a group's re-ranked candidates have their exact scores: it keeps what the tables take
            width=kept_per_query(plan, shape.ntotal) if rerank else candidates_per_query(plan, shape.ntotal),
            similarity=plan.metric != "l2",
            candidates=candidates_per_query(plan, shape.ntotal) if rerank else 0,
            dim=dim,
        )
        started = time.monotonic()
        for scored in route_and_score(
            client,
            nlist=shape.nlist,
            index_dir=plan.index_dir,
            query_store=query_store,
            pieces=tuple(todo),
            layout=routes,
            manifest=manifest,
            workers=workers,
        ).values():
            reads.add("routed score", scored.worker, scored.list_bytes)
        paired += time.monotonic() - started

    def finished(run: PieceRun, joined: Joined) -> None:
        short[0] += joined.short
        reads.add("join", joined.worker, joined.list_bytes)
        for p in run.pieces:
            files = [out[p.index]] + ([knn_path(plan.knn_dir, p.index)] if plan.knn_dir else [])
            manifest.mark_piece("join", p.index, files)

    say_resuming("join", pieces, todo)
    if routes is not None:  # a task merges as many pieces as its memory allows: each group read once for them all
        run_rows = spread(merge_run_rows(routes.width), sum(p.rows for p in todo), workers)
    elif layout is None:
        run_rows = min(run_rows, budget_rows)
    runs = piece_runs(todo, run_rows if layout is None else 0, min_piece_rows=1 if routes else MIN_RUN_PIECE_ROWS)
    seconds = (
        run_tasks(
            client,
            label="join",
            items=runs,
            task=lambda run: JoinTask(
                plan=plan,
                index_store=index_store,
                query_store=query_store,
                pieces=run.pieces,
                outs=tuple(out[p.index] for p in run.pieces),
                budget_rows=budget_rows,
                pairs=layout,
                routed=routes,
            ),
            on_done=finished,
        )
        + paired
    )
    if short[0]:
        log.warning(
            "%d queries got fewer than k=%d neighbours (the probed lists held too few); raise --nprobe",
            short[0],
            plan.k,
        )
    manifest.finish_stage("join", {"seconds": seconds, "list_reads": to_dict(reads.done())})
    if (
        routes is not None or nodes.active() or (out_dir.parent / ROUTED_DIR).exists()
    ):  # a routed join's partial lists (ours)
        discard(out_dir.parent / ROUTED_DIR)
    if layout is not None:
        drop_pairs(layout)
    return seconds
