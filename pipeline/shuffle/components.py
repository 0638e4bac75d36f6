"""Connected components of an edge list partitioned by source row, in rounds of bounded tasks.

Every row points at a row of its component no larger than itself (at first, itself); the rows
pointing at themselves are the roots of trees. Rounds of hooking (roots onto smaller roots they
share an edge with, offers shuffled to the root's partition) and shortcutting (every row straight
to its root, by pointer jumps) end when no edge joins two trees: each component is then one tree,
labelled by its smallest row. A task holds one partition's edges and labels, never the whole
graph. It learns other partitions' labels from their label files (read in place, or fetched on a
machine of its own) or by request and answer (:mod:`pipeline.shuffle.lookup`), whichever moves
fewer bytes (:func:`by_answers`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import nodes
from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched
from pipeline.io.owned import discard, rename
from pipeline.runtime.runner import Task, gather, submit
from pipeline.shuffle.edges import gather_1d, merge_histograms, read_edges, read_partition, write_partitioned
from pipeline.shuffle.lookup import AnswerTask, ask, read_answers

__all__ = ["connected_components", "component_sizes", "label_path"]

log = logging.getLogger(__name__)
R = TypeVar("R")


def _submit(client: Any, task: Task[R]) -> Any:
    """A task of the components rounds (counted as the ``components`` phase in busy time)."""
    return submit(client, task, "components")


def label_path(labels_dir: str | Path, piece: int) -> Path:
    return Path(labels_dir) / f"part-{piece:05d}.npy"


def _save(path: Path, values: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, values)


@dataclass(frozen=True, kw_only=True)
class InitLabels:
    """The first trees: every row points at the smallest row of its component among the edges
    inside its own partition (``edge_path``: they need no other partition), or at its label in
    ``warm`` (an earlier, smaller graph) where that is smaller. The rounds then only join trees
    across partitions: a k-NN graph of 1M rows in two partitions took 3 rounds where single rows took 4."""

    labels_dir: str
    piece: int
    first_row: int
    rows: int
    warm: str | None
    edge_path: str

    def run(self) -> None:
        from scipy.sparse import coo_array
        from scipy.sparse.csgraph import connected_components as local_components

        first_row, rows = self.first_row, self.rows
        src, dst, _ = read_edges(self.edge_path)
        inside = (dst >= first_row) & (dst < first_row + rows)
        local = (src[inside] - first_row, dst[inside] - first_row)
        graph = coo_array((np.ones(local[0].size, np.int8), local), shape=(rows, rows))
        _, comp = local_components(graph, directed=False)
        smallest = np.full(int(comp.max(initial=-1)) + 1, rows, dtype=np.int64)
        np.minimum.at(smallest, comp, np.arange(rows))
        labels = first_row + smallest[comp]
        start = label_path(self.warm, self.piece) if self.warm else None
        if start is not None and nodes.present(start):  # labels of an earlier, smaller graph: still valid
            old = np.load(fetched(start))  # (a partition that took in new rows has them after its old ones)
            labels[: old.size] = np.minimum(labels[: old.size], old)
        _save(label_path(self.labels_dir, self.piece), labels)


@dataclass(frozen=True, kw_only=True)
class AskEnds:
    """Ask for the labels of the far ends of partition ``piece``'s edges: the same rows every
    round, so they are asked once and answered each round. Beside the asks, ``where.npy`` keeps
    each far end's place among the answers, so a round looks them up by position."""

    edge_path: str
    starts: np.ndarray
    piece: int
    out: str

    def run(self) -> int:
        _, dst, _ = read_edges(self.edge_path)
        asked = ask(self.out, dst, starts=self.starts, own=self.piece)
        far = dst[_outside(dst, self.starts, self.piece)]
        where = pc.index_in(pa.array(far), value_set=pa.array(asked)).to_numpy()
        _save(Path(self.out) / ENDS_WHERE, where.astype(np.int32 if asked.size < 2**31 else np.int64))
        return int(asked.size)


ENDS_WHERE = "where.npy"


def _outside(rows: np.ndarray, starts: np.ndarray, piece: int) -> np.ndarray:
    """Which of ``rows`` lie outside partition ``piece`` (first rows ``starts``)."""
    lo = int(starts[piece])
    hi = int(starts[piece + 1]) if piece + 1 < len(starts) else np.iinfo(np.int64).max
    return (rows < lo) | (rows >= hi)


def _jump_inside(labels: np.ndarray, first_row: int) -> np.ndarray:
    """Point every row whose label lies in this partition at the end of its chain here (pointer
    jumping: each pass halves the chains)."""
    while True:
        inside = np.flatnonzero((labels >= first_row) & (labels < first_row + labels.size))
        nxt = labels[labels[inside] - first_row]
        if np.array_equal(nxt, labels[inside]):
            return labels
        labels[inside] = nxt


