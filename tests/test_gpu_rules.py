"""The GPU backend's rules and its faiss plumbing, checked on the CPU.

The GPU backend trains and fills through two faiss hooks (a k-means assignment index, and
``add_core`` with precomputed lists). Driven here by CPU indexes, they must give exactly what
plain ``train`` / ``add_with_ids`` give, so the GPU path differs only in where the distances run.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.backends import CpuBackend, GpuBackend
from pipeline.backends.gpu import (
    GPU_MAX_K,
    _index_bytes,
    add_with_assignments,
    batch_rows,
    device_vector_bytes,
    gpu_runtime_problem,
    gpu_search_limits,
    train_with_assigner,
)
from pipeline.backends.kernels import FAISS_METRICS, ResidentRows, host_rerank, ivf_of
from pipeline.index.choice import default_index_key, default_rerank, explain_index_key, gpu_index_bytes, make_index
from pipeline.io.sample_data import clustered_vectors

from .conftest import write_store


def _data(n: int = 10_000, d: int = 32) -> np.ndarray:
    x = clustered_vectors(n, d, clusters=40, seed=0)
    faiss.normalize_L2(x)
    return x


def _codes(index: faiss.Index) -> list[bytes]:
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    inv = ivf.invlists
    return [
        faiss.rev_swig_ptr(inv.get_codes(i), inv.list_size(i) * ivf.code_size).tobytes()
        + faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).tobytes()
        for i in range(ivf.nlist)
    ]


@pytest.mark.parametrize("key", ["IVF32,PQ8", "IVF32,PQ16x4", "IVF32,SQ8", "IVF32,Flat", "OPQ4,IVF32,PQ4"])
def test_assigner_hooks_match_plain_faiss(key):
    """Training with an outside assignment index and adding with precomputed lists change nothing."""
    x = _data()
    train = x[:3000] if key.startswith("OPQ") else x  # OPQ's alternating training is slow; few rows suffice here
    plain = make_index(key, 32, "cosine")
    hooked = make_index(key, 32, "cosine")
    plain.train(train)
    used = []

    def assigner(d: int, metric: int) -> faiss.Index:
        used.append((d, metric))
        return faiss.IndexFlat(d, metric)

    train_with_assigner(hooked, train, assigner)
    assert used[0] == (32, FAISS_METRICS["cosine"])  # the coarse k-means, in the quantizer's metric
    if "PQ" in key and "SQ" not in key:
        assert any(metric == faiss.METRIC_L2 for _, metric in used)  # the PQ codebooks' k-means
    q = faiss.downcast_index(faiss.extract_index_ivf(hooked)).quantizer
    q0 = faiss.downcast_index(faiss.extract_index_ivf(plain)).quantizer
    np.testing.assert_array_equal(
        faiss.rev_swig_ptr(faiss.downcast_index(q).get_xb(), q.ntotal * 32),
        faiss.rev_swig_ptr(faiss.downcast_index(q0).get_xb(), q0.ntotal * 32),
    )
    ids = np.arange(1000, 1000 + len(x), dtype=np.int64)
    a, b = faiss.clone_index(plain), faiss.clone_index(plain)
    a.add_with_ids(x, ids)
    calls = []

    def assign(quantizer: faiss.Index, xb: np.ndarray) -> np.ndarray:
        calls.append(len(xb))
        return quantizer.search(xb, 1)[1].ravel()

    add_with_assignments(b, x, ids, assign, rows_per_batch=3000)
    assert calls == [3000, 3000, 3000, 1000]
    assert b.ntotal == a.ntotal == len(x)
    assert _codes(a) == _codes(b)
    np.testing.assert_array_equal(a.search(x[:50], 5)[1], b.search(x[:50], 5)[1])


def test_hooks_are_cleared_after_training():
    index = make_index("IVF32,PQ8", 32, "l2")
    train_with_assigner(index, _data(), lambda d, m: faiss.IndexFlat(d, m))
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert ivf.clustering_index is None and ivf.pq.assign_index is None


@pytest.mark.parametrize(
    "key,dim,why,float16",
    [
        ("Flat", 32, None, False),
        ("IVF32,Flat", 32, None, False),
        ("IVF32,SQ8", 32, None, False),
        ("IVF32,PQ8", 32, None, False),
        ("IVF32,PQ96", 384, None, True),  # float16 lookup tables from 56 sub-quantizers
        ("IVF32,PQ16x4fs", 32, "no GPU implementation", False),
        ("IVF32,PQ16x4", 32, "4 bits", False),
        ("IVF32,PQ192", 384, "PQ192", False),
        ("IVF32,PQ2", 128, "64 dimensions per sub-quantizer", False),
        ("OPQ8,IVF32,PQ8", 32, None, False),
    ],
)
def test_gpu_search_limits(key, dim, why, float16):
    got_why, got_f16 = gpu_search_limits(make_index(key, dim, "l2"))
    assert (got_why is None) == (why is None)
    if why:
        assert why in got_why
    assert got_f16 == float16


def test_gpu_search_limits_raw_vector_pq():
    index = make_index("IVF32,PQ8", 32, "l2")
    faiss.downcast_index(faiss.extract_index_ivf(index)).by_residual = False
    assert "raw vectors" in gpu_search_limits(index)[0]


@pytest.mark.parametrize(
    "n,d,key",
    [
        (1_000_000, 128, "IVF2048,PQ32"),
        (10_000_000, 128, "IVF8192,PQ32"),
        (1_000_000, 768, "IVF2048,PQ96"),
        (30_000, 384, "IVF256,PQ96"),
        (1_000_000, 100, "IVF2048,PQ20"),  # 5 dimensions per sub-quantizer (the GPU takes 5)
        (1_000_000, 98, "IVF2048,SQ8"),  # no supported PQ splits 98 dimensions
        (5_000, 128, "Flat"),
    ],
)
def test_default_gpu_keys_are_searchable_on_the_gpu(n, d, key):
    assert default_index_key(n, d, gpu=True) == key
    assert gpu_search_limits(make_index(key, d, "l2"))[0] is None


GIB = 2**30


@pytest.mark.parametrize(
    "n,d,free,storage",
    [
        (10_000_000, 128, 80 * GIB, "Flat"),  # 5.2 GiB of float32 vectors: fit 40% of 80 GiB
        (10_000_000, 768, 60 * GIB, "SQfp16"),  # 28.7 GiB float32 do not fit 24 GiB; 14.4 GiB float16 do
        (100_000_000, 768, 80 * GIB, "PQ96"),  # neither fits: 8-bit PQ, re-ranked
        (1_000_000, 768, 16 * GIB, "Flat"),
        (1_000_000, 98, GIB // 4, "SQ8"),  # no supported PQ splits 98 dimensions
    ],
)
def test_gpu_default_plan_follows_free_gpu_memory(n, d, free, storage):
    key = default_index_key(n, d, gpu=True, gpu_free=free)
    assert key.split(",")[1] == storage
    index = make_index(key, d, "l2")
    assert gpu_search_limits(index)[0] is None  # every choice is searchable by the GPU kernels
    assert default_rerank(index) == (4 if storage.startswith(("PQ", "SQ8")) else 0)
    nlist = int(key.split(",")[0][3:])
    if storage == "Flat":
        assert gpu_index_bytes(n, d, nlist, 4 * d) <= 0.4 * free
    why = explain_index_key(n, d, gpu=True, gpu_free=free)
    assert f"({free / GIB:.1f} GiB)" in why and ("no re-rank" in why) == (storage in ("Flat", "SQfp16"))


def test_the_smallest_free_gpu_decides_the_plan():
    from pipeline.cluster.clients import ClusterInfo
    from pipeline.results import WorkerDevice

    def dev(name: str, free: int, backend: str = "gpu") -> WorkerDevice:
        return WorkerDevice(name, "h", backend, "test", 4, 1, "H200", 141 * GIB, free)

    cluster = ClusterInfo(2, None, None, (dev("0", 120 * GIB), dev("1", 20 * GIB)))
    assert cluster.backend == "gpu" and cluster.gpu_free == 20 * GIB
    assert ClusterInfo(1, None, None, (dev("0", 0, "cpu"),)).gpu_free == 0


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_resident_rows_rerank_as_the_host_does(tmp_path, metric):
    """The device-resident re-rank (run here with NumPy as its array module) scores what the host
    gather scores, missing candidates (-1) worst, across piece boundaries and small chunks."""
    x = _data(3000, 24)
    store = write_store(tmp_path / "store", x)
    rng = np.random.default_rng(3)
    q = _data(3100, 24)[3000:]
    rows = rng.integers(0, len(x), (100, 17))
    rows[rng.random(rows.shape) < 0.1] = -1
    want = host_rerank(CpuBackend().exact_scores, q, rows, store, metric)
    got = ResidentRows(np, store).rerank(q, rows, metric, chunk_bytes=24 * 17 * 4 * 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.isinf(got[rows < 0]).all() and (got[rows < 0] > 0).all() == (metric == "l2")


def test_cpu_exact_search_streams_the_store_exactly(tmp_path):
    x = _data(2500, 16)
    store = write_store(tmp_path / "store", x, pieces=4)
    for metric in ("cosine", "l2"):
        scores, rows = CpuBackend().exact_search(x[:50], store, 7, metric)
        flat = faiss.IndexFlat(16, FAISS_METRICS[metric])
        flat.add(x)
        want_scores, want_rows = flat.search(x[:50], 7)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
        assert (rows == want_rows).mean() > 0.99  # equal up to ties


def test_batch_rows_under_a_memory_cap():
    assert batch_rows(free_bytes=1 << 30, bytes_per_row=1024, cap=1 << 20) == (1 << 30) // 2 // 1024
    assert batch_rows(free_bytes=64 << 20, bytes_per_row=4096, cap=65_536) == 8192
    assert batch_rows(free_bytes=100, bytes_per_row=4096, cap=65_536) == 1  # never zero
    assert batch_rows(free_bytes=1 << 40, bytes_per_row=16, cap=65_536) == 65_536


@pytest.mark.parametrize("case", ["k above the GPU limit", "fast-scan codes"])
def test_gpu_backend_searches_on_the_cpu_with_the_reason(case, caplog):
    """Decided before any GPU call, so it holds (and is checked) on machines without a GPU."""
    x = _data()
    if case.startswith("k"):
        index, k, why = make_index("Flat", 32, "cosine"), GPU_MAX_K + 1, f"(the GPU kernels take at most {GPU_MAX_K})"
        index.add(x)
    else:
        index, k, why = make_index("IVF32,PQ16x4fs", 32, "cosine"), 5, "IndexIVFPQFastScan has no GPU implementation"
        index.train(x)
        index.add(x)
    with caplog.at_level(logging.WARNING, logger="pipeline.backends.gpu"):
        _, rows = GpuBackend(device=0).search(index, x[:20], k)
    np.testing.assert_array_equal(rows, CpuBackend().search(index, x[:20], k)[1])
    assert "searching on the CPU" in caplog.text and why in caplog.text


@pytest.mark.skipif(gpu_runtime_problem() is None, reason="a GPU is visible here")
def test_device_choice_without_a_gpu():
    from pipeline.backends.worker import choose

    problem = gpu_runtime_problem()
    assert problem and ("CPU-only build" in problem or "no CUDA device" in problem)
    assert choose("auto") == ("cpu", problem) and choose("gpu") == ("cpu", problem)
    assert choose("cpu") == ("cpu", "--device cpu")


def _copied_lists(index: faiss.Index) -> faiss.Index:
    """A copy of ``index`` with its IVF lists copied one by one: FAISS's cloner refuses sliced and
    on-disk lists, which ``copyInvertedListsFrom`` on a GPU reads list by list."""
    inner = faiss.downcast_index(ivf_of(index))
    held, own = inner.invlists, inner.own_invlists
    copied = faiss.ArrayInvertedLists(inner.nlist, inner.code_size)
    for i in range(inner.nlist):
        size = held.list_size(i)
        if size:
            copied.add_entries(i, size, held.get_ids(i), held.get_codes(i))
    inner.own_invlists = False  # the index keeps its own lists: swapped out for the clone only
    inner.replace_invlists(copied, False)
    try:
        return faiss.clone_index(index)
    finally:
        inner.replace_invlists(held, own)


class _CpuAsGpu:
    """faiss's GPU entry points replaced by CPU copies, so the GPU backend's own plumbing around
    them (fill through a twin and merge back, the resident exact index) runs here."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.copies = 0

        self.groups = 0  # of the copies: list groups (an index over a slice of another's lists)

        def to_gpu(_res, _device, index, _co=None):
            self.copies += 1
            ivf = ivf_of(index)
            lists = None if ivf is None else faiss.downcast_InvertedLists(ivf.invlists)
            self.groups += isinstance(lists, faiss.SliceInvertedLists)
            if lists is None or isinstance(lists, faiss.ArrayInvertedLists):
                return faiss.clone_index(index)
            return _copied_lists(index)  # sliced or on-disk lists: a GPU copies them list by list, as here

        class Options:  # faiss's GpuClonerOptions fields: setting any other name fails, as SWIG's would not
            __slots__ = ("useFloat16", "indicesOptions")

            def __init__(self) -> None:
                self.useFloat16, self.indicesOptions = False, 0

        monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", faiss.clone_index, raising=False)
        monkeypatch.setattr(faiss, "GpuClonerOptions", Options, raising=False)
        monkeypatch.setattr(faiss, "INDICES_64_BIT", 0, raising=False)
        monkeypatch.setattr(GpuBackend, "resources", lambda self: None)
        monkeypatch.setattr(GpuBackend, "free_memory", lambda self: 1 << 34)


