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

from .conftest import DIM, write_store

# the node runs Python, NumPy and CuPy versions CI never does: a new warning is shown, not an error
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("default")]

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
        np.testing.assert_allclose(
            GpuBackend(device=0).exact_scores(q, cand, metric),
            CpuBackend().exact_scores(q, cand, metric),
            rtol=1e-4,
            atol=1e-4,
        )


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


def _lists(index: faiss.Index) -> list[tuple[bytes, bytes]]:
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    inv = ivf.invlists
    return [
        (
            faiss.rev_swig_ptr(inv.get_codes(i), inv.list_size(i) * ivf.code_size).tobytes(),
            faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).tobytes(),
        )
        for i in range(ivf.nlist)
    ]


def test_the_gpu_fill_encodes_on_the_gpu_and_writes_the_cpu_layout(vectors):
    """IVF-Flat filled through its GPU twin holds the same lists (vectors and ids) as a CPU fill;
    8-bit IVF-PQ finds what the CPU-encoded one finds."""
    from pipeline.backends.gpu import gpu_encodes

    ids = np.arange(100, 100 + len(vectors), dtype=np.int64)
    flat_cpu, flat_gpu = _trained(vectors, "IVF32,Flat"), _trained(vectors, "IVF32,Flat")
    assert gpu_encodes(flat_gpu)
    CpuBackend().add(flat_cpu, vectors, ids)
    GpuBackend(device=0).add(flat_gpu, vectors, ids)
    assert flat_gpu.ntotal == len(vectors)
    cpu_lists, gpu_lists = _lists(flat_cpu), _lists(flat_gpu)
    same = sum(a == b for a, b in zip(cpu_lists, gpu_lists, strict=True))
    assert same >= len(cpu_lists) - 2  # a vector on a centroid boundary may land in the other list
    pq_cpu, pq_gpu = _trained(vectors), faiss.clone_index(_trained(vectors))
    CpuBackend().add(pq_cpu, vectors, ids)
    GpuBackend(device=0).add(pq_gpu, vectors, ids)
    for index in (pq_cpu, pq_gpu):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", 8)
    q = vectors[:500]
    assert _overlap(CpuBackend().search(pq_gpu, q, 10)[1], CpuBackend().search(pq_cpu, q, 10)[1]) >= 0.97


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_resident_rerank_and_exact_search_match_the_cpu(tmp_path, vectors, metric):
    """The row store held on the GPU: re-ranking and the exact plan agree with the host's."""
    store = write_store(tmp_path / "store", vectors)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, len(vectors), (300, 40))
    rows[:, -3:] = -1
    q = vectors[:300]
    gpu = GpuBackend(device=0)
    assert gpu._resident(store) is not None  # a few MiB: resident
    np.testing.assert_allclose(
        gpu.rerank(q, rows, store, metric), CpuBackend().rerank(q, rows, store, metric), rtol=1e-4, atol=1e-4
    )
    g_scores, g_rows = gpu.exact_search(q, store, 10, metric)
    c_scores, c_rows = CpuBackend().exact_search(q, store, 10, metric)
    np.testing.assert_allclose(g_scores, c_scores, rtol=1e-4, atol=1e-4)
    assert _overlap(g_rows, c_rows) >= 0.99


