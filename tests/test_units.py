"""Unit checks of the pieces the spine relies on."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
from distributed import Client

from pipeline.cluster.clients import local_layout
from pipeline.config import ClusterSpec
from pipeline.index.choice import default_index_key, default_nprobe, make_index
from pipeline.index.sampling import load_sample, sample_rows
from pipeline.io.ids import duplicate_rows, id_keys, write_key_buckets
from pipeline.io.parquet import plan_dataset
from pipeline.io.store import RowStore
from pipeline.search.exact import exact_knn, merge_topk
from pipeline.search.recall import recall_at_k

from .conftest import exact_neighbours


def test_sample_is_seeded_uniform_and_spans_all_shards():
    a, b = sample_rows(100_000, 5_000, seed=3), sample_rows(100_000, 5_000, seed=3)
    assert np.array_equal(a, b) and len(np.unique(a)) == 5_000
    counts = np.bincount(a // 25_000, minlength=4)  # four "shards" of 25k rows
    assert counts.min() > 1_100  # ~1,250 each, not all from the first
    assert not np.array_equal(a, sample_rows(100_000, 5_000, seed=4))
    assert np.array_equal(sample_rows(10, 20, seed=0), np.arange(10))


def test_string_keys_distinguish_and_repeat():
    ids = pa.array(["a", "b", "", "ab", "ba", "a", "long-" * 50])
    keys = id_keys(ids)
    assert keys[0] == keys[5]
    assert len(set(keys.tolist())) == 6
    assert id_keys(ids.slice(3, 2)).tolist() == keys[3:5].tolist()


def test_duplicate_buckets_find_repeats_across_pieces(tmp_path):
    first = pa.array(np.arange(0, 1000, dtype=np.int64))
    second = pa.array(np.arange(990, 1500, dtype=np.int64))
    write_key_buckets(id_keys(first), 0, 3, tmp_path, 0)
    write_key_buckets(id_keys(second), 1000, 3, tmp_path, 1)
    groups = [g for b in range(3) for g in duplicate_rows(tmp_path / f"b{b:04d}", limit=100)]
    assert sorted(tuple(sorted(g)) for g in groups) == [(990 + i, 1000 + i) for i in range(10)]


def test_exact_knn_matches_brute_force(dask_address, dataset_dir, vectors, tmp_path):
    ds = plan_dataset([str(dataset_dir)], "id", "embedding", 1 << 30)
    store = RowStore(tmp_path / "store", ds.starts, ds.total_rows)
    from pipeline.io.parquet import read_piece

    for p in ds.pieces:
        ids, x = read_piece(p, "id", "embedding", ds.dim)
        store.write_piece(p.index, ids, x)
    queries = vectors[::97]
    with Client(dask_address) as client:
        scores, rows = exact_knn(client, store, len(ds.pieces), queries=queries, k=7, metric="l2")
    truth = exact_neighbours(vectors, queries, 7, metric="l2")
    assert recall_at_k(rows.tolist(), truth.tolist(), 7) == 1.0
    assert np.all(np.diff(scores, axis=1) >= 0)  # squared distances ascending
    np.testing.assert_allclose(scores[:, 0], ((vectors[rows[:, 0]] - queries) ** 2).sum(1), rtol=1e-4, atol=1e-3)


def test_cpu_knn_scores_whole_batches_by_products_and_keeps_rows_batch_free_otherwise(monkeypatch):
    """A batch FAISS would score one query at a time goes through products only when the caller
    says it is scored whole (a recall sample); otherwise each row's scores are the same alone as
    in any batch, so a part redone alone writes the same bytes."""
    from pipeline.backends import cpu, lists

    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((200, 32)).astype(np.float32)
    be = cpu.CpuBackend()
    be.set_threads(2)
    calls = []
    real = lists.blas_knn
    monkeypatch.setattr(cpu, "blas_knn", lambda *a: calls.append(len(a[0])) or real(*a))
    d_batch, _ = be.knn(q, x, 5, "l2")
    d_alone, _ = be.knn(q[7:8], x, 5, "l2")
    assert not calls and np.array_equal(d_batch[7:8], d_alone)
    be.knn(q, x, 5, "l2", whole=True)
    be.knn(q[:10], x, 5, "l2", whole=True)  # too few to gain: FAISS
    be.knn(np.tile(q, (40, 1)), x, 5, "l2", whole=True)  # FAISS's own products
    assert calls == [200]


def test_merge_topk_is_exact():
    rng = np.random.default_rng(0)
    scores = rng.random((5, 30))
    parts = [(scores[:, i : i + 10], np.tile(np.arange(i, i + 10), (5, 1))) for i in (0, 10, 20)]
    top, rows = merge_topk(parts, 4)
    assert np.array_equal(rows, np.argsort(-scores, axis=1)[:, :4])


def test_gather_keeps_order_and_repeats(tmp_path):
    store = RowStore(tmp_path, np.array([0, 3]), 5)
    store.write_piece(0, pa.array(["a", "b", "c"]), np.arange(6, dtype=np.float32).reshape(3, 2))
    store.write_piece(1, pa.array(["d", "e"]), np.arange(6, 10, dtype=np.float32).reshape(2, 2))
    rows = np.array([[4, 0], [0, 2]])
    assert store.gather_vectors(rows)[..., 0].tolist() == [[8.0, 0.0], [0.0, 4.0]]
    assert store.gather_ids(rows).to_pylist() == ["e", "a", "a", "c"]
    with pytest.raises(IndexError):
        store.gather_vectors(np.array([5]))


@pytest.mark.parametrize(
    "n, d, key",
    [
        (5_000, 64, "Flat"),
        (20_000, 384, "Flat"),
        (30_000, 384, "IVF128,Flat"),
        (200_000, 768, "IVF512,Flat"),
        (300_000, 384, "IVF1024,PQ192x4fs"),
        (1_000_000, 128, "IVF2048,PQ64x4fs"),
        (50_000, 33, "IVF256,Flat"),
        (500_000, 64, "IVF1024,SQ8"),
        (100_000, 64, "IVF256,Flat"),
    ],
)
def test_default_index_rule(n, d, key):
    assert default_index_key(n, d) == key
    make_index(key, d, "cosine")  # a valid factory string


@pytest.mark.parametrize(
    "n, d, key",
    [
        (1_000_000, 128, "IVF1024,Flat"),
        (2_000_000, 128, "IVF1024,Flat"),  # below 4,096 bounded lists: sqrt(n) lists, flat quantizer
        (3_000_000, 128, "IVF4096(IVF256,Flat),Flat"),  # before training weighs 256 to 32 first-level lists
        (4_000_000, 128, "IVF4096(IVF256,Flat),Flat"),
        (16_000_000, 64, "IVF16384(IVF512,Flat),Flat"),
        (256_000_000, 64, "IVF32768,SQ8"),  # 64 GiB of float32 lists: past the 32 GiB of memory
    ],
)
def test_lists_stop_growing_past_a_million_rows(n, d, key):
    """With the workers' memory known, CPU IVF-Flat lists keep about LIST_ROWS rows from about 3M rows,
    found through a two-level quantizer, so a query's scan stays the same size as n grows."""
    assert default_index_key(n, d, memory_budget=32 << 30) == key
    index = make_index(key, d, "l2")
    nested = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if "(" in key:
        assert isinstance(nested, faiss.IndexIVFFlat) and nested.nprobe == 8  # saved with the index