@pytest.mark.parametrize(
    ("codes", "metric"),
    [
        ("Flat", faiss.METRIC_L2),
        ("Flat", faiss.METRIC_INNER_PRODUCT),
        ("SQ8", faiss.METRIC_L2),
        ("PQ8np", faiss.METRIC_L2),
    ],
)
def test_a_gpu_worker_copies_one_list_group_and_searches_it_as_the_host(monkeypatch, caplog, codes, metric):
    """GpuBackend.group_search (a routed join's score task on a GPU worker) copies only the group's
    lists (vectors, or codes with their codec), once for the block, and its searches give the
    host's; k above the GPU's limit goes to the host; a group over the free memory is searched on
    the host, said once."""
    from pipeline.backends.lists import coarse_assign
    from pipeline.search.routed import coarse_distances

    fake = _CpuAsGpu(monkeypatch)
    x = _data(6000, 32)
    owner = faiss.index_factory(32, f"IVF40,{codes}", metric)
    ivf = faiss.downcast_index(owner)  # a proxy that does not own it: owner stays referenced here
    ivf.train(x)
    ivf.add(x)
    first, last = 10, 25
    groups = [
        np.where((a >= first) & (a < last), a, -1)
        for a in (coarse_assign(ivf.quantizer, q, 6) for q in (x[:300], x[300:700]))
    ]
    centroids = ivf.quantizer.reconstruct_n(0, 40)
    similarity = metric == faiss.METRIC_INNER_PRODUCT
    coarse = [coarse_distances(q, centroids, a, similarity) for q, a in zip((x[:300], x[300:700]), groups, strict=True)]
    seen, real_to_gpu = [], faiss.index_cpu_to_gpu

    def to_gpu(res, device, index, co=None):  # what the GPU is given
        seen.append(index)
        return real_to_gpu(res, device, index, co)

    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu)
    with (
        GpuBackend(device=0).group_search(ivf, first, last) as on_gpu,
        CpuBackend().group_search(ivf, first, last) as on_host,
    ):
        for q, assign, near in zip((x[:300], x[300:700]), groups, coarse, strict=True):
            got, want = on_gpu(q, 10, assign, near), on_host(q, 10, assign, near)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
            assert (got[1] == want[1]).mean() > 0.99
        wide = on_gpu(x[:50], GPU_MAX_K + 1, groups[0][:50], coarse[0][:50])  # past the GPU's k: the host's
        assert wide[1].shape == (50, GPU_MAX_K + 1)
    assert fake.copies == 1 and seen[0].nlist == last - first  # the group's lists only, once
    assert seen[0].ntotal == sum(ivf.invlists.list_size(i) for i in range(first, last))

    monkeypatch.setattr(GpuBackend, "free_memory", lambda self: 1 << 10)
    with caplog.at_level(logging.WARNING), GpuBackend(device=0).group_search(ivf, first, last) as small:
        got = small(x[:300], 10, groups[0], coarse[0])
    assert fake.copies == 1 and "list groups searched on the CPU" in caplog.text
    with CpuBackend().group_search(ivf, first, last) as on_host:
        np.testing.assert_array_equal(got[1], on_host(x[:300], 10, groups[0], coarse[0])[1])


