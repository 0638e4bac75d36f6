"""The GPU path against the CPU path, on a real GPU (``pytest -m gpu``; skipped without one).

Every check compares with the CPU result on the same data or the same trained index: GPU
results are trusted only as far as they agree.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import run
from pipeline.backends import CpuBackend, GpuBackend
from pipeline.index.choice import make_index
from pipeline.index.fill import load_index
from pipeline.search.recall import recall_at_k

from .conftest import DIM

pytestmark = pytest.mark.gpu

KEY = {"index_key": "IVF32,PQ16", "nprobe": 8}


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return recall_at_k(a.tolist(), b.tolist(), a.shape[1])


def _trained(vectors: np.ndarray, key: str = "IVF32,PQ16") -> faiss.Index:
    index = make_index(key, DIM, "cosine")
    CpuBackend().train(index, vectors)
    return index


def test_auto_picks_the_gpu():
    from pipeline.backends.worker import choose

    assert choose("auto")[0] == "gpu" and choose("gpu")[0] == "gpu"


def test_same_neighbours_as_the_cpu_on_the_same_index(vectors):
    index = _trained(vectors)
    CpuBackend().add(index, vectors, np.arange(len(vectors), dtype=np.int64))
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", 8)
    q = vectors[:500]
    _, cpu = CpuBackend().search(index, q, 10)
    _, gpu = GpuBackend(device=0).search(index, q, 10)
    assert _overlap(gpu, cpu) >= 0.99  # the fallbacks (k > 2048, fast-scan) are tested in test_gpu_rules.py


def test_gpu_training_and_fill_match_the_cpu(vectors):
    """GPU k-means and GPU assignment give an index that finds what the CPU-built one finds."""
    cpu_index, gpu_index = _trained(vectors), make_index("IVF32,PQ16", DIM, "cosine")
    GpuBackend(device=0).train(gpu_index, vectors)
    ids = np.arange(len(vectors), dtype=np.int64)
    CpuBackend().add(cpu_index, vectors, ids)
    GpuBackend(device=0).add(gpu_index, vectors, ids)
    assert gpu_index.ntotal == cpu_index.ntotal == len(vectors)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(vectors)
    _, truth = exact.search(vectors[:500], 10)
    for index in (cpu_index, gpu_index):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 32)
    r_cpu = _overlap(CpuBackend().search(cpu_index, vectors[:500], 10)[1], truth)
    r_gpu = _overlap(CpuBackend().search(gpu_index, vectors[:500], 10)[1], truth)
    assert r_gpu >= r_cpu - 0.02


def test_exact_scores_match_the_cpu(vectors):
    rng = np.random.default_rng(0)
    q = vectors[:200]
    cand = vectors[rng.integers(0, len(vectors), (200, 40))]
    for metric in ("cosine", "l2"):
        np.testing.assert_allclose(GpuBackend(device=0).exact_scores(q, cand, metric),
                                   CpuBackend().exact_scores(q, cand, metric), rtol=1e-4, atol=1e-4)


def test_small_temp_memory_cap_still_searches_right(vectors):
    index = _trained(vectors)
    CpuBackend().add(index, vectors, np.arange(len(vectors), dtype=np.int64))
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", 8)
    _, cpu = CpuBackend().search(index, vectors, 10)
    capped = GpuBackend(device=0, temp_memory=8 << 20)  # faiss pages its work through 8 MiB
    _, gpu = capped.search(index, vectors, 10)
    assert _overlap(gpu, cpu) >= 0.99


def test_run_on_the_gpu_matches_the_cpu_and_its_index_loads_on_the_cpu(make_config, dataset_dir, vectors, tmp_path):
    gpu_report = run(make_config(input=str(dataset_dir), output=str(tmp_path / "gpu"), device="gpu", k=10, **KEY))
    cpu_report = run(make_config(input=str(dataset_dir), output=str(tmp_path / "cpu"), device="cpu", k=10, **KEY))
    assert gpu_report.search.backend == "gpu"

    def lists(out: str) -> np.ndarray:
        t = pq.read_table(Path(out).parent / "neighbors").sort_by("query_id")
        return np.array(t.column("neighbor_id").to_pylist())

    assert _overlap(lists(gpu_report.neighbors), lists(cpu_report.neighbors)) >= 0.97
    # the GPU-built index is an ordinary CPU index on disk
    index = load_index(tmp_path / "gpu" / "index")
    assert index.ntotal == len(vectors)
    faiss.ParameterSpace().set_index_parameter(index, "nprobe", 8)
    assert CpuBackend().search(index, vectors[:10], 5)[1].shape == (10, 5)