def test_default_rule_fits_codes_in_the_memory_budget():
    # 100M x 768: PQ384x4fs codes are 19.2 GB; a 16 GiB worker gets codes of at most 8 GiB
    key = default_index_key(100_000_000, 768, memory_budget=16 * 2**30)
    m = int(key.split(",PQ")[1].split("x")[0])
    assert m < 384 and 100_000_000 * (m / 2 + 8) <= 8 * 2**30
    assert default_index_key(100_000_000, 768) == "IVF16384,PQ384x4fs"
    assert default_index_key(100_000_000, 128, memory_budget=32 * 2**30) == "IVF16384,PQ64x4fs"  # codes fit: unchanged
    # IVF-Flat while the float32 lists fit the workers' memory taken together (a join over lists past half
    # of a worker is routed, each list group read once), at any number of rows; memory unknown: 200,000 rows
    assert default_index_key(100_000, 768, memory_budget=2 * 2**30) == "IVF256,Flat"  # sqrt(n) lists: list-major
    assert default_index_key(100_000, 768, memory_budget=256 * 2**20) == "IVF512,PQ384x4fs"  # 293 MiB of lists
    assert default_index_key(1_000_000, 128, memory_budget=1 * 2**30) == "IVF1024,Flat"  # 488 MiB: fits one worker
    assert default_index_key(1_000_000, 128, memory_budget=256 * 2**20) == "IVF2048,PQ64x4fs"
    assert default_index_key(1_000_000, 128, memory_budget=256 * 2**20, workers=2) == "IVF1024,Flat"  # two do
    # d <= 64 takes IVF-Flat too where it fits: list-major search beats SQ8 searched query by query
    assert default_index_key(1_000_000, 64, memory_budget=64 * 2**30) == "IVF1024,Flat"


