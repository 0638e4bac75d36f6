"""The spine end to end on generated Parquet: recall, self-exclusion, id types, cross joins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import join, run
from pipeline.io.sample_data import clustered_vectors, write_shards
from pipeline.search.recall import recall_at_k

from .conftest import DIM, exact_neighbours

IVFPQ = {"index_key": "IVF32,PQ16", "nprobe": 8}  # 16 bytes a vector: needs rerank for high recall
IVFPQ_FINE = {"index_key": "IVF32,PQ32", "nprobe": 8}  # 32 bytes a vector: >= 0.90 on codes alone


def read_neighbours(out: Path) -> dict:
    table = pq.read_table(out / "neighbors")
    return dict(zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist()))


def self_recall(out: Path, x: np.ndarray, k: int = 10, sample: int = 300) -> float:
    found = read_neighbours(out)
    rows = np.random.default_rng(0).choice(len(x), sample, replace=False)
    truth = exact_neighbours(x, x[rows], k + 1)
    truth = [[t for t in row if t != q][:k] for row, q in zip(truth.tolist(), rows)]
    return recall_at_k([found[int(q)] for q in rows], truth, k)


def test_self_join_recall_without_rerank(make_config, dataset_dir, vectors):
    report = run(make_config(input=str(dataset_dir), k=10, exclude_self=True, rerank=0, **IVFPQ_FINE))
    assert report.search.rerank == 0
    assert self_recall(Path(report.neighbors).parent, vectors) >= 0.90


def test_self_join_recall_with_rerank(make_config, dataset_dir, vectors):
    report = run(make_config(input=str(dataset_dir), k=10, exclude_self=True, rerank=4, **IVFPQ))
    assert self_recall(Path(report.neighbors).parent, vectors) >= 0.99


def test_output_layout_and_types(make_config, dataset_dir, vectors, tmp_path):
    run(make_config(input=str(dataset_dir), k=5, exclude_self=True, **IVFPQ))
    out = tmp_path / "out"
    assert (out / "_SUCCESS").exists() and (out / "report.json").exists()
    parts = sorted((out / "neighbors").glob("part-*.parquet"))
    assert len(parts) == 3  # one per piece (each shard fits one partition)
    table = pq.read_table(out / "neighbors")
    assert table.schema.field("query_id").type == pa.int64()
    assert table.schema.field("neighbor_id").type == pa.list_(pa.int64())
    assert table.schema.field("score").type == pa.list_(pa.float32())
    assert sorted(table.column("query_id").to_pylist()) == list(range(len(vectors)))
    scores = table.column("score").to_pylist()
    assert all(len(s) == 5 for s in scores)
    assert all(s == sorted(s, reverse=True) for s in scores)  # cosine: similarity, best first
    assert not any(tmp.name for tmp in out.rglob("*.tmp-*"))


def test_exclude_self_removes_own_id_not_position_zero(make_config, tmp_path):
    # every vector appears twice (ids i and i + n): the exact copy ties with the row itself
    base = clustered_vectors(500, DIM, clusters=10, seed=3)
    data = tmp_path / "dups"
    write_shards(data, np.concatenate([base, base]), shards=2)
    run(make_config(input=str(data), k=3, exclude_self=True, index_key="Flat"))
    found = read_neighbours(tmp_path / "out")
    n = len(base)
    for q, nbrs in found.items():
        assert q not in nbrs
        assert (q + n if q < n else q - n) in nbrs  # the copy is still found


def test_l2_scores_are_squared_distances_ascending(make_config, dataset_dir, vectors, tmp_path):
    run(make_config(input=str(dataset_dir), k=4, metric="l2", index_key="Flat", exclude_self=True))
    table = pq.read_table(tmp_path / "out" / "neighbors")
    q, nbrs, scores = (table.column(c).to_pylist()[0] for c in ("query_id", "neighbor_id", "score"))
    expected = ((vectors[nbrs] - vectors[q]) ** 2).sum(1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert scores == sorted(scores)


def test_string_ids_round_trip(make_config, tmp_path):
    x = clustered_vectors(2000, DIM, clusters=20, seed=4)
    ids = [f"doc-{i:05d}" for i in range(len(x))]
    write_shards(tmp_path / "s", x, shards=2, ids=ids)
    run(make_config(input=str(tmp_path / "s"), k=5, exclude_self=True, index_key="Flat"))
    table = pq.read_table(tmp_path / "out" / "neighbors")
    assert pa.types.is_string(table.schema.field("query_id").type)
    assert table.schema.field("neighbor_id").type == pa.list_(pa.string())
    found = dict(zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist()))
    truth = exact_neighbours(x, x[:50], 6)
    for q in range(50):
        want = [ids[t] for t in truth[q] if t != q][:5]
        assert found[ids[q]] == want


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_float16_and_float64_inputs(make_config, tmp_path, dtype, caplog):
    x = clustered_vectors(1500, DIM, clusters=15, seed=5)
    write_shards(tmp_path / "d", x, shards=2, dtype=dtype)
    with caplog.at_level("INFO", logger="pipeline"):
        run(make_config(input=str(tmp_path / "d"), k=5, exclude_self=True, index_key="Flat"))
    if dtype == "float64":
        assert "converting to float32" in caplog.text
    found = read_neighbours(tmp_path / "out")
    truth = exact_neighbours(x.astype(dtype).astype(np.float32), x[:30].astype(dtype).astype(np.float32), 6)
    assert (
        recall_at_k(
            [found[i] for i in range(30)], [[t for t in r if t != i][:5] for i, r in enumerate(truth.tolist())], 5
        )
        >= 0.97
    )


def test_variable_length_list_column(make_config, tmp_path):
    x = clustered_vectors(1200, DIM, clusters=12, seed=6)
    table = pa.table(
        {"id": np.arange(1200), "embedding": pa.array(list(x.astype(np.float32)), type=pa.list_(pa.float32()))}
    )
    (tmp_path / "v").mkdir()
    pq.write_table(table, tmp_path / "v" / "a.parquet")
    run(make_config(input=str(tmp_path / "v"), k=3, exclude_self=True, index_key="Flat"))
    found = read_neighbours(tmp_path / "out")
    truth = exact_neighbours(x, x[:20], 4)
    assert all(found[i] == [t for t in truth[i] if t != i][:3] for i in range(20))


def test_join_a_different_query_set(make_config, dataset_dir, vectors, tmp_path):
    index_dir = tmp_path / "idx"
    run(make_config(input=str(dataset_dir), index_dir=str(index_dir), output=str(tmp_path / "first"), k=5, **IVFPQ))
    queries = clustered_vectors(400, DIM, clusters=40, seed=1)[::2] + 0.01
    write_shards(tmp_path / "q", queries, shards=2, first_id=10_000_000)
    report = join(make_config(input=str(tmp_path / "q"), index_dir=str(index_dir), k=5, rerank=4, nprobe=8))
    assert report.queries == len(queries)
    found = read_neighbours(tmp_path / "out")
    truth = exact_neighbours(vectors, queries, 5)
    ids = sorted(found)
    assert ids[0] == 10_000_000 and len(ids) == len(queries)
    assert recall_at_k([found[i] for i in ids], truth.tolist(), 5) >= 0.97


def test_join_exclude_self_by_id_on_overlapping_queries(make_config, dataset_dir, vectors, tmp_path):
    index_dir = tmp_path / "idx"
    run(
        make_config(
            input=str(dataset_dir), index_dir=str(index_dir), output=str(tmp_path / "first"), k=3, index_key="Flat"
        )
    )
    write_shards(tmp_path / "q", vectors[:100], shards=1)  # same ids and vectors as indexed rows
    join(make_config(input=str(tmp_path / "q"), index_dir=str(index_dir), k=3, exclude_self=True))
    found = read_neighbours(tmp_path / "out")
    truth = exact_neighbours(vectors, vectors[:100], 4)
    assert all(found[i] == [t for t in truth[i] if t != i][:3] for i in range(100))


def test_target_recall_tunes_and_reports_held_out_recall(make_config, dataset_dir, vectors, tmp_path):
    report = run(
        make_config(
            input=str(dataset_dir),
            k=10,
            exclude_self=True,
            index_key="IVF64,PQ16",
            target_recall=0.95,
            recall_queries=200,
        )
    )
    rec = report.recall
    assert rec.target == 0.95 and rec.queries == 200 and rec.recall >= 0.93
    assert len(rec.curve) >= 3 and all(p.recall < 0.95 for p in rec.curve if p.nprobe == 1)
    chosen = [p for p in rec.curve if (p.nprobe, p.rerank) == (rec.nprobe, rec.rerank)][0]
    assert chosen.recall >= 0.95
    assert report.search.nprobe == rec.nprobe
    # the table written agrees with the measurement (independent check on other queries)
    assert self_recall(tmp_path / "out", vectors) >= 0.93


def test_ivf_flat_tuning_computes_its_recall_curve_and_takes_the_smallest_passing_nprobe(
    make_config, dataset_dir, tmp_path
):
    """IVF-Flat's recall against nprobe is read off the true neighbours' lists, not searched: every
    point says so, the choice is the smallest nprobe that passes (the one below it was computed
    and fell short), and the held-out search at it meets the target."""
    report = run(
        make_config(
            input=str(dataset_dir),
            k=10,
            exclude_self=True,
            index_key="IVF64,Flat",
            target_recall=0.95,
            recall_queries=200,
        )
    )
    rec = report.recall
    assert rec.curve and all(p.computed and p.seconds == 0 for p in rec.curve)
    passes = {p.nprobe: p.recall - 2 * p.stderr >= 0.95 for p in rec.curve}
    assert passes[rec.nprobe] and (rec.nprobe == 1 or passes[rec.nprobe - 1] is False)
    assert rec.met and rec.recall >= 0.95 and rec.queries == 200
    assert "computed, not searched" in (tmp_path / "out" / "report.md").read_text()


def test_a_missed_target_finishes_the_table_but_fails_the_job(make_config, dataset_dir, tmp_path):
    from pipeline.search.tuning import BelowTarget

    # both settings given: the target is checked, not tuned to (no switch to exact search)
    settings = dict(
        input=str(dataset_dir),
        k=10,
        exclude_self=True,
        index_key="IVF64,PQ4",
        rerank=0,
        nprobe=4,
        target_recall=1.0,
        recall_queries=100,
    )
    with pytest.raises(
        BelowTarget,
        match=r"recall@10 0\.\d+ .*target 1\.0: MISSED; plan: IVF64,PQ4, nprobe=4, "
        r"rerank=0; .* not marked _SUCCESS.*--allow-below-target",
    ):
        run(make_config(**settings))
    out = tmp_path / "out"
    assert not (out / "_SUCCESS").exists() and len(read_neighbours(out)) == 6000
    report = run(make_config(**settings, allow_below_target=True))  # accepted: finishes, resumed, marked done
    assert report.recall.met is False and (out / "_SUCCESS").exists()


def test_ties_are_not_misses(make_config, tmp_path):
    """Exact duplicates tie at the k-th score: any of them is a right answer (tie-aware recall)."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, 16)).astype(np.float32)
    x = np.repeat(base, 8, axis=0)  # every vector 8 times: 7 exact ties for each row's top 5
    write_shards(tmp_path / "dups", x, shards=2)
    report = run(
        make_config(
            input=str(tmp_path / "dups"), k=5, exclude_self=True, index_key="IVF8,Flat", nprobe=8, recall_queries=200
        )
    )
    rec = report.recall  # exact search, so every answer is right; which of the ties comes first is not
    assert rec.recall == 1.0 and rec.recall_strict < 1.0 and rec.met


