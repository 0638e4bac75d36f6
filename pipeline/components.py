"""Connected components of an edge list partitioned by source row, in rounds of bounded tasks.

Min-label propagation with pointer jumping: every row starts labelled with itself; each round, one
task per partition lowers each row's label to the smallest label among its neighbours, then to
the label of that label (both read from the previous round's per-piece files through memory
maps). Labels only decrease and always name a row of the same component, so the fixed point
labels each component by its smallest row. Rounds grow with the log of the longest chain; a task
holds one partition's edges and labels, never the whole graph.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .atomic import atomic_path
from .edges import gather_1d, merge_histograms, read_edges, read_partition, write_partitioned

__all__ = ["connected_components", "component_sizes", "label_path"]

log = logging.getLogger(__name__)


def label_path(labels_dir: str | Path, piece: int) -> Path:
    return Path(labels_dir) / f"part-{piece:05d}.npy"


def _save(path: Path, values: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, values)


def _init(labels_dir: str, piece: int, first_row: int, rows: int, warm: str | None) -> None:
    start = label_path(warm, piece) if warm else None
    if start is not None and start.exists():  # labels of an earlier, smaller graph: still valid
        _save(label_path(labels_dir, piece), np.load(start))
    else:
        _save(label_path(labels_dir, piece), np.arange(first_row, first_row + rows, dtype=np.int64))


def _round(edge_path: str, old_dir: str, new_dir: str, starts: np.ndarray, piece: int) -> int:
    """One propagation round for one partition; returns how many labels changed."""
    src, dst, _ = read_edges(edge_path)  # sorted by src
    old = np.load(label_path(old_dir, piece))
    new = old.copy()
    if src.size:
        lo = int(starts[piece])
        nbr = gather_1d(old_dir, starts, dst)
        first = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
        local = src[first] - lo
        new[local] = np.minimum(new[local], np.minimum.reduceat(nbr, first))
        new = np.minimum(new, gather_1d(old_dir, starts, new))  # jump: the label of the label
    _save(label_path(new_dir, piece), new)
    return int((new != old).sum())


def connected_components(client: Any, edge_paths: Sequence[str], starts: np.ndarray, total: int,
                         work_dir: Path, warm: Path | None = None) -> Path:
    """Label every row by the smallest row of its component; return the directory of labels.

    ``edge_paths[p]`` holds the edges whose source lies in piece ``p``, both directions present.
    ``warm``: final labels of a subgraph (the same rows' earlier edges, before the input grew).
    They are valid starting labels (each names a row of the same, larger component), so only
    the components the new edges touch take more than one round to settle.
    """
    if work_dir.exists():
        for child in work_dir.iterdir():  # rounds are cheap to redo; partial ones are not trusted
            if warm is None or child.resolve() != warm.resolve():
                shutil.rmtree(child)
    ends = np.r_[starts[1:], total]
    old = work_dir / "round-0000"
    client.gather([client.submit(_init, str(old), p, int(starts[p]), int(ends[p] - starts[p]),
                                 str(warm) if warm else None, pure=False) for p in range(len(starts))])
    if warm is not None:
        shutil.rmtree(warm, ignore_errors=True)
    r = 0
    while True:
        r += 1
        new = work_dir / f"round-{r:04d}"
        changed = sum(client.gather([
            client.submit(_round, edge_paths[p], str(old), str(new), starts, p, pure=False) for p in range(len(starts))
        ]))
        shutil.rmtree(old)
        old = new
        log.debug("components round %d: %d labels changed", r, changed)
        if changed == 0:
            break
    final = work_dir / "labels"
    old.rename(final)
    log.info("connected components: converged in %d rounds", r)
    return final


def _count_map(labels_dir: str, piece: int, starts: np.ndarray, out_dir: str) -> None:
    labels = np.load(label_path(labels_dir, piece))
    values, counts = np.unique(labels, return_counts=True)
    part = np.searchsorted(starts, values, side="right") - 1
    write_partitioned(out_dir, part, len(starts), {"label": values, "count": counts.astype(np.int64)})


def _count_reduce(map_dirs: Sequence[str], piece: int) -> dict[int, int]:
    c = read_partition(map_dirs, piece, ("label", "count"))
    if c["label"].size == 0:
        return {}
    labels, inverse = np.unique(c["label"].astype(np.int64), return_inverse=True)
    sizes = np.bincount(inverse, weights=c["count"]).astype(np.int64)
    values, counts = np.unique(sizes, return_counts=True)
    return {int(v): int(n) for v, n in zip(values, counts)}


def component_sizes(client: Any, labels_dir: Path, starts: np.ndarray, work_dir: Path) -> dict[int, int]:
    """{component size: number of components}, counted by a shuffle on the label."""
    maps = [str(work_dir / f"from-{p:05d}") for p in range(len(starts))]
    client.gather([client.submit(_count_map, str(labels_dir), p, starts, maps[p], pure=False)
                   for p in range(len(starts))])
    parts = client.gather([client.submit(_count_reduce, maps, p, pure=False) for p in range(len(starts))])
    shutil.rmtree(work_dir)
    return merge_histograms(parts)