def test_default_nprobe():
    assert default_nprobe(256) == 64 and default_nprobe(16) == 16


def test_local_layout():
    assert local_layout(ClusterSpec(), cpus=2) == (1, 2)
    assert local_layout(ClusterSpec(), cpus=16) == (4, 4)
    assert local_layout(ClusterSpec(workers=3, threads_per_worker=2), cpus=16) == (3, 2)


@pytest.mark.parametrize(
    "key, enc, mode",
    [
        ("IVF64,PQ8x4fs", "IVF64,PQ8x4", "fastscan"),
        ("IVF64,PQ8x4fsr", "IVF64,PQ8x4", "fastscan"),
        ("IVF64,PQ8", "IVF64,PQ8", "ondisk"),
        ("IVF64,Flat", "IVF64,Flat", "ondisk"),
        ("IVF64,PQ8+16", "IVF64,PQ8+16", "memory"),
        ("PCA32,IVF64,PQ8x4fs", "PCA32,IVF64,PQ8x4fs", "serial"),
        ("Flat", "Flat", "none"),
        ("HNSW16", "HNSW16", "serial"),
    ],
)
def test_fill_modes(key, enc, mode):
    from pipeline.backends.kernels import ivf_of
    from pipeline.index.choice import encoding_key, make_encoder
    from pipeline.index.fill import fill_mode

    assert encoding_key(key) == enc
    encoder = make_encoder(key, 32, "l2")
    assert fill_mode(key, encoder) == mode
    if mode == "fastscan":  # the twin encodes exactly as the real index would
        real = make_index(key, 32, "l2")
        assert faiss.downcast_index(ivf_of(encoder)).by_residual == faiss.downcast_index(ivf_of(real)).by_residual


@pytest.mark.parametrize(
    "key, metric",
    [
        ("IVF32,PQ32x4fs", "cosine"),
        ("IVF32,PQ8+16", "l2"),  # IVFPQR: L2 only
        ("HNSW16", "cosine"),
        ("PCA32,IVF32,PQ32x4fs", "cosine"),
    ],
)
def test_every_fill_mode_end_to_end(make_config, dataset_dir, vectors, key, metric, tmp_path):
    """Each fill path gives a complete index whose neighbours (re-ranked) match exact search."""
    import pyarrow.parquet as pq

    from pipeline import run

    report = run(
        make_config(
            input=str(dataset_dir),
            k=5,
            exclude_self=True,
            index_key=key,
            rerank=8,
            metric=metric,
            **({"nprobe": 32} if key.startswith(("IVF", "OPQ")) else {}),
        )
    )
    assert report.index.ntotal == len(vectors)
    t = pq.read_table(tmp_path / "out" / "neighbors")
    found = dict(zip(t.column("query_id").to_pylist(), t.column("neighbor_id").to_pylist()))
    sample = np.arange(0, len(vectors), 37)
    truth = exact_neighbours(vectors, vectors[sample], 6, metric=metric)
    assert (
        recall_at_k(
            [found[int(q)] for q in sample],
            [[r for r in row if r != q][:5] for row, q in zip(truth.tolist(), sample)],
            5,
        )
        >= 0.95
    )


