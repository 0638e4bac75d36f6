"""The routed join of an IVF index: each group of inverted lists is read once per join.

The batched join (:func:`pipeline.backends.lists.list_major_search` per query batch) reads every
list its batch probes, once per batch: a join of ``n`` queries in batches of ``b`` reads the
index ``n / b`` times, and every worker maps all of it. Here the join is turned inside out, as
FAISS's ``contrib.big_batch_search`` does on one machine, over Dask:

1. **route** (a task per run of consecutive query pieces, :func:`route_run_rows`): the run's
   queries are assigned to their ``nprobe`` nearest lists (the coarse quantizer only), written as
   (query, list) pairs ordered by list group with where each group's pairs start
   (``route/run-FIRST-LAST.*``, ``piece-NNNNN.*`` for a run of one), so a score task reads its own
   pairs of each run by range, not the whole route, and once a run, not once a piece;
2. **score** (a task per *list group*: consecutive lists of at most ``GROUP_BYTES`` of vectors):
   the group's lists are read once, and every query piece's routed queries are scored against
   them, list by list with one matrix product each, piece after piece (memory: the group, one
   piece's queries and their heaps), into the group's partial top lists: four files a group, each
   piece's run in them read by range (:class:`PartialLists`);
3. **merge**: the join's own tasks, each taking a run of pieces (:func:`merge_run_rows`), read
   each group's partials of the run by one range and merge them into the pieces' lists (exact
   scores, self-exclusion, ids, a table a piece), as the exact join by pairs does. So the ranged
   reads of routes and partials are groups x runs, not groups x pieces (:func:`spread` keeps four
   runs a worker at least).

**Lossy codes** (PQ, SQ: re-ranked) are routed where the fill wrote their vectors in list order
(:mod:`pipeline.index.ordered`): a score task reads its group's vectors once and re-ranks from them.
Fast-scan PQ codes are in memory, so the route searches each piece by its codes as the batched
join does and sends each candidate to the group holding its vector; codes in a list file are
searched group by group (:meth:`ScoreTask._rerank_group`).

A score task asks its worker's device for the group's search (``group_search``): the host walks
the lists where they lie; a GPU worker copies the group's lists (vectors, or codes with their
codec) to its GPU once and searches each piece there (:meth:`GpuBackend.group_search`).

The result equals the batched join's at the same ``nprobe`` up to ties. Each stage is recorded
in the output manifest, so a killed join resumes where it stopped; the partial lists are removed
once every piece's table is written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.backends.lists import GroupSearch, coarse_assign, list_centroids, packed, search_assigned, two_level
from pipeline.backends.worker import worker_device
from pipeline.index.ordered import OrderedGroup, ordered_files, read_group
from pipeline.index.shape import IndexShape
from pipeline.io import nodes
from pipeline.io.atomic import atomic_path, write_npz
from pipeline.io.nodes import fetched, npy_rows
from pipeline.io.parquet import Piece, PieceRun, piece_runs
from pipeline.io.store import RowStore
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.progress import PieceProgress
from pipeline.runtime.runner import Stage, run_stage, worker_name

__all__ = [
    "ROUTED_DIR",
    "GROUP_BYTES",
    "ListGroup",
    "RoutedLayout",
    "plan_list_groups",
    "merge_run_rows",
    "spread",
    "route_and_score",
    "routed_lists",
]

log = logging.getLogger(__name__)

ROUTED_DIR = "_routed"
GROUP_BYTES = 256 << 20  # vectors a list group holds at most (one score task holds one group)
MIN_GROUPS = 4  # by default at least this many groups (as lists allow), so several workers share the scoring
MERGE_BYTES = 256 << 20  # a merge task's lists and one group's partial lists of its run, at most
RUNS_PER_WORKER = 4  # route and merge tasks (runs of pieces) per worker at least, as the pieces allow


def merge_run_rows(width: int) -> int:
    """Queries one merge task takes at most (a run of pieces, :func:`routed_lists`): its heaps (a
    score and a row, ``width`` a query) and one group's partial lists of them fit ``MERGE_BYTES``."""
    return max(1, MERGE_BYTES // (24 * max(1, int(width))))


def spread(run_rows: int, rows: int, workers: int) -> int:
    """``run_rows`` lowered so that ``rows`` make ``RUNS_PER_WORKER`` runs a worker: a run saves
    reads, but the runs are the stage's tasks, and one run of everything would leave all but one
    worker idle (at 1M rows one merge task could hold every piece)."""
    return max(1, min(int(run_rows), -(-int(rows) // (RUNS_PER_WORKER * max(1, int(workers))))))


@dataclass(frozen=True)
class ListGroup:
    """Inverted lists ``[first, last)``, holding ``rows`` vectors (a unit of the score stage)."""

    index: int
    first: int
    last: int
    rows: int


@dataclass(frozen=True)
class RoutedLayout:
    """Where the routed join keeps its routes and partial lists, and its list groups."""

    folder: str
    groups: tuple[ListGroup, ...]
    nprobe: int
    width: int  # candidates kept per query: k, plus one where a query's own row is dropped later
    similarity: bool  # inner product (higher is better) or squared L2 (kept negated)
    candidates: int = 0  # lossy codes: each group's candidates (by codes) re-ranked from its vectors in list order
    dim: int = 0

    @property
    def rerank(self) -> bool:
        return self.candidates > 0

    def task_bytes(self) -> int:
        """About what the layout weighs in a task record: its list groups (every route, score and
        join task holds it; :func:`pipeline.runtime.runner.submit` sends one of thousands of
        groups to the cluster once)."""
        return 32 * len(self.groups)

    def route_path(self, run: PieceRun | int) -> Path:
        """A route (a run of query pieces, or a piece number): where each group's pairs start."""
        return Path(self.folder) / "route" / f"{_route_stem(run)}.npz"

    def pairs_path(self, run: PieceRun | int, kind: str) -> Path:
        """A route's (query, list) pairs by list group: ``slots`` (query of the run x the route's
        width, ``nprobe``, + the list's rank among the query's) or ``lists``."""
        return Path(self.folder) / "route" / f"{_route_stem(run)}.{kind}.npy"

    def candidates_path(self, run: PieceRun | int, kind: str) -> Path:
        """A piece's candidates for re-ranking, grouped by list group (``rows`` or ``queries``)."""
        return Path(self.folder) / "route" / f"{_route_stem(run)}.{kind}.npy"

    def partial_path(self, group: int, kind: str) -> Path:
        """One group's partial lists of every piece, as 1-d arrays (:data:`PARTIAL_KINDS`):
        ``starts`` (where each piece number's run of queries begins), ``queries`` (the run's local
        query numbers), ``scores`` and ``rows`` (``width`` a query)."""
        return Path(self.folder) / "partial" / f"group-{group:05d}.{kind}.npy"


def _route_stem(run: PieceRun | int) -> str:
    """A route's file name: ``piece-NNNNN`` for one piece (as routes were before runs, so a join
    resumed from then reads them), ``run-FIRST-LAST`` for a run of several."""
    if isinstance(run, int):
        return f"piece-{run:05d}"
    first, last = run.pieces[0].index, run.pieces[-1].index
    return f"piece-{first:05d}" if len(run.pieces) == 1 else f"run-{first:05d}-{last:05d}"


ROUTE_BYTES = 256 << 20  # a route task's (query, list) pairs of its run, sorted by list group, at most


def route_run_rows(nprobe: int, candidates: int = 0) -> int:
    """Queries one route task takes (a run of pieces): its pairs (a slot and a list, 8 bytes
    each, ``nprobe`` a query), the ``candidates`` a query it found by the codes (a row, a query,
    a group) and their sorts fit ``ROUTE_BYTES``; one piece's vectors at a time."""
    return max(1, ROUTE_BYTES // (48 * max(1, int(nprobe)) + 40 * max(0, int(candidates))))


def plan_list_groups(
    shape: IndexShape, group_bytes: int | None = None, min_groups: int = MIN_GROUPS, *, row_bytes: int | None = None
) -> tuple[ListGroup, ...]:
    """Consecutive lists grouped up to ``group_bytes`` of vectors, and into at least
    ``min_groups`` groups (one per worker, say) where the lists allow (a list is never split).
    Every group a query's lists fall in scores it apart, so more groups than the workers need
    cost time: each query's heap is made, filled and sorted once per group it meets.
    ``row_bytes``: what a group holds in memory per row (default the codes: the vectors of
    IVF-Flat; codes and vectors in list order where lossy codes are re-ranked)."""
    sizes, nlist = shape.list_sizes, shape.nlist
    code_size = row_bytes or shape.code_size
    total = int(sizes.sum()) * code_size
    per_group = max(1, min(group_bytes or GROUP_BYTES, GROUP_BYTES, -(-total // max(1, min_groups))))
    groups: list[ListGroup] = []
    first, held = 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > first and held + size * code_size > per_group:
            groups.append(ListGroup(len(groups), first, i, int(sizes[first:i].sum())))
            first, held = i, 0
        held += size * code_size
    groups.append(ListGroup(len(groups), first, nlist, int(sizes[first:].sum())))
    return tuple(groups)


@dataclass(frozen=True, kw_only=True)
class RouteTask:
    """Assign a run of query pieces' queries to their ``nprobe`` nearest lists (the coarse
    quantizer), one piece's vectors at a time, into one route for the run: a score task then
    reads each group's pairs once a run, not once a piece (groups x pieces ranged reads).

    With ``layout.candidates`` (lossy codes held in memory, their vectors in list order), each
    piece is also searched by its codes, as the batched join searches it, and each candidate is
    sent to the list group holding its vector (:meth:`candidates`)."""

    index_dir: str
    query_store: RowStore
    queries: PieceRun
    layout: RoutedLayout
    searched: bool = False  # the codes are in memory: search them here

    def run(self) -> None:
        from pipeline.index.fill import load_lists

        index = load_lists(self.index_dir, 0, 0)  # the coarse quantizer: no list's bytes are read
        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
        assigned, found = [], []
        with worker_device():  # the quantizer's search on the worker's threads
            for piece in self.queries.pieces:
                q = np.ascontiguousarray(self.query_store.vectors(piece.index))
                dis = None
                if self.searched and two_level(ivf.quantizer) is None:  # its distances, as FAISS's own search has them
                    dis, assign = ivf.quantizer.search(q, self.layout.nprobe)
                else:
                    assign = coarse_assign(ivf.quantizer, q, self.layout.nprobe)
                if self.searched:
                    found.append(self.candidates(ivf, q, assign, dis))
                assigned.append(assign)
                del q
        extra = {"starts": self.write_candidates(np.concatenate(found))} if found else {}
        write_routes(self.layout, self.queries, np.concatenate(assigned), **extra)

    def candidates(self, ivf: Any, q: np.ndarray, assign: np.ndarray, dis: np.ndarray | None) -> np.ndarray:
        """Search a piece by its codes for each query's ``layout.candidates`` best (global rows,
        ``-1`` padded), as the batched join does. A group then re-ranks exactly the batched
        search's candidates in its lists: the join's lists are the batched join's, and no query's
        candidates are re-ranked more than once."""
        layout = self.layout
        centroids = None if dis is not None else list_centroids(ivf.quantizer, 0, int(ivf.nlist), int(ivf.d))
        found = np.empty((len(q), layout.candidates), dtype=np.int64)
        for lo in range(0, len(q), BOUND_QUERIES):
            keys = np.ascontiguousarray(assign[lo : lo + BOUND_QUERIES])
            if centroids is None:
                assert dis is not None
                near = np.ascontiguousarray(dis[lo : lo + BOUND_QUERIES])
            else:
                near = coarse_distances(q[lo : lo + BOUND_QUERIES], centroids, keys, layout.similarity)
            part = search_assigned(ivf, q[lo : lo + BOUND_QUERIES], layout.candidates, keys, near)
            found[lo : lo + len(keys)] = part[1]
        return found

    def write_candidates(self, found: np.ndarray) -> np.ndarray:
        """Write the run's candidates ``found`` (its queries one piece after another) as (query of
        the run, row) pairs ordered by the list group that holds each row's vector
        (``ordered/row_lists.npy``); return where each group's pairs start."""
        layout = self.layout
        lists_of = np.load(fetched(ordered_files(self.index_dir)[3]), mmap_mode="r")
        firsts = np.array([g.first for g in layout.groups], dtype=np.int64)
        at = np.flatnonzero(found.ravel() >= 0)
        rows = found.ravel()[at]
        group = np.searchsorted(firsts, np.asarray(lists_of[rows], dtype=np.int64), side="right") - 1
        order = np.argsort(group, kind="stable")  # by group, then by query
        starts = np.searchsorted(group[order], np.arange(len(firsts) + 1))
        for kind, values in (("rows", rows[order]), ("queries", (at[order] // layout.candidates).astype(np.int32))):
            _save_npy(layout.candidates_path(self.queries, kind), values)
        return starts


def _save_npy(path: Path, values: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, values)


BOUND_QUERIES = 16_384  # queries a route searches by their codes at once


@dataclass(frozen=True)
class Scored:
    """One list group scored: the routed queries it scored, the bytes of its lists (read once),
    and the worker that ran it."""

    queries: int
    list_bytes: int
    worker: str


@dataclass(frozen=True, kw_only=True)
class ScoreTask:
    """Read one list group once and score every piece's queries routed to it (see the module),
    reading each route's pairs for the group once (a route: a run of pieces)."""

    index_dir: str
    query_store: RowStore
    runs: tuple[PieceRun, ...]
    group: ListGroup
    layout: RoutedLayout

    def run(self) -> Scored:
        from pipeline.index.fill import load_lists

        g, layout = self.group, self.layout
        index = load_lists(self.index_dir, g.first, g.last)  # its mapped pages leave with the task
        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
        if layout.rerank:
            return self._rerank_group(ivf)
        progress = PieceProgress("routed score", g.index)
        scored = 0
        # the worker's device holds the group for the task: on the host every core walks its lists
        # for a share of the queries; a GPU worker copies them to its GPU once
        with (
            worker_device() as device,
            device.group_search(ivf, g.first, g.last) as search,
            PartialLists(layout, g.index) as out,
        ):
            for piece, picked, lists in self._routed():
                if picked.size:
                    # only the routed rows, gathered from the memory map: a group meets a share of each
                    # piece's queries (about nprobe / groups of them at scale), so reading whole pieces
                    # would read the query store once per group; this reads each query about once per
                    # list group it is routed to (at most nprobe times), as faiss's big_batch_search does
                    q = np.ascontiguousarray(self.query_store.mapped_vectors(piece.index)[picked])
                    scores, rows = search(q, layout.width, lists)
                    if not layout.similarity:  # squared distances, kept negated (higher is better)
                        scores = -scores
                    scored += int(picked.size)
                else:
                    scores = np.zeros((0, layout.width), np.float32)
                    rows = np.zeros((0, layout.width), np.int64)
                out.add(piece.index, picked, scores, rows)
                progress.advance(piece.rows)
        result = Scored(queries=scored, list_bytes=g.rows * int(ivf.code_size), worker=worker_name())
        del ivf, index  # unmaps the lists read
        return result

    def _routed(self) -> Iterator[tuple[Piece, np.ndarray, np.ndarray]]:
        """Each piece in number order with its queries routed here and their lists."""
        for run in sorted(self.runs, key=lambda r: r.index):
            yield from routed_pieces(self.layout, self.group, run)

    def _rerank_group(self, ivf: Any) -> Scored:
        """Lossy codes: each piece's candidates in this group's lists re-ranked exactly from the
        group's vectors in list order, read once (:mod:`pipeline.index.ordered`); each query keeps
        its ``width`` best here. The candidates are those the route found by searching the codes
        (:meth:`RouteTask.candidates`); where the codes are in a list file instead, the group's
        lists are searched here, for each routed query's ``candidates`` best among them (FAISS's
        ``search_preassigned``, the coarse distances recomputed from the centroids): a superset of
        what the batched search keeps from these lists, so the recall is at least the batched plan's."""
        g, layout = self.group, self.layout
        vectors = read_group(self.index_dir, g.first, g.last, layout.dim)
        progress = PieceProgress("routed score", g.index)
        scored = 0
        with contextlib.ExitStack() as held, PartialLists(layout, g.index) as out:
            searches: list[GroupSearch] = []  # the device's hold on the group's codes, taken once if needed

            def search() -> GroupSearch:
                if not searches:  # FAISS on the worker's threads, or the group's codes on its GPU
                    device = held.enter_context(worker_device())
                    searches.append(held.enter_context(device.group_search(ivf, g.first, g.last)))
                return searches[0]

            for run in sorted(self.runs, key=lambda r: r.index):
                for piece, (picked, scores, rows) in self._reranked(run, ivf, vectors, search):
                    if not layout.similarity:  # squared distances, kept negated (higher is better)
                        scores = -scores
                    scored += int(picked.size)
                    out.add(piece.index, picked, scores, rows)
                    progress.advance(piece.rows)
        return Scored(queries=scored, list_bytes=g.rows * int(ivf.code_size) + vectors.nbytes, worker=worker_name())

    def _reranked(
        self, run: PieceRun, ivf: Any, vectors: OrderedGroup, search: Callable[[], GroupSearch]
    ) -> Iterator[tuple[Piece, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """Each piece of ``run`` with its queries' ``width`` best here: the candidates the route
        found by the codes, or the group's lists searched by the codes (``search()``) first."""
        g = self.group
        with np.load(fetched(self.layout.route_path(run))) as z:
            starts = z["starts"] if "starts" in z.files else None
        if starts is not None:  # searched by their codes at the route
            yield from self._rerank_found(run, vectors, int(starts[g.index]), int(starts[g.index + 1]))
            return
        for piece, picked, lists in routed_pieces(self.layout, g, run):
            yield piece, self._search_and_rerank(search(), ivf, piece, picked=picked, lists=lists, vectors=vectors)

    def _rerank_found(
        self, run: PieceRun, vectors: OrderedGroup, lo: int, hi: int
    ) -> list[tuple[Piece, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
        """The route's (query, row) pairs ``[lo, hi)`` of ``run`` (this group's, read once for
        the run), scored exactly a chunk of pairs at a time; each piece's queries' ``width`` best."""
        layout = self.layout
        rows = np.array(npy_rows(layout.candidates_path(run, "rows"), lo, hi), dtype=np.int64)
        queries = np.array(npy_rows(layout.candidates_path(run, "queries"), lo, hi), dtype=np.int64)
        pos = vectors.place(rows)
        if (pos < 0).any():
            raise RuntimeError(f"{layout.candidates_path(run, 'rows')}: a candidate outside its list group")
        out, base = [], 0
        for piece in run.pieces:  # the pairs are in query order within the group: cut at the pieces
            a, b = np.searchsorted(queries, [base, base + piece.rows])
            out.append((piece, self._rerank_pairs(piece, queries[a:b] - base, rows[a:b], pos[a:b], vectors)))
            base += piece.rows
        return out

    def _rerank_pairs(
        self, piece: Piece, queries: np.ndarray, rows: np.ndarray, pos: np.ndarray, vectors: OrderedGroup
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``piece``'s (query, row) pairs, the rows at ``pos`` of the group's vectors, scored
        exactly; each query's ``width`` best."""
        layout = self.layout
        picked, inverse = np.unique(queries, return_inverse=True)
        mapped = self.query_store.mapped_vectors(piece.index)
        exact = np.empty(len(rows), dtype=np.float32)
        for a in range(0, len(rows), RERANK_PAIRS):  # the pairs' vectors gathered a chunk at a time
            b = min(len(rows), a + RERANK_PAIRS)
            q = np.asarray(mapped[queries[a:b]], dtype=np.float32)
            exact[a:b] = pair_scores(q, vectors.vectors[pos[a:b]], layout.similarity)
        width, similarity = layout.width, layout.similarity
        scores, best = best_per_query(inverse, exact, rows, len(picked), width=width, similarity=similarity)
        return picked, scores, best

    def _search_and_rerank(
        self,
        search: GroupSearch,
        ivf: Any,
        piece: Piece,
        *,
        picked: np.ndarray,
        lists: np.ndarray,
        vectors: OrderedGroup,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The queries ``picked`` of ``piece`` routed here (to ``lists``) searched by their codes
        among this group's lists (by the device's ``search``), their ``candidates`` best
        re-ranked; each query's ``width`` best."""
        g, layout = self.group, self.layout
        scores = np.zeros((len(picked), layout.width), np.float32)
        rows = np.full((len(picked), layout.width), -1, np.int64)
        if not picked.size:
            return picked, scores, rows
        centroids = list_centroids(ivf.quantizer, g.first, g.last, layout.dim)
        mapped = self.query_store.mapped_vectors(piece.index)
        for lo in range(0, len(picked), RERANK_QUERIES):  # a chunk's queries gathered at a time
            hi = min(len(picked), lo + RERANK_QUERIES)
            q = np.ascontiguousarray(mapped[picked[lo:hi]], dtype=np.float32)
            keys = packed(lists[lo:hi])
            dis = coarse_distances(q, centroids, keys - g.first, layout.similarity)
            found = search(q, layout.candidates, keys, dis)[1]
            at = np.flatnonzero(found.ravel() >= 0)
            cand = found.ravel()[at]
            pos = vectors.place(cand)
            keep = pos >= 0
            at, cand, pos = at[keep], cand[keep], pos[keep]
            which = at // found.shape[1]
            exact = pair_scores(q[which], vectors.vectors[pos], layout.similarity)
            scores[lo:hi], rows[lo:hi] = best_per_query(
                which, exact, cand, hi - lo, width=layout.width, similarity=layout.similarity
            )
        return picked, scores, rows


PARTIAL_KINDS = ("starts", "queries", "scores", "rows")


class PartialLists:
    """One list group's partial lists of every piece, written as the score task finds them into
    four files of the group (:meth:`RoutedLayout.partial_path`), each published whole when the
    task ends. A file a (group, piece) made groups x pieces files: 76,000 at 10^8 x 128 (200
    groups, 381 pieces), and 10^8 at 10^9; now four a group, each piece's run read by range.
    Pieces are added in number order, each run appended to its file (written, not mapped: mapped
    pages would count against the worker's memory until the task ended); each ``.npy`` header,
    whose length does not hang on the array's length, is written again at the end with it."""

    KINDS = (("queries", np.int64, 1), ("scores", np.float32, 0), ("rows", np.int64, 0))  # (kind, dtype, 1: a query)

    def __init__(self, layout: RoutedLayout, group: int) -> None:
        self.layout, self.group = layout, group
        self._held = contextlib.ExitStack()
        self._files: dict[str, Any] = {}
        self._runs: dict[int, int] = {}  # piece number -> its queries here

    def __enter__(self) -> PartialLists:
        with contextlib.ExitStack() as opening:
            for kind, dtype, _ in self.KINDS:
                tmp = opening.enter_context(atomic_path(self.layout.partial_path(self.group, kind)))
                self._files[kind] = opening.enter_context(open(tmp, "wb"))
                _npy_header(self._files[kind], dtype, 0)  # a stand-in of the same length
            self._held = opening.pop_all()
        return self

    def add(self, piece: int, picked: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> None:
        """``piece``'s routed queries here and their partial lists (``width`` wide), in piece order."""
        if self._runs and piece <= max(self._runs):
            raise RuntimeError(f"group {self.group}: piece {piece} added after piece {max(self._runs)}")
        self._runs[piece] = len(picked)
        self._files["queries"].write(np.ascontiguousarray(picked, dtype=np.int64).tobytes())
        self._files["scores"].write(np.ascontiguousarray(scores, dtype=np.float32).tobytes())
        self._files["rows"].write(np.ascontiguousarray(rows, dtype=np.int64).tobytes())

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool | None:
        sizes = np.zeros(max(self._runs, default=-1) + 2, dtype=np.int64)
        for piece, n in self._runs.items():
            sizes[piece + 1] = n
        starts = np.cumsum(sizes)
        if kind is None:
            for name, dtype, per_query in self.KINDS:
                fh = self._files[name]
                fh.seek(0)
                _npy_header(fh, dtype, int(starts[-1]) * (1 if per_query else self.layout.width))
        published = self._held.__exit__(kind, value, tb)  # closed and renamed into place, or removed on an error
        if kind is None:
            _save_npy(self.layout.partial_path(self.group, "starts"), starts)
        return published


def _npy_header(fh: Any, dtype: Any, n: int) -> None:
    """A ``.npy`` header of a 1-d array of ``n`` values at ``fh``'s place: 128 bytes for any ``n``
    below 10^18 (NumPy pads it to a multiple of 64), checked, since :class:`PartialLists` writes
    a stand-in first and the real one over it."""
    at = fh.tell()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (n,)}
    np.lib.format.write_array_header_1_0(fh, header)
    if fh.tell() - at != NPY_HEADER_BYTES:
        raise RuntimeError(f"{fh.name}: a .npy header of {fh.tell() - at} bytes, not {NPY_HEADER_BYTES}")


NPY_HEADER_BYTES = 128


def partial_run(
    layout: RoutedLayout, group: int, first: int, last: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(queries, scores, rows, counts)`` of pieces ``first`` to ``last`` (inclusive; default
    ``first`` alone) in ``group``'s partial lists: one ranged read of each file for the whole
    run, since the pieces' runs lie in number order. ``counts``: each piece number's queries."""
    w, last = layout.width, first if last is None else last
    bounds = np.asarray(npy_rows(layout.partial_path(group, "starts"), first, last + 2), dtype=np.int64)
    bounds = np.concatenate([bounds, np.full(last + 2 - first - len(bounds), bounds[-1] if len(bounds) else 0)])
    lo, hi = int(bounds[0]), int(bounds[-1])
    queries = np.array(npy_rows(layout.partial_path(group, "queries"), lo, hi), dtype=np.int64)
    scores = np.array(npy_rows(layout.partial_path(group, "scores"), lo * w, hi * w), dtype=np.float32)
    rows = np.array(npy_rows(layout.partial_path(group, "rows"), lo * w, hi * w), dtype=np.int64)
    return queries, scores.reshape(-1, w), rows.reshape(-1, w), np.diff(bounds)


def write_routes(layout: RoutedLayout, run: PieceRun | int, assign: np.ndarray, **extra: np.ndarray) -> None:
    """A run's route (or one piece's): its queries' lists ``assign`` (``-1`` for none; the run's
    queries one piece after another) as (query, list) pairs ordered by list group (then query,
    then the list's rank), with where each group's run starts."""
    firsts = np.array([g.first for g in layout.groups], dtype=np.int64)
    slots = np.flatnonzero(assign.ravel() >= 0)  # query x width + rank, in query order
    lists = assign.ravel()[slots].astype(np.int64)
    group = np.searchsorted(firsts, lists, side="right") - 1
    order = np.argsort(group, kind="stable")
    for kind, values in (("slots", slots[order]), ("lists", lists[order])):
        _save_npy(layout.pairs_path(run, kind), values)
    starts = np.searchsorted(group[order], np.arange(len(firsts) + 1))
    width = np.int64(assign.shape[1])
    write_npz(layout.route_path(run), group_starts=starts, group_firsts=firsts, width=width, **extra)


def routed_to(layout: RoutedLayout, g: ListGroup, run: PieceRun | int) -> tuple[np.ndarray, np.ndarray]:
    """The queries of a run (or one piece) routed to group ``g`` (numbered in the run), and their
    lists there (``-1``: elsewhere), from the group's own run of the route's pairs: read by range,
    so the score stage reads each route once in all, not once per group (at 10^8 x 128, 200 groups
    each reading all 381 pieces' routes would read 640 GB of routes for 51 GB of lists). Routes
    grouped for other list groups (a resumed join planned with another worker count) are read
    whole and filtered."""
    with np.load(fetched(layout.route_path(run))) as z:
        firsts, starts, width = z["group_firsts"], z["group_starts"], int(z["width"])
    if np.array_equal(firsts, [x.first for x in layout.groups]):
        lo, hi = int(starts[g.index]), int(starts[g.index + 1])
        slots = np.array(npy_rows(layout.pairs_path(run, "slots"), lo, hi), dtype=np.int64)
        lists = np.array(npy_rows(layout.pairs_path(run, "lists"), lo, hi), dtype=np.int64)
    else:
        slots = np.load(fetched(layout.pairs_path(run, "slots")))
        lists = np.load(fetched(layout.pairs_path(run, "lists")))
        inside = (lists >= g.first) & (lists < g.last)
        slots, lists = slots[inside], lists[inside]
    picked, at = np.unique(slots // width, return_inverse=True)
    routed = np.full((len(picked), width), -1, dtype=np.int64)
    routed[at, slots % width] = lists
    return picked, routed


def routed_pieces(layout: RoutedLayout, g: ListGroup, run: PieceRun) -> Iterator[tuple[Piece, np.ndarray, np.ndarray]]:
    """Each piece of ``run`` with its queries routed to group ``g`` (numbered in the piece) and
    their lists there: the run's route read once (:func:`routed_to`), then cut at the pieces."""
    picked, lists = routed_to(layout, g, run)
    base = 0
    for piece in run.pieces:
        lo, hi = np.searchsorted(picked, [base, base + piece.rows])
        yield piece, picked[lo:hi] - base, lists[lo:hi]
        base += piece.rows


RERANK_QUERIES = 8192  # routed queries searched and re-ranked at once (fast-scan wants many)
RERANK_PAIRS = 65_536  # (query, candidate) vectors gathered at once: 32 MiB at d = 128


def coarse_distances(q: np.ndarray, centroids: np.ndarray, at: np.ndarray, similarity: bool) -> np.ndarray:
    """Each query's score to each of its lists (``at``: the list's place in ``centroids``,
    negative for none): what the coarse quantizer would have reported."""
    c = centroids[np.maximum(at, 0)]
    if similarity:
        return np.ascontiguousarray(np.einsum("nd,npd->np", q, c), dtype=np.float32)
    diff = q[:, None, :] - c
    return np.ascontiguousarray(np.einsum("npd,npd->np", diff, diff), dtype=np.float32)


def pair_scores(q: np.ndarray, v: np.ndarray, similarity: bool) -> np.ndarray:
    """Exact scores of row ``i`` of ``q`` against row ``i`` of ``v``: inner products, or squared
    L2 as FAISS reports it (``|v|^2 - 2 q.v + |q|^2``)."""
    dots = np.einsum("md,md->m", q, v)
    if similarity:
        return dots.astype(np.float32, copy=False)
    return (np.einsum("md,md->m", v, v) - 2 * dots + np.einsum("md,md->m", q, q)).astype(np.float32)


def best_per_query(
    query: np.ndarray, exact: np.ndarray, rows: np.ndarray, n: int, *, width: int, similarity: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, width)`` best exact scores and their rows per query, from (``query``, score, row)
    triples; score 0 and row ``-1`` past a query's triples."""
    key = -exact if similarity else exact
    order = np.lexsort((rows, key, query))  # by query, best first, ties by row
    query, exact, rows = query[order], exact[order], rows[order]
    first = np.searchsorted(query, np.arange(n))
    rank = np.arange(len(query)) - first[query]
    keep = rank < width
    scores = np.zeros((n, width), np.float32)
    best = np.full((n, width), -1, np.int64)
    scores[query[keep], rank[keep]] = exact[keep]
    best[query[keep], rank[keep]] = rows[keep]
    return scores, best


def route_and_score(
    client: Any,
    *,
    nlist: int,
    index_dir: str,
    query_store: RowStore,
    pieces: tuple[Piece, ...],
    layout: RoutedLayout,
    manifest: Manifest,
    workers: int = 1,
) -> dict[int, Scored]:
    """The route and score stages (``routed_route``, ``routed_score``), resumable; returns each
    group's :class:`Scored`. Lossy codes held in memory (not in a list file) are searched whole by
    the route, as the batched join searches them (:meth:`RouteTask.candidates`)."""
    searched = layout.rerank and not nodes.present(Path(index_dir) / "index.ivfdata")
    # a route task takes as many pieces as its pairs (and candidates, where it searches their codes) fit
    bound = route_run_rows(layout.nprobe, layout.candidates if searched else 0)
    runs = tuple(piece_runs(pieces, spread(bound, sum(p.rows for p in pieces), workers)))
    forget_other_layouts(manifest, layout, runs)
    if not {g.index for g in layout.groups} <= manifest.done_pieces("routed_score"):  # routes serve the scoring
        run_stage(
            client,
            manifest,
            Stage(
                name="routed_route",
                items=runs,
                task=lambda r: RouteTask(
                    index_dir=index_dir, query_store=query_store, queries=r, layout=layout, searched=searched
                ),
                files=lambda r: (
                    [layout.route_path(r)]
                    + [layout.pairs_path(r, kind) for kind in ("slots", "lists")]
                    + ([layout.candidates_path(r, kind) for kind in ("rows", "queries")] if searched else [])
                ),
            ),
        )
    log.info(
        "routed join: %d list group(s) of %d lists, each read once for %d query piece(s) in %d route(s)",
        len(layout.groups),
        nlist,
        len(pieces),
        len(runs),
    )
    return run_stage(
        client,
        manifest,
        Stage(
            name="routed_score",
            items=layout.groups,
            result=Scored,
            task=lambda g: ScoreTask(index_dir=index_dir, query_store=query_store, runs=runs, group=g, layout=layout),
            files=lambda g: [layout.partial_path(g.index, kind) for kind in PARTIAL_KINDS],
        ),
    )


def forget_other_layouts(manifest: Manifest, layout: RoutedLayout, runs: Sequence[PieceRun]) -> None:
    """Routes and list groups an interrupted join recorded done without this layout's files (an
    earlier version's: a route without its pairs, a route a piece where this join routes runs of
    them, a partial file a (group, piece)) are done again."""
    routed = manifest.done_pieces("routed_route")
    for r in runs:
        if r.index in routed and not all(nodes.present(layout.pairs_path(r, k)) for k in ("slots", "lists")):
            manifest.forget_piece("routed_route", r.index)
    scored = manifest.done_pieces("routed_score")
    for g in layout.groups:
        if g.index in scored and not nodes.present(layout.partial_path(g.index, "starts")):
            manifest.forget_piece("routed_score", g.index)


def routed_lists(layout: RoutedLayout, pieces: Sequence[Piece]) -> tuple[np.ndarray, np.ndarray]:
    """The lists of a run of pieces (in number order; the join's rows, one after another) merged
    from every group's partial lists: (scores in the metric's convention, global rows), best
    first, ``layout.width`` wide, ``-1`` where fewer were found. Each group's files are read once
    for the whole run (:func:`partial_run`), so the merge reads groups x runs ranges, not groups x
    pieces (at 10^9 x 768, some 10^4 groups x 2 x 10^4 pieces). Each group's partial lists go into
    one heap per query (only the queries that group saw), in group order, so the merge is the same
    on every run, whatever pieces share a task."""
    numbers = [p.index for p in pieces]
    if numbers != sorted(set(numbers)):
        raise ValueError(f"routed merge: pieces {numbers} are not in number order")
    first, last, w = numbers[0], numbers[-1], layout.width
    base = np.full(last - first + 1, -1, dtype=np.int64)  # each piece number's first row in the run (-1: not in it)
    base[np.array(numbers) - first] = np.cumsum([0] + [p.rows for p in pieces[:-1]])
    heap = faiss.ResultHeap(sum(p.rows for p in pieces), w, keep_max=True)  # scores kept higher-better (l2 negated)
    for g in layout.groups:
        picked, scores, rows, counts = partial_run(layout, g.index, first, last)
        offset = np.repeat(base, counts)
        ours = offset >= 0  # a piece between the run's (done already, on a resumed join) is skipped
        picked = np.ascontiguousarray(picked[ours] + offset[ours])
        scores, rows = np.ascontiguousarray(scores[ours]), np.ascontiguousarray(rows[ours])
        scores[rows < 0] = -np.inf  # empty slots never displace a found row
        if picked.size:
            heap.heaps.addn_query_subset_with_ids(
                len(picked), faiss.swig_ptr(picked), w, faiss.swig_ptr(scores), faiss.swig_ptr(rows), w
            )
    heap.finalize()
    return (heap.D if layout.similarity else -heap.D), heap.I
