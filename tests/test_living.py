"""Living data: inputs whose files are added, removed and rewritten between runs.

Units (the layout, holes, list merges) run in the fast tier; whole updates against fresh runs and
against exact search, the 30-round month, drift and a kill mid-update are slow.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import dedup, graph, run
from pipeline.index.built import IndexRecord
from pipeline.io.layout import in_holes, layout_of, relayout
from pipeline.io.parquet import Dataset, FileInfo, Piece
from pipeline.io.sample_data import clustered_vectors
from pipeline.io.store import RowStore
from pipeline.runtime.manifest import Manifest
from pipeline.search.truth import merge_truth
from pipeline.search.update import _best_offers, _merge, _ordered_keys
from pipeline.shuffle.edges import make_parts


# the layout ---------------------------------------------------------------------------------
def _planned(files: dict[str, tuple[int, str]], piece_rows: int = 100) -> Dataset:
    """A dataset as planning gives it: files in name order, pieces of ``piece_rows``, rows in order."""
    infos, pieces, at = [], [], 0
    for name in sorted(files):
        rows, footer = files[name]
        infos.append(FileInfo(name, rows * 10, 0, rows, footer))
        for lo in range(0, rows, piece_rows):
            n = min(piece_rows, rows - lo)
            pieces.append(Piece(len(pieces), name, (lo // piece_rows,), lo, at, n))
            at += n
    return Dataset(tuple(infos), tuple(pieces), "id", "embedding", 8, "int", at)


files_strategy = st.dictionaries(
    st.sampled_from([f"f{i}" for i in range(8)]), st.integers(1, 350), min_size=1, max_size=8
)


@settings(max_examples=60, deadline=None)
@given(first=files_strategy, second=files_strategy, rewrite=st.sets(st.sampled_from([f"f{i}" for i in range(8)])))
def test_a_relayout_keeps_surviving_rows_and_numbers_new_ones_after_every_row_laid_out(first, second, rewrite):
    old = _planned({name: (rows, "a") for name, rows in first.items()})
    fresh = _planned(
        {name: (rows + (name in rewrite), "b" if name in rewrite else "a") for name, rows in second.items()}
    )  # a rewrite shows in its footer
    same = {n for n in second if n in first and n not in rewrite and second[n] == first[n]}
    laid, diff = relayout(fresh, layout_of(old))
    # surviving files keep their pieces (numbers and rows); every other old piece is retired
    kept = [p for p in old.pieces if p.path in same]
    assert [p for p in laid.pieces if p.path in same] == kept
    assert sorted(p.index for p in laid.retired) == sorted(p.index for p in old.pieces if p.path not in same)
    # new pieces come after every piece and row laid out before, in input order
    new = [p for p in laid.pieces if p.path not in same]
    assert all(p.index > max(q.index for q in old.pieces) and p.start >= old.row_space for p in new)
    assert [p.start for p in new] == sorted(p.start for p in new)
    # live and retired rows never overlap, and the store's view agrees
    spans = sorted((p.start, p.start + p.rows) for p in (*laid.pieces, *laid.retired))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert laid.total_rows == sum(second[n] + (n in rewrite) for n in second)
    assert len(laid.starts) == len(laid.pieces) + len(laid.retired)
    assert diff.changed == (set(first) != set(second) or bool(set(first) & set(second) - same))
    assert set(diff.removed) == set(first) - set(second) and set(diff.added) == set(second) - set(first)


def test_the_diff_says_what_changed_in_one_line():
    old = _planned({"a": (100, "x"), "b": (200, "x"), "c": (300, "x")})
    fresh = _planned({"a": (100, "x"), "b": (150, "y"), "d": (1_500_000, "x")}, piece_rows=500_000)
    _, diff = relayout(fresh, layout_of(old))
    line = diff.summary()
    assert "1 file added (1.50M rows)" in line and "1 file removed (300 rows)" in line
    assert "1 file rewritten (150 rows)" in line and "\n" not in line


def test_a_touched_file_is_not_a_rewrite():
    old = _planned({"a": (100, "x")})
    fresh = Dataset(
        (FileInfo("a", 1000, 999, 100, "x"),), old.pieces, "id", "embedding", 8, "int", 100
    )  # same size and footer, new time
    laid, diff = relayout(fresh, layout_of(old))
    assert not diff.changed and laid.pieces == old.pieces


def test_holes_and_the_store_view_of_live_rows(tmp_path):
    assert in_holes(np.array([0, 4, 5, 9, 10, 20]), [(5, 5), (20, 1)]).tolist() == [0, 0, 1, 1, 0, 1]
    assert not in_holes(np.array([1, 2]), []).any()
    # pieces 0 and 2 live, piece 1 (rows 10-29) retired
    store = RowStore(tmp_path, np.array([0, 10, 30]), 40, live=(0, 2))
    assert store.rows == 20 and store.piece_rows(1) == 20
    assert store.live_rows(np.arange(20)).tolist() == [*range(10), *range(30, 40)]
    rows = store.sample_rows(np.random.default_rng(0), 15)
    assert not in_holes(rows, [(10, 20)]).any() and len(set(rows.tolist())) == 15
    full = RowStore(tmp_path, np.array([0, 10, 30]), 40)
    a = full.sample_rows(np.random.default_rng(3), 7)
    assert a.tolist() == np.sort(np.random.default_rng(3).choice(40, size=7, replace=False)).tolist()


def test_partitions_break_at_holes():
    pieces = [Piece(0, "a", (0,), 0, 0, 10), Piece(1, "a", (1,), 10, 10, 10), Piece(3, "c", (0,), 0, 50, 10)]
    parts = make_parts(pieces, 8)
    assert [(p.pieces, p.start, p.rows) for p in parts] == [((0, 1), 0, 20), ((3,), 50, 10)]


def test_merging_new_rows_keeps_the_best_k_once_each():
    rows = np.array([[5, 6, 7], [8, -1, -1]])
    scores = np.array([[0.9, 0.8, 0.7], [0.5, np.nan, np.nan]], dtype=np.float32)
    q = np.array([0, 0, 1, 1])
    r = np.array([100, 6, 101, 101])
    s = np.array([0.85, 0.8, 0.6, 0.6], dtype=np.float32)
    changed = _merge(rows, scores, q=q, r=r, s=s, higher_better=True)
    assert rows.tolist() == [[5, 100, 6], [101, 8, -1]] and changed.tolist() == [0, 1]
    again = _merge(rows, scores, q=q, r=r, s=s, higher_better=True)  # patched twice: nothing moves
    assert rows.tolist() == [[5, 100, 6], [101, 8, -1]] and again.size == 0
    low = np.array([[3, 4]])
    d = np.array([[0.1, 0.2]], dtype=np.float32)
    _merge(low, d, q=np.array([0]), r=np.array([9]), s=np.array([0.15], np.float32), higher_better=False)
    assert low.tolist() == [[3, 9]]  # l2: smaller is closer


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), higher=st.booleans(), width=st.integers(1, 6))
def test_merged_lists_are_the_best_of_list_and_offers(seed: int, higher: bool, width: int) -> None:
    """Against brute force: each list becomes the best ``width`` of its rows and the rows offered
    (scores drawn from a few values, so ties abound), each row once, a listed row at the list's
    score; only the queries whose lists moved are returned."""
    rng = np.random.default_rng(seed)
    n = 6
    full = rng.integers(0, width + 1, n)
    rows = np.full((n, width), -1, dtype=np.int64)
    scores = np.full((n, width), np.nan, dtype=np.float32)
    for i, m in enumerate(full):
        picked = rng.choice(20, size=m, replace=False)
        s = rng.integers(0, 4, m).astype(np.float32)
        order = np.lexsort((picked, -s if higher else s))
        rows[i, :m], scores[i, :m] = picked[order], s[order]
    m = int(rng.integers(0, 15))
    q, r = rng.integers(0, n, m), rng.integers(0, 26, m)  # rows 0-19 may be listed already, and repeat
    s = rng.integers(0, 4, m).astype(np.float32)
    before, before_scores = rows.copy(), scores.copy()
    want = []
    for i in range(n):
        best = {int(a): float(b) for a, b in zip(rows[i], scores[i], strict=True) if a >= 0}
        listed = set(best)
        for a, b in zip(r[q == i].tolist(), s[q == i].tolist(), strict=True):
            if a not in listed:
                best[a] = max(best.get(a, -np.inf), b) if higher else min(best.get(a, np.inf), b)
        want.append(sorted(best.values(), reverse=higher)[:width])
    changed = _merge(rows, scores, q=q, r=r, s=s, higher_better=higher)
    for i in range(n):
        got = rows[i][rows[i] >= 0]
        assert len(set(got.tolist())) == got.size  # each row once
        assert scores[i][: got.size].tolist() == want[i]
        for a, b in zip(before[i].tolist(), before_scores[i].tolist(), strict=True):
            if a >= 0 and a not in got:  # a listed row leaves only when the full list is at least as good
                assert got.size == width and (b <= scores[i][-1] if higher else b >= scores[i][-1])
    assert sorted(changed.tolist()) == [i for i in range(n) if (rows[i] != before[i]).any()]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=40))
def test_ordered_keys_sort_as_the_floats(values: list[float]) -> None:
    """The packed merge sorts float32 ranks by integer keys: the same order, -0 equal to +0."""
    rank = np.array(values, dtype=np.float32)
    keys = _ordered_keys(rank)
    assert np.array_equal(np.greater.outer(keys, keys), np.greater.outer(rank, rank))
    assert np.array_equal(np.equal.outer(keys, keys), np.equal.outer(rank, rank))


def test_best_offers_orders_by_query_then_rank_then_row_each_pair_once() -> None:
    q = np.array([2, 0, 2, 0, 2, 0])
    r = np.array([7, 5, 6, 5, 9, 4])
    rank = np.array([0.5, 0.3, 0.5, 0.1, -0.0, 0.3], dtype=np.float32)
    order = _best_offers(q, r, rank)
    # query 0: row 5 at 0.1 (its better offer; 0.3 dropped), then row 4 at 0.3; query 2: 9 (-0), 6, 7
    assert list(zip(q[order].tolist(), r[order].tolist(), strict=True)) == [(0, 5), (0, 4), (2, 9), (2, 6), (2, 7)]
    assert rank[order].tolist()[:2] == [np.float32(0.1), np.float32(0.3)]


# whole updates ---------------------------------------------------------------------------------
SHARD_ROWS, DIM = 600, 24


def _top(x: np.ndarray, q: np.ndarray, rows: np.ndarray, depth: int, higher: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``depth`` of queries ``q`` among the global ``rows`` of ``x`` (-1/NaN padded)."""
    s = q @ x[rows].T if higher else ((q[:, None, :] - x[rows][None, :, :]) ** 2).sum(-1)
    order = np.argsort(-s if higher else s, axis=1, kind="stable")[:, :depth]
    out_rows = np.full((len(q), depth), -1, np.int64)
    out_scores = np.full((len(q), depth), np.nan, np.float32)
    out_rows[:, : order.shape[1]] = rows[order]
    out_scores[:, : order.shape[1]] = np.take_along_axis(s, order, axis=1)
    return out_rows, out_scores