def test_gathers_over_many_pieces_stay_under_the_open_file_limit(tmp_path):
    """Each mapped piece holds a descriptor: the per-process map caches are sized from RLIMIT_NOFILE."""
    import numpy as np
    import pyarrow as pa

    from pipeline.io.store import RowStore

    pieces, rows = 400, 3
    store = RowStore(tmp_path / "store", np.arange(pieces) * rows, pieces * rows)
    for p in range(pieces):
        store.write_piece(p, pa.array(np.arange(p * rows, (p + 1) * rows)), np.full((rows, 4), p, dtype=np.float32))
    script = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))
import numpy as np
from pipeline.io.store import RowStore
store = RowStore({str(tmp_path / "store")!r}, np.arange({pieces}) * {rows}, {pieces * rows})
for _ in range(2):
    got = store.gather_vectors(np.arange({pieces}) * {rows})
    assert (got[:, 0] == np.arange({pieces})).all()
    ids = store.gather_ids(np.arange({pieces}) * {rows} + 1)
    assert ids.to_pylist() == list(np.arange({pieces}) * {rows} + 1)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_searches_never_change_the_shared_index_and_run_concurrently_with_other_settings(tmp_path):
    import threading

    from pipeline.search.join import SearchPlan, search_batch, shared_index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 16)).astype(np.float32)
    index = faiss.index_factory(16, "IVF64,Flat")
    index.train(x)
    index.add(x)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    plans = [SearchPlan(str(tmp_path), "l2", 5, nprobe, 0, False, True) for nprobe in (1, 64)]
    shared = shared_index(plans[0])
    q, ids = x[:200], pa.array(np.arange(200))
    alone = [search_batch(shared, p, q, q_rows=np.arange(200), q_ids=ids, index_store=None)[2] for p in plans]
    assert not np.array_equal(alone[0], alone[1])  # the settings matter
    assert faiss.extract_index_ivf(shared).nprobe == 1  # the cached index was not modified
    mismatches = []

    def worker(i: int) -> None:
        for _ in range(25):
            if not np.array_equal(
                search_batch(shared, plans[i], q, q_rows=np.arange(200), q_ids=ids, index_store=None)[2], alone[i]
            ):
                mismatches.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SlowPiece:
    """A task record that reports its rows in five steps."""

    index: int
    rows: int

    def run(self) -> int:
        from pipeline.runtime.progress import PieceProgress

        progress = PieceProgress("probe", self.index)
        for _ in range(5):
            time.sleep(0.3)
            progress.advance(self.rows // 5)
        return self.rows


def test_progress_moves_inside_a_running_piece(dask_address, monkeypatch):
    """Workers report rows done inside a piece (a Dask event at most once a second), so the
    driver's progress line moves before the piece ends."""
    from dataclasses import dataclass

    from distributed import Client

    from pipeline.runtime import progress
    from pipeline.runtime.runner import run_tasks

    seen: list[int] = []
    monkeypatch.setattr(progress.Progress, "show", lambda self: seen.append(self.done))

    @dataclass(frozen=True)
    class Item:
        index: int
        rows: int

    with Client(dask_address) as client:
        run_tasks(client, label="probe", items=[Item(0, 1000)], task=lambda i: _SlowPiece(index=i.index, rows=i.rows))
    assert any(0 < done < 1000 for done in seen) and seen[-1] == 1000


def _stepping_task() -> str:
    from pipeline.runtime.progress import PieceProgress

    progress = PieceProgress("train", 0)
    for step in ("reading 10 sampled rows", "k-means into 4 lists on 10 rows"):
        progress.note(step)
        time.sleep(1.2)
    return "trained"


def test_long_single_tasks_report_their_steps(dask_address, caplog):
    """Training and the tuning walk are one task each: the driver shows the steps the worker
    reports (and the elapsed time) while it waits, then returns the task's result."""
    import logging

    from distributed import Client

    from pipeline.runtime import progress

    with Client(dask_address) as client, caplog.at_level(logging.INFO, logger="pipeline.runtime.progress"):
        result = progress.watch(client, client.submit(_stepping_task, pure=False), "train", interval=0.5)
    lines = [r.getMessage() for r in caplog.records]
    assert result == "trained"
    assert any(line.startswith("train: reading 10 sampled rows, elapsed") for line in lines), lines
    assert any(line.startswith("train: k-means into 4 lists on 10 rows, elapsed") for line in lines), lines


def test_the_commands_and_the_subpackages_have_names_of_their_own():
    """``pipeline.dedup`` and ``pipeline.graph`` are the commands; their code lives in
    ``pipeline.duplicates`` and ``pipeline.graphs``, importable in every form after the package."""
    import pipeline
    import pipeline.duplicates.groups as groups
    import pipeline.graphs.knn_graph as knn_graph
    from pipeline.duplicates import explore

    assert callable(pipeline.dedup) and callable(pipeline.graph) and callable(pipeline.run)
    assert groups.__name__ == "pipeline.duplicates.groups" and knn_graph.__name__ == "pipeline.graphs.knn_graph"
    assert explore.__name__ == "pipeline.duplicates.explore"


def _gpu_bundle():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import gpu_bundle
    finally:
        sys.path.pop(0)
    return gpu_bundle


def test_shape_data_writes_seeded_inputs_the_tool_reads(tmp_path, monkeypatch):
    """``scripts/shape_data.py`` (the benchmarks' other shapes): each kind is seeded, lands in
    ``ceil(rows / 50,000)`` files the input planner accepts, and has the shape it is named for."""
    import pyarrow.parquet as pq

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    import shape_data

    def written(kind: str, seed: int, name: str, rows: int = 1_200, dim: int = 8) -> np.ndarray:
        out = tmp_path / name
        args = [kind, str(out), "--rows", str(rows), "--dim", str(dim), "--seed", str(seed)]
        monkeypatch.setattr(sys, "argv", ["shape_data.py", *args])
        shape_data.main()
        plan = plan_dataset([str(out)], "id", "embedding", 1 << 20)
        assert (plan.total_rows, plan.dim, len(plan.files)) == (rows, dim, -(-rows // 50_000))
        table = pq.read_table(out, columns=["embedding"])
        return np.asarray(table.column(0).combine_chunks().flatten(), dtype=np.float32).reshape(rows, dim)

    for kind in ("anisotropic", "uniform", "powerlaw"):
        first, again = written(kind, 0, f"{kind}-a"), written(kind, 0, f"{kind}-b")
        assert np.array_equal(first, again) and not np.array_equal(first, written(kind, 1, f"{kind}-c"))
    written("uniform", 0, "two-files", rows=50_001, dim=2)
    norms = np.linalg.norm(written("powerlaw", 0, "norms", dim=32), axis=1)
    assert norms.max() > 3 * norms.min()  # log-normal norms: inner product and cosine disagree

    def spread(x: np.ndarray) -> float:  # largest over smallest singular value of the centred rows
        values = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
        return float(values[0] / values[-1])

    stretched = spread(written("anisotropic", 0, "axes", rows=4_000, dim=32))
    assert stretched > 2 * spread(written("uniform", 0, "noise", rows=4_000, dim=32))  # noise: about 1.2


def test_the_gpu_probe_names_an_abort_instead_of_dying_silently(monkeypatch, capsys):
    """faiss abort()s when cuBLAS is unusable: the probe runs in a child process and says so."""
    gpu_bundle = _gpu_bundle()
    gpu_bundle.probe_gpu(dict(os.environ))  # this faiss: imports, no GPU, nothing to search
    assert "GPUs: 0" in capsys.readouterr().out
    monkeypatch.setattr(gpu_bundle, "PROBE", "print('before', flush=True); import os; os.abort()")
    with pytest.raises(SystemExit, match=r"the GPU probe died of signal 6 \(faiss aborts when cuBLAS is unusable"):
        gpu_bundle.probe_gpu(dict(os.environ))
    assert "before" in capsys.readouterr().out  # the child's whole output is kept


def test_the_gpu_bundle_installs_twice_into_one_folder(tmp_path, monkeypatch):
    """A second install into the same --target replaces the links the first made to the node's
    cuBLAS and cuRAND (tar's data filter refused to extract over them)."""
    import io
    import lzma
    import tarfile

    gpu_bundle = _gpu_bundle()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for rel in ("nvidia/cublas/lib/libcublas.so.12", "nvidia/curand/lib/libcurand.so.10", "faiss/__init__.py"):
            info = tarfile.TarInfo(rel)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"stub"))
    bundle = tmp_path / "faiss-gpu-test.tar.xz"
    bundle.write_bytes(lzma.compress(raw.getvalue()))
    node = tmp_path / "node"
    node.mkdir()
    for name in ("libcublas.so.13", "libcurand.so.10"):
        (node / name).write_bytes(b"node")
    monkeypatch.setattr(gpu_bundle, "_find_node_lib", lambda name: str(node / name))
    target = tmp_path / "faiss"
    for _ in range(2):
        gpu_bundle.install(bundle, target, check=False)
    assert os.readlink(target / "nvidia/cublas/lib/libcublas.so.13") == str(node / "libcublas.so.13")
    assert os.readlink(target / "nvidia/curand/lib/libcurand.so.10") == str(node / "libcurand.so.10")
    assert (node / "libcurand.so.10").read_bytes() == b"node"  # the node's library was never written


def test_a_training_sample_is_read_without_memory_maps(tmp_path):
    """The training sample touches most pages of every piece: it is read piece by piece with plain
    reads (same rows, same order as a gather), leaving no memory map open in the process."""
    from pipeline.io import store as store_module

    from .conftest import write_store

    x = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    store = write_store(tmp_path / "s", x, pieces=4)
    rows = np.random.default_rng(1).permutation(3000)[:700]
    store_module._open_npy.cache_clear()
    got = store.gather_vectors(rows, mapped=False)
    assert store_module._open_npy.cache_info().currsize == 0  # nothing mapped
    assert np.array_equal(got, x[rows]) and np.array_equal(got, store.gather_vectors(rows))
    assert np.array_equal(load_sample(store, rows), x[rows])  # the training sample reads this way


def test_dask_pauses_the_embedded_workers_by_private_memory():
    """Mapped file pages (row store, lists) are page cache the kernel drops under pressure: the
    embedded workers' memory monitor counts resident pages minus the file-backed ones."""
    import types

    from pipeline.cluster.clients import PrivateMemory, private_bytes

    proc = types.SimpleNamespace(memory_info=lambda: types.SimpleNamespace(rss=10 << 30, shared=7 << 30))
    assert private_bytes(proc) == 3 << 30
    worker = types.SimpleNamespace(monitor=types.SimpleNamespace(proc=proc, get_process_memory=lambda: 10 << 30))
    PrivateMemory().setup(worker)
    assert worker.monitor.get_process_memory() == 3 << 30


def test_every_task_hands_arrow_memory_back(monkeypatch):
    """pyarrow's allocator keeps freed memory, which Dask counts against the worker: every task
    record's run is followed by a release, failing or not."""
    from pipeline.runtime import runner

    released: list[int] = []
    monkeypatch.setattr(runner.pa, "default_memory_pool", lambda: _fake_pool(lambda: released.append(1)), raising=True)

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Works:
        def run(self) -> int:
            return 7

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Fails:
        def run(self) -> int:
            raise RuntimeError("boom")

    assert runner.run_task(Works()) == 7
    with pytest.raises(RuntimeError, match="boom"):
        runner.run_task(Fails())
    assert released == [1, 1]


def _fake_pool(release):
    """A stand-in for pyarrow's memory pool: only ``release_unused``."""
    import types

    return types.SimpleNamespace(release_unused=release)
