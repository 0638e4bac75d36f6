"""Connected components of an edge list partitioned by source row, in rounds of bounded tasks.

Every row points at a row of its component no larger than itself (at first, itself); the rows
pointing at themselves are the roots of trees. Rounds of hooking (roots onto smaller roots they
share an edge with, offers shuffled to the root's partition) and shortcutting (every row straight
to its root, through memory-mapped per-piece label files) end when no edge joins two trees: each
component is then one tree, labelled by its smallest row. A task holds one partition's edges and
labels, never the whole graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline.io import nodes
from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched
from pipeline.io.owned import discard, rename
from pipeline.runtime.runner import Task, gather, submit
from pipeline.shuffle.edges import gather_1d, merge_histograms, read_edges, read_partition, write_partitioned

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
    """Every row of a partition its own label, or its label in ``warm`` (an earlier, smaller graph)."""

    labels_dir: str
    piece: int
    first_row: int
    rows: int
    warm: str | None

    def run(self) -> None:
        labels_dir, piece, first_row, rows, warm = self.labels_dir, self.piece, self.first_row, self.rows, self.warm
        start = label_path(warm, piece) if warm else None
        if start is not None and nodes.present(start):  # labels of an earlier, smaller graph: still valid
            old = np.load(fetched(start))  # (a partition that took in new rows has them after its old ones)
            new = np.arange(first_row + old.size, first_row + rows, dtype=np.int64)
            _save(label_path(labels_dir, piece), np.concatenate([old, new]))
        else:
            _save(label_path(labels_dir, piece), np.arange(first_row, first_row + rows, dtype=np.int64))


@dataclass(frozen=True, kw_only=True)
class HooksTask:
    """For each edge joining two trees, ask the larger root to hook onto the smaller one."""

    edge_path: str
    labels_dir: str
    starts: np.ndarray
    piece: int
    out: str

    def run(self) -> int:
        edge_path, labels_dir, starts, piece, out = self.edge_path, self.labels_dir, self.starts, self.piece, self.out
        src, dst, _ = read_edges(edge_path)
        labels = np.load(fetched(label_path(labels_dir, piece)))
        ru = labels[src - int(starts[piece])]
        rv = gather_1d(labels_dir, starts, dst) if dst.size else dst
        cross = ru != rv
        hi, lo = np.maximum(ru[cross], rv[cross]), np.minimum(ru[cross], rv[cross])
        write_partitioned(out, np.searchsorted(starts, hi, side="right") - 1, len(starts), {"hi": hi, "lo": lo})
        return int(cross.sum())


@dataclass(frozen=True, kw_only=True)
class ApplyHooks:
    """Each root of this partition hooks onto the smallest root that asked."""

    hook_dirs: tuple[str, ...]
    labels_dir: str
    starts: np.ndarray
    piece: int
    out: str

    def run(self) -> None:
        hook_dirs, labels_dir, starts, piece, out = self.hook_dirs, self.labels_dir, self.starts, self.piece, self.out
        labels = np.load(fetched(label_path(labels_dir, piece)))
        h = read_partition(hook_dirs, piece, ("hi", "lo"))
        if h["hi"].size:
            hi, lo = h["hi"].astype(np.int64), h["lo"].astype(np.int64)
            order = np.argsort(hi, kind="stable")
            hi, lo = hi[order], lo[order]
            first = np.flatnonzero(np.r_[True, hi[1:] != hi[:-1]])
            local = hi[first] - int(starts[piece])
            labels[local] = np.minimum(labels[local], np.minimum.reduceat(lo, first))
        _save(label_path(out, piece), labels)


@dataclass(frozen=True, kw_only=True)
class Shortcut:
    """Point every row straight at its tree's root (pointers only decrease, so this ends)."""

    hooked_dir: str
    starts: np.ndarray
    piece: int
    out: str

    def run(self) -> None:
        hooked_dir, starts, piece, out = self.hooked_dir, self.starts, self.piece, self.out
        labels = np.load(fetched(label_path(hooked_dir, piece)))
        while True:
            nxt = gather_1d(hooked_dir, starts, labels)
            if np.array_equal(nxt, labels):
                break
            labels = nxt
        _save(label_path(out, piece), labels)


def connected_components(
    client: Any, edge_paths: Sequence[str], *, starts: np.ndarray, total: int, work_dir: Path, warm: Path | None = None
) -> Path:
    """Label every row by the smallest row of its component; return the directory of labels.

    ``edge_paths[p]`` holds the edges whose source lies in piece ``p`` (both directions present,
    or either: hooking is symmetric). ``warm``: final labels of a subgraph (the same rows'
    earlier edges, before the input grew); they are valid starting trees, so only components the
    new edges touch do any work.

    Each round (Shiloach-Vishkin style, with every step a task per partition): every edge whose
    ends lie in different trees asks the larger root to hook onto the smaller; each root takes
    the smallest offer; then every row is pointed straight at its new root. Every tree that
    touches another merges each round, so rounds grow with the log of the component size, not
    with its diameter.
    """
    for child in nodes.children(work_dir):  # rounds are cheap to redo; partial ones are not trusted
        if warm is None or child.resolve() != warm.resolve():
            discard(child)
    ends = np.r_[starts[1:], total]
    n_parts = len(starts)
    labels = work_dir / "round-0000"
    gather(
        client,
        [
            _submit(
                client,
                InitLabels(
                    labels_dir=str(labels),
                    piece=p,
                    first_row=int(starts[p]),
                    rows=int(ends[p] - starts[p]),
                    warm=str(warm) if warm else None,
                ),
            )
            for p in range(n_parts)
        ],
    )
    if warm is not None:
        discard(warm)
    r = 0
    while True:
        r += 1
        hooks = [str(work_dir / f"hooks-{r:04d}" / f"from-{p:05d}") for p in range(n_parts)]
        crossing = sum(
            gather(
                client,
                [
                    _submit(
                        client,
                        HooksTask(
                            edge_path=edge_paths[p], labels_dir=str(labels), starts=starts, piece=p, out=hooks[p]
                        ),
                    )
                    for p in range(n_parts)
                ],
            )
        )
        log.debug("components round %d: %d edges join different trees", r, crossing)
        if crossing == 0:
            discard(work_dir / f"hooks-{r:04d}")
            break
        hooked = work_dir / f"hooked-{r:04d}"
        gather(
            client,
            [
                _submit(
                    client,
                    ApplyHooks(hook_dirs=tuple(hooks), labels_dir=str(labels), starts=starts, piece=p, out=str(hooked)),
                )
                for p in range(n_parts)
            ],
        )
        nxt = work_dir / f"round-{r:04d}"
        gather(
            client,
            [
                _submit(client, Shortcut(hooked_dir=str(hooked), starts=starts, piece=p, out=str(nxt)))
                for p in range(n_parts)
            ],
        )
        for d in (labels, hooked, work_dir / f"hooks-{r:04d}"):
            discard(d)
        labels = nxt
    final = work_dir / "labels"
    rename(labels, final)
    log.info("connected components: %d round(s)", r)
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
