"""Dedup end to end on planted duplicates: copies, perturbations and a chain, in both modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import ConfigError, InputError, dedup
from pipeline.io.sample_data import clustered_vectors, write_shards
from pipeline.shuffle.components import connected_components
from pipeline.shuffle.edges import write_edges

DIM = 48
N_BACKGROUND = 3000


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Random background (no pair near 0.95) plus planted groups, in 3 shards with a quality column.

    - ids 0..4 have exact copies at ids 10000.. (one copy each; id 0 has three);
    - ids 5..9 have a perturbed twin (cosine ~0.99) at ids 20000..;
    - ids 30000, 30001, 30002 form a chain: a~b and b~c pass 0.95, a~c (0.85) does not.
    """
    rng = np.random.default_rng(7)
    x = _unit(rng.standard_normal((N_BACKGROUND, DIM))).astype(np.float32)
    ids = list(range(N_BACKGROUND))
    rows, extra_ids = [], []
    for i in range(5):
        for c in range(3 if i == 0 else 1):
            rows.append(x[i])
            extra_ids.append(10000 + 10 * i + c)
    for i in range(5, 10):
        noise = _unit(rng.standard_normal(DIM)) * 0.12
        rows.append(_unit(x[i] + noise))
        extra_ids.append(20000 + i)
    e1, e2 = np.zeros(DIM, np.float32), np.zeros(DIM, np.float32)
    e1[0], e2[1] = 1, 1
    base = _unit(rng.standard_normal(DIM)).astype(np.float32)
    theta = np.deg2rad(16.0)  # cos 16 deg = 0.961 >= 0.95 > cos 32 deg = 0.848
    for j in range(3):
        rows.append(_unit(0.2 * base + np.cos(j * theta) * e1 + np.sin(j * theta) * e2))
        extra_ids.append(30000 + j)
    allx = np.vstack([x, np.array(rows, dtype=np.float32)])
    allids = np.array(ids + extra_ids, dtype=np.int64)
    perm = rng.permutation(len(allids))  # spread the planted rows over the shards
    allx, allids = allx[perm], allids[perm]
    quality = (allids % 7).astype(np.float64)
    d = tmp_path_factory.mktemp("planted")
    for s, part in enumerate(np.array_split(np.arange(len(allids)), 3)):
        table = pa.table(
            {
                "id": pa.array(allids[part]),
                "quality": pa.array(quality[part]),
                "text": pa.array([f"text {i}" for i in allids[part]]),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(allx[part].ravel()), DIM),
            }
        )
        pq.write_table(table, d / f"part-{s:05d}.parquet", row_group_size=500)
    return {"dir": d, "x": allx, "ids": allids, "quality": dict(zip(allids.tolist(), quality.tolist()))}


def groups_of(out: Path) -> dict[int, dict]:
    t = pq.read_table(out / "groups").to_pylist()
    return {r["id"]: r for r in t}


def members(groups: dict[int, dict]) -> list[set[int]]:
    by: dict[int, set[int]] = {}
    for i, r in groups.items():
        by.setdefault(r["group_id"], set()).add(i)
    return sorted((m for m in by.values() if len(m) > 1), key=min)


EXPECTED = [
    {0, 10000, 10001, 10002},
    {1, 10010},
    {2, 10020},
    {3, 10030},
    {4, 10040},
    {5, 20005},
    {6, 20006},
    {7, 20007},
    {8, 20008},
    {9, 20009},
]
CHAIN = {30000, 30001, 30002}

# 500-row pieces; each piece's edges overflow the shuffle budget (2 x partition_size), so the
# pairs are shuffled between 9 partitions (3 shards of 500 + 500 + 5 rows)
SETTINGS = {
    "threshold": 0.95,
    "index_key": "IVF16,Flat",
    "nprobe": 16,
    "recall_queries": 500,
    "partition_size": 500 * DIM * 4,
}