def _gpu_workers(monkeypatch: pytest.MonkeyPatch) -> _CpuAsGpu:
    """Workers asked for ``--device gpu`` choose the GPU backend, with faiss's GPU calls replaced
    by CPU stand-ins (the embedded in-process cluster: the patches reach its tasks)."""
    from pipeline.backends import worker

    fake = _CpuAsGpu(monkeypatch)
    choose = worker.choose
    monkeypatch.setattr(worker, "choose", lambda device: ("gpu", "stand-in") if device == "gpu" else choose(device))
    monkeypatch.setattr(worker, "claim_gpu", lambda lock_dir=None: (0, None))
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    monkeypatch.setattr(GpuBackend, "_resident", lambda self, store: None)  # no CuPy here: host gathers

    def knn_gpu(_res, q, x, k, metric=faiss.METRIC_L2, device=0):
        return faiss.knn(q, x, k, metric=metric)

    monkeypatch.setattr(faiss, "knn_gpu", knn_gpu, raising=False)
    return fake


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "routed"),
    [("IVF16,Flat", True), ("IVF16,SQ8", True), ("IVF16,Flat", False), ("IVF16,PQ8", False), ("Flat", False)],
)
def test_a_job_through_the_gpu_backend_writes_the_cpu_tables(
    make_config, dataset_dir, tmp_path, monkeypatch, key, routed
):
    """A whole job on a worker that chose the GPU backend, faiss's GPU calls replaced by CPU
    stand-ins (the plumbing a GPU node runs: the worker's choice, training, the fill's twin, the
    recall check, the batched search's clone or each list group copied alone, the exact plan):
    the tables a CPU worker writes, ties aside."""
    from pipeline import run

    fake = _gpu_workers(monkeypatch)

    def job(device: str):  # the embedded in-process cluster: the patches reach its tasks
        settings = {"index_key": key, "nprobe": 4, "k": 10, "exclude_self": True, "routed_join": routed}
        out = str(tmp_path / device)
        return run(
            make_config(
                input=str(dataset_dir), output=out, device=device, scheduler_address=None, workers=1, **settings
            )
        )

    on_gpu = job("gpu")
    assert on_gpu.search.backend == "gpu" and (fake.groups >= 1) == routed  # routed: list groups on the "GPU"
    on_cpu = job("cpu")

    def lists(report) -> np.ndarray:
        return np.array(pq.read_table(report.neighbors).sort_by("query_id").column("neighbor_id").to_pylist())

    assert (lists(on_gpu) == lists(on_cpu)).mean() > 0.999