@dataclass(frozen=True, kw_only=True)
class HooksTask:
    """For each edge joining two trees, ask the larger root to hook onto the smaller one. The far
    ends' labels come as answers (``answer_dirs``) to the asks in ``asked``, or, where ``asked`` is
    None, from the other partitions' label files (read in place)."""

    edge_path: str
    labels_dir: str
    asked: str | None
    answer_dirs: tuple[str, ...]
    starts: np.ndarray
    piece: int
    out: str

    def run(self) -> int:
        starts, piece = self.starts, self.piece
        src, dst, _ = read_edges(self.edge_path)
        labels = np.load(fetched(label_path(self.labels_dir, piece)))
        first = int(starts[piece])
        ru = labels[src - first]
        far = _outside(dst, starts, piece)
        rv = np.empty_like(ru)
        rv[~far] = labels[dst[~far] - first]
        if far.any() and self.asked is not None:
            where = np.load(fetched(Path(self.asked) / ENDS_WHERE))
            rv[far] = read_answers(self.answer_dirs, piece).values[where]
        elif far.any():
            rv[far] = gather_1d(self.labels_dir, starts, dst[far])
        cross = ru != rv
        hi, lo = np.maximum(ru[cross], rv[cross]), np.minimum(ru[cross], rv[cross])
        # a root takes only its smallest offer: send that one (hashed, no sort of every edge)
        offers = pa.table({"hi": hi, "lo": lo}).group_by("hi", use_threads=False).aggregate([("lo", "min")])
        hi, lo = offers.column("hi").to_numpy(), offers.column("lo_min").to_numpy()
        write_partitioned(self.out, np.searchsorted(starts, hi, side="right") - 1, len(starts), {"hi": hi, "lo": lo})
        return int(cross.sum())


@dataclass(frozen=True, kw_only=True)
class ApplyHooks:
    """Each root of this partition hooks onto the smallest root that asked; then every row points
    as far along its chain as this partition knows, and asks for the rest (``asks``; None: a
    :class:`Shortcut` follows instead)."""

    hook_dirs: tuple[str, ...]
    labels_dir: str
    starts: np.ndarray
    piece: int
    out: str
    asks: str | None

    def run(self) -> int:
        starts, piece = self.starts, self.piece
        first = int(starts[piece])
        labels = np.load(fetched(label_path(self.labels_dir, piece)))
        h = read_partition(self.hook_dirs, piece, ("hi", "lo"))
        if h["hi"].size:
            hi, lo = h["hi"].astype(np.int64), h["lo"].astype(np.int64)
            order = np.argsort(hi, kind="stable")
            hi, lo = hi[order], lo[order]
            head = np.flatnonzero(np.r_[True, hi[1:] != hi[:-1]])
            local = hi[head] - first
            labels[local] = np.minimum(labels[local], np.minimum.reduceat(lo, head))
        labels = _jump_inside(labels, first)
        _save(label_path(self.out, piece), labels)
        if self.asks is None:
            return 0
        return int(ask(self.asks, labels[_outside(labels, starts, piece)], starts=starts, own=piece).size)


@dataclass(frozen=True, kw_only=True)
class JumpTask:
    """One pointer jump across partitions: every row whose label was asked about takes the answer
    (its label's label), then jumps inside the partition again. Rows whose label is now a root
    known to be settled are done; the rest ask again (``asks``). Pointers only decrease, so this ends."""

    labels_dir: str
    answer_dirs: tuple[str, ...]
    starts: np.ndarray
    piece: int
    out: str
    asks: str

    def run(self) -> int:
        starts, piece = self.starts, self.piece
        first = int(starts[piece])
        labels = np.load(fetched(label_path(self.labels_dir, piece)))
        got = read_answers(self.answer_dirs, piece)
        far = np.flatnonzero(_outside(labels, starts, piece))
        targets = labels[far]
        asked = np.isin(targets, got.rows)
        settled = np.union1d(targets[~asked], got.values[got.settled])  # not asked: settled before
        labels[far[asked]] = got.at(targets[asked])[0]
        labels = _jump_inside(labels, first)
        _save(label_path(self.out, piece), labels)
        again = np.setdiff1d(labels[_outside(labels, starts, piece)], settled)
        return int(ask(self.asks, again, starts=starts, own=piece).size)