def test_components_groups_copies_perturbations_and_chains(make_config, planted, tmp_path):
    report = dedup(make_config(input=str(planted["dir"]), **SETTINGS))
    out = tmp_path / "out"
    g = groups_of(out)
    assert len(g) == len(planted["ids"])
    assert members(g) == sorted(EXPECTED + [CHAIN], key=min)
    for group in EXPECTED + [CHAIN]:
        rep = min(group)  # default keep priority: the smallest id
        assert all(g[i]["representative_id"] == rep for i in group)
        assert [i for i in group if g[i]["is_kept"]] == [rep]
    # the chain's ends are linked only through the middle: their own score is below the threshold
    row = {i: r for r, i in enumerate(planted["ids"].tolist())}
    x = _unit(planted["x"])
    assert g[30002]["score_to_representative"] == pytest.approx(float(x[row[30002]] @ x[row[30000]]), abs=1e-5)
    assert g[30002]["score_to_representative"] < 0.95
    assert g[10001]["score_to_representative"] == pytest.approx(1.0, abs=1e-5)
    assert g[123]["score_to_representative"] is None and g[123]["is_kept"]
    assert len(list((out / "groups").glob("part-*.parquet"))) == 9  # shuffled between 9 partitions
    kept = set(pq.read_table(out / "kept").column("id").to_pylist())
    assert kept == {i for i, r in g.items() if r["is_kept"]}
    pairs = pq.read_table(out / "pairs").to_pylist()
    assert all(p["score"] >= 0.95 for p in pairs)
    got = {frozenset((p["id_a"], p["id_b"])) for p in pairs}
    assert frozenset((30000, 30002)) not in got and frozenset((30000, 30001)) in got
    summary = report.dedup
    assert summary.rows_dropped == sum(len(m) - 1 for m in EXPECTED) + 2
    assert summary.group_sizes == {"2": 9, "3": 1, "4": 1}
    assert summary.exactness.pair_recall == 1.0 and summary.exactness.below_threshold == 0
    md = (out / "report.md").read_text()
    assert "Dedup" in md and "group_sizes.svg" in md and (out / "group_sizes.svg").exists()


def test_greedy_keeps_the_chain_end_that_no_kept_row_covers(make_config, planted, tmp_path):
    dedup(make_config(input=str(planted["dir"]), dedup_mode="greedy", **SETTINGS))
    g = groups_of(tmp_path / "out")
    assert g[30000]["is_kept"] and not g[30001]["is_kept"] and g[30002]["is_kept"]
    assert g[30001]["representative_id"] == 30000 and g[30002]["representative_id"] == 30002
    for group in EXPECTED:  # complete groups: greedy and components agree
        assert [i for i in group if g[i]["is_kept"]] == [min(group)]


@pytest.mark.parametrize("order", ["max", "min"])
def test_keep_by_column(make_config, planted, tmp_path, order):
    dedup(make_config(input=str(planted["dir"]), keep_by="quality", keep_order=order, **SETTINGS))
    g = groups_of(tmp_path / "out")
    q = planted["quality"]
    for group in EXPECTED + [CHAIN]:
        pick = (max if order == "max" else min)(q[i] for i in group)
        best = min(i for i in group if q[i] == pick)  # ties: the smallest id
        assert [i for i in group if g[i]["is_kept"]] == [best]


def test_rerun_is_a_no_op_and_a_new_threshold_regroups_from_the_join(make_config, planted, tmp_path, caplog):
    cfg = make_config(input=str(planted["dir"]), **SETTINGS)
    dedup(cfg)
    out = tmp_path / "out"
    files = sorted(p for p in out.rglob("*.parquet") if "index" not in p.parts)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    dedup(cfg)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == before
    join_files = sorted((out / "neighbors").glob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in join_files]
    with caplog.at_level("INFO", logger="pipeline"):
        report = dedup(make_config(input=str(planted["dir"]), **{**SETTINGS, "threshold": 0.999}))
    assert [p.stat().st_mtime_ns for p in join_files] == stamps  # the join was reused
    assert report.dedup.rows_dropped == 7  # exact copies only
    assert "regrouping from the existing join" in caplog.text


def test_explore_counts_match_a_real_run(make_config, planted, tmp_path):
    table = dedup(make_config(input=str(planted["dir"]), explore=True, **SETTINGS)).dedup_explore
    at = {row.threshold: row for row in table}
    assert at[0.95].rows_dropped == 14 and at[0.999].rows_dropped == 7
    assert at[0.95].pairs >= at[0.96].pairs >= at[0.999].pairs
    assert not (tmp_path / "out" / "groups").exists()
    report = dedup(make_config(input=str(planted["dir"]), **SETTINGS))
    assert report.dedup.rows_dropped == at[0.95].rows_dropped
    assert report.dedup.pairs == at[0.95].pairs


def test_report_shows_example_pairs_with_text(make_config, planted, tmp_path):
    report = dedup(make_config(input=str(planted["dir"]), text_column="text", **SETTINGS))
    ex = report.dedup.examples
    assert ex and all(e.text_a == f"text {e.id_a}" for e in ex)
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"text {ex[0].id_a}" in md