def test_every_run_measures_recall(make_config, dataset_dir):
    report = run(make_config(input=str(dataset_dir), k=10, exclude_self=True, index_key="Flat", recall_queries=100))
    assert report.recall.recall == 1.0 and report.recall.queries == 100


def test_target_recall_on_real_like_embeddings(make_config, tmp_path):
    """384-d float16 vectors with a low intrinsic dimension (like sentence embeddings), fast-scan PQ."""
    x = clustered_vectors(5000, 384, clusters=25, seed=11, latent=24)
    write_shards(tmp_path / "emb", x, shards=2, dtype="float16")
    report = run(
        make_config(
            input=str(tmp_path / "emb"),
            k=10,
            exclude_self=True,
            index_key="IVF32,PQ192x4fs",
            target_recall=0.9,
            recall_queries=200,
        )
    )
    assert report.recall.recall >= 0.88  # held-out: not the sample it was tuned on
    found = read_neighbours(tmp_path / "out")
    xs = x.astype("float16").astype(np.float32)
    rows = np.random.default_rng(5).choice(len(x), 200, replace=False)
    truth = exact_neighbours(xs, xs[rows], 11)
    assert (
        recall_at_k(
            [found[int(q)] for q in rows], [[t for t in r if t != q][:10] for r, q in zip(truth.tolist(), rows)], 10
        )
        >= 0.88
    )