@pytest.mark.slow
@pytest.mark.parametrize("routed", [False, True])
def test_dedup_and_graph_through_the_gpu_backend_give_the_cpu_results(
    make_config, dataset_dir, tmp_path, monkeypatch, routed
):
    """dedup and graph on a worker that chose the GPU backend (CPU stand-ins for faiss's GPU calls)
    report what a CPU worker reports: pairs, groups, rows kept and dropped, edges."""
    from pipeline import dedup, graph

    _gpu_workers(monkeypatch)
    common = {"scheduler_address": None, "workers": 1, "index_key": "IVF16,Flat", "nprobe": 4, "k": 10}
    for command, extra in ((dedup, {"threshold": 0.9}), (graph, {"graph_mode": "symmetric"})):
        counts = []
        for device in ("gpu", "cpu"):
            out = str(tmp_path / f"{command.__name__}-{device}")
            config = make_config(
                input=str(dataset_dir), output=out, device=device, routed_join=routed, **common, **extra
            )
            summary = command(config).to_json()[command.__name__]
            counts.append({k: v for k, v in summary.items() if isinstance(v, int | float) and "seconds" not in k})
        assert counts[0] == counts[1] and counts[0], command.__name__


@pytest.mark.parametrize("key", ["IVF16,Flat", "IVF16,PQ8", "IVF16,SQ8"])
def test_gpu_fill_through_a_twin_gives_the_cpu_fill(monkeypatch, key):
    """The fill path of GpuBackend.add: clone the empty piece index, add with ids, copy back and
    merge into the caller's index; with CPU stand-ins the lists equal a plain CPU add."""
    fake = _CpuAsGpu(monkeypatch)
    x = _data(4000, 32)
    ids = np.arange(500, 4500, dtype=np.int64)
    cpu, gpu = make_index(key, 32, "cosine"), make_index(key, 32, "cosine")
    cpu.train(x)
    gpu = faiss.clone_index(cpu)
    CpuBackend().add(cpu, x, ids)
    GpuBackend(device=0).add(gpu, x, ids)
    assert fake.copies == 1 and gpu.ntotal == cpu.ntotal == len(x)
    assert _codes(gpu) == _codes(cpu)


