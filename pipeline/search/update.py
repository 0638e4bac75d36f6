"""Rejoining what an input update touched (:mod:`pipeline.io.layout`), not everything.

After the index took in new rows and let removed ones go, a self-join's lists are brought to what
a fresh join with the same index and settings would write. The pieces of new and rewritten files
are joined in full (the usual join, :mod:`pipeline.search.join`); then every other piece is
*patched* from its lists as global rows (``knn/``):

- a query one of whose neighbours left (a row of a removed or rewritten file) is searched again;
- a new row enters a query's list when it beats the query's k-th score. Those are found from the
  new rows' own lists (reverse neighbours: new row ``r`` listing query ``q`` at score ``s``), so
  the list takes them in without a search (scores are symmetric).

A piece none of whose queries changed is left alone; a changed one has its lists and neighbour
table rewritten whole, atomically. Patching twice gives the same lists (repeats are dropped), so a
patch killed part way is simply done again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.atomic import atomic_path
from pipeline.io.layout import in_holes
from pipeline.io.parquet import Piece
from pipeline.io.store import RowStore
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import Stage, run_stage
from pipeline.search.join import (
    ROW_GROUP_ROWS,
    TABLE_OPTIONS,
    SearchPlan,
    knn_path,
    listed_table,
    search_batch,
    shared_index,
    to_padded,
)
from pipeline.shuffle.edges import read_knn_spare, read_partition, write_knn, write_partitioned

__all__ = ["Patched", "PatchTask", "patch_pieces", "neighbour_table", "spare_for"]

log = logging.getLogger(__name__)

SEARCH_ROWS = 16_384  # queries searched again per batch
SPARE_PER_K = 1  # spare candidates a self-join keeps per neighbour: a list survives losing half of itself


REVERSE_PER_K = 8  # an update's new rows keep lists 8k deep: the queries they enter are found from them


def spare_for(k: int, *, update: bool = False) -> int:
    """Candidates past ``k`` that a self-join keeps in ``knn/``: with ``k`` spare, a query is searched
    again only when more than half of its ``2k`` candidates left (under 0.1% of queries for k=10
    when a fifth of the rows leave at random), for 10 to 25% more join time (1M x 128 on 2 cores:
    19.9 to 21.4 s against 16.4 to 19.7 s without). ``k / 2`` spare cost about 10%, but an update
    removing a fifth of the rows then searched 5% of the queries again and took 0.53 to 0.55x a
    fresh run instead of 0.47x.

    ``update``: the spare of the new rows of an update, whose lists are read backwards (a query
    takes in a new row that lists it): ``8k`` deep, since the new row may rank a query far below
    where the query ranks it."""
    return (REVERSE_PER_K - 1) * k if update else SPARE_PER_K * k


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


REVERSE_FIELDS = ("q", "r", "s")  # the query's global row, the new row listing it, its score
REVERSE_ROWS = 16_384  # rows of a new piece's lists one reverse task reads


@dataclass(frozen=True)
class _Slice:
    """Rows ``[lo, hi)`` of a new piece's lists: one reverse task (``index``: its number)."""

    index: int
    piece: Piece
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True, kw_only=True)
class ReverseTask:
    """Read one new piece's lists (rows from ``first``) once and write their entries partitioned
    by the piece to patch whose query they list (``starts``/``ends``: those pieces' global rows,
    in partition order), under ``out_dir``: each patch task then reads its own partition by range
    instead of every new piece's lists."""

    knn: str
    first: int
    lo: int  # the rows of the piece's lists this task reads: [lo, hi)
    hi: int
    starts: np.ndarray
    ends: np.ndarray
    out_dir: str

    def run(self) -> int:
        rows, scores, _ = read_knn_spare(self.knn, rows=(self.lo, self.hi))
        valid = rows >= 0
        q, s = rows[valid], scores[valid]
        line = np.repeat(np.arange(self.lo, self.lo + len(rows), dtype=np.int64), valid.sum(axis=1))
        order = np.argsort(self.starts, kind="stable")
        at = np.searchsorted(self.starts[order], q, side="right") - 1
        part = order[np.maximum(at, 0)]
        inside = (at >= 0) & (q < self.ends[part])  # rows of new pieces are nobody's to patch
        write_partitioned(
            self.out_dir,
            part[inside],
            len(self.starts),
            {"q": q[inside], "r": self.first + line[inside], "s": s[inside].astype(np.float32)},
        )
        return int(inside.sum())


