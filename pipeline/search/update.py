"""Rejoining what an input update touched (:mod:`pipeline.io.layout`), not everything.

After the index took in new rows and let removed ones go, a self-join's lists are brought to what
a fresh join with the same index and settings would write. The pieces of new and rewritten files
are joined in full (the usual join, :mod:`pipeline.search.join`); then every other piece is
*patched* from its lists as global rows (``knn/``):

- a query one of whose neighbours left (a row of a removed or rewritten file) loses it, and its
  spare candidates move up; it is searched again only when fewer than ``k`` are left;
- a new row enters a query's list when it scores at or above the list's *floor* (the score every
  row the list does not hold is at or below; :class:`pipeline.shuffle.edges.KeptLists`). The
  piece's queries meet the new rows one new piece's partial index at a time: on IVF-Flat plans
  each query is scored against the new rows of the lists it probes (its probes kept with its
  lists), elsewhere it searches the piece ``k`` and the spare deep. So each query meets exactly
  the new rows a search of the whole index would show it. A new row's own list says little about
  the lists it enters: with inner products over rows of unequal norms a long row belongs in many
  lists while its own holds other long rows.

A piece none of whose queries changed is left alone; a changed one has its lists and neighbour
table rewritten whole, atomically. Patching twice gives the same lists (repeats are dropped), so a
patch killed part way is simply done again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.backends.lists import coarse_assign, is_ivf_flat, search_above
from pipeline.backends.worker import worker_device
from pipeline.index.fill import part_index
from pipeline.io.atomic import atomic_path
from pipeline.io.layout import in_holes
from pipeline.io.parquet import Piece
from pipeline.io.store import RowStore
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import Stage, run_stage
from pipeline.search.join import (
    KEPT_PROBES_MAX,
    ROW_GROUP_ROWS,
    TABLE_OPTIONS,
    SearchPlan,
    knn_path,
    listed_table,
    search_batch,
    shared_index,
    to_padded,
)
from pipeline.shuffle.edges import read_kept_lists, searched_floor, write_knn

__all__ = ["Patched", "PatchTask", "patch_pieces", "neighbour_table", "spare_for"]

log = logging.getLogger(__name__)

SEARCH_ROWS = 16_384  # queries searched again per batch
NEW_ROWS_BATCH = 65_536  # queries searched against the new rows at once (one pass over their small lists)
SPARE_PER_K = 1  # spare candidates a self-join keeps per neighbour: a list survives losing half of itself


def spare_for(k: int) -> int:
    """Candidates past ``k`` that a self-join keeps in ``knn/``: with ``k`` spare, a query is searched
    again only when more than half of its ``2k`` candidates left (under 0.1% of queries for k=10
    when a fifth of the rows leave at random), for 10 to 25% more join time (1M x 128 on 2 cores:
    19.9 to 21.4 s against 16.4 to 19.7 s without). ``k / 2`` spare cost about 10%, but an update
    removing a fifth of the rows then searched 5% of the queries again and took 0.53 to 0.55x a
    fresh run instead of 0.47x."""
    return SPARE_PER_K * k


@dataclass(frozen=True)
class Patched:
    """One patched piece: queries searched again (a neighbour left), queries whose lists took in
    new rows, and whether its files were rewritten."""

    searched: int = 0
    merged: int = 0
    dropped: int = 0  # queries that lost a neighbour (searched again only past their spare)
    rewritten: bool = False


def neighbour_table(store: RowStore, piece: int, rows: np.ndarray, scores: np.ndarray) -> pa.Table:
    """A piece's neighbour table (``query_id``, ``neighbor_id``, ``score``) from its padded lists."""
    valid = rows >= 0
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    return listed_table(store.ids(piece), offsets, store.gather_ids(rows[valid]), scores[valid])


def _ordered_keys(rank: np.ndarray) -> np.ndarray:
    """``uint32`` keys sorting as the float32 ``rank`` does (finite values; ``-0`` as ``+0``)."""
    bits = (rank.astype(np.float32) + np.float32(0)).view(np.uint32)
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(1 << 31))