from pipeline.search.tuning import REFINE_STEPS, RERANK_FACTORS, WIDE_FACTORS, probe_steps  # noqa: E402


def _shape(name: str, n: int = 24_000) -> np.ndarray:
    rng = np.random.default_rng(21)
    if name == "clustered":
        return clustered_vectors(n, 32, clusters=400, seed=4, latent=32)
    if name == "anisotropic":
        return (rng.standard_normal((n, 16)) * np.geomspace(10.0, 0.01, 16)).astype(np.float32)
    if name == "isotropic":
        return rng.standard_normal((n, 24)).astype(np.float32)
    if name == "low_dimensional":
        return rng.standard_normal((n, 4)).astype(np.float32)
    base = clustered_vectors(n // 4, 48, clusters=50, seed=6)  # duplicate-heavy: 4 near-copies of each row
    return (np.repeat(base, 4, axis=0) + 1e-4 * rng.standard_normal((n, 48))).astype(np.float32)


@pytest.mark.parametrize("shape", ["clustered", "anisotropic", "isotropic", "low_dimensional", "duplicate_heavy"])
def test_the_default_run_reaches_its_target_on_held_out_queries(make_config, tmp_path, shape):
    write_shards(tmp_path / shape, _shape(shape), shards=2)
    report = run(make_config(input=str(tmp_path / shape), exclude_self=True, metric="l2"))
    rec = report.recall
    assert rec.target == 0.95 and rec.met and rec.recall >= 0.95, rec
    assert report.index.key != "Flat" and (tmp_path / "out" / "_SUCCESS").exists()
    # the walk: about one search per nprobe step and per re-rank factor, never the whole grid
    steps = len(probe_steps(report.index.nlist)) + REFINE_STEPS
    assert len(rec.curve) <= steps + len(RERANK_FACTORS) + len(WIDE_FACTORS)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_the_exact_plan_streams_the_row_store_and_equals_brute_force(
    make_config, dataset_dir, vectors, tmp_path, metric
):
    """``Flat`` searches the row store piece by piece (six pieces here): no copy of the vectors is
    built, and every list is the brute-force answer."""
    report = run(
        make_config(
            input=str(dataset_dir),
            k=7,
            exclude_self=True,
            index_key="Flat",
            metric=metric,
            partition_size=1000 * DIM * 4,
            recall_queries=50,
        )
    )
    out = tmp_path / "out"
    assert not (out / "index" / "index.faiss").exists()
    assert len(list((out / "index" / "store" / "vectors").glob("*.npy"))) == 6  # one piece per row group
    assert report.search.nprobe is None and report.search.rerank == 0 and report.recall.recall == 1.0
    found = read_neighbours(out)
    sample = np.arange(0, len(vectors), 23)
    truth = exact_neighbours(vectors, vectors[sample], 8, metric=metric)
    expect = [[r for r in row if r != q][:7] for row, q in zip(truth.tolist(), sample)]
    assert recall_at_k([found[int(q)] for q in sample], expect, 7) >= 0.999  # float rounding may swap a near-tie


def test_a_target_the_index_cannot_reach_switches_to_exact_search(make_config, dataset_dir, vectors, tmp_path, caplog):
    """4-bit codes without re-ranking top out far below 0.99: the job joins with exact search over
    the row store instead, says why, and meets its target; --allow-below-target keeps the index."""
    settings = dict(
        input=str(dataset_dir),
        k=10,
        exclude_self=True,
        index_key="IVF64,PQ4",
        rerank=0,
        target_recall=0.99,
        recall_queries=200,
    )
    with caplog.at_level("WARNING", logger="pipeline"):
        report = run(make_config(**settings))
    assert "no setting of the index reached recall 0.990" in caplog.text
    assert report.search.strategy == "exact" and "below the target" in report.search.why
    assert report.recall.met and report.recall.recall == 1.0
    found = read_neighbours(tmp_path / "out")
    sample = np.arange(0, len(vectors), 41)
    truth = exact_neighbours(vectors, vectors[sample], 11)
    expect = [[r for r in row if r != q][:10] for row, q in zip(truth.tolist(), sample)]
    assert recall_at_k([found[int(q)] for q in sample], expect, 10) >= 0.999
    md = (tmp_path / "out" / "report.md").read_text()
    assert "plan: exact search over the row store" in md.splitlines()[2]
    accepted = run(make_config(**settings, output=str(tmp_path / "accepted"), allow_below_target=True))
    assert accepted.search.strategy == "index" and not accepted.recall.met
