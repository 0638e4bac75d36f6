"""The routed join of an IVF-Flat index: each group of inverted lists is read once per join.

The batched join (:func:`pipeline.backends.lists.list_major_search` per query batch) reads every
list its batch probes, once per batch: a join of ``n`` queries in batches of ``b`` reads the
index ``n / b`` times, and every worker maps all of it. Here the join is turned inside out, as
FAISS's ``contrib.big_batch_search`` does on one machine, over Dask:

1. **route** (a task per query piece): the piece's queries are assigned to their ``nprobe``
   nearest lists (the coarse quantizer only), written as ``route/piece-NNNNN.npy``;
2. **score** (a task per *list group*: consecutive lists of at most ``GROUP_BYTES`` of vectors):
   the group's lists are read once, and every query piece's routed queries are scored against
   them, list by list with one matrix product each, piece after piece (memory: the group, one
   piece's queries and their heaps); each (group, piece) writes its partial top lists;
3. **merge**: the join's own piece tasks merge each piece's partials into its lists (exact
   scores, self-exclusion, ids, the tables), as the exact join by pairs does.

The result equals the batched join's at the same ``nprobe`` up to ties. Each stage is recorded
in the output manifest, so a killed join resumes where it stopped; the partial lists are removed
once every piece's table is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.backends.lists import coarse_assign, list_major_search, list_views, two_level
from pipeline.backends.worker import worker_device
from pipeline.index.ordered import OrderedGroup, read_group
from pipeline.index.shape import IndexShape
from pipeline.io.atomic import write_npz
from pipeline.io.nodes import fetched
from pipeline.io.parquet import Piece
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
    "route_and_score",
    "routed_lists",
]

log = logging.getLogger(__name__)

ROUTED_DIR = "_routed"
GROUP_BYTES = 256 << 20  # vectors a list group holds at most (one score task holds one group)
MIN_GROUPS = 4  # by default at least this many groups (as lists allow), so several workers share the scoring


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
    rerank: bool = False  # lossy codes: each group's candidates re-ranked from its vectors in list order
    dim: int = 0

    def route_path(self, piece: int) -> Path:
        return Path(self.folder) / "route" / f"piece-{piece:05d}.npz"

    def partial_path(self, group: int, piece: int) -> Path:
        return Path(self.folder) / "partial" / f"group-{group:05d}" / f"piece-{piece:05d}.npz"


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
    """Assign one query piece's queries to their ``nprobe`` nearest lists (the coarse quantizer)."""

    index_dir: str
    query_store: RowStore
    piece: Piece
    nprobe: int
    out: str

    def run(self) -> None:
        from pipeline.index.fill import load_lists

        index = load_lists(self.index_dir, 0, 0)  # the coarse quantizer: no list's bytes are read
        ivf = faiss.extract_index_ivf(index)
        q = np.ascontiguousarray(self.query_store.vectors(self.piece.index))
        with worker_device():  # the quantizer's search on the worker's threads
            assign = coarse_assign(ivf.quantizer, q, self.nprobe)
        write_npz(self.out, assign=assign.astype(np.int64))


@dataclass(frozen=True)
class Scored:
    """One list group scored: the routed queries it scored, the bytes of its lists (read once),
    and the worker that ran it."""

    queries: int
    list_bytes: int
    worker: str


