"""The exact plan's self-join, each pair of row blocks scored once for both of them.

Searching every piece against every piece computes each score twice (row ``i`` against ``j``,
then ``j`` against ``i``). Here consecutive pieces are grouped (at most ``GROUP_BYTES`` of
vectors a group) and each group is searched against itself first (the *diagonal*, itself
symmetric by blocks: :func:`pipeline.backends.kernels.self_topk`); its ``k``-th scores are floors
under which nothing can enter a row's top ``k``. Then every pair of groups ``g < h`` takes one
matrix product per tile, read both ways (:func:`pipeline.backends.kernels.pair_topk`), and each
piece's lists are the exact merge of its rows' diagonal and pair lists. About half the
arithmetic of the piece-by-piece plan, same result up to ties.

Each task writes its partial lists (global rows, scores higher-better) atomically to
``_exact/`` in the output and is recorded in the manifest, so a killed job redoes only
unfinished tasks; the join stage then merges them piece by piece and removes the folder.
Memory: two groups (``GROUP_BYTES`` each) and one or two 64 MiB tiles of scores per task,
within the 256 MiB a join batch may use (``BATCH_BYTES``), whatever the store's size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.kernels import merge_topk, shifted
from pipeline.backends.worker import worker_device
from pipeline.io.atomic import write_npz
from pipeline.io.nodes import fetched
from pipeline.io.owned import discard
from pipeline.io.parquet import Piece
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import run_tasks

__all__ = [
    "PAIRS_DIR",
    "GROUP_BYTES",
    "MAX_GROUPS",
    "Group",
    "PairLayout",
    "plan_groups",
    "exact_pairs",
    "piece_lists",
    "drop_pairs",
]

log = logging.getLogger(__name__)

PAIRS_DIR = "_exact"
GROUP_BYTES = 64 << 20  # float32 vectors a group holds (a pair task holds two, plus a 64 MiB tile)
MAX_GROUPS = 24  # at most 276 pair tasks; a larger store is searched piece by piece


@dataclass(frozen=True)
class Group:
    """Pieces ``[first, last)`` of the row store: rows ``[start, start + rows)``."""

    first: int
    last: int
    start: int
    rows: int


@dataclass(frozen=True)
class PairLayout:
    """Where the partial lists are and which pieces each group holds."""

    folder: str
    groups: tuple[Group, ...]

    def group_of(self, piece: int) -> int:
        return next(g for g, grp in enumerate(self.groups) if grp.first <= piece < grp.last)


@dataclass(frozen=True)
class _Task:
    index: int  # g * groups + h: the manifest's key for the task
    g: int
    h: int
    rows: int  # rows the task scores (progress)


def plan_groups(store: RowStore, dim: int, folder: Path, max_bytes: int | None = None) -> PairLayout | None:
    """Consecutive pieces grouped up to ``max_bytes`` of vectors (``GROUP_BYTES``); None when that
    makes more than ``MAX_GROUPS`` groups: pair tasks grow with the square of the groups, and such
    a store is searched piece by piece instead."""
    if store.rows != store.total_rows:  # an updated input's holes: searched piece by piece instead
        return None
    bounds = [*store.starts.tolist(), store.total_rows]
    pieces = len(store.starts)
    groups: list[Group] = []
    first = 0
    for p in range(pieces):
        if p > first and (bounds[p + 1] - bounds[first]) * dim * 4 > (max_bytes or GROUP_BYTES):
            groups.append(Group(first, p, bounds[first], bounds[p] - bounds[first]))
            first = p
    groups.append(Group(first, pieces, bounds[first], bounds[pieces] - bounds[first]))
    if len(groups) > MAX_GROUPS:
        return None
    return PairLayout(str(folder), tuple(groups))


def _vectors(store: RowStore, group: Group) -> np.ndarray:
    return np.concatenate([store.vectors(p) for p in range(group.first, group.last)])


def _diagonal_path(folder: str, g: int) -> Path:
    return Path(folder) / f"diagonal-{g:05d}.npz"


def _pair_path(folder: str, g: int, h: int) -> Path:
    return Path(folder) / f"pair-{g:05d}-{h:05d}.npz"


@dataclass(frozen=True, kw_only=True)
class DiagonalTask:
    """Group ``g`` searched against itself: its rows' ``width`` best scores and rows, written to
    the layout's folder (the floors of the pair tasks that involve it)."""

    store: RowStore
    layout: PairLayout
    g: int
    width: int
    metric: Metric

    def run(self) -> None:
        store, layout, g, width, metric = self.store, self.layout, self.g, self.width, self.metric
        group = layout.groups[g]
        with worker_device() as be:
            scores, rows = be.self_topk(_vectors(store, group), width, metric)
        write_npz(_diagonal_path(layout.folder, g), scores=scores, rows=shifted(rows, group.start))


