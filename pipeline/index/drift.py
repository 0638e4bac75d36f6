"""Drift: whether an updated input has moved away from the rows the index was trained on.

An update encodes new rows with the quantizer trained on the first input (:mod:`pipeline.io.layout`).
When the new rows come from elsewhere (a new source, a new domain) they sit far from every
centroid, crowd a few lists, and their neighbours are found less well. Two measurements, both
deterministic (seeded samples, no clocks), say so after the fill:

- the new rows' mean squared distance to their nearest centroid, against the surviving rows'
  (the *distance ratio*; about 1 when the new rows are like the old);
- the list-size imbalance (FAISS's ``imbalance_factor``: 1 for equal lists) before and after.

The join then measures the tie-aware recall of held-out *new* rows at the kept plan
(:func:`pipeline.jobs.recall.measure_recall`). Past ``drift_limit`` the update warns and names
``--retrain``, which trains the index again on the current rows (the scan is kept).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.backends.kernels import ivf_of
from pipeline.backends.lists import two_level
from pipeline.io.nodes import fetched
from pipeline.io.store import RowStore
from pipeline.runtime.runner import result_of, submit

__all__ = ["Drift", "DriftTask", "measure_drift", "DRIFT_SAMPLE"]

log = logging.getLogger(__name__)

DRIFT_SAMPLE = 4096  # rows sampled from the new and from the surviving rows


@dataclass(frozen=True)
class Drift:
    """What an update measured (the index manifest's ``drift`` stage)."""

    new_rows: int
    distance_ratio: float  # new rows' mean squared distance to their centroid / surviving rows'
    imbalance_before: float | None
    imbalance_after: float | None
    limit: float

    @property
    def drifted(self) -> bool:
        return self.distance_ratio > self.limit

    def summary(self) -> str:
        lists = (
            f"; list imbalance {self.imbalance_before:.2f} -> {self.imbalance_after:.2f}"
            if self.imbalance_before is not None and self.imbalance_after is not None
            else ""
        )
        return (
            f"the {self.new_rows:,} new rows sit {self.distance_ratio:.2f}x as far from their centroids as the "
            f"rows already indexed (limit {self.limit:g}){lists}"
        )


def _centroid_distances(quantizer: faiss.Index, x: np.ndarray) -> np.ndarray:
    """Squared distance of each row to its nearest centroid (by the quantizer's own search)."""
    _, lists = quantizer.search(x, 1)
    nested = two_level(quantizer)
    if nested is not None:  # an IVF-Flat of centroids: reconstructing needs its direct map
        nested.make_direct_map()
    centroids = quantizer.reconstruct_batch(np.maximum(lists[:, 0], 0))
    return np.asarray(((x - centroids) ** 2).sum(axis=1), dtype=np.float64)


@dataclass(frozen=True, kw_only=True)
class DriftTask:
    """Mean squared distance to the nearest centroid of the ``new`` and the ``old`` sampled rows."""

    trained: str
    store: RowStore
    new: np.ndarray
    old: np.ndarray

    def run(self) -> tuple[float, float]:
        index = faiss.read_index(fetched(self.trained))  # held: the IVF view below points into it
        ivf = ivf_of(index)
        assert ivf is not None
        quantizer = faiss.clone_index(ivf.quantizer)
        return tuple(  # type: ignore[return-value]
            float(_centroid_distances(quantizer, np.ascontiguousarray(self.store.gather_vectors(rows))).mean())
            for rows in (self.new, self.old)
        )


def measure_drift(
    client: Any,
    *,
    trained: Path,
    store: RowStore,
    new_pieces: tuple[int, ...],
    seed: int,
    limit: float,
    imbalance_before: float | None,
    imbalance_after: float | None,
) -> Drift | None:
    """The drift of the rows of ``new_pieces`` from the other live rows (None: nothing to compare:
    no inverted lists, no new rows, or no old ones)."""
    trained_index = faiss.read_index(str(fetched(trained)))
    ivf = ivf_of(trained_index)
    old_pieces = tuple(p for p in store.live if p not in set(new_pieces))
    if ivf is None or not new_pieces or not old_pieces:
        return None
    new_store = RowStore(store.root, store.starts, store.total_rows, new_pieces)
    old_store = RowStore(store.root, store.starts, store.total_rows, old_pieces)
    rng = np.random.default_rng([seed, 31337])
    new_rows, old_rows = new_store.sample_rows(rng, DRIFT_SAMPLE), old_store.sample_rows(rng, DRIFT_SAMPLE)
    task = DriftTask(trained=str(trained), store=store, new=new_rows, old=old_rows)
    new_mean, old_mean = result_of(submit(client, task, "drift"))
    ratio = new_mean / old_mean if old_mean > 0 else (1.0 if new_mean == 0 else float("inf"))
    return Drift(new_store.rows, round(float(ratio), 3), imbalance_before, imbalance_after, limit)
