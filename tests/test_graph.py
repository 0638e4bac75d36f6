"""k-NN graphs: directed, symmetric and mutual edges checked by hand; CSR and umap arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import ConfigError, graph

POSITIONS = [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 32.5]  # on a line: each point's nearest is easy to see


@pytest.fixture(scope="module")
def line_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("line")
    x = np.array([[p, 0.0] for p in POSITIONS], dtype=np.float32)
    for s, part in enumerate(np.array_split(np.arange(len(x)), 2)):  # two shards: edges cross partitions
        table = pa.table(
            {
                "id": pa.array([f"p{i}" for i in part]),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[part].ravel()), 2),
            }
        )
        pq.write_table(table, d / f"part-{s:05d}.parquet")
    return d


def edges_of(out: Path) -> dict[tuple[str, str], float]:
    nodes = pq.read_table(out / "nodes").to_pydict()
    name = dict(zip(nodes["row"], nodes["id"]))
    e = pq.read_table(out / "edges").to_pydict()
    return {(name[s], name[d]): w for s, d, w in zip(e["src"], e["dst"], e["weight"])}


# nearest (k=1) on the line: p0->p1, p1->p0, p2->p1, p3->p2, p4->p3, p5->p6, p6->p5
DIRECTED = {("p0", "p1"), ("p1", "p0"), ("p2", "p1"), ("p3", "p2"), ("p4", "p3"), ("p5", "p6"), ("p6", "p5")}


def test_directed_symmetric_and_mutual_by_hand(make_config, line_dir, tmp_path):
    # tiny partitions: each shard is its own piece and shuffle partition, so edges cross partitions
    base = {
        "input": str(line_dir),
        "metric": "l2",
        "index_key": "Flat",
        "k": 1,
        "recall_queries": 0,
        "target_recall": "off",
        "partition_size": 32,
    }
    report = graph(make_config(graph_mode="directed", **base))
    out = tmp_path / "out"
    e = edges_of(out)
    assert set(e) == DIRECTED
    assert len(list((out / "edges").glob("part-*.parquet"))) == 2
    assert e[("p2", "p1")] == pytest.approx(4.0)  # weight: the score, a squared l2 distance
    assert report.graph.mutual_share == pytest.approx(4 / 7, abs=1e-4)

    report = graph(make_config(graph_mode="symmetric", **base))  # regraphed from the same join
    undirected = {frozenset(p) for p in DIRECTED}
    assert set(edges_of(out)) == {(a, b) for a, b in DIRECTED} | {(b, a) for a, b in DIRECTED}
    assert report.graph.edges == 2 * len(undirected)
    # components: p0..p4 are linked in a chain; p5-p6 apart
    assert report.graph.components == 2 and report.graph.largest_component == 5

    report = graph(make_config(graph_mode="mutual", **base))
    assert set(edges_of(out)) == {("p0", "p1"), ("p1", "p0"), ("p5", "p6"), ("p6", "p5")}
    assert report.graph.components == 5  # {p0, p1}, {p5, p6}, and p2, p3, p4 alone
    assert report.graph.degree.isolated == 3


def test_min_score_and_gaussian_weights(make_config, line_dir, tmp_path):
    base = {
        "input": str(line_dir),
        "metric": "l2",
        "index_key": "Flat",
        "k": 2,
        "recall_queries": 0,
        "target_recall": "off",
    }
    graph(make_config(graph_mode="directed", min_score=10.0, weight="gaussian", kernel_width=2.0, **base))
    e = edges_of(tmp_path / "out")
    assert all(w > np.exp(-10.0 / 8.0) - 1e-6 for w in e.values())  # only distances^2 <= 10 kept
    assert ("p3", "p4") not in e and ("p0", "p2") in e  # 64 > 10; 9 <= 10
    assert e[("p0", "p1")] == pytest.approx(np.exp(-1.0 / 8.0), rel=1e-5)


def test_csr_and_umap_arrays(make_config, dataset_dir, vectors, tmp_path):
    sparse = pytest.importorskip("scipy.sparse")
    report = graph(make_config(input=str(dataset_dir), k=8, index_key="IVF32,Flat", nprobe=32, recall_queries=300))
    out = tmp_path / "out"
    m = sparse.load_npz(out / "graph.npz")
    e = pq.read_table(out / "edges")
    coo = m.tocoo()
    assert m.shape == (6000, 6000) and m.nnz == e.num_rows == report.graph.edges
    assert np.array_equal(coo.row, e.column("src").to_numpy()) and np.array_equal(coo.col, e.column("dst").to_numpy())
    assert np.allclose(coo.data, e.column("weight").to_numpy())
    assert (m != m.T).nnz == 0  # symmetric by default
    z = np.load(out / "umap_knn.npz")
    idx, dist = z["knn_indices"], z["knn_dists"]
    assert idx.shape == dist.shape == (6000, 9)
    assert np.array_equal(idx[:, 0], np.arange(6000)) and (dist[:, 0] == 0).all()
    assert (np.diff(dist, axis=1) >= -1e-6).all()  # nearest first
    # cosine distance = 1 - similarity, against the vectors themselves
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    nodes = pq.read_table(out / "nodes").column("id").to_numpy()  # row -> input id (here the row itself)
    i, j = 17, idx[17, 3]
    assert dist[17, 3] == pytest.approx(1 - float(x[nodes[i]] @ x[nodes[j]]), abs=1e-4)
    g = report.graph
    assert sum(g.degree.histogram.values()) == 6000 and g.degree.isolated == 0
    assert g.recall.graph_recall >= 0.95 and (out / "degrees.svg").exists()


def test_gaussian_weights_need_a_distance(make_config, line_dir):
    with pytest.raises(ConfigError, match="gaussian needs a distance"):
        graph(make_config(input=str(line_dir), metric="ip", weight="gaussian"))


def test_graph_command_line(dask_address, line_dir, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "graph",
            "--input",
            str(line_dir),
            "--output",
            str(out),
            "--metric",
            "l2",
            "--index-key",
            "Flat",
            "--k",
            "1",
            "--graph-mode",
            "mutual",
            "--recall-queries",
            "0",
            "--target-recall",
            "off",
            "--scheduler-address",
            dask_address,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(edges_of(out)) == {("p0", "p1"), ("p1", "p0"), ("p5", "p6"), ("p6", "p5")}
    assert "graph (mutual): 7 nodes, 4 edges" in proc.stderr


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edges=st.lists(
        st.tuples(
            st.integers(0, 20),
            st.integers(0, 40),
            st.floats(-2, 2, width=32),
            st.sampled_from([1, 2]),
        ),
        max_size=150,
    ),
    metric=st.sampled_from(["l2", "cosine"]),
    split=st.integers(0, 150),
)
def test_reduce_keeps_one_edge_a_pair_with_its_closest_score_and_every_flag(tmp_path_factory, edges, metric, split):
    """Whatever the repeats and their order over map outputs: one edge per (src, dst), sorted, with
    the closest score of its repeats and the union of their direction flags."""
    from pipeline.shuffle.edges import reduce_edges, write_partitioned

    tmp = tmp_path_factory.mktemp("reduce")
    maps = []
    for i, chunk in enumerate((edges[:split], edges[split:])):
        a = np.array(chunk, dtype=np.float64).reshape(-1, 4)
        maps.append(tmp / f"from-{i}")
        columns = {"src": a[:, 0].astype(np.int64), "dst": a[:, 1].astype(np.int64)}
        columns |= {"score": a[:, 2].astype(np.float32), "flag": a[:, 3].astype(np.int8)}
        write_partitioned(maps[-1], np.zeros(len(chunk), np.int64), 1, columns)
    src, dst, score, flags = reduce_edges(maps, 0, metric, "symmetric")
    want: dict[tuple[int, int], tuple[np.float32, int]] = {}
    for s, d, sc, f in edges:
        sc = np.float32(sc)
        best, seen = want.get((s, d), (sc, 0))
        want[(s, d)] = (min(best, sc) if metric == "l2" else max(best, sc), seen | f)
    assert list(zip(src.tolist(), dst.tolist(), strict=True)) == sorted(want)
    assert score.tolist() == [want[e][0] for e in sorted(want)]
    assert flags.tolist() == [want[e][1] for e in sorted(want)]


def test_graph_recall_reuses_the_joins_exact_truth(make_config, dataset_dir, vectors, tmp_path, monkeypatch):
    """The graph is scored on the self-join's kept recall sample (exact over today's rows), not on
    a second exact pass; the share found equals a brute-force count over those rows' out-edges."""
    import pipeline.jobs.graph as graph_job
    from pipeline.runtime.manifest import Manifest
    from pipeline.search.truth import kept_truth

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the graph's recall drew a new sample")

    monkeypatch.setattr(graph_job, "draw_sample", no_second_pass)
    report = graph(make_config(input=str(dataset_dir), k=8, index_key="IVF32,Flat", nprobe=4, recall_queries=300))
    out = tmp_path / "out"
    kept = kept_truth(Manifest(out), k=8, metric="cosine", exclude_self=True)
    assert kept is not None and report.graph.recall.queries == len(kept.queries) == 300
    e = pq.read_table(out / "edges")
    src, dst = e.column("src").to_numpy(), e.column("dst").to_numpy()
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    nodes = pq.read_table(out / "nodes").column("id").to_numpy()
    hits = []
    for r in kept.queries.tolist():
        s = x[nodes] @ x[nodes[r]]
        s[r] = -np.inf
        exact = set(np.argsort(-s, kind="stable")[:8].tolist())
        hits.append(len(exact & set(dst[src == r].tolist())) / 8)
    assert report.graph.recall.graph_recall == pytest.approx(float(np.mean(hits)), abs=0.01)
