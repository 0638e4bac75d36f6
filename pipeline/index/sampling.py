"""Seeded, uniform sampling over all pieces of a dataset (never just the first shard)."""

from __future__ import annotations

import numpy as np

from pipeline.io.store import RowStore

__all__ = ["sample_rows", "load_sample"]


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct global rows drawn uniformly from ``range(n)`` with ``seed``, sorted."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def load_sample(store: RowStore, rows: np.ndarray) -> np.ndarray:
    """The vectors of ``rows`` as one float32 array (the training set; bounded by its size), read
    piece by piece so that nothing stays mapped (:meth:`RowStore.gather_vectors`)."""
    return np.ascontiguousarray(store.gather_vectors(rows, mapped=False))
