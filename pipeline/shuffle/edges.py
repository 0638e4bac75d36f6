"""Edges between indexed rows: the self-join's neighbour lists, shuffled by source row.

A self-join run for dedup or a graph also writes each piece's neighbours as global rows
(``knn/part-NNNNN.npz``: ``rows`` and ``scores``, ``k`` columns, ``-1`` padded). From those, a
file shuffle partitions edges by source row. A *partition* is a run of consecutive pieces whose
edges fit a byte budget (:func:`pieces_per_part`). Each *map* task writes its partition's edges,
and the same edges reversed, as one array sorted by target partition with a bounds array. Each
*reduce* task reads its slice of every map output. So a task holds one partition's edges, never
the whole edge list. The reduce combines the two directions of a pair (flags say which were
found): ``symmetric`` keeps either, ``mutual`` only pairs found from both ends, ``directed`` the
lists as joined.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.atomic import atomic_path, npz_rows, write_npz
from pipeline.io.layout import in_holes
from pipeline.io.nodes import fetched, npy_rows
from pipeline.kinds import Metric

__all__ = [
    "FORWARD",
    "REVERSE",
    "MODES",
    "passes",
    "write_knn",
    "read_knn",
    "read_knn_src",
    "write_knn_blocks",
    "write_partitioned",
    "read_kept_lists",
    "searched_floor",
    "KeptLists",
    "read_partition",
    "MapEdgesTask",
    "EdgesMapped",
    "reduce_edges",
    "write_edges",
    "read_edges",
    "gather_1d",
    "degree_histogram",
    "in_mode",
    "merge_histograms",
    "Part",
    "pieces_per_part",
    "make_parts",
    "part_starts",
]

FORWARD, REVERSE = 1, 2  # flag bits: the edge came from the source's list / from the target's list
MODES = ("directed", "symmetric", "mutual")


def passes(scores: np.ndarray, threshold: float | None, metric: Metric) -> np.ndarray:
    """Scores at least as close as ``threshold``: similarity >= it, or (l2) squared distance <= it."""
    if threshold is None:
        return np.ones(np.shape(scores), dtype=bool)
    return scores <= threshold if metric == "l2" else scores >= threshold


# row-form neighbour lists, written by the join ---------------------------------------------
def write_knn(
    path: str | os.PathLike[str],
    rows: np.ndarray,
    scores: np.ndarray,
    src: np.ndarray | None = None,
    *,
    k: int | None = None,
    floor: np.ndarray | None = None,
    probes: np.ndarray | None = None,
) -> None:
    """Neighbour lists as global rows (``-1`` padded); ``src``: the query rows, when not a whole
    piece. ``k``: lists wider than ``k`` keep the entries past it apart, as spare candidates
    (:func:`read_knn` gives the first ``k``, :func:`read_knn_spare` all of them). ``floor`` and
    ``probes``: what an input update's patch keeps with the lists (:class:`KeptLists`)."""
    extra: dict[str, Any] = {} if src is None else {"src": np.asarray(src, dtype=np.int64)}
    if k is not None and rows.shape[1] > k:
        extra |= {"spare_rows": rows[:, k:].astype(np.int64), "spare_scores": scores[:, k:].astype(np.float32)}
        rows, scores = rows[:, :k], scores[:, :k]
    if floor is not None:
        extra["floor"] = np.asarray(floor, dtype=np.float32)
    if probes is not None:
        extra["probes"] = np.asarray(probes, dtype=np.int32)
    write_npz(path, rows=rows.astype(np.int64), scores=scores.astype(np.float32), **extra)


