"""The routed join of an IVF-Flat index: list groups each read once, the same lists as the
batched join (up to ties), resumable, and its partial lists removed at the end; and the batched
join's runs of small pieces."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import run
from pipeline.index.shape import IndexShape
from pipeline.io.parquet import Piece
from pipeline.search import join, routed
from tests.test_pairs import _same_up_to_ties, _tables


def test_list_groups_cover_every_list_once_within_their_bytes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5_000, 16)).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 64)
    index.train(x)
    index.add(x)
    shape = IndexShape.of(index)
    assert shape.ivf_flat and shape.ntotal == 5_000 and shape.imbalance is not None and shape.imbalance >= 1.0
    groups = routed.plan_list_groups(shape, group_bytes=200 * 16 * 4)
    assert groups[0].first == 0 and groups[-1].last == 64
    assert all(a.last == b.first for a, b in zip(groups, groups[1:]))  # contiguous, no list twice
    assert sum(g.rows for g in groups) == 5_000 and [g.index for g in groups] == list(range(len(groups)))
    sizes = [index.invlists.list_size(i) for i in range(64)]
    for g in groups:  # within the bytes, unless one list alone is larger
        held = sum(sizes[g.first : g.last]) * 64
        assert held <= 200 * 16 * 4 or g.last - g.first == 1
    assert len(routed.plan_list_groups(shape)) >= routed.MIN_GROUPS  # small indexes still spread out


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_the_routed_join_equals_the_batched_one_and_resumes(make_config, dataset_dir, tmp_path, monkeypatch, metric):
    """Three pieces, IVF16,Flat: the routed join's tables equal the batched join's; a score task
    that fails stops the job, and the rerun scores only the groups not recorded, then removes the
    routes and partial lists."""

    def config(out: str, **extra: object) -> object:  # the embedded in-process cluster: patches reach the tasks
        return make_config(
            input=str(dataset_dir),
            output=str(tmp_path / out),
            index_key="IVF16,Flat",
            nprobe=4,
            k=7,
            exclude_self=True,
            metric=metric,
            scheduler_address=None,
            workers=1,
            **extra,
        )

    run(config("batched"))
    monkeypatch.setattr(routed, "GROUP_BYTES", 6_000 * 32 * 4 // 4)  # four or five list groups
    score = routed.ScoreTask.run

    def failing(task: routed.ScoreTask) -> routed.Scored:
        if task.group.index == 2:
            raise RuntimeError("score task killed")
        return score(task)

    monkeypatch.setattr(routed.ScoreTask, "run", failing)
    with pytest.raises(Exception, match="score task killed"):
        run(config("routed", routed_join=True))
    folder = tmp_path / "routed" / routed.ROUTED_DIR
    stages = json.loads((tmp_path / "routed" / "manifest.json").read_text())["stages"]
    assert len(stages["routed_route"]["pieces"]) == 3  # every piece (one per shard) routed before scoring
    recorded = set(stages.get("routed_score", {}).get("pieces", {}))
    assert "2" not in recorded
    ran = tmp_path / "ran.txt"
    ran.touch()

    def counted(task: routed.ScoreTask) -> routed.Scored:
        with open(ran, "a") as fh:
            fh.write(f"{task.group.index}\n")
        return score(task)

    monkeypatch.setattr(routed.ScoreTask, "run", counted)
    report = run(config("routed", routed_join=True))
    done_again = set(ran.read_text().split())
    assert "2" in done_again and not done_again & recorded  # no recorded group is scored again
    assert not folder.exists()  # routes and partial lists removed once the tables are written
    _same_up_to_ties(_tables(tmp_path / "routed"), _tables(tmp_path / "batched"))
    assert report.recall is not None and report.recall.met
    # the bytes of lists read: the routed join's score stage read the groups this run scored, once each
    index_lists = 6_000 * 32 * 4
    reads = report.join.lists_read
    assert reads is not None and reads.by_phase.get("join", 0) == 0  # the merge walks no list
    assert 0 < reads.by_phase["routed score"] <= index_lists
    assert "| lists read | routed score" in (tmp_path / "routed" / "report.md").read_text()


def test_the_report_counts_the_lists_each_join_reads(make_config, dataset_dir, tmp_path):
    """Batches of 256 queries probe nearly every list each: the batched join reads the index's
    lists many times over; the routed join reads each group once."""
    from pipeline.search import join as join_module

    common = dict(input=str(dataset_dir), index_key="IVF16,Flat", nprobe=8, k=5, scheduler_address=None, workers=1)
    index_lists = 6_000 * 32 * 4
    batched = run(make_config(output=str(tmp_path / "batched"), **common))
    routed_report = run(make_config(output=str(tmp_path / "routed"), routed_join=True, **common))
    assert batched.join.lists_read is not None and routed_report.join.lists_read is not None
    assert routed_report.join.lists_read.total == index_lists  # every group, once
    assert batched.join.lists_read.total >= 2 * index_lists  # several batches: the lists again each time
    assert join_module.Joined(short=0).list_bytes == 0


def test_a_routed_query_join_equals_the_batched_one(make_config, dataset_dir, tmp_path):
    """Queries other than the indexed rows (``join`` against an index built by ``build``)."""
    from pipeline import build, join

    index_dir = tmp_path / "index"
    build(make_config(input=str(dataset_dir), index_dir=str(index_dir), index_key="IVF16,Flat", output=None))
    queries = Path(dataset_dir)  # the same rows as queries, by id: the ids differ from nothing, so nothing is dropped
    for name, extra in (("batched", {}), ("routed", {"routed_join": True})):
        join(
            make_config(
                input=str(queries), index_dir=str(index_dir), output=str(tmp_path / name), k=5, nprobe=4, **extra
            )
        )
    _same_up_to_ties(_tables(tmp_path / "routed"), _tables(tmp_path / "batched"))


def test_lists_larger_than_half_a_worker_are_joined_routed(monkeypatch):
    """The batched join maps every list in every worker: past half a worker's memory, routed."""
    from types import SimpleNamespace

    from pipeline.jobs import stages

    built = SimpleNamespace(ntotal=2_000_000, dim=128, key="IVF1024,Flat", nlist=1024)  # 0.95 GiB of lists
    monkeypatch.setattr(stages, "worker_memory", lambda client: 800 << 20)
    assert stages._lists_outgrow_workers(None, built)
    assert stages._group_bytes(None) == 100 << 20  # an eighth of a worker
    monkeypatch.setattr(stages, "worker_memory", lambda client: 4 << 30)
    assert not stages._lists_outgrow_workers(None, built)
    monkeypatch.setattr(stages, "worker_memory", lambda client: 800 << 20)
    assert not stages._lists_outgrow_workers(None, SimpleNamespace(**{**built.__dict__, "key": "IVF1024,SQ8"}))


