"""``dedup --explore``: pairs and rows dropped over a range of thresholds, from one join."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.duplicates.plan import DedupPlan
from pipeline.io.owned import discard
from pipeline.io.parquet import Dataset
from pipeline.kinds import Metric
from pipeline.results import ExploreRow
from pipeline.runtime.runner import gather, submit
from pipeline.search.join import knn_path
from pipeline.shuffle.edges import (
    MapEdgesTask,
    Part,
    make_parts,
    part_starts,
    passes,
    pieces_per_part,
    reduce_edges,
)

__all__ = ["explore", "map_task"]


def map_task(
    part: Part,
    *,
    knn_dir: Path,
    starts: np.ndarray,
    out: str,
    metric: Metric,
    threshold: float,
    wide_dir: Path | None = None,
    range_dir: Path | None = None,
    holes: tuple[tuple[int, int], ...] = (),
) -> MapEdgesTask:
    """The task that maps one partition's lists (and their widened lists and range pairs) to
    above-threshold edges by source row."""
    return MapEdgesTask(
        knn_paths=tuple(str(knn_path(knn_dir, p)) for p in part.pieces),
        first_row=part.start,
        starts=starts,
        out_dir=out,
        metric=metric,
        min_score=threshold,
        wide_paths=tuple(str(knn_path(wide_dir, p)) for p in part.pieces) if wide_dir is not None else (),
        range_paths=tuple(str(knn_path(range_dir, p)) for p in part.pieces) if range_dir is not None else (),
        holes=holes,
    )


@dataclass(frozen=True, kw_only=True)
class CanonicalPairs:
    """Partition ``part``'s shuffled edges as unordered pairs, each once: (a, b, score) with a < b."""

    map_dirs: tuple[str, ...]
    part: int
    metric: Metric

    def run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src, dst, score, _ = reduce_edges(self.map_dirs, self.part, self.metric, "symmetric")
        one = src < dst
        return src[one], dst[one], score[one]


def rows_dropped(a: np.ndarray, b: np.ndarray) -> int:
    """Rows a components-mode dedup drops for the pairs ``(a, b)``: linked rows minus their components."""
    if not a.size:
        return 0
    # imported here: scipy.sparse costs every command 0.3 s of start-up, and only --explore needs it
    from scipy.sparse import coo_array
    from scipy.sparse.csgraph import connected_components

    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    graph = coo_array((np.ones(a.size, dtype=np.int8), (inv[: a.size], inv[a.size :])), shape=(nodes.size,) * 2)
    n_components, _ = connected_components(graph, directed=False)
    return int(nodes.size - n_components)


def explore(
    client: Any, plan: DedupPlan, *, dataset: Dataset, output: Path, thresholds: Sequence[float], k: int, budget: int
) -> tuple[ExploreRow, ...]:
    """Pairs and rows dropped (components mode) at each threshold, from one join.

    The pairs at the loosest threshold are shuffled and symmetrised like a real run, then counted
    on the driver with scipy's connected components once per threshold. Memory is the pairs at
    the loosest threshold, not the dataset.
    """
    loosest = max(thresholds) if plan.metric == "l2" else min(thresholds)
    work = output / "_explore"
    discard(work)
    parts = make_parts(dataset.pieces, pieces_per_part(dataset.pieces, k, budget))
    starts = part_starts(parts)
    maps = [str(work / f"from-{p.index:05d}") for p in parts]
    mapped = [
        map_task(
            p,
            knn_dir=output / "knn",
            starts=starts,
            out=maps[p.index],
            metric=plan.metric,
            threshold=loosest,
            holes=dataset.holes,
        )
        for p in parts
    ]
    gather(client, [submit(client, task, "explore") for task in mapped])
    canonical = [CanonicalPairs(map_dirs=tuple(maps), part=p.index, metric=plan.metric) for p in parts]
    pairs = gather(client, [submit(client, task, "explore") for task in canonical])
    discard(work)
    a, b, s = (np.concatenate([p[i] for p in pairs]) for i in range(3))
    out = []
    for t in sorted(thresholds, reverse=plan.metric != "l2"):
        sel = passes(s, t, plan.metric)
        out.append(ExploreRow(t, int(sel.sum()), rows_dropped(a[sel], b[sel]), dataset.total_rows))
    return tuple(out)
