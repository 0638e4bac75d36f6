"""Training: the index key's quantizers (k-means, PQ codebooks) fitted on a seeded sample of rows,
on a worker and its device, written as the trained (empty) index the fill copies."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.backends.kernels import ivf_of
from pipeline.backends.worker import worker_device
from pipeline.index.choice import make_encoder
from pipeline.index.sampling import load_sample, sample_rows
from pipeline.io.atomic import atomic_path
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.results import Files
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.progress import PieceProgress, watch
from pipeline.runtime.runner import submit

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
                be.train(index, sample)
            progress.note("writing the trained index")
        with atomic_path(self.out) as tmp:
            faiss.write_index(index, str(tmp))


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
        rows=sample_rows(store.total_rows, n_train, seed),
        seed=seed,
        out=str(path),
    )
    watch(client, submit(client, task, "train"), "train")
    manifest.finish_stage("train", TrainRecord(key, n_train, manifest.record([path])))