def test_a_score_task_gathers_only_its_routed_queries(make_config, dataset_dir, tmp_path, monkeypatch):
    """A list group meets a share of each piece's queries: its score task gathers those rows from
    the store's memory map, and never reads a whole piece (which would read the query store once
    per group)."""
    from pipeline.io.store import RowStore

    score = routed.ScoreTask.run

    def whole_piece(self: RowStore, piece: int) -> np.ndarray:
        raise AssertionError(f"a score task read query piece {piece} whole")

    def gathering_only(task: routed.ScoreTask) -> routed.Scored:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(RowStore, "vectors", whole_piece)
            return score(task)

    monkeypatch.setattr(routed.ScoreTask, "run", gathering_only)
    monkeypatch.setattr(routed, "GROUP_BYTES", 6_000 * 32 * 4 // 4)  # several groups
    common = dict(input=str(dataset_dir), index_key="IVF16,Flat", nprobe=4, k=5, scheduler_address=None, workers=1)
    report = run(make_config(output=str(tmp_path / "routed"), routed_join=True, **common))
    run(make_config(output=str(tmp_path / "batched"), **common))
    assert report.join.lists_read is not None and report.join.lists_read.by_phase["routed score"] > 0
    _same_up_to_ties(_tables(tmp_path / "routed"), _tables(tmp_path / "batched"))


# runs of pieces in the batched join -------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=0, max_size=12), run_rows=st.integers(0, 120))
def test_piece_runs_cover_the_pieces_in_order_within_the_rows(sizes: list[int], run_rows: int) -> None:
    """Runs are consecutive pieces, every piece once; a run of several holds at most ``run_rows``
    rows and no piece under the floor; and a run ends only where the next piece would not fit."""
    pieces = [Piece(i, "f", (0,), 0, 10 * sum(sizes[:i]), 10 * n) for i, n in enumerate(sizes)]
    floor = 100
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(join, "MIN_RUN_PIECE_ROWS", floor)
        runs = join.piece_runs(pieces, 10 * run_rows)
    assert [p for r in runs for p in r.pieces] == pieces
    for r in runs:
        assert r.index == r.pieces[0].index and r.rows == sum(p.rows for p in r.pieces)
        if len(r.pieces) > 1:
            assert r.rows <= 10 * run_rows and min(p.rows for p in r.pieces) >= floor
    for a, b in zip(runs, runs[1:]):
        nxt = b.pieces[0]
        assert a.rows + nxt.rows > 10 * run_rows or min(p.rows for p in (*a.pieces, nxt)) < floor


def test_small_pieces_are_joined_in_one_run_with_tables_of_their_own(make_config, dataset_dir, tmp_path, monkeypatch):
    """Three pieces of 2,000 rows, each smaller than the batch IVF-Flat wants: one join task takes
    all three in its batches, writes each piece's table and lists and records each piece; the
    tables equal those of a task a piece (up to ties)."""
    ran: list[tuple[int, ...]] = []
    task_run = join.JoinTask.run

    def counted(task: join.JoinTask) -> join.Joined:
        ran.append(tuple(p.index for p in task.pieces))
        return task_run(task)

    monkeypatch.setattr(join.JoinTask, "run", counted)
    plan = dict(index_key="IVF16,Flat", nprobe=4, k=5, exclude_self=True)
    common = dict(input=str(dataset_dir), scheduler_address=None, workers=1, **plan)
    monkeypatch.setattr(join, "MIN_RUN_PIECE_ROWS", 10**9)
    run(make_config(output=str(tmp_path / "apart"), **common))
    assert sorted(ran) == [(0,), (1,), (2,)]
    ran.clear()
    monkeypatch.setattr(join, "MIN_RUN_PIECE_ROWS", 1)
    report = run(make_config(output=str(tmp_path / "together"), **common))
    assert ran == [(0, 1, 2)]
    _same_up_to_ties(_tables(tmp_path / "together"), _tables(tmp_path / "apart"))
    assert sorted(p.name for p in (tmp_path / "together" / "neighbors").iterdir()) == [
        f"part-{i:05d}.parquet" for i in range(3)
    ]
    recorded = json.loads((tmp_path / "together" / "manifest.json").read_text())["stages"]["join"]["pieces"]
    assert sorted(recorded) == ["0", "1", "2"]
    assert report.recall is not None and report.recall.met