@dataclass(frozen=True, kw_only=True)
class Shortcut:
    """Point every row straight at its tree's root, following its label through the other
    partitions' label files (read in place; pointers only decrease, so this ends)."""

    hooked_dir: str
    starts: np.ndarray
    piece: int
    out: str

    def run(self) -> None:
        labels = np.load(fetched(label_path(self.hooked_dir, self.piece)))
        while True:
            nxt = gather_1d(self.hooked_dir, self.starts, labels)
            if np.array_equal(nxt, labels):
                break
            labels = nxt
        _save(label_path(self.out, self.piece), labels)


ANSWER_BYTES = 25  # a row asked (8 bytes) and its answer (row, label, settled: 17 bytes)


def by_answers(client: Any, edge_paths: Sequence[str], total: int) -> bool:
    """Whether components should learn other partitions' labels by request and answer rather than
    from their label files. Where the workers see this machine's folders, the files are read in
    place (memory-mapped pages, nothing copied): files. Staged per node, every machine would fetch
    every label file it reads, twice a round (8 bytes a row each time); request and answer move
    25 bytes for each distinct far end a partition asks about, at most one per edge. So: answers
    when the edges' far ends are fewer than the machines' label copies (dedup's sparse pairs, or
    many machines), files otherwise (a dense k-NN graph on a few machines). Counted from the edge
    files' footers and the worker count, never timed."""
    if not nodes.active():
        return False
    workers = max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    edges = sum(pq.read_metadata(nodes.source(p)).num_rows for p in edge_paths)
    return edges * ANSWER_BYTES < workers * total * 8 * 2


def _answer(client: Any, ask_dirs: Sequence[str], labels: Path, starts: np.ndarray, out: Path) -> tuple[str, ...]:
    """Answer the asks in ``ask_dirs`` with the labels in ``labels``: a task per partition."""
    outs = tuple(str(out / f"to-{p:05d}") for p in range(len(starts)))
    gather(
        client,
        [
            _submit(
                client,
                AnswerTask(
                    ask_dirs=tuple(ask_dirs),
                    values=str(label_path(labels, p)),
                    first_row=int(starts[p]),
                    part=p,
                    out=outs[p],
                ),
            )
            for p in range(len(starts))
        ],
    )
    return outs


def _wave(client: Any, tasks: Sequence[Task[Any]]) -> list[Any]:
    """Run one step of the rounds, a task per partition; their results in partition order."""
    return gather(client, [_submit(client, t) for t in tasks])