@settings(max_examples=60, deadline=None)
@given(
    n_old=st.integers(5, 80),
    n_new=st.integers(0, 40),
    removed=st.floats(0.0, 0.9),
    depth=st.integers(2, 12),
    higher=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kept_truth_merged_with_the_new_rows_is_exact_as_far_as_it_says(n_old, n_new, removed, depth, higher, seed):
    """The truth before an update, less the rows that left, merged with an exact search of the
    new rows alone, gives the exact top of the updated rows for as many entries as ``known`` says,
    and ``known`` falls only by the known entries that left."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n_old + n_new, 3)).astype(np.float32)  # small integers: many ties
    q = rng.integers(-3, 4, size=(6, 3)).astype(np.float32)
    old = np.arange(n_old)
    old_rows, old_scores = _top(x, q, old, depth, higher)
    old_known = np.where((old_rows >= 0).sum(1) >= depth, float(depth), np.inf)
    holes = [(int(r), 1) for r in old[rng.random(n_old) < removed]]
    new = np.arange(n_old, n_old + n_new)
    if n_new:
        new_rows, new_scores = _top(x, q, new, depth, higher)
        new_known = np.where((new_rows >= 0).sum(1) >= depth, float(depth), np.inf)
    else:
        new_rows, new_scores, new_known = np.zeros((6, 0), np.int64), np.zeros((6, 0), np.float32), np.full(6, np.inf)
    rows, scores, known = merge_truth(
        old_rows, old_scores, old_known,
        holes=holes, new_rows=new_rows, new_scores=new_scores, new_known=new_known, higher_better=higher, depth=depth,
    )  # fmt: skip
    now = np.concatenate([old[~in_holes(old, holes)], new])
    _, exact = _top(x, q, now, depth, higher)
    for i in range(len(q)):
        m = int(min(known[i], depth, len(now)))
        assert np.allclose(scores[i, :m], exact[i, :m])  # ties may swap rows, never scores
        assert set(rows[i, :m].tolist()) <= set(now.tolist())
        assert (rows[i, m:] == -1).all()
        lost = int(in_holes(old_rows[i, : int(min(old_known[i], depth))], holes).sum())
        assert known[i] >= min(old_known[i] - lost, new_known[i], depth)


def _write(path: Path, ids: np.ndarray, x: np.ndarray) -> None:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), x.shape[1])
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "embedding": emb}), path, row_group_size=300)


@pytest.fixture(scope="module")
def pool() -> np.ndarray:
    return clustered_vectors(40 * SHARD_ROWS, DIM, clusters=30, seed=11)


def _shard(pool: np.ndarray, folder: Path, number: int, rows: slice | None = None) -> None:
    """Shard ``number`` of the pool (ids are pool rows), all rows or ``rows`` of them."""
    ids = np.arange(number * SHARD_ROWS, (number + 1) * SHARD_ROWS)
    if rows is not None:
        ids = ids[rows]
    _write(folder / f"part-{number:05d}.parquet", ids, pool[ids])


def _shards(pool: np.ndarray, folder: Path, count: int) -> Path:
    """``folder`` made, holding shards ``0 .. count - 1`` of the pool."""
    folder.mkdir()
    for s in range(count):
        _shard(pool, folder, s)
    return folder


def _tables(out: Path) -> dict[int, tuple[list[int], list[float]]]:
    t = pq.read_table(out / "neighbors")
    q = t.column("query_id").to_pylist()
    assert len(q) == len(set(q)), "a query listed twice"
    return dict(zip(q, zip(t.column("neighbor_id").to_pylist(), t.column("score").to_pylist())))


def _input_ids(folder: Path) -> np.ndarray:
    return np.sort(pq.read_table(folder, columns=["id"]).column("id").to_numpy())


def _exact(pool: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = pool[ids] / np.linalg.norm(pool[ids], axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(s, order, axis=1)


def _recall(tables: dict, pool: np.ndarray, ids: np.ndarray, k: int) -> float:
    """Tie-aware recall@k against exact search: a listed neighbour counts when it scores at
    least the exact k-th score (big-ann-benchmarks' rule)."""
    _, kth = _exact(pool, ids, k)
    x = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    hits = 0
    for i, q in enumerate(ids.tolist()):
        got = np.array(tables[q][0], dtype=np.int64)
        hits += int((x[got] @ x[q] >= kth[i, -1] - 1e-5).sum())
    return hits / (len(ids) * k)


def _overlap(a: dict, b: dict) -> float:
    return float(np.mean([len(set(a[q][0]) & set(b[q][0])) / max(1, len(b[q][0])) for q in b]))


FIXED = {"index_key": "IVF32,Flat", "nprobe": 4, "k": 10, "exclude_self": True}


def test_run_after_a_shard_removed_and_one_rewritten_equals_a_search_of_the_updated_index(
    make_config, pool, tmp_path, caplog
):
    data = _shards(pool, tmp_path / "data", 8)
    out = tmp_path / "out"
    run(make_config(input=str(data), output=str(out), **FIXED))
    kept_store = {p: p.stat().st_mtime_ns for p in (out / "index" / "store" / "vectors").glob("*.npy")}
    # a month later: shard 3 removed, shard 5 rewritten with half its rows, shard 8 added
    os.remove(data / "part-00003.parquet")
    _shard(pool, data, 5, slice(0, SHARD_ROWS // 2))
    _shard(pool, data, 8)
    with caplog.at_level("INFO", logger="pipeline"):
        report = run(make_config(input=str(data), output=str(out), **FIXED))
    assert "1 file added (600 rows), 1 file removed (600 rows), 1 file rewritten (300 rows)" in caplog.text
    assert report.join.recall.met
    ids = _input_ids(data)
    updated = _tables(out)
    assert sorted(updated) == ids.tolist()  # every query once, none of the rows gone
    gone = set(range(3 * SHARD_ROWS, 4 * SHARD_ROWS)) | set(range(5 * SHARD_ROWS + SHARD_ROWS // 2, 6 * SHARD_ROWS))
    assert not gone & {n for ns, _ in updated.values() for n in ns}
    # surviving rows kept their global rows: the store files of unchanged shards are untouched
    after = {p: p.stat().st_mtime_ns for p in (out / "index" / "store" / "vectors").glob("*.npy")}
    assert sum(1 for p, t in kept_store.items() if after.get(p) == t) == 6
    # the same lists as searching every query against the updated index
    searched = tmp_path / "searched"
    from pipeline import join

    join(make_config(index_dir=str(out / "index"), input=str(data), output=str(searched), **FIXED))
    direct = _tables(searched)
    assert _overlap(updated, direct) >= 0.99
    assert abs(_recall(updated, pool, ids, 10) - _recall(direct, pool, ids, 10)) <= 0.005
    # and the recall of a fresh run with the same settings
    fresh = run(make_config(input=str(data), output=str(tmp_path / "fresh"), **FIXED))
    assert fresh.join.recall.met
    assert abs(_recall(updated, pool, ids, 10) - _recall(_tables(tmp_path / "fresh"), pool, ids, 10)) <= 0.01


def test_an_update_over_rows_of_unequal_norms_equals_a_search_of_the_updated_index(make_config, tmp_path, caplog):
    """Inner product over rows whose norms differ: neighbourhoods are far from mutual (a long row
    is in many lists, while its own list holds other long rows), so a new row's own list says
    little about the lists it enters. The patch must still give what a search gives."""
    rng = np.random.default_rng(5)
    pool = clustered_vectors(40 * SHARD_ROWS, DIM, clusters=30, seed=12)
    pool = pool / np.linalg.norm(pool, axis=1, keepdims=True) * rng.lognormal(0.0, 0.5, (len(pool), 1))
    data = _shards(pool, tmp_path / "data", 8)
    out = tmp_path / "out"
    settings = {**FIXED, "metric": "ip", "nprobe": 8}
    run(make_config(input=str(data), output=str(out), **settings))
    os.remove(data / "part-00003.parquet")
    _shard(pool, data, 5, slice(0, SHARD_ROWS // 2))
    _shard(pool, data, 8)
    with caplog.at_level("INFO", logger="pipeline"):
        report = run(make_config(input=str(data), output=str(out), **settings))
    assert "1 file rewritten (300 rows)" in caplog.text
    updated = _tables(out)
    assert sorted(updated) == _input_ids(data).tolist()
    from pipeline import join

    searched = tmp_path / "searched"
    join(make_config(index_dir=str(out / "index"), input=str(data), output=str(searched), **settings))
    direct = _tables(searched)
    assert _overlap(updated, direct) >= 0.99
    ids = _input_ids(data)
    s = pool[ids] @ pool[ids].T
    np.fill_diagonal(s, -np.inf)
    kth = np.sort(s, axis=1)[:, -10]
    at = {q: i for i, q in enumerate(ids.tolist())}

    def recall(tables: dict) -> float:
        return float(np.mean([(s[at[q], [at[n] for n in tables[q][0]]] >= kth[at[q]] - 1e-5).sum() / 10 for q in at]))

    assert abs(recall(updated) - recall(direct)) <= 0.002
    assert report.join.recall.met


def test_an_update_reports_the_recall_of_the_lists_it_wrote(make_config, pool, tmp_path, monkeypatch):
    """An update's recall is measured on the lists it wrote, not on a search at its plan: a patch
    that took in no new rows (a stand-in for one that misses what a search finds) is reported at
    the recall its lists have, with a warning, and fails its target loudly."""
    from pipeline.search import update
    from pipeline.search.tuning import BelowTarget

    settings = {**FIXED, "scheduler_address": None, "workers": 1}  # in process: the stand-in reaches the worker
    data = _shards(pool, tmp_path / "data", 4)
    out = tmp_path / "out"
    run(make_config(input=str(data), output=str(out), **settings))
    _shard(pool, data, 4)  # a fifth of the rows new: about two of an old query's ten neighbours come from the patch

    def nothing_offered(self, floor, probes):
        none = np.zeros(0, np.int64)
        return update._Offers(none, none, np.zeros(0, np.float32), np.full(len(floor), -np.inf, np.float32), probes)

    monkeypatch.setattr(update.PatchTask, "_offered", nothing_offered)
    with pytest.raises(BelowTarget, match="MISSED") as missed:
        run(make_config(input=str(data), output=str(out), **settings))
    said = float(str(missed.value).split("recall@10 ")[1].split()[0])
    written = _recall(_tables(out), pool, _input_ids(data), 10)
    assert said < 0.95 and abs(said - written) <= 0.05, (said, written)


@pytest.mark.parametrize("routed", [False, True])
def test_an_update_on_gpu_workers_gives_the_cpu_workers_lists(make_config, pool, tmp_path, monkeypatch, routed):
    """The same update (a shard removed, one rewritten with half its rows, one added) on a worker
    that chose the GPU backend, faiss's GPU calls replaced by CPU stand-ins (the new rows' fill
    through the GPU twin, the recall samples by knn_gpu, the list groups copied alone when routed):
    the lists a CPU worker's update writes."""
    from tests.test_gpu_rules import _gpu_workers

    _gpu_workers(monkeypatch)
    tables = []
    for device in ("gpu", "cpu"):
        data = _shards(pool, tmp_path / f"data-{device}", 8)
        out = tmp_path / f"out-{device}"
        settings = {**FIXED, "device": device, "scheduler_address": None, "workers": 1, "routed_join": routed}
        run(make_config(input=str(data), output=str(out), **settings))
        stored = {p: p.stat().st_mtime_ns for p in (out / "index" / "store" / "vectors").glob("*.npy")}
        os.remove(data / "part-00003.parquet")
        _shard(pool, data, 5, slice(0, SHARD_ROWS // 2))
        _shard(pool, data, 8)
        report = run(make_config(input=str(data), output=str(out), **settings))
        assert report.search.backend == device and report.join.recall.met
        kept = sum(p.exists() and p.stat().st_mtime_ns == t for p, t in stored.items())
        assert kept == 6  # updated in place: the unchanged shards' rows were not stored again
        tables.append(_tables(out))
    assert sorted(tables[0]) == sorted(tables[1]) and _overlap(tables[0], tables[1]) >= 0.999


def test_a_routed_lossy_index_keeps_its_vectors_in_list_order_through_an_update(make_config, pool, tmp_path):
    """IVF-SQ8 joined routed, re-ranked from the vectors in list order: after a shard removed, one
    halved and one added, the ordered vectors hold exactly the live rows, each its own vector, and
    the updated tables list no row that left, as a search of the updated index does."""
    from pipeline import join

    lossy = {**FIXED, "index_key": "IVF32,SQ8", "rerank": 2, "routed_join": True}
    data = _shards(pool, tmp_path / "data", 8)
    out = tmp_path / "out"
    run(make_config(input=str(data), output=str(out), **lossy))
    os.remove(data / "part-00003.parquet")
    _shard(pool, data, 5, slice(0, SHARD_ROWS // 2))
    _shard(pool, data, 8)
    run(make_config(input=str(data), output=str(out), **lossy))
    index = out / "index"
    rows = np.load(index / "ordered" / "rows.npy")
    store = Manifest(index).stage_record("index", IndexRecord).store(index)
    assert sorted(rows.tolist()) == sorted(store.live_rows(np.arange(store.rows)).tolist())
    vectors = np.load(index / "ordered" / "vectors.npy").reshape(len(rows), DIM)
    np.testing.assert_array_equal(vectors, store.gather_vectors(rows))
    updated = _tables(out)
    ids = _input_ids(data)
    assert sorted(updated) == ids.tolist()
    gone = set(range(3 * SHARD_ROWS, 4 * SHARD_ROWS)) | set(range(5 * SHARD_ROWS + SHARD_ROWS // 2, 6 * SHARD_ROWS))
    assert not gone & {n for ns, _ in updated.values() for n in ns}
    join(make_config(index_dir=str(index), input=str(data), output=str(tmp_path / "searched"), **lossy))
    assert _overlap(updated, _tables(tmp_path / "searched")) >= 0.99


def _pairs(out: Path) -> set[tuple[int, int]]:
    t = pq.read_table(out / "pairs")
    return {(min(a, b), max(a, b)) for a, b in zip(t.column("id_a").to_pylist(), t.column("id_b").to_pylist())}


@pytest.fixture(scope="module")
def duplicated(pool: np.ndarray) -> np.ndarray:
    """The pool with a third of its rows near-copies of others (cosine ~0.99), across shards."""
    rng = np.random.default_rng(5)
    x = pool.copy()
    copies = rng.choice(len(x), size=len(x) // 3, replace=False)
    sources = rng.choice(len(x), size=copies.size)
    x[copies] = x[sources] + 0.01 * np.linalg.norm(x[sources], axis=1, keepdims=True) * rng.standard_normal(
        (copies.size, x.shape[1])
    ).astype(np.float32) / np.sqrt(x.shape[1])
    return x


def test_dedup_after_a_shard_removed_and_one_rewritten_equals_a_fresh_run(make_config, duplicated, tmp_path, caplog):
    data = _shards(duplicated, tmp_path / "data", 8)
    out = tmp_path / "out"
    dedup(make_config(input=str(data), output=str(out), threshold=0.95))
    os.remove(data / "part-00003.parquet")
    _shard(duplicated, data, 5, slice(0, SHARD_ROWS // 2))
    with caplog.at_level("INFO", logger="pipeline"):
        updated = dedup(make_config(input=str(data), output=str(out), threshold=0.95))
    assert "1 file removed" in caplog.text and "pairs and groups updated" in caplog.text
    fresh = dedup(make_config(input=str(data), output=str(tmp_path / "fresh"), threshold=0.95))
    a, b = _pairs(out), _pairs(tmp_path / "fresh")
    assert len(a & b) / len(a | b) >= 0.995
    assert abs(updated.dedup.rows_dropped - fresh.dedup.rows_dropped) <= 0.001 * fresh.dedup.rows_in
    assert updated.dedup.rows_in == fresh.dedup.rows_in == 6.5 * SHARD_ROWS
    # every input row has one fate; the removed file's copies are gone from deduplicated/
    groups = pq.read_table(out / "groups")
    assert sorted(groups.column("id").to_pylist()) == _input_ids(data).tolist()
    assert not (out / "deduplicated" / "part-00003.parquet").exists()
    kept = pq.read_table(out / "deduplicated").num_rows
    assert kept == updated.dedup.rows_kept


def _edges(out: Path) -> set[tuple[int, int]]:
    nodes = pq.read_table(out / "nodes")
    by_row = dict(zip(nodes.column("row").to_pylist(), nodes.column("id").to_pylist()))
    e = pq.read_table(out / "edges")
    return {(by_row[s], by_row[d]) for s, d in zip(e.column("src").to_pylist(), e.column("dst").to_pylist())}


def test_graph_after_an_update_matches_a_fresh_graph(make_config, pool, tmp_path):
    data = _shards(pool, tmp_path / "data", 6)
    out = tmp_path / "out"
    settings = {**FIXED, "graph_mode": "symmetric"}
    graph(make_config(input=str(data), output=str(out), **settings))
    os.remove(data / "part-00002.parquet")
    _shard(pool, data, 4, slice(100, 400))
    _shard(pool, data, 9)
    updated = graph(make_config(input=str(data), output=str(out), **settings))
    fresh = graph(make_config(input=str(data), output=str(tmp_path / "fresh"), **settings))
    a, b = _edges(out), _edges(tmp_path / "fresh")
    assert len(a & b) / len(a | b) >= 0.97
    assert updated.graph.nodes == fresh.graph.nodes == len(_input_ids(data))
    assert {s for s, _ in a} <= set(_input_ids(data).tolist())
    import scipy.sparse

    csr = scipy.sparse.load_npz(out / "graph.npz")
    assert csr.nnz == len(a)  # retired rows are nodes without edges
    umap = np.load(out / "umap_knn.npz")
    assert umap["knn_indices"].shape[0] == csr.shape[0]


def test_a_month_of_nightly_updates_stays_equal_to_a_search_of_the_updated_index(make_config, pool, tmp_path, caplog):
    """30 rounds of random adds, removes and rewrites; after each the lists equal those of every
    query searched against the updated index (ties aside), every input row is a query once, the
    recall target is met, and the recall sample's truth, brought up to date rather than searched
    again, is exact."""
    from pipeline import join

    rng = np.random.default_rng(2026)
    data = _shards(pool, tmp_path / "data", 5)
    live = list(range(5))
    fresh_shard = 5
    out = tmp_path / "out"
    settings = {**FIXED, "index_key": "IVF16,Flat", "nprobe": 4}
    run(make_config(input=str(data), output=str(out), **settings))
    for day in range(30):
        action = rng.choice(["add", "remove", "rewrite", "mix"])
        if action in ("add", "mix") and fresh_shard < 40:
            _shard(pool, data, fresh_shard)
            live.append(fresh_shard)
            fresh_shard += 1
        if action in ("remove", "mix") and len(live) > 3:
            gone = int(rng.choice(live))
            os.remove(data / f"part-{gone:05d}.parquet")
            live.remove(gone)
        if action in ("rewrite", "mix"):
            target = int(rng.choice(live))
            keep = np.sort(rng.choice(SHARD_ROWS, size=int(rng.integers(SHARD_ROWS // 3, SHARD_ROWS)), replace=False))
            _shard(pool, data, target, keep)
        with caplog.at_level("INFO", logger="pipeline"):
            report = run(make_config(input=str(data), output=str(out), **settings))
        assert report.join.recall.met, f"day {day}: recall target missed"
        ids = _input_ids(data)
        updated = _tables(out)
        assert sorted(updated) == ids.tolist(), f"day {day}: queries differ from the input"
        listed = {n for ns, _ in updated.values() for n in ns}
        assert listed <= set(ids.tolist()), f"day {day}: a neighbour that left the input"
        searched = tmp_path / f"searched-{day}"
        join(make_config(index_dir=str(out / "index"), input=str(data), output=str(searched), **settings))
        assert _overlap(updated, _tables(searched)) >= 0.98, f"day {day}: lists differ from a search"
        shutil.rmtree(searched)
        _assert_kept_truth_exact(out, pool, ids, k=10, day=day)
    renewed = caplog.text.count("kept queries brought up to date")
    assert renewed >= 20, f"the kept truth was brought up to date on {renewed} of 30 days"


def _assert_kept_truth_exact(out: Path, pool: np.ndarray, ids: np.ndarray, *, k: int, day: int) -> None:
    """The recall sample's truth kept in ``out`` (brought up to date by each update, not searched
    again) is the exact top ``k`` of its queries over the input's rows, its queries input rows."""
    from pipeline.index.built import IndexRecord
    from pipeline.runtime.manifest import Manifest
    from pipeline.search.truth import TRUTH_FILE

    record = Manifest(out / "index").stage_record("index", IndexRecord)
    assert record is not None
    store = record.store(out / "index")
    with np.load(out / TRUTH_FILE) as z:
        queries, rows, scores, known = z["queries"], z["rows"], z["scores"], z["known"]
    assert len(queries) >= 100 and (known >= k).all(), f"day {day}: a kept query short of its k"
    query_ids = store.gather_ids(queries).to_numpy()
    assert set(query_ids.tolist()) <= set(ids.tolist()), f"day {day}: a kept query that left"
    listed = store.gather_ids(rows[:, :k].ravel()).to_numpy().reshape(len(rows), k)
    assert set(listed.ravel().tolist()) <= set(ids.tolist()), f"day {day}: a kept neighbour that left"
    x = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    exact = x[query_ids] @ x[ids].T
    exact[ids[None, :] == query_ids[:, None]] = -np.inf  # its own row excluded
    best = -np.sort(-exact, axis=1)[:, :k]
    assert np.allclose(scores[:, :k], best, atol=1e-5), f"day {day}: the kept truth is not exact"


DRIFT = {"index_key": "IVF16,Flat", "k": 10, "exclude_self": True}


def test_new_rows_from_elsewhere_are_called_drift_and_retrain_fixes_them(make_config, pool, tmp_path, caplog):
    data = _shards(pool, tmp_path / "data", 4)
    out = tmp_path / "out"
    run(make_config(input=str(data), output=str(out), **DRIFT))
    _shard(pool, data, 4)  # more of the same
    with caplog.at_level("INFO", logger="pipeline"):
        run(make_config(input=str(data), output=str(out), **DRIFT))
    assert "no drift" in caplog.text and "drifted" not in caplog.text
    caplog.clear()
    elsewhere = clustered_vectors(2 * SHARD_ROWS, DIM, clusters=8, seed=99) * 3.0 + 5.0
    for s in (5, 6):
        ids = np.arange(s * SHARD_ROWS, (s + 1) * SHARD_ROWS)
        _write(data / f"part-{s:05d}.parquet", ids, elsewhere[(s - 5) * SHARD_ROWS : (s - 4) * SHARD_ROWS])
    with caplog.at_level("INFO", logger="pipeline"):
        run(make_config(input=str(data), output=str(out), **DRIFT))
    assert "the input drifted" in caplog.text and "--retrain" in caplog.text
    drift = json.loads((out / "index" / "manifest.json").read_text())["stages"]["drift"]["done"]
    assert drift["distance_ratio"] > drift["limit"]
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline"):
        report = run(make_config(input=str(data), output=str(out), retrain=True, **DRIFT))
    assert "training the index again" in caplog.text and "every piece is joined again" in caplog.text
    assert report.join.recall.met and len(_tables(out)) == 7 * SHARD_ROWS


@pytest.mark.slow
def test_an_update_killed_mid_way_resumes_to_the_same_lists(pool, tmp_path):
    from tests.test_resume import finish, kill_when

    data = _shards(pool, tmp_path / "data", 10)

    def command(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "pipeline", "run", "--input", str(data), "--output", str(out), "--k", "5",
            "--exclude-self", "--index-key", "IVF16,Flat", "--nprobe", "4", "--partition-size",
            str(100 * DIM * 4), "--workers", "1", "--threads-per-worker", "1",
        ]  # fmt: skip

    clean, killed = tmp_path / "clean", tmp_path / "killed"
    finish(command(clean))
    shutil.copytree(clean, killed)
    os.remove(data / "part-00004.parquet")
    _shard(pool, data, 7, slice(0, 250))
    _shard(pool, data, 12)
    finish(command(clean))

    def patching() -> bool:
        try:
            stages = json.loads((killed / "manifest.json").read_text())["stages"]
        except (OSError, ValueError):
            return False
        return len(stages.get("patch", {}).get("pieces", {})) >= 5

    kill_when(command(killed), patching)
    assert not (killed / "_SUCCESS").exists()
    finish(command(killed))
    a, b = _tables(killed), _tables(clean)
    assert a.keys() == b.keys()
    # the same lists: equal scores (to float rounding), equal neighbours but where scores tie
    differ = [q for q in b if not np.allclose(a[q][1], b[q][1], atol=1e-5)]
    assert not differ, [(q, a[q], b[q]) for q in differ[:3]]
    assert sum(a[q][0] == b[q][0] for q in b) >= 0.999 * len(b)


def test_against_follows_a_removed_input_shard_and_a_changed_reference(make_config, pool, tmp_path):
    """Decontamination updates with both sides: input rows gone take their matches with them, and
    a reference that gained a file is matched against every input row again."""
    data, ref = _shards(pool, tmp_path / "data", 4), tmp_path / "ref"
    ref.mkdir()
    # the reference: near-copies of 5 rows of shard 1 and 5 of shard 2
    picked = np.r_[SHARD_ROWS + np.arange(5), 2 * SHARD_ROWS + np.arange(5)]
    _write(ref / "eval-a.parquet", 10**6 + np.arange(10), pool[picked] * 1.001)
    out = tmp_path / "out"
    settings = {"threshold": 0.99, "against": [str(ref)]}
    first = dedup(make_config(input=str(data), output=str(out), **settings))
    assert first.dedup.contamination.rows_contaminated == 10
    os.remove(data / "part-00001.parquet")  # five matched rows leave the input
    extra = 3 * SHARD_ROWS + np.arange(4)
    _write(ref / "eval-b.parquet", 2 * 10**6 + np.arange(4), pool[extra] * 0.999)  # four more rows matched
    updated = dedup(make_config(input=str(data), output=str(out), **settings))
    fresh = dedup(make_config(input=str(data), output=str(tmp_path / "fresh"), **settings))
    assert updated.dedup.contamination.rows_contaminated == fresh.dedup.contamination.rows_contaminated == 9

    def matched(o: Path) -> list[int]:
        return sorted(pq.read_table(o / "contamination").column("id").to_pylist())

    assert matched(out) == matched(tmp_path / "fresh") == sorted([*(2 * SHARD_ROWS + np.arange(5)), *extra])


@settings(max_examples=60, deadline=None)
@given(
    holes=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)), max_size=12),
    seed=st.integers(0, 999),
)
def test_rows_in_holes_are_found_alike_for_few_holes_and_many(holes, seed):
    """A row lies in a hole when ``start <= row < start + rows``: found by comparisons for a few
    holes and by a binary search for many, with the same answer (holes that touch included)."""
    import pipeline.io.layout as layout

    rows = np.random.default_rng(seed).integers(-1, 240, size=(30, 7))
    disjoint: list[tuple[int, int]] = []  # the binary search assumes holes that do not overlap, as retired pieces are
    for start, n in sorted(holes):
        if not disjoint or start >= disjoint[-1][0] + disjoint[-1][1]:
            disjoint.append((start, n))
    want = np.zeros(rows.shape, dtype=bool)
    for start, n in disjoint:
        want |= (rows >= start) & (rows < start + n)
    assert np.array_equal(in_holes(rows, disjoint), want)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layout, "FEW_HOLES", -1)
        assert np.array_equal(layout.in_holes(rows, disjoint), want)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), width=st.integers(1, 6), seed=st.integers(0, 999))
def test_dropped_entries_leave_the_rest_of_each_list_in_order(rows, width, seed):
    """Entries dropped from the padded lists: each list keeps the rest in order, moved up, padded
    with -1 and NaN; lists that lost nothing are untouched, and the lists that lost any are said."""
    from pipeline.search.update import _drop

    rng = np.random.default_rng(seed)
    padded = np.arange(width)[None, :] >= rng.integers(0, width + 1, size=(rows, 1))  # lists end in padding
    found = np.where(padded, -1, rng.integers(0, 50, size=(rows, width)))
    scores = np.where(padded, np.nan, rng.standard_normal((rows, width))).astype(np.float32)
    out = (rng.random((rows, width)) < 0.3) & (found >= 0)
    want_rows, want_scores = found.copy(), scores.copy()
    for i in range(rows):
        keep = [j for j in range(width) if not out[i, j]]
        kept_rows = [found[i, j] for j in keep if found[i, j] >= 0]
        kept_scores = [scores[i, j] for j in keep if found[i, j] >= 0]
        if out[i].any():
            want_rows[i] = kept_rows + [-1] * (width - len(kept_rows))
            want_scores[i] = kept_scores + [np.nan] * (width - len(kept_scores))
    got_rows, got_scores = found.copy(), scores.copy()
    lost = _drop(got_rows, got_scores, out)
    assert np.array_equal(lost, out.any(axis=1))
    assert np.array_equal(got_rows, want_rows)
    assert np.array_equal(got_scores, want_scores, equal_nan=True)