def test_gpu_exact_plan_through_a_resident_flat_index(monkeypatch, tmp_path):
    fake = _CpuAsGpu(monkeypatch)
    x = _data(2500, 16)
    store = write_store(tmp_path / "store", x, pieces=4)
    be = GpuBackend(device=0)
    for metric in ("cosine", "l2"):
        got = be.exact_search(x[:40], store, 6, metric)
        again = be.exact_search(x[40:80], store, 6, metric)  # the resident index is made once per store and metric
        want = CpuBackend().exact_search(x[:80], store, 6, metric)
        np.testing.assert_allclose(np.vstack([got[0], again[0]]), want[0], rtol=1e-5, atol=1e-5)
        assert (np.vstack([got[1], again[1]]) == want[1]).mean() > 0.99
    assert fake.copies == 2


def test_gpu_self_join_by_pairs_gives_the_cpu_lists(monkeypatch):
    """The GPU backend's two pair methods (brute force both ways, no floors) against the CPU's
    symmetric ones, with ``knn_gpu`` replaced by the CPU's brute force: the same scores."""
    monkeypatch.setattr(
        faiss, "knn_gpu", lambda _res, q, x, k, metric, device: faiss.knn(q, x, k, metric=metric), raising=False
    )
    monkeypatch.setattr(GpuBackend, "resources", lambda self: None)
    x = _data(900, 16)
    a, b = x[:500], x[500:]
    gpu, cpu = GpuBackend(device=0), CpuBackend()
    for metric in ("l2", "ip"):
        np.testing.assert_allclose(gpu.self_topk(x, 7, metric)[0], cpu.self_topk(x, 7, metric)[0], atol=1e-4)
        floor = cpu.self_topk(b, 7, metric)[0][:, -1]
        (ga, _), (gb, _) = gpu.pair_topk(a, b, 7, metric, floor)
        (ca, _), (cb, _) = cpu.pair_topk(a, b, 7, metric, floor)
        np.testing.assert_allclose(ga, ca, atol=1e-4)
        kept = gb >= floor[:, None]  # the CPU's b side is exact down to the floor
        np.testing.assert_allclose(np.where(kept, cb, 0), np.where(kept, gb, 0), atol=1e-4)