@dataclass(frozen=True, kw_only=True)
class ScoreTask:
    """Read one list group once and score every piece's queries routed to it (see the module)."""

    index_dir: str
    query_store: RowStore
    pieces: tuple[Piece, ...]
    group: ListGroup
    layout: RoutedLayout

    def run(self) -> Scored:
        from pipeline.index.fill import load_lists

        g = self.group
        index = load_lists(self.index_dir, g.first, g.last)  # its mapped pages leave with the task
        ivf: Any = faiss.downcast_index(faiss.extract_index_ivf(index))
        g, layout = self.group, self.layout
        if layout.rerank:
            return self._rerank_group(ivf)
        progress = PieceProgress("routed score", g.index)
        scored = 0
        for piece in self.pieces:
            with np.load(fetched(layout.route_path(piece.index))) as z:
                assign = z["assign"]
            inside = (assign >= g.first) & (assign < g.last)
            picked = np.flatnonzero(inside.any(axis=1))
            if picked.size:
                # only the routed rows, gathered from the memory map: a group meets a share of each
                # piece's queries (about nprobe / groups of them at scale), so reading whole pieces would
                # read the query store once per group; this reads each query about once per list group
                # it is routed to (at most nprobe times), as faiss's big_batch_search does
                q = np.ascontiguousarray(self.query_store.mapped_vectors(piece.index)[picked])
                lists = np.where(inside[picked], assign[picked], -1)
                with worker_device():  # every core walks the group's lists for its share of the queries
                    scores, rows = list_major_search(ivf, q, layout.width, layout.nprobe, assign=lists)
                if not layout.similarity:  # squared distances, kept negated (higher is better)
                    scores = -scores
                scored += int(picked.size)
            else:
                scores = np.zeros((0, layout.width), np.float32)
                rows = np.zeros((0, layout.width), np.int64)
            write_npz(layout.partial_path(g.index, piece.index), queries=picked, scores=scores, rows=rows)
            progress.advance(piece.rows)
        result = Scored(queries=scored, list_bytes=g.rows * int(ivf.code_size), worker=worker_name())
        del ivf, index  # unmaps the lists read
        return result

    def _routed(self, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
        """The queries of ``piece`` routed to this group, and their lists here (``-1``: elsewhere)."""
        g = self.group
        with np.load(fetched(self.layout.route_path(piece.index))) as z:
            assign = z["assign"]
        inside = (assign >= g.first) & (assign < g.last)
        picked = np.flatnonzero(inside.any(axis=1))
        return picked, np.where(inside[picked], assign[picked], -1)

    def _rerank_group(self, ivf: Any) -> Scored:
        """Lossy codes: the group's lists searched by their codes for each routed query's
        ``width`` best candidates here (FAISS's ``search_preassigned``, the coarse distances
        recomputed from the centroids), re-ranked exactly from the group's vectors in list order,
        read once (:mod:`pipeline.index.ordered`). Each group's candidates include every one the
        batched search would have kept from its lists, so the recall is at least the batched plan's."""
        g, layout = self.group, self.layout
        vectors = read_group(self.index_dir, g.first, g.last, layout.dim)
        centroids = list_centroids(ivf.quantizer, g.first, g.last, layout.dim)
        progress = PieceProgress("routed score", g.index)
        w, metric = layout.width, "ip" if layout.similarity else "l2"
        step = max(1, RERANK_BYTES // (w * layout.dim * 4))
        scored = 0
        for piece in self.pieces:
            picked, lists = self._routed(piece)
            scores = np.zeros((len(picked), w), np.float32)
            rows = np.full((len(picked), w), -1, np.int64)
            if picked.size:
                q = np.ascontiguousarray(self.query_store.mapped_vectors(piece.index)[picked], dtype=np.float32)
                with worker_device() as be:
                    for lo in range(0, len(q), step):
                        hi = min(len(q), lo + step)
                        keys = np.ascontiguousarray(lists[lo:hi])
                        dis = coarse_distances(q[lo:hi], centroids, keys - g.first, layout.similarity)
                        found = search_assigned(ivf, q[lo:hi], w, keys, dis)
                        scores[lo:hi], rows[lo:hi] = rerank_in_group(be, q[lo:hi], found, vectors, metric)
                if not layout.similarity:  # squared distances, kept negated (higher is better)
                    scores = -scores
                scored += int(picked.size)
            write_npz(layout.partial_path(g.index, piece.index), queries=picked, scores=scores, rows=rows)
            progress.advance(piece.rows)
        codes = g.rows * int(ivf.code_size)
        return Scored(queries=scored, list_bytes=codes + vectors.nbytes, worker=worker_name())


RERANK_BYTES = 64 << 20  # candidates' vectors gathered at once: routed queries are searched and re-ranked in chunks


def list_centroids(quantizer: faiss.Index, first: int, last: int, dim: int) -> np.ndarray:
    """The centroids of lists ``[first, last)``: a flat quantizer's rows, or a two-level
    quantizer's, found in its own lists by their ids (the centroid numbers)."""
    nested = two_level(quantizer)
    if nested is None:
        return np.asarray(quantizer.reconstruct_n(first, last - first), dtype=np.float32).reshape(-1, dim)
    out = np.zeros((last - first, dim), dtype=np.float32)
    for view in list_views(nested, np.arange(nested.nlist)).values():
        inside = (view.ids >= first) & (view.ids < last)
        out[view.ids[inside] - first] = view.stored[inside]
    return out


def coarse_distances(q: np.ndarray, centroids: np.ndarray, at: np.ndarray, similarity: bool) -> np.ndarray:
    """Each query's score to each of its lists (``at``: the list's place in ``centroids``,
    negative for none): what the coarse quantizer would have reported."""
    c = centroids[np.maximum(at, 0)]
    if similarity:
        return np.ascontiguousarray(np.einsum("nd,npd->np", q, c), dtype=np.float32)
    diff = q[:, None, :] - c
    return np.ascontiguousarray(np.einsum("npd,npd->np", diff, diff), dtype=np.float32)


def search_assigned(ivf: Any, q: np.ndarray, k: int, keys: np.ndarray, dis: np.ndarray) -> np.ndarray:
    """The ``k`` best stored rows by their codes among each query's lists ``keys`` (``-1``
    skipped), as global rows (``-1`` where fewer)."""
    n = len(q)
    params = faiss.SearchParametersIVF()
    params.nprobe = int(keys.shape[1])
    distances = np.empty((n, k), dtype=np.float32)
    labels = np.empty((n, k), dtype=np.int64)
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    ivf.search_preassigned_c(
        n,
        faiss.swig_ptr(q),
        k,
        faiss.swig_ptr(keys),
        faiss.swig_ptr(dis),
        faiss.swig_ptr(distances),
        faiss.swig_ptr(labels),
        False,
        params,
    )
    return labels


def rerank_in_group(
    be: Any, q: np.ndarray, found: np.ndarray, group: OrderedGroup, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """``found``'s exact scores against the group's vectors, best first (missing rows last)."""
    at = group.place(found)
    exact = be.exact_scores(q, group.vectors[np.maximum(at, 0)], metric)
    similarity = metric != "l2"
    exact = np.where(at >= 0, exact, -np.inf if similarity else np.inf).astype(np.float32)
    order = np.argsort(-exact if similarity else exact, axis=1, kind="stable")
    rows = np.take_along_axis(np.where(at >= 0, found, -1), order, axis=1)
    scores = np.take_along_axis(exact, order, axis=1)
    return np.where(rows >= 0, scores, 0).astype(np.float32), rows


def route_and_score(
    client: Any,
    *,
    nlist: int,
    index_dir: str,
    query_store: RowStore,
    pieces: tuple[Piece, ...],
    layout: RoutedLayout,
    manifest: Manifest,
) -> dict[int, Scored]:
    """The route and score stages (``routed_route``, ``routed_score``), resumable; returns each
    group's :class:`Scored`."""
    run_stage(
        client,
        manifest,
        Stage(
            name="routed_route",
            items=pieces,
            task=lambda p: RouteTask(
                index_dir=index_dir,
                query_store=query_store,
                piece=p,
                nprobe=layout.nprobe,
                out=str(layout.route_path(p.index)),
            ),
            files=lambda p: [layout.route_path(p.index)],
        ),
    )
    log.info(
        "routed join: %d list group(s) of %d lists, each read once for %d query piece(s)",
        len(layout.groups),
        nlist,
        len(pieces),
    )
    return run_stage(
        client,
        manifest,
        Stage(
            name="routed_score",
            items=layout.groups,
            result=Scored,
            task=lambda g: ScoreTask(
                index_dir=index_dir, query_store=query_store, pieces=pieces, group=g, layout=layout
            ),
            files=lambda g: [layout.partial_path(g.index, p.index) for p in pieces],
        ),
    )


def routed_lists(layout: RoutedLayout, piece: Piece) -> tuple[np.ndarray, np.ndarray]:
    """One piece's lists merged from every group's partial lists: (scores in the metric's
    convention, global rows), best first, ``layout.width`` wide, ``-1`` where fewer were found.
    Each group's partial lists go into one heap per query (only the queries that group saw), in
    group order, so the merge is the same on every run."""
    n, w = piece.rows, layout.width
    heap = faiss.ResultHeap(n, w, keep_max=True)  # scores are kept higher-better (l2 negated)
    for g in layout.groups:
        with np.load(fetched(layout.partial_path(g.index, piece.index))) as z:
            picked = np.ascontiguousarray(z["queries"], dtype=np.int64)
            scores = np.ascontiguousarray(z["scores"], dtype=np.float32)
            rows = np.ascontiguousarray(z["rows"], dtype=np.int64)
        scores[rows < 0] = -np.inf  # empty slots never displace a found row
        if picked.size:
            heap.heaps.addn_query_subset_with_ids(
                len(picked), faiss.swig_ptr(picked), w, faiss.swig_ptr(scores), faiss.swig_ptr(rows), w
            )
    heap.finalize()
    return (heap.D if layout.similarity else -heap.D), heap.I