@dataclass(frozen=True, kw_only=True)
class PairTask:
    """Groups ``g < h`` scored against each other once, one matrix product per tile read both
    ways; each side's ``width`` best, above ``h``'s diagonal floors, written to the layout's folder."""

    store: RowStore
    layout: PairLayout
    g: int
    h: int
    width: int
    metric: Metric

    def run(self) -> None:
        store, layout, g, h, width, metric = self.store, self.layout, self.g, self.h, self.width, self.metric
        a, b = layout.groups[g], layout.groups[h]
        with np.load(fetched(_diagonal_path(layout.folder, h))) as z:
            floor = z["scores"][:, -1]  # h's k-th best within h: nothing lower enters its top k
        with worker_device() as be:
            (a_scores, a_rows), (b_scores, b_rows) = be.pair_topk(
                _vectors(store, a), _vectors(store, b), width, metric, floor
            )
        write_npz(
            _pair_path(layout.folder, g, h),
            a_scores=a_scores,
            a_rows=shifted(a_rows, b.start),
            b_scores=b_scores,
            b_rows=shifted(b_rows, a.start),
        )


def exact_pairs(
    client: Any, store: RowStore, *, layout: PairLayout, width: int, metric: Metric, manifest: Manifest
) -> float:
    """Run the diagonal and pair tasks not yet done (stages ``exact_diagonal``, ``exact_pairs``);
    return their wall time."""
    Path(layout.folder).mkdir(parents=True, exist_ok=True)
    n = len(layout.groups)
    diagonal = [_Task(g, g, g, grp.rows) for g, grp in enumerate(layout.groups)]
    done = manifest.done_pieces("exact_diagonal")
    seconds = run_tasks(
        client,
        label="exact diagonal",
        items=[t for t in diagonal if t.index not in done],
        task=lambda t: DiagonalTask(store=store, layout=layout, g=t.g, width=width, metric=metric),
        on_done=lambda t, _: manifest.mark_piece("exact_diagonal", t.index, [_diagonal_path(layout.folder, t.g)]),
    )
    manifest.finish_stage("exact_diagonal")
    pairs = [
        _Task(g * n + h, g, h, layout.groups[g].rows + layout.groups[h].rows) for g in range(n) for h in range(g + 1, n)
    ]
    done = manifest.done_pieces("exact_pairs")
    seconds += run_tasks(
        client,
        label="exact pairs",
        items=[t for t in pairs if t.index not in done],
        task=lambda t: PairTask(store=store, layout=layout, g=t.g, h=t.h, width=width, metric=metric),
        on_done=lambda t, _: manifest.mark_piece("exact_pairs", t.index, [_pair_path(layout.folder, t.g, t.h)]),
    )
    manifest.finish_stage("exact_pairs")
    return seconds


def piece_lists(layout: PairLayout, piece: Piece, width: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """``piece``'s exact lists (scores in the metric's convention, global rows), merged from its
    group's diagonal and every pair that group is part of."""
    g = layout.group_of(piece.index)
    rows = slice(piece.start - layout.groups[g].start, piece.start - layout.groups[g].start + piece.rows)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    with np.load(fetched(_diagonal_path(layout.folder, g))) as z:
        parts.append((z["scores"][rows], z["rows"][rows]))
    for other in range(len(layout.groups)):
        if other != g:
            side = "a" if g < other else "b"
            with np.load(fetched(_pair_path(layout.folder, min(g, other), max(g, other)))) as z:
                parts.append((z[f"{side}_scores"][rows], z[f"{side}_rows"][rows]))
    scores, found = merge_topk(parts, width)
    return (-scores if metric == "l2" else scores), found


def drop_pairs(layout: PairLayout) -> None:
    """Remove the partial lists once every piece's table is written (ours: the tool wrote them)."""
    discard(layout.folder)