def test_gpu_default_plan_is_ivf_flat_when_it_fits(make_config, tmp_path):
    """``index_key: auto`` on GPU workers: 30,000 x 32 fits any GPU, so IVF-Flat, no re-rank, at the target."""
    from pipeline.io.sample_data import clustered_vectors, write_shards

    data = tmp_path / "data"
    write_shards(data, clustered_vectors(30_000, DIM, clusters=60, seed=5), shards=3, row_group_rows=5000)
    report = run(make_config(input=str(data), output=str(tmp_path / "auto"), device="gpu", k=10))
    assert report.search.backend == "gpu"
    assert report.index.key.endswith(",Flat") and report.search.rerank == 0
    assert "GPU" in report.index.why
    assert report.recall is not None and report.recall.recall >= 0.95
    assert all(d.gpu_name and d.gpu_free_bytes > 0 for d in report.join.devices)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_self_join_blocks_and_pairs_match_the_cpu(vectors, metric):
    """The pair methods (brute force on the GPU both ways) against the CPU's symmetric kernels."""
    x = np.ascontiguousarray(vectors[:3000], dtype=np.float32)
    a, b = x[:1700], x[1700:]
    gpu, cpu = GpuBackend(device=0), CpuBackend()
    np.testing.assert_allclose(gpu.self_topk(x, 8, metric)[0], cpu.self_topk(x, 8, metric)[0], rtol=1e-4, atol=1e-3)
    floor = cpu.self_topk(b, 8, metric)[0][:, -1]
    (ga, _), (gb, _) = gpu.pair_topk(a, b, 8, metric, floor)
    (ca, _), (cb, _) = cpu.pair_topk(a, b, 8, metric, floor)
    np.testing.assert_allclose(ga, ca, rtol=1e-4, atol=1e-3)
    kept = gb >= floor[:, None]  # the CPU's second side is exact down to the floor
    np.testing.assert_allclose(np.where(kept, cb, 0), np.where(kept, gb, 0), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    ("codes", "metric", "gpu_type"),
    [
        ("Flat", faiss.METRIC_L2, "GpuIndexIVFFlat"),
        ("Flat", faiss.METRIC_INNER_PRODUCT, "GpuIndexIVFFlat"),
        ("SQ8", faiss.METRIC_L2, "GpuIndexIVFScalarQuantizer"),
        ("PQ8np", faiss.METRIC_L2, "GpuIndexIVFPQ"),
    ],
)
def test_a_list_group_is_searched_on_the_gpu_as_on_the_host(vectors, monkeypatch, codes, metric, gpu_type):
    """GpuBackend.group_search (a routed join's score task on a GPU worker): the group's lists
    alone go to the GPU (a GPU index, not a host fallback) and give the host's lists: the same
    vectors for IVF-Flat, the same codes' candidates for SQ and PQ (with their coarse scores)."""
    from pipeline.backends.lists import coarse_assign
    from pipeline.search.routed import coarse_distances

    owner = faiss.index_factory(DIM, f"IVF32,{codes}", metric)
    ivf = faiss.downcast_index(owner)  # a proxy that does not own it: owner stays referenced here
    ivf.train(vectors)
    ivf.add(vectors)
    first, last = 5, 21
    q = vectors[:700]
    assign = coarse_assign(ivf.quantizer, q, 8)
    assign = np.where((assign >= first) & (assign < last), assign, -1)
    coarse = coarse_distances(q, ivf.quantizer.reconstruct_n(0, 32), assign, metric == faiss.METRIC_INNER_PRODUCT)
    copies = []
    real = faiss.index_cpu_to_gpu

    def to_gpu(*args):
        copies.append(real(*args))
        return copies[-1]

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu)
    with GpuBackend(device=0).group_search(ivf, first, last) as on_gpu:
        got = on_gpu(q, 10, assign, coarse)
    assert len(copies) == 1 and gpu_type in type(copies[0]).__name__ and copies[0].nlist == last - first
    with CpuBackend().group_search(ivf, first, last) as on_host:
        want = on_host(q, 10, assign, coarse)
    found = want[1] >= 0
    np.testing.assert_allclose(got[0][found], want[0][found], rtol=1e-3, atol=1e-3)
    assert (got[1] == want[1]).mean() >= (0.99 if codes == "Flat" else 0.95)


def test_a_routed_join_on_the_gpu_gives_the_cpu_tables(make_config, dataset_dir, tmp_path):
    """The routed join end to end on a GPU worker (its list groups scored on the GPU) writes the
    lists a CPU worker writes, ties aside."""

    def job(device: str):
        return run(
            make_config(
                input=str(dataset_dir),
                output=str(tmp_path / device),
                device=device,
                k=10,
                index_key="IVF16,Flat",
                nprobe=4,
                routed_join=True,
                exclude_self=True,
            )
        )

    on_gpu, on_cpu = job("gpu"), job("cpu")
    assert on_gpu.search.backend == "gpu"

    def lists(report) -> np.ndarray:
        t = pq.read_table(Path(report.neighbors).parent / "neighbors").sort_by("query_id")
        return np.array(t.column("neighbor_id").to_pylist())

    assert _overlap(lists(on_gpu), lists(on_cpu)) >= 0.99