def test_dedup_input_errors(make_config, planted):
    with pytest.raises(ConfigError, match="--threshold is required"):
        dedup(make_config(input=str(planted["dir"])))
    with pytest.raises(InputError, match="no column 'score'.*--keep-by"):
        dedup(make_config(input=str(planted["dir"]), keep_by="score", **SETTINGS))
    with pytest.raises(InputError, match="column 'text'.*numeric"):
        dedup(make_config(input=str(planted["dir"]), keep_by="text", overwrite=True, **SETTINGS))
    with pytest.raises(ConfigError, match="cosine similarity lies in"):
        dedup(make_config(input=str(planted["dir"]), **{**SETTINGS, "threshold": 1.5}))


def test_components_follow_long_chains(dask_address, tmp_path):
    """A 2,000-row path split over 4 partitions, plus a separate pair: labels are each component's minimum."""
    from distributed import Client

    n = 2003
    starts = np.array([0, 500, 1000, 1500])
    rng = np.random.default_rng(0)
    path = rng.permutation(2000)  # the chain visits rows in random order
    a, b = path[:-1], path[1:]
    src = np.concatenate([a, b, [2000, 2001]])
    dst = np.concatenate([b, a, [2001, 2000]])
    paths = _write_partitioned_edges(tmp_path, src, dst, starts, n)
    with Client(dask_address) as client:
        labels_dir = connected_components(client, paths, starts=starts, total=n, work_dir=tmp_path / "cc")
    labels = np.concatenate([np.load(labels_dir / f"part-{p:05d}.npy") for p in range(4)])
    assert (labels[:2000] == 0).all() and list(labels[2000:]) == [2000, 2000, 2002]


def _write_partitioned_edges(tmp: Path, src: np.ndarray, dst: np.ndarray, starts: np.ndarray, n: int) -> list[str]:
    """Edge files by source partition (sorted), as the graph's reduce writes them."""
    ends = np.r_[starts[1:], n]
    paths = []
    for p in range(len(starts)):
        sel = (src >= starts[p]) & (src < ends[p])
        order = np.lexsort((dst[sel], src[sel]))
        paths.append(str(tmp / f"e{p}.parquet"))
        write_edges(paths[-1], src[sel][order], dst[sel][order], np.ones(sel.sum(), np.float32))
    return paths


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 80),
    cuts=st.lists(st.integers(1, 79), max_size=5),
    pairs=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 79)), max_size=120),
    one_way=st.booleans(),
    answers=st.booleans(),
)
def test_components_equal_scipy_on_any_graph_and_partitioning(
    dask_address, tmp_path_factory, n, cuts, pairs, one_way, answers
):
    """Labels are each component's smallest row, whatever the edges (one direction or both, loops,
    repeats), however the rows are cut into partitions (some of them without edges), and whether
    partitions learn each other's labels from their files or by request and answer."""
    from distributed import Client
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    starts = np.unique(np.r_[0, [c for c in cuts if c < n]]).astype(np.int64)
    e = np.array([(a, b) for a, b in pairs if a < n and b < n], dtype=np.int64).reshape(-1, 2)
    src, dst = (e[:, 0], e[:, 1]) if one_way else (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])
    tmp = tmp_path_factory.mktemp("cc")
    paths = _write_partitioned_edges(tmp, src, dst, starts, n)
    with Client(dask_address) as client:
        labels_dir = connected_components(client, paths, starts=starts, total=n, work_dir=tmp / "cc", answers=answers)
    got = np.concatenate([np.load(labels_dir / f"part-{p:05d}.npy") for p in range(len(starts))])
    _, comp = scipy_components(coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)), directed=False)
    smallest = np.full(comp.max() + 1, n)
    np.minimum.at(smallest, comp, np.arange(n))
    assert np.array_equal(got, smallest[comp])


def test_report_json_is_valid(make_config, planted, tmp_path):
    dedup(make_config(input=str(planted["dir"]), **SETTINGS))
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["command"] == "dedup" and data["dedup"]["rows_in"] == len(planted["ids"])