def read_knn(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    with np.load(fetched(path)) as z:
        return z["rows"], z["scores"]


def read_knn_spare(
    path: str | os.PathLike[str], rows: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """The lists with their spare candidates (``rows``, ``scores`` as wide as both) and ``k``;
    ``rows``: only the lists of queries ``[lo, hi)``, read from their places in the file."""
    with np.load(fetched(path)) if rows is None else contextlib.nullcontext(npz_rows(fetched(path), *rows)) as z:
        k = z["rows"].shape[1]
        if "spare_rows" in z:
            return np.hstack([z["rows"], z["spare_rows"]]), np.hstack([z["scores"], z["spare_scores"]]), k
        return z["rows"], z["scores"], k


@dataclass
class KeptLists:
    """A piece's kept lists as an input update's patch reads and writes them (``knn/``).

    ``floor``: per list, a score every row a search would show the query, and the list does not
    hold, is at or below (at or above, for l2). A searched list's floor is its last score when
    it is full, else the worst (the search listed every row it met); a patch keeps it as rows
    leave the list, so a list that lost rows still says how far it is complete. ``probes``: the
    lists each query searches (``-1`` past a two-level quantizer's candidates), where a patch
    stored them: they hold while the quantizer and ``nprobe`` do."""

    rows: np.ndarray
    scores: np.ndarray
    k: int
    floor: np.ndarray
    probes: np.ndarray | None


def read_kept_lists(path: str | os.PathLike[str], *, higher_better: bool) -> KeptLists:
    """:class:`KeptLists` of one piece; the floor worked out as a search leaves it where no patch
    stored one."""
    with np.load(fetched(path)) as z:
        rows, scores, k = z["rows"], z["scores"], z["rows"].shape[1]
        if "spare_rows" in z:
            rows, scores = np.hstack([rows, z["spare_rows"]]), np.hstack([scores, z["spare_scores"]])
        floor = z["floor"] if "floor" in z else None
        probes = z["probes"] if "probes" in z else None
    if floor is None:  # as the join wrote it
        floor = searched_floor(rows, scores, higher_better=higher_better)
    return KeptLists(rows, scores, k, floor, probes)


def searched_floor(rows: np.ndarray, scores: np.ndarray, *, higher_better: bool) -> np.ndarray:
    """The floor of lists a search filled (:class:`KeptLists`): each full list's last score, the
    worst score where the list is not full (the search listed every row it met). Lists are at
    least ``k >= 1`` wide."""
    worst = -np.inf if higher_better else np.inf
    return np.where(rows[:, -1] >= 0, scores[:, -1], worst).astype(np.float32)


def write_knn_blocks(path: str | os.PathLike[str], blocks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Lists of several widths for some rows: ``(src, rows, scores)`` blocks, each ``-1`` padded to
    its own width only (a few long lists do not pad every short one)."""
    arrays: dict[str, np.ndarray] = {}
    for i, (src, rows, scores) in enumerate(blocks):
        arrays[f"src_{i}"] = np.asarray(src, dtype=np.int64)
        arrays[f"rows_{i}"] = np.asarray(rows, dtype=np.int64)
        arrays[f"scores_{i}"] = np.asarray(scores, dtype=np.float32)
    write_npz(path, **arrays)


def read_knn_src(path: str | os.PathLike[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The ``(src, rows, scores)`` blocks :func:`write_knn_blocks` wrote."""
    with np.load(fetched(path)) as z:
        n = sum(1 for name in z.files if name.startswith("src_"))
        return [(z[f"src_{i}"], z[f"rows_{i}"], z[f"scores_{i}"]) for i in range(n)]


# a file shuffle: columns partitioned by a target partition number -----------------------------
@dataclass(frozen=True)
class Part:
    """Consecutive pieces shuffled as one partition: global rows ``[start, start + rows)``."""

    index: int
    pieces: tuple[int, ...]
    start: int
    rows: int


EDGE_BYTES = 21  # src, dst (int64), score (float32), flag (int8)


def pieces_per_part(pieces: Sequence[Any], k: int, budget: int) -> int:
    """How many consecutive pieces one shuffle partition takes: their edges (both ways) fit ``budget``.

    Pieces are sized by vector bytes; edges are sized by ``k``. Grouping keeps the number of
    partitions (and so of shuffle files, which grows with its square) in step with the edges.
    """
    biggest = max((int(p.rows) for p in pieces), default=1)
    return max(1, int(budget) // max(1, biggest * max(1, k) * 2 * EDGE_BYTES))


def make_parts(pieces: Sequence[Any], per_part: int) -> list[Part]:
    """Up to ``per_part`` consecutive pieces per partition; a partition's rows are contiguous, so a
    hole (the retired rows of an updated input, :mod:`pipeline.io.layout`) starts a new one."""
    groups: list[list[Any]] = []
    for p in pieces:
        last = groups[-1] if groups else None
        if last is None or len(last) >= per_part or last[-1].start + last[-1].rows != p.start:
            groups.append([p])
        else:
            last.append(p)
    return [
        Part(g, tuple(int(p.index) for p in group), int(group[0].start), int(sum(p.rows for p in group)))
        for g, group in enumerate(groups)
    ]


def part_starts(parts: Sequence[Part]) -> np.ndarray:
    return np.array([p.start for p in parts], dtype=np.int64)


def write_partitioned(
    directory: str | os.PathLike[str], part: np.ndarray, n_parts: int, columns: Mapping[str, np.ndarray]
) -> None:
    """Write ``columns`` sorted by ``part`` (0..n_parts-1), one structured array, with the bounds of each.

    The bounds file is written last: a directory without one is an unfinished map output.
    """
    d = Path(directory)
    # numpy's stable sort is a radix sort on 16-bit keys: partition numbers mostly fit
    order = np.argsort(part.astype(np.uint16) if n_parts <= 1 << 16 else part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(n_parts + 1), side="left").astype(np.int64)
    rows = np.empty(order.size, dtype=[(name, np.asarray(v).dtype) for name, v in columns.items()])
    for name, values in columns.items():
        rows[name] = np.asarray(values)[order]
    with atomic_path(d / "data.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, rows)
    with atomic_path(d / "bounds.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, bounds)


def read_partition(sources: Sequence[str | os.PathLike[str]], part: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Partition ``part`` of every map output directory in ``sources``, concatenated."""
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for src in sources:
        d = Path(src)
        bounds = np.load(fetched(d / "bounds.npy"))
        if part + 1 >= len(bounds):  # written before the input grew: nothing for the new partitions
            continue
        lo, hi = int(bounds[part]), int(bounds[part + 1])
        if hi > lo:  # this partition's rows only: staged per node, a ranged read of another machine's file
            block = npy_rows(d / "data.npy", lo, hi)
            for n in names:
                out[n].append(np.array(block[n]))
    return {n: np.concatenate(v) if v else np.zeros(0) for n, v in out.items()}


def gather_1d(directory: str | os.PathLike[str], starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Values at global ``rows`` of a per-piece array store (``part-NNNNN.npy`` files of 1-d arrays)."""
    rows = np.asarray(rows, dtype=np.int64)
    out: np.ndarray | None = None
    piece_of = np.searchsorted(starts, rows, side="right") - 1
    for p in np.unique(piece_of):
        sel = piece_of == p
        mm = np.load(fetched(Path(directory) / f"part-{int(p):05d}.npy"), mmap_mode="r")
        if out is None:
            out = np.empty(rows.shape, dtype=mm.dtype)
        out[sel] = mm[rows[sel] - starts[p]]
    return out if out is not None else np.zeros(rows.shape, dtype=np.int64)


# edges -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EdgesMapped:
    """What mapping one partition's lists found: the edges kept, the *saturated* rows (every
    neighbour passed the threshold, so more may exist beyond) and the pieces mapped."""

    edges: int
    saturated: int
    pieces: int = 0


@dataclass(frozen=True, kw_only=True)
class MapEdgesTask:
    """Shuffle the passing edges of consecutive pieces' lists (rows from ``first_row``), both ways
    round, to the partitions (first rows ``starts``) of their source rows, under ``out_dir``.

    ``wide_paths``: longer lists (with their source rows) searched again for some rows; their
    edges are added (repeats merge in the reduce). ``range_paths``: every passing pair of some
    rows (one-column lists), complete by construction.
    """

    knn_paths: tuple[str, ...]
    first_row: int
    starts: np.ndarray
    out_dir: str
    metric: Metric
    min_score: float | None
    wide_paths: tuple[str, ...] = ()
    range_paths: tuple[str, ...] = ()
    holes: tuple[tuple[int, int], ...] = ()  # (start, rows) that left the input: edges into them are dropped

    def run(self) -> EdgesMapped:
        metric, min_score = self.metric, self.min_score
        lists = [read_knn(p) for p in self.knn_paths]
        rows = np.concatenate([r for r, _ in lists])
        n = rows.shape[0]
        first = np.arange(self.first_row, self.first_row + n, dtype=np.int64)
        blocks = [(first, rows, np.concatenate([s for _, s in lists]))]
        blocks += [b for p in self.wide_paths for b in read_knn_src(p)]
        n_listed = len(blocks)
        blocks += [b for p in self.range_paths for b in read_knn_src(p)]
        widened = np.concatenate([b[0] for b in blocks[1:n_listed]]) if n_listed > 1 else np.zeros(0, np.int64)
        complete = (
            np.concatenate([b[0] for b in blocks[n_listed:]]) if len(blocks) > n_listed else np.zeros(0, np.int64)
        )
        src_parts, dst_parts, score_parts = [], [], []
        saturated = 0
        for i, (src_rows, nbr, scores) in enumerate(blocks):
            ok = (nbr >= 0) & passes(scores, min_score, metric) & ~in_holes(nbr, self.holes)
            if min_score is not None and nbr.shape[1] and i < n_listed:
                full = ok.all(axis=1) & ~np.isin(src_rows, complete)
                if i == 0:  # a row searched again counts by its longer list
                    full &= ~np.isin(src_rows, widened)
                saturated += int(full.sum())
            src_parts.append(np.repeat(src_rows, nbr.shape[1])[ok.ravel()])
            dst_parts.append(nbr.ravel()[ok.ravel()])
            score_parts.append(scores.ravel()[ok.ravel()].astype(np.float32))
        src, dst, sc = np.concatenate(src_parts), np.concatenate(dst_parts), np.concatenate(score_parts)
        # reversed too: symmetric graphs need them, and they tell which directed edges are mutual
        flag = np.concatenate([np.full(len(sc), FORWARD, np.int8), np.full(len(sc), REVERSE, np.int8)])
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
        sc = np.concatenate([sc, sc])
        part = np.searchsorted(self.starts, src, side="right") - 1
        write_partitioned(self.out_dir, part, len(self.starts), {"src": src, "dst": dst, "score": sc, "flag": flag})
        return EdgesMapped(edges=int(len(src) // 2), saturated=saturated, pieces=len(self.knn_paths))


def reduce_edges(
    map_dirs: Sequence[str], part: int, metric: Metric, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The edges whose source row lies in partition ``part``, one per (src, dst), sorted.

    Returns (src, dst, score, flags); ``flags`` has FORWARD and/or REVERSE set. Where both
    directions were found, the closer score is kept (they are equal after exact re-ranking).
    """
    cols = read_partition(map_dirs, part, ("src", "dst", "score", "flag"))
    src, dst = cols["src"].astype(np.int64), cols["dst"].astype(np.int64)
    score, flag = cols["score"].astype(np.float32), cols["flag"].astype(np.int8)
    if src.size == 0:
        return src, dst, score, flag
    # one int64 key per (src, dst), sorted once (a three-key lexsort took 8x as long); repeats of
    # a pair then combine by the closest score and the union of flags, whatever their order
    lo, span = int(src.min()), int(dst.max()) + 1
    if (int(src.max()) - lo + 1) * span < 1 << 62:
        order = np.argsort((src - lo) * span + dst)
    else:  # rows beyond int64 keys: sort by both columns
        order = np.lexsort((dst, src))
    src, dst, score, flag = src[order], dst[order], score[order], flag[order]
    first = np.ones(src.size, dtype=bool)
    first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])
    starts = np.flatnonzero(first)
    flags = np.bitwise_or.reduceat(flag, starts)
    score = (np.minimum if metric == "l2" else np.maximum).reduceat(score, starts)
    src, dst = src[starts], dst[starts]
    if mode != "symmetric":
        keep = in_mode(flags, mode)
        src, dst, score, flags = src[keep], dst[keep], score[keep], flags[keep]
    return src, dst, score, flags


def in_mode(flags: np.ndarray, mode: str) -> np.ndarray:
    """Which combined edges a graph of ``mode`` keeps, from their direction flags."""
    if mode == "mutual":
        return flags == FORWARD | REVERSE
    if mode == "directed":
        return (flags & FORWARD) != 0
    return np.ones(flags.shape, dtype=bool)


def write_edges(path: str | os.PathLike[str], src: np.ndarray, dst: np.ndarray, weight: np.ndarray) -> None:
    table = pa.table(
        {"src": pa.array(src, pa.int64()), "dst": pa.array(dst, pa.int64()), "weight": pa.array(weight, pa.float32())}
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, str(tmp))


def read_edges(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = pq.read_table(fetched(path))
    return (t.column("src").to_numpy(), t.column("dst").to_numpy(), t.column("weight").to_numpy())


def degree_histogram(src: np.ndarray, first_row: int, rows: int) -> dict[int, int]:
    """{degree: number of rows} over the rows ``[first_row, first_row + rows)``."""
    deg = np.bincount(src - first_row, minlength=rows)
    values, counts = np.unique(deg, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def merge_histograms(parts: Sequence[Mapping[Any, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for h in parts:
        for key, count in h.items():
            out[int(key)] = out.get(int(key), 0) + int(count)
    return dict(sorted(out.items()))