def test_gpu_memory_is_counted_as_faiss_allocates_it():
    """faiss's GPU vectors round allocations up (a power of two below 4 MiB, a quarter more below
    128 MiB): an IVF clone's lists of ~100 KiB take 128 KiB each, so the plain sum of codes and ids
    would be about 1.3-2x low; the estimate counts each list as allocated."""
    assert [device_vector_bytes(n) for n in (0, 1, 3, 4096, 4097)] == [0, 1, 4, 4096, 8192]
    assert device_vector_bytes(5 << 20) == (5 << 20) * 5 // 4 and device_vector_bytes(200 << 20) == 200 << 20
    x = _data(12_000, 32)
    index = make_index("IVF8,Flat", 32, "l2")
    index.train(x)
    index.add(x)
    ivf = faiss.extract_index_ivf(index)
    sizes = [ivf.invlists.list_size(i) for i in range(8)]
    want = sum(device_vector_bytes(s * 128) + device_vector_bytes(s * 8) for s in sizes) + 8 * 32 * 4
    plain = 12_000 * (128 + 8) + 8 * 32 * 4
    assert _index_bytes(index) == want and 1.0 < want / plain <= 2.0
    assert gpu_index_bytes(12_000, 32, 8, 4 * 32) >= plain  # the plan's estimate rounds the same way


