"""Training: the index key's quantizers (k-means, PQ codebooks) fitted on a seeded sample of rows,
on a worker and its device, written as the trained (empty) index the fill copies."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.backends.kernels import ivf_of
from pipeline.backends.lists import coarse_centroids, first_level_probes, scored_centroids, two_level
from pipeline.backends.worker import worker_device
from pipeline.index.choice import first_level_choices, make_encoder, with_first_level
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
    that needs no training), seeding its k-means with ``seed``; write it to ``out``; return the key
    trained. ``choose_first_level`` (an auto plan's two-level key): the first level's size is the
    one of :func:`pipeline.index.choice.first_level_choices` that scores the fewest centroids a
    row (:func:`weigh_first_levels`, :func:`cheapest`), and the key returned says which."""

    key: str
    dim: int
    metric: Metric
    store: RowStore
    rows: np.ndarray
    seed: int
    out: str
    choose_first_level: bool = False

    def run(self) -> str:
        key = self.key
        index = make_encoder(key, self.dim, self.metric)
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
                    nested = two_level(ivf.quantizer)
                    assert nested is not None
                    centroids = two_level_centroids(ivf, sample, self.seed)
                    if self.choose_first_level:
                        n1 = self._cheapest_first_level(ivf, centroids, sample, progress)
                        if n1 != nested.nlist:  # the same key but for the first level's size
                            key = with_first_level(key, n1)
                            index = make_encoder(key, self.dim, self.metric)
                            ivf = ivf_of(index)
                            assert ivf is not None
                            nested = two_level(ivf.quantizer)
                            assert nested is not None
                    fill_first_level(nested, centroids, sample, self.seed)
                    progress.note(
                        f"the two-level quantizer probes {nested.nprobe} of its {nested.nlist} first-level lists "
                        f"(about {coarse_centroids(ivf):,.0f} centroids scored a row)"
                    )
                be.train(index, sample)  # the codes (the coarse quantizer, trained above, is kept)
            progress.note("writing the trained index")
        with atomic_path(self.out) as tmp:
            faiss.write_index(index, str(tmp))
        return key

    def _cheapest_first_level(
        self, ivf: faiss.IndexIVF, centroids: np.ndarray, sample: np.ndarray, progress: PieceProgress
    ) -> int:
        """The first-level size :func:`cheapest` keeps of those weighed for ``ivf``'s centroids."""
        weighed = weigh_first_levels(centroids, sample, self.seed, ivf.metric_type, first_level_choices(int(ivf.nlist)))
        progress.note(
            "first levels weighed: "
            + "; ".join(f"{w.lists}: {w.probes} probed, {w.scored:,.0f} scored" for w in weighed)
        )
        return cheapest(weighed).lists


def _transformed(index: faiss.Index) -> bool:
    """Whether ``index`` transforms vectors (OPQ, PCA) before its IVF layer: FAISS's own training then."""
    return isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)


FIRST_LEVEL_CHECK_ROWS = 4096  # training rows on which a two-level quantizer's probes are counted


def train_two_level(ivf: faiss.IndexIVF, x: np.ndarray, seed: int) -> None:
    """Train an IVF index's two-level quantizer on ``x`` (:func:`two_level_centroids`, then
    :func:`fill_first_level`), its first level the size its key says."""
    nested = two_level(ivf.quantizer)
    assert nested is not None
    fill_first_level(nested, two_level_centroids(ivf, x, seed), x, seed)


def two_level_centroids(ivf: faiss.IndexIVF, x: np.ndarray, seed: int) -> np.ndarray:
    """The ``nlist`` centroids of an IVF index, by FAISS's two-level k-means on ``x`` (the power
    of two nearest ``sqrt(nlist)`` clusters, as FAISS's own two-level IVF training, then each split
    into lists in proportion to its rows), whose cost grows with ``sqrt(nlist)`` where one k-means
    into ``nlist`` grows with ``nlist``. The split is not the quantizer's first level, whose size
    training may choose (:func:`weigh_first_levels`, :func:`cheapest`) after the centroids. Inner-product indexes
    cluster on the sphere, as FAISS's own IVF training does."""
    from faiss.contrib.clustering import two_level_clustering  # here: it imports SciPy (0.1-0.2 s a start)

    nlist = int(ivf.nlist)
    split = 1 << max(0, round(math.log2(math.sqrt(nlist))))
    spherical = ivf.metric_type == faiss.METRIC_INNER_PRODUCT
    centroids, _ = two_level_clustering(
        np.ascontiguousarray(x, dtype=np.float32), split, nlist, seed=seed, spherical=spherical
    )
    return np.ascontiguousarray(centroids, dtype=np.float32)


def _check_rows(x: np.ndarray, seed: int) -> np.ndarray:
    """Up to ``FIRST_LEVEL_CHECK_ROWS`` of ``x`` drawn with ``seed``, in order."""
    check = np.random.default_rng(seed).choice(len(x), min(len(x), FIRST_LEVEL_CHECK_ROWS), replace=False)
    return x[np.sort(check)]


def fill_first_level(nested: faiss.IndexIVFFlat, centroids: np.ndarray, x: np.ndarray, seed: int) -> None:
    """Train the first level of a two-level quantizer (``nested``) on the ``centroids`` with
    ``seed``, add them, and set its ``nprobe`` to what :func:`first_level_probes` counts on up to
    ``FIRST_LEVEL_CHECK_ROWS`` of the rows ``x``, drawn with ``seed``."""
    nested.cp.seed = seed
    nested.cp.min_points_per_centroid = 1  # ~32 centroids a first-level list (choice.first_level_lists): by design
    nested.train(centroids)
    nested.add(centroids)
    nested.nprobe = first_level_probes(nested, centroids, _check_rows(x, seed))


@dataclass(frozen=True)
class FirstLevel:
    """A first-level size weighed by training: its lists, the probes counted for them, and the
    centroids it then scores a row on the check rows."""

    lists: int
    probes: int
    scored: float


def weigh_first_levels(
    centroids: np.ndarray, x: np.ndarray, seed: int, metric: int, choices: tuple[int, ...]
) -> list[FirstLevel]:
    """Each first-level size of ``choices`` for a two-level quantizer over ``centroids``, trained
    and its probes counted as :func:`fill_first_level` does, with the centroids it scores a row on
    the check rows of ``x`` (:func:`pipeline.backends.lists.scored_centroids`)."""
    d = centroids.shape[1]
    check = _check_rows(x, seed)
    weighed = []
    for n1 in choices:
        first = faiss.IndexIVFFlat(faiss.IndexFlat(d, metric), d, n1, metric)
        fill_first_level(first, centroids, x, seed)
        weighed.append(FirstLevel(n1, int(first.nprobe), scored_centroids(first, check)))
    return weighed


def cheapest(weighed: list[FirstLevel]) -> FirstLevel:
    """The first level that scores the fewest centroids a row: counted, not timed, so the same
    sample chooses the same; the first of equals."""
    return min(weighed, key=lambda level: level.scored)


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
    choose_first_level: bool = False,
) -> str:
    """Train ``key`` on ``n_train`` seeded rows on a worker; write ``path``; record the stage with
    the key trained (``choose_first_level``: its two-level quantizer's first level, if any, sized
    by training, :class:`TrainTask`); return that key."""
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
        choose_first_level=choose_first_level,
    )
    trained: str = unwrap(watch(client, submit(client, task, "train"), "train"))
    if trained != key:
        log.info("trained %s (its first level sized by training)", trained)
    manifest.finish_stage("train", TrainRecord(trained, n_train, manifest.record([path])))
    return trained