def connected_components(
    client: Any,
    edge_paths: Sequence[str],
    *,
    starts: np.ndarray,
    total: int,
    work_dir: Path,
    warm: Path | None = None,
    answers: bool | None = None,
) -> Path:
    """Label every row by the smallest row of its component; return the directory of labels.

    ``edge_paths[p]`` holds the edges whose source lies in piece ``p`` (both directions present,
    or either: hooking is symmetric). ``warm``: final labels of a subgraph (the same rows'
    earlier edges, before the input grew); they are valid starting trees, so only components the
    new edges touch do any work. ``answers``: learn other partitions' labels by request and
    answer, or from their label files (None: as :func:`by_answers` counts).

    Each round (Shiloach-Vishkin style, with every step a task per partition): every edge whose
    ends lie in different trees asks the larger root to hook onto the smaller; each root takes the
    smallest offer; then every row is pointed at its new root, by pointer jumps inside a partition
    in memory and across partitions through the label files or by request and answer (the far
    ends of the edges are asked once, :class:`AskEnds`, and answered each round). Every tree that
    touches another merges each round, so rounds grow with the log of the component size, not
    with its diameter; the jumps of a round with the log of its longest chain of hooks.
    """
    for child in nodes.children(work_dir):  # rounds are cheap to redo; partial ones are not trusted
        if warm is None or child.resolve() != warm.resolve():
            discard(child)
    ends = np.r_[starts[1:], total]
    parts = range(len(starts))
    labels = work_dir / "round-0000"
    _wave(
        client,
        [
            InitLabels(
                labels_dir=str(labels),
                piece=p,
                first_row=int(starts[p]),
                rows=int(ends[p] - starts[p]),
                warm=str(warm) if warm else None,
                edge_path=edge_paths[p],
            )
            for p in parts
        ],
    )
    if warm is not None:
        discard(warm)
    if answers is None:
        answers = by_answers(client, edge_paths, total)
    asked_ends = [str(work_dir / "ends" / f"from-{p:05d}") for p in parts] if answers else None
    if asked_ends is not None:
        _wave(client, [AskEnds(edge_path=edge_paths[p], starts=starts, piece=p, out=asked_ends[p]) for p in parts])
    r = 0
    while True:
        r += 1
        rnd = work_dir / f"r{r:04d}"
        far_ends = _answer(client, asked_ends, labels, starts, rnd / "ends") if asked_ends else ()
        hooks = [str(rnd / "hooks" / f"from-{p:05d}") for p in parts]
        hooking = [
            HooksTask(
                edge_path=edge_paths[p],
                labels_dir=str(labels),
                asked=asked_ends[p] if asked_ends else None,
                answer_dirs=far_ends,
                starts=starts,
                piece=p,
                out=hooks[p],
            )
            for p in parts
        ]
        crossing = sum(_wave(client, hooking))
        log.debug("components round %d: %d edges join different trees", r, crossing)
        if crossing == 0:
            discard(rnd)
            break
        jumped, asks = rnd / "hooked", [str(rnd / "asks-0000" / f"from-{p:05d}") for p in parts]
        hooked = [
            ApplyHooks(
                hook_dirs=tuple(hooks),
                labels_dir=str(labels),
                starts=starts,
                piece=p,
                out=str(jumped),
                asks=asks[p] if answers else None,
            )
            for p in parts
        ]
        asked = sum(_wave(client, hooked))
        if not answers:  # every row follows its label through the other partitions' files
            nxt = rnd / "jumped"
            _wave(client, [Shortcut(hooked_dir=str(jumped), starts=starts, piece=p, out=str(nxt)) for p in parts])
            jumped = nxt
        j = 0
        while asked:  # pointer jumps across partitions until every row points at its root
            j += 1
            told = _answer(client, asks, jumped, starts, rnd / f"answers-{j:04d}")
            nxt, asks = rnd / f"jumped-{j:04d}", [str(rnd / f"asks-{j:04d}" / f"from-{p:05d}") for p in parts]
            jumps = [
                JumpTask(labels_dir=str(jumped), answer_dirs=told, starts=starts, piece=p, out=str(nxt), asks=asks[p])
                for p in parts
            ]
            asked = sum(_wave(client, jumps))
            jumped = nxt
        nxt = work_dir / f"round-{r:04d}"
        rename(jumped, nxt)
        discard(labels)
        discard(rnd)
        labels = nxt
    final = work_dir / "labels"
    rename(labels, final)
    log.info("connected components: %d round(s)%s", r, " (labels by request and answer)" if answers else "")
    return final


@dataclass(frozen=True, kw_only=True)
class CountMap:
    """Count one partition's rows per label, shuffled to the label's partition."""

    labels_dir: str
    piece: int
    starts: np.ndarray
    out_dir: str
    rows: int | None = None  # the partition's rows (the rest, to the next partition, are holes)

    def run(self) -> None:
        labels_dir, piece, starts, out_dir = self.labels_dir, self.piece, self.starts, self.out_dir
        labels = np.load(fetched(label_path(labels_dir, piece)))[: self.rows]
        values, counts = np.unique(labels, return_counts=True)
        part = np.searchsorted(starts, values, side="right") - 1
        write_partitioned(out_dir, part, len(starts), {"label": values, "count": counts.astype(np.int64)})


@dataclass(frozen=True, kw_only=True)
class CountReduce:
    """{component size: components} over the labels shuffled to partition ``piece``."""

    map_dirs: tuple[str, ...]
    piece: int

    def run(self) -> dict[int, int]:
        map_dirs, piece = self.map_dirs, self.piece
        c = read_partition(map_dirs, piece, ("label", "count"))
        if c["label"].size == 0:
            return {}
        labels, inverse = np.unique(c["label"].astype(np.int64), return_inverse=True)
        sizes = np.bincount(inverse, weights=c["count"]).astype(np.int64)
        values, counts = np.unique(sizes, return_counts=True)
        return {int(v): int(n) for v, n in zip(values, counts)}


def component_sizes(
    client: Any, labels_dir: Path, starts: np.ndarray, work_dir: Path, rows: Sequence[int] | None = None
) -> dict[int, int]:
    """{component size: number of components}, counted by a shuffle on the label; ``rows``: each
    partition's rows, where holes follow them (they are no one's component)."""
    maps = [str(work_dir / f"from-{p:05d}") for p in range(len(starts))]
    gather(
        client,
        [
            _submit(
                client,
                CountMap(
                    labels_dir=str(labels_dir),
                    piece=p,
                    starts=starts,
                    out_dir=maps[p],
                    rows=None if rows is None else int(rows[p]),
                ),
            )
            for p in range(len(starts))
        ],
    )
    parts = gather(client, [_submit(client, CountReduce(map_dirs=tuple(maps), piece=p)) for p in range(len(starts))])
    discard(work_dir)
    return merge_histograms(parts)
