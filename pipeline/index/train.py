"""Training: the index key's quantizers (k-means, PQ codebooks) fitted on a seeded sample of rows,
on a worker and its device, written as the trained (empty) index the fill copies."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.clustering import two_level_clustering

from pipeline.backends.kernels import ivf_of
from pipeline.backends.lists import coarse_centroids, first_level_probes, two_level
from pipeline.backends.worker import worker_device
from pipeline.index.choice import make_encoder
from pipeline.index.sampling import load_sample, sample_rows
from pipeline.io.atomic import atomic_path
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.results import Files
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.progress import PieceProgress, watch
from pipeline.runtime.runner import submit, unwrap

__all__ = ["TrainTask", "TrainRecord", "train_index"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRecord:
    """The manifest's ``train`` stage: the key trained, on how many rows, its file."""

    key: str
    rows: int
    files: Files = ()


@dataclass(frozen=True, kw_only=True)
class TrainTask:
    """Train an empty ``key`` index of ``dim``-d vectors on the stored ``rows`` (none: an index
    that needs no training), seeding its k-means with ``seed``; write it to ``out``."""

    key: str
    dim: int
    metric: Metric
    store: RowStore
    rows: np.ndarray
    seed: int
    out: str

    def run(self) -> None:
        index = make_encoder(self.key, self.dim, self.metric)
        ivf = ivf_of(index)
        if ivf is not None:
            ivf.cp.seed = self.seed
        n = len(self.rows)
        if n:
            progress = PieceProgress("train", 0)
            progress.note(f"reading {n:,} sampled rows")
            sample = load_sample(self.store, self.rows)
            progress.note(
                f"k-means into {ivf.nlist:,} lists on {n:,} rows"
                if ivf is not None
                else f"training {self.key} on {n:,} rows"
            )
            with worker_device() as be:
                if ivf is not None and two_level(ivf.quantizer) is not None and not _transformed(index):
                    progress.note(f"two-level k-means into {ivf.nlist:,} lists on {n:,} rows")
                    train_two_level(ivf, sample, self.seed)
                    nested = two_level(ivf.quantizer)
                    assert nested is not None
                    progress.note(
                        f"the two-level quantizer probes {nested.nprobe} of its {nested.nlist} first-level lists "
                        f"(about {coarse_centroids(ivf):,.0f} centroids scored a row)"
                    )
                be.train(index, sample)  # the codes (the coarse quantizer, trained above, is kept)
            progress.note("writing the trained index")
        with atomic_path(self.out) as tmp:
            faiss.write_index(index, str(tmp))


def _transformed(index: faiss.Index) -> bool:
    """Whether ``index`` transforms vectors (OPQ, PCA) before its IVF layer: FAISS's own training then."""
    return isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)


FIRST_LEVEL_CHECK_ROWS = 4096  # training rows on which a two-level quantizer's probes are counted


def train_two_level(ivf: faiss.IndexIVF, x: np.ndarray, seed: int) -> None:
    """Train an IVF index's two-level quantizer on ``x``: FAISS's two-level k-means (``sqrt(nlist)``
    clusters, then each split into lists in proportion to its rows), whose cost grows with
    ``sqrt(nlist)`` where one k-means into ``nlist`` grows with ``nlist``; the centroids then fill
    the quantizer's own IVF-Flat index, which then probes as many of its lists as
    :func:`pipeline.backends.lists.first_level_probes` finds it takes, on up to
    ``FIRST_LEVEL_CHECK_ROWS`` of ``x`` drawn with ``seed``. Inner-product indexes cluster on the
    sphere, as FAISS's own IVF training does."""
    nested = two_level(ivf.quantizer)
    assert nested is not None
    spherical = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    centroids, _ = two_level_clustering(
        np.ascontiguousarray(x, dtype=np.float32), int(nested.nlist), int(ivf.nlist), seed=seed, spherical=spherical
    )
    fill_first_level(nested, centroids, x, seed)


def fill_first_level(nested: faiss.IndexIVFFlat, centroids: np.ndarray, x: np.ndarray, seed: int) -> None:
    """Train the first level of a two-level quantizer (``nested``) on the ``centroids`` with
    ``seed``, add them, and set its ``nprobe`` to what :func:`first_level_probes` counts on up to
    ``FIRST_LEVEL_CHECK_ROWS`` of the rows ``x``, drawn with ``seed``."""
    nested.cp.seed = seed
    nested.cp.min_points_per_centroid = 1  # ~32 centroids a first-level list (choice.first_level_lists): by design
    nested.train(centroids)
    nested.add(centroids)
    check = np.random.default_rng(seed).choice(len(x), min(len(x), FIRST_LEVEL_CHECK_ROWS), replace=False)
    nested.nprobe = first_level_probes(nested, centroids, x[np.sort(check)])


def train_index(
    client: Any,
    manifest: Manifest,
    *,
    store: RowStore,
    key: str,
    dim: int,
    metric: Metric,
    n_train: int,
    seed: int,
    path: Path,
) -> None:
    """Train ``key`` on ``n_train`` seeded rows on a worker; write ``path``; record the stage."""
    if n_train:
        log.info("training %s (%s) on %d sampled rows", key, metric, n_train)
    task = TrainTask(
        key=key,
        dim=dim,
        metric=metric,
        store=store,
        rows=store.live_rows(sample_rows(store.rows, n_train, seed)),
        seed=seed,
        out=str(path),
    )
    unwrap(watch(client, submit(client, task, "train"), "train"))
    manifest.finish_stage("train", TrainRecord(key, n_train, manifest.record([path])))