def _best_offers(q: np.ndarray, r: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """The order of offers ``(q, r, rank)`` by query, best rank first, then row, each ``(q, r)``
    once (its best offer). Two sorts of one key each (rows, then query and rank packed in 64
    bits); the pairs are hashed to find repeats, which only a patch done again makes."""
    by_row = np.argsort(r)  # rows offered twice to one query are repeats: their order is moot
    packed = (q[by_row].astype(np.uint64) << np.uint64(32)) | _ordered_keys(rank[by_row])
    order = by_row[np.argsort(packed, kind="stable")]
    pairs = np.sort(q.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + r.astype(np.uint64))  # wraps: a hash
    if not (pairs[1:] == pairs[:-1]).any():  # distinct hashes: no pair offered twice
        return order
    _, first = np.unique(np.stack([q[order], r[order]], axis=1), axis=0, return_index=True)  # first: best
    return order[np.sort(first)]


def _merge(
    rows: np.ndarray, scores: np.ndarray, *, q: np.ndarray, r: np.ndarray, s: np.ndarray, higher_better: bool
) -> np.ndarray:
    """Merge candidates ``(q, r, s)`` (local query, global row, score) into the padded lists in
    place, keeping each query's best; return the queries whose lists changed.

    A row a list holds already keeps its place (only a patch done again offers one), a row offered
    twice enters once at its better score, and equal scores keep the list's order, the list's
    entries first. Each touched query's list and its best candidates are sorted together once
    (a small matrix, row by row)."""
    q, r, s = np.asarray(q, dtype=np.int64), np.asarray(r, dtype=np.int64), np.asarray(s, dtype=np.float32)
    fresh = ~(rows[q] == r[:, None]).any(axis=1)
    q, r, s = q[fresh], r[fresh], s[fresh]
    if not q.size:
        return q
    order = _best_offers(q, r, -s if higher_better else s)  # by query, best first, each row once
    q, r, s = q[order], r[order], s[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]])
    touched, counts = q[starts], np.diff(np.r_[starts, q.size])
    line = np.repeat(np.arange(touched.size), counts)
    width = rows.shape[1]
    slot = np.arange(q.size) - starts[line]
    keep = slot < width  # more than a list's width of candidates cannot all enter
    extra = int(min(width, counts.max()))
    cand_rows = np.full((touched.size, extra), -1, dtype=np.int64)
    cand_scores = np.full((touched.size, extra), np.nan, dtype=np.float32)
    cand_rows[line[keep], slot[keep]] = r[keep]
    cand_scores[line[keep], slot[keep]] = s[keep]
    old_rows, old_scores = rows[touched], scores[touched]
    all_rows = np.hstack([old_rows, cand_rows])
    all_scores = np.hstack([old_scores, cand_scores]).astype(np.float32)
    worst = -np.inf if higher_better else np.inf
    key = np.where(all_rows >= 0, all_scores, worst)
    best = np.argsort(-key if higher_better else key, axis=1, kind="stable")[:, :width]
    new_rows = np.take_along_axis(all_rows, best, axis=1)
    new_scores = np.take_along_axis(all_scores, best, axis=1)
    changed = (new_rows != old_rows).any(axis=1)
    rows[touched], scores[touched] = new_rows, new_scores
    return touched[changed]


