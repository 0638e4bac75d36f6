"""Generated datasets with known structure: clustered vectors in Parquet shards.

Used by the README's first command, the tests and the benchmarks. Clusters of varying spread make
approximate search measurably approximate (unlike uniform noise, where every method looks alike).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.atomic import atomic_path

__all__ = ["clustered_vectors", "duplicate_heavy_vectors", "write_shards"]


def clustered_vectors(n: int, dim: int, clusters: int = 100, seed: int = 0, latent: int = 8) -> np.ndarray:
    """``n`` float32 vectors in ``clusters`` clusters, each spread along its own ``latent``-dim subspace.

    Like real embeddings (and unlike isotropic noise) the data has a low intrinsic dimension, so
    nearest neighbours are well defined and recall measures the index, not the noise.
    """
    rng = np.random.default_rng(seed)
    latent = min(latent, dim)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    bases = rng.standard_normal((clusters, latent, dim)).astype(np.float32) / np.sqrt(latent)
    spread = rng.uniform(0.3, 1.0, size=clusters).astype(np.float32)
    label = rng.integers(0, clusters, size=n)
    out = np.empty((n, dim), dtype=np.float32)
    for c in range(clusters):  # one matrix product per cluster, not per row
        rows = np.flatnonzero(label == c)
        z = rng.standard_normal((rows.size, latent)).astype(np.float32)
        out[rows] = centres[c] + spread[c] * (z @ bases[c])
    out += 0.02 * rng.standard_normal((n, dim)).astype(np.float32)
    return out


def duplicate_heavy_vectors(
    n: int, dim: int, *, seed: int = 0, largest: int = 400, share: float = 0.6, near: float = 0.2
) -> np.ndarray:
    """``n`` clustered vectors of which about ``share`` are copies: groups of identical vectors
    whose sizes run from 2 to ``largest`` (log-uniform, so a few groups are very large, as the
    same summary text is in real corpora), and ``near`` of the rest near-duplicates (tiny noise
    on another row). Rows are shuffled, so copies land in every shard."""
    rng = np.random.default_rng(seed + 1)
    x = clustered_vectors(n, dim, seed=seed)
    copied = 0
    target = int(share * n)
    while copied < target:
        size = int(min(target - copied + 1, np.exp(rng.uniform(np.log(2), np.log(largest)))))
        if size < 2:
            break
        src, dst = rng.integers(0, n), rng.integers(0, n, size=size - 1)
        x[dst] = x[src]
        copied += size - 1
    nearby = rng.random(n) < near
    x[nearby] = x[rng.integers(0, n, int(nearby.sum()))] + 0.01 * rng.standard_normal((int(nearby.sum()), dim))
    return x[rng.permutation(n)].astype(np.float32)


def write_shards(
    directory: str | os.PathLike[str],
    vectors: np.ndarray,
    *,
    shards: int = 4,
    row_group_rows: int = 10_000,
    ids: np.ndarray | list[str] | None = None,
    dtype: str = "float32",
    first_id: int = 0,
) -> list[Path]:
    """Write ``vectors`` (and ``id``, plus a ``text`` column) as ``part-NNNNN.parquet`` shards."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    all_ids = pa.array(np.arange(first_id, first_id + n, dtype=np.int64) if ids is None else ids)
    paths = []
    for s, rows in enumerate(np.array_split(np.arange(n), shards)):
        if rows.size == 0:
            continue
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        values = pa.array(vectors[lo:hi].astype(dtype).ravel())
        table = pa.table(
            {
                "id": all_ids.slice(lo, hi - lo),
                "text": pa.array([f"row {i}" for i in range(lo, hi)]),
                "embedding": pa.FixedSizeListArray.from_arrays(values, dim),
            }
        )
        path = out / f"part-{s:05d}.parquet"
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, row_group_size=row_group_rows)
        paths.append(path)
    return paths