@dataclass(frozen=True, kw_only=True)
class PatchTask:
    """Bring one query piece's lists up to date with an updated index (see the module doc)."""

    plan: SearchPlan
    store: RowStore
    piece: Piece
    holes: tuple[tuple[int, int], ...]  # global rows that left: (start, rows) of retired pieces
    reverse: tuple[str, ...]  # the ReverseTask outputs of the pieces joined in full
    part: int  # this piece's partition in them
    out: str  # the neighbour table
    knn: str

    def run(self) -> Patched:
        plan, store, piece = self.plan, self.store, self.piece
        rows, scores, k = read_knn_spare(self.knn)
        higher = plan.metric != "l2"
        # neighbours that left are dropped: the spare candidates behind them move up
        gone = in_holes(rows, self.holes) & (rows >= 0)
        left = np.asarray(gone.any(axis=1))
        if left.any():
            rows, scores = np.where(gone, -1, rows), np.where(gone, np.nan, scores).astype(np.float32)
            order = np.argsort(rows < 0, axis=1, kind="stable")
            rows, scores = np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)
        lost = left & ((rows >= 0).sum(axis=1) < k)  # fewer than k left: searched again
        searched = np.flatnonzero(lost)
        if searched.size:
            self._search_again(rows, scores, searched)
        # reverse neighbours: new rows whose lists (spare included) hold this piece's queries
        found = read_partition(self.reverse, self.part, REVERSE_FIELDS)
        cq = found["q"].astype(np.int64) - piece.start
        cr = found["r"].astype(np.int64)
        cs = found["s"].astype(np.float32)
        last = scores[:, -1]  # the list's last score (spare included): a new row beating it belongs in it
        full = rows[:, -1] >= 0
        better = (cs > last[cq]) if higher else (cs < last[cq])
        # every list takes them in, those just searched again too: a second patch changes nothing
        enters = better | ~full[cq]
        merged = _merge(rows, scores, q=cq[enters], r=cr[enters], s=cs[enters], higher_better=higher)
        if not left.any() and not merged.size:
            return Patched()
        table = neighbour_table(store, piece.index, rows[:, :k], scores[:, :k])
        with atomic_path(self.out) as tmp:
            pq.write_table(table, str(tmp), row_group_size=ROW_GROUP_ROWS, **TABLE_OPTIONS)
        write_knn(self.knn, rows, scores, k=k)
        return Patched(searched=int(searched.size), merged=int(merged.size), dropped=int(left.sum()), rewritten=True)

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
    work_dir: Path,
) -> tuple[Patched, tuple[int, ...]]:
    """Patch every piece of ``pieces`` not patched yet (stage ``patch``) against the ``new``
    pieces' lists and the ``holes``; re-record the rewritten ones in the ``join`` stage. Returns
    the totals and the pieces rewritten.

    The new pieces' lists are read once each (stage ``patch_reverse``, under ``work_dir``) and
    their entries partitioned by the piece whose query they list."""
    assert plan.knn_dir is not None
    knn_dir = plan.knn_dir
    starts = np.array([p.start for p in pieces], dtype=np.int64)
    ends = starts + np.array([p.rows for p in pieces], dtype=np.int64)
    # each new piece's lists in slices of REVERSE_ROWS rows: tasks that share the cores
    slices: list[_Slice] = []
    for p in new if pieces else ():  # nothing to patch: nothing to partition for
        for lo in range(0, p.rows, REVERSE_ROWS):
            slices.append(_Slice(len(slices), p, lo, min(lo + REVERSE_ROWS, p.rows)))
    reverse = [str(work_dir / f"from-{c.piece.index:05d}-{c.lo:09d}") for c in slices]
    run_stage(
        client,
        manifest,
        Stage(
            name="patch_reverse",
            items=slices,
            task=lambda c: ReverseTask(
                knn=str(knn_path(knn_dir, c.piece.index)),
                first=c.piece.start,
                lo=c.lo,
                hi=c.hi,
                starts=starts,
                ends=ends,
                out_dir=reverse[c.index],
            ),
            files=lambda c: [Path(reverse[c.index]) / "bounds.npy"],
        ),
    )
    sources = tuple(reverse)
    part_of = {p.index: i for i, p in enumerate(pieces)}

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
                reverse=sources,
                part=part_of[p.index],
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
