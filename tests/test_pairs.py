"""The exact self-join by pairs: each pair of blocks scored once for both sides, checked against
brute force (property tests), then end to end against the piece-by-piece exact plan, with a
failure part way through and a resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import run
from pipeline.backends import kernels as stored
from pipeline.backends.cpu import CpuBackend
from pipeline.search import pairs


def _brute(x: np.ndarray, q: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Higher-better scores of the true top ``k`` (fewer where ``x`` is short), by NumPy."""
    s = q @ x.T
    if metric == "l2":
        s = -((q * q).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * s)
    return -np.sort(-s, axis=1)[:, :k]


def _check(scores: np.ndarray, rows: np.ndarray, x: np.ndarray, q: np.ndarray, k: int, metric: str) -> None:
    want = _brute(x, q, k, metric)
    n = want.shape[1]
    tol = 1e-3 * (1 + np.abs(want).max())
    np.testing.assert_allclose(scores[:, :n], want, atol=tol)  # the same scores, position by position
    assert (rows[:, :n] >= 0).all() and (rows[:, n:] == -1).all()
    dots = np.einsum("qd,qkd->qk", q, x[rows[:, :n]])
    if metric == "l2":
        dots = -((q * q).sum(1)[:, None] + (x[rows[:, :n]] ** 2).sum(2) - 2 * dots)
    np.testing.assert_allclose(dots, scores[:, :n], atol=tol)  # each returned row has the score reported
    assert (np.diff(scores[:, :n], axis=1) <= tol).all()  # best first


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 160),
    dim=st.integers(1, 12),
    k=st.integers(1, 12),
    block=st.integers(1, 70),
    tile=st.integers(1, 40),
    cap=st.sampled_from([0, 2, 10**6]),
    metric=st.sampled_from(["l2", "ip"]),
    dups=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_self_topk_is_exact_search_of_the_rows_among_themselves(rows, dim, k, block, tile, cap, metric, dups, seed):
    """Blocks against themselves, then pairs of blocks scored once for both sides with the floors
    (and, past ``cap`` kept scores a row, transposed into heaps): the scores of brute force,
    whatever the sizes, ties (duplicated rows) and tiles."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    if dups:
        x[rows // 2 :] = x[: rows - rows // 2]
    knn = CpuBackend().knn  # the Knn seam: the metric by name
    scores, found = stored.self_topk(knn, x, k, metric, block=block, floor_hits=cap)
    a, b = x[: rows // 2 + 1], x[rows // 2 + 1 :]
    if len(b):
        floor = stored.knn_topk(knn, b, b, k, metric)[0][:, -1]
        (sa, ra), (sb, rb) = stored.pair_topk(a, b, k, metric, floor, tile=tile, floor_hits=cap)
    _check(scores, found, x, x, k, metric)
    if len(b):
        _check(sa, ra, b, a, k, metric)  # a's side: exact among b
        # b's side is exact wherever the true score reaches the floor: with b's own top k (the
        # diagonal the floor came from) it makes b's exact top k among a and b together
        own_s, own_r = stored.knn_topk(knn, b, b, k, metric)
        union_s, union_r = stored.merge_topk([(sb, rb), (own_s, stored.shifted(own_r, len(a)))], k)
        _check(union_s, union_r, np.concatenate([a, b]), b, k, metric)


def _tables(out: Path) -> dict:
    t = pq.read_table(out / "neighbors")
    return {
        q: (n, s)
        for q, n, s in zip(
            t.column("query_id").to_pylist(),
            t.column("neighbor_id").to_pylist(),
            t.column("score").to_pylist(),
            strict=True,
        )
    }


def _same_up_to_ties(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for q in a:
        (na, sa), (nb, sb) = a[q], b[q]
        np.testing.assert_allclose(sa, sb, atol=1e-4)
        assert len(na) == len(nb)
        distinct = np.r_[True, np.abs(np.diff(sa)) > 1e-4] & np.r_[np.abs(np.diff(sa)) > 1e-4, True]
        assert [n for n, d in zip(na, distinct, strict=True) if d] == [
            m for m, d in zip(nb, distinct, strict=True) if d
        ]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_the_exact_self_join_by_pairs_equals_the_piece_by_piece_one_and_resumes(
    make_config, dataset_dir, tmp_path, monkeypatch, metric
):
    """Three groups of two pieces (six pieces of 1,000 rows): diagonal and pair tasks, then the
    lists merged per piece equal the piece-by-piece exact plan's. A pair task that fails stops the
    job; the rerun redoes only the unfinished tasks, and the partial lists are removed at the end."""

    def config(out: str, **extra: object) -> object:  # the embedded in-process cluster: patches reach the tasks
        return make_config(
            input=str(dataset_dir),
            output=str(tmp_path / out),
            index_key="Flat",
            k=7,
            exclude_self=True,
            metric=metric,
            scheduler_address=None,
            workers=1,
            **extra,
        )

    monkeypatch.setattr(pairs, "MAX_GROUPS", 0)  # piece by piece
    run(config("pieces"))
    stages = json.loads((tmp_path / "pieces" / "manifest.json").read_text())["stages"]
    assert not stages.get("exact_diagonal", {}).get("pieces")
    monkeypatch.setattr(pairs, "MAX_GROUPS", 24)
    monkeypatch.setattr(pairs, "GROUP_BYTES", 2000 * 32 * 4)
    run_pair = pairs.PairTask.run

    def failing(task: pairs.PairTask) -> None:
        if (task.g, task.h) == (0, 2):
            raise RuntimeError("pair task killed")
        run_pair(task)

    monkeypatch.setattr(pairs.PairTask, "run", failing)
    with pytest.raises(Exception, match="pair task killed"):
        run(config("pairs"))
    folder = tmp_path / "pairs" / pairs.PAIRS_DIR
    kept = {p.name for p in folder.iterdir()}
    assert {"diagonal-00000.npz", "diagonal-00001.npz", "diagonal-00002.npz"} <= kept
    # the tasks that finished before the failure stopped the job (two run at once: maybe none)
    stages = json.loads((tmp_path / "pairs" / "manifest.json").read_text())["stages"]
    recorded = stages.get("exact_pairs", {}).get("pieces", {})
    unfinished = [f"{g}-{h}" for g, h in ((0, 1), (0, 2), (1, 2)) if str(g * 3 + h) not in recorded]
    ran = tmp_path / "ran.txt"  # the tasks say what ran in a file
    ran.touch()
    run_diagonal = pairs.DiagonalTask.run

    def counted_pair(task: pairs.PairTask) -> None:
        with open(ran, "a") as fh:
            fh.write(f"{task.g}-{task.h}\n")
        run_pair(task)

    def counted_diagonal(task: pairs.DiagonalTask) -> None:
        with open(ran, "a") as fh:
            fh.write(f"{task.g}-{task.g}\n")
        run_diagonal(task)

    monkeypatch.setattr(pairs.PairTask, "run", counted_pair)
    monkeypatch.setattr(pairs.DiagonalTask, "run", counted_diagonal)
    run(config("pairs"))
    assert sorted(ran.read_text().split()) == unfinished and "0-2" in unfinished  # no recorded task is redone
    assert not folder.exists()  # removed once every piece's table is written
    _same_up_to_ties(_tables(tmp_path / "pairs"), _tables(tmp_path / "pieces"))