def test_gpu_free_memory_hands_cupys_cached_blocks_back_first(monkeypatch):
    """CuPy keeps freed blocks in its pool: free for CuPy, not for faiss's clone. The free memory
    the backend sizes clones and batches by is read after they are handed back."""
    import sys
    import types

    calls: list[str] = []
    pool = types.SimpleNamespace(free_all_blocks=lambda: calls.append("free_all_blocks"))

    class Device:
        def __init__(self, _n):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def mem_get_info():
        calls.append("memGetInfo")
        return (3 << 30, 8 << 30)

    fake = types.SimpleNamespace(
        get_default_memory_pool=lambda: pool,
        cuda=types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(memGetInfo=mem_get_info)),
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert GpuBackend(device=0).free_memory() == 3 << 30
    assert calls == ["free_all_blocks", "memGetInfo"]


def test_the_resident_exact_index_is_sized_at_its_filling_peak(monkeypatch, tmp_path):
    """A GPU flat index filled piece by piece holds about twice its size at the peak: a store whose
    vectors fit RESIDENT_SHARE of the free memory once, but not twice, streams from the host."""
    from pipeline.backends import gpu as gpu_module

    fake = _CpuAsGpu(monkeypatch)
    x = _data(2000, 16)
    store = write_store(tmp_path / "store", x, pieces=2)
    need = ResidentRows.nbytes(store, 16)
    free = int(1.5 * need / gpu_module.RESIDENT_SHARE)  # once fits, twice does not
    monkeypatch.setattr(GpuBackend, "free_memory", lambda self: free)
    monkeypatch.setattr(
        GpuBackend, "knn", lambda self, q, xs, k, metric: faiss.knn(q, xs, k, metric=FAISS_METRICS[metric])
    )
    be = GpuBackend(device=0)
    got = be.exact_search(x[:30], store, 5, "l2")
    assert fake.copies == 0  # streamed: no resident index was built
    want = CpuBackend().exact_search(x[:30], store, 5, "l2")
    assert (got[1] == want[1]).mean() > 0.99
    assert be._held(store, "re-ranking", "", lambda: "resident") == "resident"  # no growth: fits once