def _drop(rows: np.ndarray, scores: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Drop the entries at ``out`` from the padded lists in place, the rest moved up in order;
    return the lists that lost any."""
    lost = np.asarray(out.any(axis=1))
    at = np.flatnonzero(lost)  # only the lists that lost any are moved up
    if at.size:
        gone = out[at]
        kept_rows, kept_scores = np.where(gone, -1, rows[at]), np.where(gone, np.nan, scores[at]).astype(np.float32)
        order = np.argsort(kept_rows < 0, axis=1, kind="stable")
        rows[at] = np.take_along_axis(kept_rows, order, axis=1)
        scores[at] = np.take_along_axis(kept_scores, order, axis=1)
    return lost


def _raised(floor: np.ndarray, other: np.ndarray, higher_better: bool) -> np.ndarray:
    """The higher of two floors (the lower, for l2): the claim both sides can make."""
    return np.maximum(floor, other) if higher_better else np.minimum(floor, other)


def _offers_floor(q: np.ndarray, s: np.ndarray, queries: int, width: int, higher_better: bool) -> np.ndarray:
    """Per query, the score every new row it was not offered is at or below (above, for l2): the
    last of its offers where it got a full list of ``width``, else the worst (it met every one)."""
    worst = -np.inf if higher_better else np.inf
    out = np.full(queries, worst, dtype=np.float32)
    if q.size:
        full = np.bincount(q, minlength=queries) >= width
        last = np.full(queries, np.inf if higher_better else -np.inf, dtype=np.float32)
        (np.minimum if higher_better else np.maximum).at(last, q, s)
        out[full] = last[full]
    return out


@dataclass(frozen=True)
class _Offers:
    """New rows offered to a piece's lists: ``(queries, rows, scores)`` as local query, global
    row, score; the floor they leave per query; the queries' probes where they were used."""

    queries: np.ndarray
    rows: np.ndarray
    scores: np.ndarray
    floor: np.ndarray
    probes: np.ndarray | None


@dataclass(frozen=True, kw_only=True)
class PatchTask:
    """Bring one query piece's lists up to date with an updated index (see the module doc)."""

    plan: SearchPlan
    store: RowStore
    piece: Piece
    holes: tuple[tuple[int, int], ...]  # global rows that left: (start, rows) of retired pieces
    new: tuple[int, ...]  # the pieces joined in full: their rows are offered to this piece's lists
    out: str  # the neighbour table
    knn: str

    def run(self) -> Patched:
        plan, store, piece = self.plan, self.store, self.piece
        higher = plan.metric != "l2"
        kept = read_kept_lists(self.knn, higher_better=higher)
        rows, scores, k, floor = kept.rows, kept.scores, kept.k, kept.floor
        # neighbours that left are dropped: the spare candidates behind them move up (the floor
        # stays: the rows nobody listed are still at or below it)
        left = _drop(rows, scores, in_holes(rows, self.holes) & (rows >= 0))
        # new rows a search would show each query, above its floor (see _offered)
        offered = self._offered(floor, kept.probes)
        floor = _raised(floor, offered.floor, higher)
        under = (scores < floor[:, None]) if higher else (scores > floor[:, None])
        trimmed = _drop(rows, scores, (rows >= 0) & under)
        q, r, s = offered.queries, offered.rows, offered.scores
        above = (s >= floor[q]) if higher else (s <= floor[q])
        merged = _merge(rows, scores, q=q[above], r=r[above], s=s[above], higher_better=higher)
        # fewer than k left above the floor: searched again
        searched = np.flatnonzero((left | trimmed) & ((rows >= 0).sum(axis=1) < k))
        if searched.size:
            self._search_again(rows, scores, searched)
            floor[searched] = searched_floor(rows[searched], scores[searched], higher_better=higher)
        full = rows[:, -1] >= 0  # a full list dropped what came after it: its last score bounds the rest
        floor = np.where(full, _raised(floor, scores[:, -1], higher), floor).astype(np.float32)
        changed = bool(left.any() or trimmed.any() or merged.size)
        if changed:
            table = neighbour_table(store, piece.index, rows[:, :k], scores[:, :k])
            with atomic_path(self.out) as tmp:
                pq.write_table(table, str(tmp), row_group_size=ROW_GROUP_ROWS, **TABLE_OPTIONS)
        probes = offered.probes if offered.probes is not None and offered.probes.shape[1] <= KEPT_PROBES_MAX else None
        if changed or (probes is not None and kept.probes is None):  # probes kept for the next update
            write_knn(self.knn, rows, scores, k=k, floor=floor, probes=probes)
        if not changed:
            return Patched()
        return Patched(searched=int(searched.size), merged=int(merged.size), dropped=int(left.sum()), rewritten=True)

    def _offered(self, floor: np.ndarray, probes: np.ndarray | None) -> _Offers:
        """The new rows a search would show each of the piece's queries at or above its
        ``floor``, and the floor that leaves (the new rows it was not shown are at or below it).

        The new pieces are taken one at a time, each through its partial index (one piece's rows
        in memory at once). IVF-Flat plans (no re-rank) score each query against the new rows of
        the lists it probes (``probes``, kept with its lists, else assigned now and returned to be
        kept) and keep every one above the floor: the floor stays. Other plans search each new
        piece ``k`` and the spare deep (exactly over its stored vectors where the fill kept no
        partial index); a query shown a full list of a piece gets its last score as a floor."""
        plan, store, piece = self.plan, self.store, self.piece
        higher = plan.metric != "l2"
        floor_after = np.full(piece.rows, -np.inf if higher else np.inf, dtype=np.float32)
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        vectors = store.mapped_vectors(piece.index)
        batches = [(lo, min(piece.rows, lo + NEW_ROWS_BATCH)) for lo in range(0, piece.rows, NEW_ROWS_BATCH)]
        for new in self.new:
            index = None if plan.strategy == "exact" else part_index(plan.index_dir, new)
            if index is not None and not plan.rerank and plan.nprobe and is_ivf_flat(index):
                ivf = cast(faiss.IndexIVFFlat, faiss.downcast_index(index))
                probes = self._probes(ivf, vectors, batches, probes)
                with worker_device():  # the worker's cores, one heavy task at a time
                    for lo, hi in batches:
                        x = np.ascontiguousarray(vectors[lo:hi], dtype=np.float32)
                        q, r, s = search_above(ivf, x, probes[lo:hi], floor[lo:hi], faiss.omp_get_max_threads())
                        found.append((lo + q, r, s))
                continue
            q, r, s = self._search_new(index, new, vectors, batches)
            shown = _offers_floor(q, s, piece.rows, plan.k + plan.spare, higher)  # per new piece: the worst it left
            floor_after = _raised(floor_after, shown, higher)
            found.append((q, r, s))
        if not found:
            none = np.zeros(0, np.int64)
            return _Offers(none, none, np.zeros(0, np.float32), floor_after, probes)
        q, r, s = (np.concatenate([f[i] for f in found]) for i in range(3))
        return _Offers(q, r.astype(np.int64), s.astype(np.float32), floor_after, probes)

    def _probes(
        self, ivf: faiss.IndexIVFFlat, vectors: np.ndarray, batches: list[tuple[int, int]], kept: np.ndarray | None
    ) -> np.ndarray:
        """The lists each of the piece's queries probes: ``kept`` with its lists, else assigned."""
        nprobe = min(int(self.plan.nprobe or 1), int(ivf.nlist))
        if kept is not None and kept.shape == (self.piece.rows, nprobe):
            return kept
        probes = np.empty((self.piece.rows, nprobe), dtype=np.int32)
        with worker_device():
            for lo, hi in batches:
                probes[lo:hi] = coarse_assign(
                    ivf.quantizer, np.ascontiguousarray(vectors[lo:hi], dtype=np.float32), nprobe
                )
        return probes

    def _search_new(
        self, index: faiss.Index | None, new: int, vectors: np.ndarray, batches: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(query, new row, score)``: the piece's queries searched against new piece ``new``
        alone, ``k`` and the spare deep: through its partial index, else exactly."""
        plan, store, piece = self.plan, self.store, self.piece
        new_store = store
        if index is None:
            new_store = RowStore(store.root, store.starts, store.total_rows, (new,))
            plan = replace(plan, strategy="exact")
        ids = store.ids(piece.index)
        parts = []
        for lo, hi in batches:
            offsets, found_scores, found_rows = search_batch(
                index,
                plan,
                np.ascontiguousarray(vectors[lo:hi], dtype=np.float32),
                q_rows=piece.start + np.arange(lo, hi, dtype=np.int64),
                q_ids=ids.slice(lo, hi - lo),
                index_store=new_store,
            )
            q = lo + np.repeat(np.arange(hi - lo, dtype=np.int64), np.diff(offsets))
            parts.append((q, found_rows.astype(np.int64), found_scores.astype(np.float32)))
        q, r, s = (np.concatenate([p[i] for p in parts]) for i in range(3))
        return q, r, s

    def _search_again(self, rows: np.ndarray, scores: np.ndarray, local: np.ndarray) -> None:
        """Search the queries at ``local`` rows of the piece again, their lists replaced in place."""
        plan, store, piece = self.plan, self.store, self.piece
        index = shared_index(plan)
        vectors = store.mapped_vectors(piece.index)
        ids = store.ids(piece.index)
        for lo in range(0, local.size, SEARCH_ROWS):
            at = local[lo : lo + SEARCH_ROWS]
            offsets, found_scores, found_rows = search_batch(
                index,
                plan,
                np.ascontiguousarray(vectors[at]),
                q_rows=piece.start + at,
                q_ids=ids.take(pa.array(at)),
                index_store=store,
            )
            width = max(rows.shape[1], plan.k + plan.spare)
            got_rows = np.full((at.size, width), -1, dtype=np.int64)
            got_scores = np.full((at.size, width), np.nan, dtype=np.float32)
            to_padded(got_rows, got_scores, 0, offsets=offsets, rows=found_rows, scores=found_scores)
            rows[at], scores[at] = got_rows[:, : rows.shape[1]], got_scores[:, : rows.shape[1]]


def patch_pieces(
    client: Any,
    plan: SearchPlan,
    store: RowStore,
    *,
    pieces: Sequence[Piece],
    new: Sequence[Piece],
    holes: Sequence[tuple[int, int]],
    out_dir: Path,
    manifest: Manifest,
) -> tuple[Patched, tuple[int, ...]]:
    """Patch every piece of ``pieces`` not patched yet (stage ``patch``) against the ``new``
    pieces' rows and the ``holes``; re-record the rewritten ones in the ``join`` stage. Returns
    the totals and the pieces rewritten."""
    assert plan.knn_dir is not None
    knn_dir = plan.knn_dir
    new_pieces = tuple(sorted(p.index for p in new))

    def files(p: Piece) -> list[Path]:
        return [out_dir / f"part-{p.index:05d}.parquet", knn_path(knn_dir, p.index)]

    results = run_stage(
        client,
        manifest,
        Stage(
            name="patch",
            items=pieces,
            result=Patched,
            task=lambda p: PatchTask(
                plan=plan,
                store=store,
                piece=p,
                holes=tuple(holes),
                new=new_pieces,
                out=str(files(p)[0]),
                knn=str(files(p)[1]),
            ),
            files=files,
            # the join's record follows the files the patch rewrote before the patch counts as done
            before_record=lambda p, _: manifest.mark_piece("join", p.index, files(p)),
        ),
    )
    rewritten = tuple(sorted(i for i, r in results.items() if r.rewritten))
    total = Patched(
        searched=sum(r.searched for r in results.values()),
        merged=sum(r.merged for r in results.values()),
        dropped=sum(r.dropped for r in results.values()),
        rewritten=bool(rewritten),
    )
    return total, rewritten