@pytest.fixture(scope="module")
def six_shards(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The planted rows as 6 shards: the first 3 are "yesterday's", the rest arrive later."""
    d = tmp_path_factory.mktemp("six")
    table = pq.read_table(planted["dir"])
    paths = []
    for s, part in enumerate(np.array_split(np.arange(table.num_rows), 6)):
        paths.append(str(d / f"part-{s:05d}.parquet"))
        pq.write_table(table.take(pa.array(part)), paths[-1], row_group_size=500)
    return paths


def _partition(out: Path) -> tuple[set[frozenset[int]], set[int]]:
    g = groups_of(out)
    by: dict[int, set[int]] = {}
    for i, r in g.items():
        by.setdefault(r["representative_id"], set()).add(i)
    return {frozenset(m) for m in by.values()}, {i for i, r in g.items() if r["is_kept"]}


@pytest.mark.parametrize("mode", ["components", "greedy"])
def test_incremental_run_equals_a_full_run_and_a_rerun_changes_nothing(make_config, six_shards, tmp_path, caplog, mode):
    # one piece per shard, two pieces per shuffle partition: the first run's last partition holds
    # one piece and takes in a new one when the input grows
    settings = {**SETTINGS, "partition_size": 220_000}
    full = dedup(make_config(input=six_shards, output=str(tmp_path / "full"), dedup_mode=mode, **settings))
    inc_out = tmp_path / "inc"
    dedup(make_config(input=six_shards[:3], output=str(inc_out), dedup_mode=mode, **settings))
    with caplog.at_level("INFO", logger="pipeline"):
        inc = dedup(make_config(input=six_shards, output=str(inc_out), dedup_mode=mode, **settings))
    assert "3 files added" in caplog.text and "new rows since the last run" in caplog.text
    assert "(0 of them searched again" in caplog.text  # old rows only took in new ones: no search
    assert _partition(inc_out) == _partition(tmp_path / "full")
    assert len(list((inc_out / "groups").glob("part-*.parquet"))) == 3
    assert inc.dedup.rows_dropped == full.dedup.rows_dropped and inc.dedup.pairs == full.dedup.pairs
    assert inc.dedup.exactness.pair_recall == 1.0
    files = sorted(p for p in inc_out.rglob("*") if p.is_file() and p.suffix in (".parquet", ".npy", ".npz", ".faiss"))
    before = {p: p.stat().st_mtime_ns for p in files}
    dedup(make_config(input=six_shards, output=str(inc_out), dedup_mode=mode, **settings))
    assert {p: p.stat().st_mtime_ns for p in files} == before  # the same day twice: nothing rewritten


def test_a_removed_old_shard_updates_to_what_a_fresh_run_finds(make_config, six_shards, tmp_path, caplog):
    out = tmp_path / "out"
    dedup(make_config(input=six_shards[:3], output=str(out), **SETTINGS))
    now = [six_shards[0], six_shards[2], six_shards[3]]
    with caplog.at_level("INFO", logger="pipeline"):
        updated = dedup(make_config(input=now, output=str(out), **SETTINGS))
    assert "1 file added" in caplog.text and "1 file removed" in caplog.text
    fresh = dedup(make_config(input=now, output=str(tmp_path / "fresh"), **SETTINGS))
    assert _partition(out) == _partition(tmp_path / "fresh")
    assert updated.dedup.rows_dropped == fresh.dedup.rows_dropped and updated.dedup.pairs == fresh.dedup.pairs


def test_l2_threshold_is_a_squared_distance_and_string_ids_work(make_config, planted, tmp_path):
    """Under l2 the threshold bounds the squared distance (<=); ids may be strings, in a column of any name."""
    table = pq.read_table(planted["dir"])
    d = tmp_path / "strings"
    d.mkdir()
    ids = pa.array([f"doc-{i}" for i in table.column("id").to_pylist()])
    pq.write_table(table.set_column(0, "doc_id", ids), d / "part-00000.parquet", row_group_size=1000)
    # unit vectors: squared l2 = 2 - 2 cos, so cos >= 0.95 is squared distance <= 0.1
    report = dedup(
        make_config(
            input=str(d),
            id_column="doc_id",
            metric="l2",
            threshold=0.1,
            index_key="IVF16,Flat",
            nprobe=16,
            recall_queries=500,
        )
    )
    # groups/ and kept/ name the id column as the input does; the report's headline is the dedup's own
    assert pq.read_table(tmp_path / "out" / "kept").column_names == ["doc_id"]
    md = (tmp_path / "out" / "report.md").read_text()
    headline = md.splitlines()[2]
    assert "| score | id a | id b | kept |" in md  # each example pair says which row was kept
    settings = json.loads((tmp_path / "out" / "report.json").read_text())["config"]
    assert "graph" not in settings and settings["dedup"]["threshold"] == 0.1  # only what dedup reads
    assert settings["data"]["paths"] == [str(d)] and Path(settings["output"]).is_absolute()
    assert (
        headline.startswith("**dedup: 14 of ") and "pairs at l2 <= 0.1" in headline and "pair recall 1.0000" in headline
    )
    g = {r["doc_id"]: r for r in pq.read_table(tmp_path / "out" / "groups").to_pylist()}
    assert report.dedup.rows_dropped == 14
    assert g["doc-10001"]["representative_id"] == "doc-0" and not g["doc-10001"]["is_kept"]  # "doc-0" < "doc-10001"
    assert g["doc-30002"]["score_to_representative"] > 0.1  # the chain's far end: a squared distance above it
    assert all(p["score"] <= 0.1 for p in pq.read_table(tmp_path / "out" / "pairs").to_pylist())
    assert report.dedup.exactness.pair_recall == 1.0


def _copies(tmp_path: Path, rows: int, first: int, copies: int, seed: int, row_group: int) -> Path:
    """Random unit rows in one file where rows ``first .. first + copies - 1`` are one vector."""
    x = _unit(np.random.default_rng(seed).standard_normal((rows, DIM))).astype(np.float32)
    x[first + 1 : first + copies] = x[first]
    d = tmp_path / "data"
    d.mkdir()
    table = pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM),
        }
    )
    pq.write_table(table, d / "part-00000.parquet", row_group_size=row_group)
    return d


def test_a_group_larger_than_k_is_found_whole(make_config, tmp_path):
    """25 copies of one vector with k=10: the rows whose 10 neighbours all pass are searched again
    with longer lists, so every pair is found and greedy keeps exactly one copy."""
    d = _copies(tmp_path, rows=800, first=99, copies=26, seed=3, row_group=200)
    settings = {
        "input": str(d),
        "threshold": 0.99,
        "index_key": "Flat",
        "k": 10,
        "recall_queries": 800,
        "partition_size": 200 * DIM * 4,
    }
    report = dedup(make_config(dedup_mode="greedy", **settings))
    g = groups_of(tmp_path / "out")
    assert [i for i in range(99, 125) if g[i]["is_kept"]] == [99]
    assert report.dedup.pairs == 26 * 25 // 2 and report.dedup.searched_again == 26
    assert report.dedup.saturated_rows == 0 and report.dedup.exactness.pair_recall == 1.0


@pytest.mark.parametrize("range_budget", ["ample", "none"])
def test_rows_with_more_duplicates_than_the_cap_get_every_pair_by_range_search(
    make_config, tmp_path, monkeypatch, range_budget
):
    """121 identical rows with a 30-neighbour cap: the rows still full at the cap get all 120
    partners by exact range search, so every pair is found and no row is left saturated. With a
    small partition_size and little worker memory there is no room for them in the shuffle: they stay
    capped and are counted (memory is bounded by configuration), and the missed pair-recall target is
    loud."""
    from pipeline.duplicates import groups
    from pipeline.jobs import dedup as dedup_job

    monkeypatch.setattr(groups, "WIDEN_MAX", 30)
    monkeypatch.setattr(groups, "MIN_ROOM", 100)
    if range_budget == "none":  # as if the workers had almost no memory for the shuffle
        monkeypatch.setattr(dedup_job, "SHUFFLE_COPIES", 1 << 40)
    d = _copies(tmp_path, rows=900, first=299, copies=121, seed=4, row_group=300)
    report = dedup(
        make_config(
            input=str(d),
            threshold=0.99,
            index_key="IVF8,Flat",
            nprobe=2,
            rerank=0,
            k=5,
            target_recall="off",
            recall_queries=900,
            partition_size=300 * DIM * 4 * (1 if range_budget == "none" else 50),
            allow_below_target=range_budget == "none",
        )
    )
    if range_budget == "none":  # loud: the pair recall is below its target, accepted here
        assert report.dedup.saturated_rows > 0 and report.dedup.pairs < 121 * 120 // 2
        assert report.dedup.exactness.pair_recall < 0.99
        return
    assert report.dedup.pairs == 121 * 120 // 2 and report.dedup.saturated_rows == 0
    assert report.dedup.exactness.pair_recall == 1.0 and report.dedup.rows_dropped == 120
    assert len(set(pq.read_table(tmp_path / "out" / "pairs").column("id_a").to_pylist())) == 120


def test_the_pair_target_searches_linked_rows_over_more_lists(make_config, tmp_path, caplog):
    """Dense near-duplicate clusters spread over many inverted lists: the join's nprobe (tuned to
    recall@k) misses pairs; the dedup searches rows with a pair again over more lists and reaches
    its pair-recall target, measured on another sample."""
    x = clustered_vectors(20_000, 16, clusters=40, seed=2, latent=4)
    write_shards(tmp_path / "dense", x, shards=2)
    with caplog.at_level("INFO", logger="pipeline"):
        report = dedup(
            make_config(input=str(tmp_path / "dense"), threshold=0.98, index_key="IVF256,Flat", k=5, recall_queries=500)
        )
    ex = report.dedup.exactness
    assert report.dedup.target_pair_recall == 0.99 and ex.pair_recall >= 0.99 and ex.exact_pairs > 1000
    assert report.dedup.pair_nprobe is not None and report.dedup.pair_nprobe > report.search.nprobe
    assert "rows with a pair are searched again with nprobe" in caplog.text


def test_incremental_dedup_with_a_tuned_index_agrees_with_a_full_run_on_clustered_data(make_config, tmp_path):
    """Dense clusters, a lossy index tuned to its targets: yesterday's three shards, then all six,
    give (within the pair-recall target's slack: one pair in 7,000 here) the pairs and groups one
    run over all six gives (the issue measured 4% of the pairs apart with the old default index)."""
    x = clustered_vectors(12_000, 16, clusters=60, seed=9, latent=4)
    write_shards(tmp_path / "all", x, shards=6)
    files = sorted(str(p) for p in (tmp_path / "all").glob("*.parquet"))
    settings = {"threshold": 0.99, "index_key": "IVF64,SQ8", "recall_queries": 500, "partition_size": 2000 * 16 * 4}
    full = dedup(make_config(input=files, output=str(tmp_path / "full"), **settings))
    dedup(make_config(input=files[:3], output=str(tmp_path / "inc"), **settings))
    inc = dedup(make_config(input=files, output=str(tmp_path / "inc"), **settings))
    assert full.dedup.exactness.pair_recall >= 0.99 and inc.dedup.exactness.pair_recall >= 0.99
    pairs = {
        name: {
            frozenset(p)
            for p in zip(*(pq.read_table(tmp_path / name / "pairs").column(c).to_pylist() for c in ("id_a", "id_b")))
        }
        for name in ("full", "inc")
    }
    assert len(pairs["full"] ^ pairs["inc"]) <= 0.001 * len(pairs["full"]) and len(pairs["full"]) > 5000
    groups_full, _ = _partition(tmp_path / "full")
    groups_inc, _ = _partition(tmp_path / "inc")
    assert len(groups_full ^ groups_inc) <= 0.002 * len(groups_full)


# the deduplicated dataset ------------------------------------------------------------------------
def _digest_files(paths: list[Path]) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def test_deduplicated_mirrors_the_input_files_minus_the_dropped_rows(make_config, planted, tmp_path):
    """deduplicated/ has the input's file names (nested folders too), every column, the input's row
    order, and exactly the kept rows; removed/ has the dropped rows with their representative and
    score; the input is left byte for byte as it was."""
    src = tmp_path / "in"
    (src / "2026-12-01").mkdir(parents=True)
    (src / "2026-12-02").mkdir()
    names = ["2026-12-01/a.parquet", "2026-12-01/b.parquet", "2026-12-02/a.parquet"]
    for name, shard in zip(names, sorted(Path(planted["dir"]).glob("*.parquet")), strict=True):
        table = pq.read_table(shard)
        pq.write_table(table.replace_schema_metadata({"origin": name}), src / name, row_group_size=400)
    inputs = _digest_files(sorted(src.rglob("*.parquet")))
    out = tmp_path / "out"
    report = dedup(make_config(input=str(src), output=str(out), **SETTINGS))

    groups = groups_of(out)
    assert sorted(
        str(p.relative_to(out / "deduplicated")) for p in (out / "deduplicated").rglob("*.parquet")
    ) == sorted(names)
    for name in names:
        original = pq.read_table(src / name)
        kept = pq.read_table(out / "deduplicated" / name)
        removed = pq.read_table(out / "removed" / name)
        assert kept.schema == original.schema and kept.schema.metadata == original.schema.metadata
        keep_mask = [groups[i]["is_kept"] for i in original.column("id").to_pylist()]
        assert kept.equals(original.filter(pa.array(keep_mask)))  # same rows, same order, same values
        dropped = original.filter(pa.array([not m for m in keep_mask]))
        assert removed.select(original.schema.names).equals(dropped)
        for r in removed.to_pylist():
            assert r["representative_id"] == groups[r["id"]]["representative_id"] != r["id"]
            assert r["score_to_representative"] == pytest.approx(groups[r["id"]]["score_to_representative"])
    assert report.dedup.dataset.rows_removed == report.dedup.rows_dropped > 0
    assert report.dedup.dataset.files_written == 3
    assert _digest_files(sorted(src.rglob("*.parquet"))) == inputs


def test_deduplicated_files_are_written_again_only_when_their_rows_change(make_config, six_shards, tmp_path):
    """A rerun rewrites no file; a grown input writes the new files (and an old one only where new
    rows changed which of its rows are kept); the result equals a full run's."""
    out = tmp_path / "inc"
    dedup(make_config(input=six_shards[:3], output=str(out), **SETTINGS))
    old = sorted((out / "deduplicated").glob("*.parquet"))
    stamps = {p.name: p.stat().st_mtime_ns for p in old}
    old_kept = {p.name: pq.read_table(p).column("id").to_pylist() for p in old}
    report = dedup(make_config(input=six_shards, output=str(out), **SETTINGS))
    full = tmp_path / "full"
    dedup(make_config(input=six_shards, output=str(full), **SETTINGS))
    for name in (Path(p).name for p in six_shards):
        assert pq.read_table(out / "deduplicated" / name).equals(pq.read_table(full / "deduplicated" / name))
    rewritten = {n for n, t in stamps.items() if (out / "deduplicated" / n).stat().st_mtime_ns != t}
    changed = {n for n in stamps if pq.read_table(out / "deduplicated" / n).column("id").to_pylist() != old_kept[n]}
    assert rewritten == changed  # an old file is written again exactly when its kept rows changed
    assert report.dedup.dataset.files_written == 3 + len(changed)
    before = {p: p.stat().st_mtime_ns for p in (out / "deduplicated").glob("*.parquet")}
    again = dedup(make_config(input=six_shards, output=str(out), **SETTINGS))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert again.dedup is None or again.dedup.dataset is None or again.dedup.dataset.files_written == 0


def test_an_input_column_named_like_an_added_one_is_refused_up_front(make_config, planted, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    table = pq.read_table(sorted(Path(planted["dir"]).glob("*.parquet"))[0])
    pq.write_table(table.append_column("representative_id", table.column("id")), src / "a.parquet")
    with pytest.raises(ConfigError, match=r"a\.parquet: column 'representative_id' .* --no-write-dataset"):
        dedup(make_config(input=str(src), output=str(tmp_path / "out"), **SETTINGS))
    assert not list((tmp_path / "out").rglob("*.npy"))  # refused before the scan
    report = dedup(make_config(input=str(src), output=str(tmp_path / "out2"), write_dataset=False, **SETTINGS))
    assert report.dedup.dataset is None and not (tmp_path / "out2" / "deduplicated").exists()


# decontamination against a reference ------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(planted: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two reference files: exact copies of input ids 100-104 (a.parquet), and perturbed copies
    (cosine ~0.97) of ids 105-109 with 50 unrelated rows (b.parquet)."""
    rng = np.random.default_rng(11)
    row_of = {int(i): r for r, i in enumerate(planted["ids"])}
    x = planted["x"]
    copies = np.stack([x[row_of[i]] for i in range(100, 105)])
    perturbed = np.stack([_unit(x[row_of[i]] + 0.25 * _unit(rng.standard_normal(DIM))) for i in range(105, 110)])
    far = _unit(rng.standard_normal((50, DIM)))
    d = tmp_path_factory.mktemp("reference")
    for name, arr, first in (("a.parquet", copies, 900_000), ("b.parquet", np.vstack([perturbed, far]), 910_000)):
        pq.write_table(
            pa.table(
                {
                    "id": pa.array(np.arange(first, first + len(arr), dtype=np.int64)),
                    "text": pa.array([f"benchmark item {i}" for i in range(len(arr))]),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(arr.astype(np.float32).ravel()), DIM),
                }
            ),
            d / name,
        )
    return {"dir": d, "cos": [float(np.dot(perturbed[j], x[row_of[105 + j]])) for j in range(5)]}


def test_against_finds_planted_contamination_and_never_touches_the_reference(make_config, planted, reference, tmp_path):
    before = _digest_files(sorted(Path(reference["dir"]).glob("*.parquet")))
    assert all(0.95 < c < 0.99 for c in reference["cos"])
    out = tmp_path / "out"
    report = dedup(
        make_config(
            input=str(planted["dir"]), output=str(out), against=[str(reference["dir"])], text_column="text", **SETTINGS
        )
    )
    c = report.dedup.contamination
    assert c.rows_contaminated == 10 and c.reference_rows == 60
    assert {Path(m.file).name: m.input_rows_matched for m in c.per_file} == {"a.parquet": 5, "b.parquet": 5}
    found = pq.read_table(out / "contamination")
    assert sorted(found.column("id").to_pylist()) == list(range(100, 110))
    match = {r["id"]: r for r in found.to_pylist()}
    assert [match[i]["reference_id"] for i in range(100, 105)] == list(range(900_000, 900_005))
    assert [match[i]["reference_id"] for i in range(105, 110)] == list(range(910_000, 910_005))
    assert all(match[i]["score"] == pytest.approx(1.0, abs=1e-5) for i in range(100, 105))
    kept = set(pq.read_table(out / "deduplicated").column("id").to_pylist())
    assert kept.isdisjoint(range(100, 110))
    removed = {r["id"]: r for r in pq.read_table(out / "removed").to_pylist()}
    assert all(removed[i]["reference_id"] == match[i]["reference_id"] for i in range(100, 110))
    assert c.examples and c.examples[0].input_text is not None and c.examples[0].reference_text.startswith("bench")
    assert "Contamination against the reference" in (out / "report.md").read_text()
    assert _digest_files(sorted(Path(reference["dir"]).glob("*.parquet"))) == before

    # a stricter threshold finds the exact copies only
    strict = dedup(
        make_config(
            input=str(planted["dir"]),
            output=str(tmp_path / "strict"),
            against=[str(reference["dir"])],
            **{**SETTINGS, "threshold": 0.999},
        )
    )
    assert strict.dedup.contamination.rows_contaminated == 5
    assert sorted(pq.read_table(tmp_path / "strict" / "contamination").column("id").to_pylist()) == list(
        range(100, 105)
    )


def test_reference_ids_equal_to_input_ids_are_a_namespace_of_their_own(make_config, planted, reference, tmp_path):
    """The reference's ids may equal the input's (each dataset numbers its own rows): its copies
    of input ids 100-109 carry those same ids, and its 50 unrelated rows the ids of input rows
    0-49. Exactly the 10 planted rows are contaminated, each matched to its own copy."""
    ref = tmp_path / "same-ids"
    ref.mkdir()
    for name, first in (("a.parquet", 100), ("b.parquet", 105)):
        t = pq.read_table(Path(reference["dir"]) / name)
        ids = np.arange(first, first + 5) if name == "a.parquet" else np.r_[np.arange(105, 110), np.arange(50)]
        pq.write_table(t.set_column(t.schema.get_field_index("id"), "id", pa.array(ids.astype(np.int64))), ref / name)
    report = dedup(make_config(input=str(planted["dir"]), output=str(tmp_path / "out"), against=[str(ref)], **SETTINGS))
    assert report.dedup.contamination.rows_contaminated == 10
    found = {r["id"]: r["reference_id"] for r in pq.read_table(tmp_path / "out" / "contamination").to_pylist()}
    assert found == {i: i for i in range(100, 110)}


def test_against_flag_keeps_the_rows_and_lists_them(make_config, planted, reference, tmp_path):
    out = tmp_path / "out"
    report = dedup(
        make_config(
            input=str(planted["dir"]),
            output=str(out),
            against=[str(reference["dir"])],
            against_action="flag",
            **SETTINGS,
        )
    )
    assert report.dedup.contamination.rows_contaminated == 10
    kept = set(pq.read_table(out / "deduplicated").column("id").to_pylist())
    assert set(range(100, 110)) <= kept
    assert sorted(pq.read_table(out / "contamination").column("id").to_pylist()) == list(range(100, 110))


def test_a_reference_of_another_dimension_is_named(make_config, planted, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    x = np.random.default_rng(0).standard_normal((40, DIM // 2)).astype(np.float32)
    pq.write_table(
        pa.table(
            {
                "id": pa.array(np.arange(40)),
                "text": pa.array(["r"] * 40),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM // 2),
            }
        ),
        ref / "bench.parquet",
    )
    with pytest.raises(
        InputError,
        match=rf"bench\.parquet, column 'embedding': --against vectors have dimension "
        rf"{DIM // 2} but the input's have {DIM}",
    ):
        dedup(make_config(input=str(planted["dir"]), output=str(tmp_path / "out"), against=[str(ref)], **SETTINGS))


def test_an_output_inside_the_reference_is_refused(make_config, planted, reference):
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="reference|input"):
        dedup(
            make_config(
                input=str(planted["dir"]),
                output=str(Path(reference["dir"]) / "out"),
                against=[str(reference["dir"])],
                **SETTINGS,
            )
        )
    assert not (Path(reference["dir"]) / "out").exists()


def test_against_on_a_grown_input_scans_and_matches_only_the_new_rows(make_config, six_shards, reference, tmp_path):
    """Yesterday's shards, then all: the input-against-reference join takes in the new query
    pieces (scanned and joined, old lists kept) and the result equals a full run's."""
    out = tmp_path / "inc"
    dedup(make_config(input=six_shards[:3], output=str(out), against=[str(reference["dir"])], **SETTINGS))
    lists = sorted((out / "against" / "knn").glob("*.npz"))
    stamps = [p.stat().st_mtime_ns for p in lists]
    report = dedup(make_config(input=six_shards, output=str(out), against=[str(reference["dir"])], **SETTINGS))
    assert [p.stat().st_mtime_ns for p in lists] == stamps  # old rows were not matched again
    assert report.dedup.contamination.rows_contaminated == 10
    assert sorted(pq.read_table(out / "contamination").column("id").to_pylist()) == list(range(100, 110))
    assert set(pq.read_table(out / "deduplicated").column("id").to_pylist()).isdisjoint(range(100, 110))
