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
from pipeline.io.parquet import Piece, PieceRun, piece_runs
from pipeline.search import join, routed
from tests.test_pairs import _same_up_to_ties, _tables


def _in_process(make_config, dataset_dir: Path, output: Path, **settings: object) -> object:  # type: ignore[no-untyped-def]
    """A self-join of ``dataset_dir``, each query's own row left out, on the embedded in-process cluster: the
    tests' patches reach its tasks."""
    return make_config(
        input=str(dataset_dir), output=str(output), exclude_self=True, scheduler_address=None, workers=1, **settings
    )


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

    def config(out: str, **extra: object) -> object:
        return _in_process(
            make_config, dataset_dir, tmp_path / out, index_key="IVF16,Flat", nprobe=4, k=7, metric=metric, **extra
        )

    run(config("batched"))
    monkeypatch.setattr(routed, "GROUP_BYTES", 6_000 * 32 * 4 // 4)  # four or five list groups
    monkeypatch.setattr(routed, "RUNS_PER_WORKER", 1)  # the three pieces routed and merged in one run
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
    routes = stages["routed_route"]["pieces"]  # the three pieces (one per shard) routed in one run, before scoring
    assert list(routes) == ["0"] and "run-00000-00002.npz" in routes["0"][0][0]
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


def test_lists_larger_than_half_a_worker_are_joined_routed(monkeypatch, tmp_path):
    """The batched join maps every list in every worker: past half a worker's memory, routed; so
    are lossy codes whose vectors the fill wrote in list order (re-ranked inside each group)."""
    from types import SimpleNamespace

    from pipeline.jobs import stages

    built = SimpleNamespace(ntotal=2_000_000, dim=128, key="IVF1024,Flat", nlist=1024, dir=tmp_path)  # 0.95 GiB
    monkeypatch.setattr(stages, "worker_memory", lambda client: 800 << 20)
    assert stages._lists_outgrow_workers(None, built)
    assert stages._group_bytes(None) == 100 << 20  # an eighth of a worker
    monkeypatch.setattr(stages, "worker_memory", lambda client: 4 << 30)
    assert not stages._lists_outgrow_workers(None, built)
    monkeypatch.setattr(stages, "worker_memory", lambda client: 800 << 20)
    sq8 = SimpleNamespace(**{**built.__dict__, "key": "IVF1024,SQ8"})
    assert not stages._lists_outgrow_workers(None, sq8)  # re-ranking would gather from the row store
    (tmp_path / "ordered").mkdir()
    for name in ("vectors", "rows", "offsets", "row_lists"):
        np.save(tmp_path / "ordered" / f"{name}.npy", np.zeros(1))
    assert stages._lists_outgrow_workers(None, sq8)


def test_an_index_larger_than_the_gpus_is_joined_routed(tmp_path):
    """On GPU workers, an index over the clone a GPU takes whole is routed (each group copied to a
    GPU in turn) instead of searched on the CPU: IVF-Flat, and lossy codes, whose fill then writes
    their vectors in list order for it; one that fits, or a CPU worker among them, keeps the
    batched join."""
    from types import SimpleNamespace

    from pipeline.cluster.clients import ClusterInfo
    from pipeline.index.choice import make_index
    from pipeline.jobs import stages
    from pipeline.results import WorkerDevice

    def cluster(free_gib: float, *backends: str) -> ClusterInfo:
        devices = tuple(
            WorkerDevice(f"w{i}", "h", b, "", 1, int(b == "gpu"), gpu_free_bytes=int(free_gib * 2**30) * (b == "gpu"))
            for i, b in enumerate(backends)
        )
        return ClusterInfo(workers=len(devices), faiss_threads=1, dashboard=None, devices=devices)

    flat = SimpleNamespace(ntotal=20_000_000, dim=128, metric="l2", key="IVF4096,Flat", nlist=4096, dir=tmp_path)
    assert stages._lists_outgrow_gpus(cluster(10, "gpu", "gpu"), flat)  # 10.1 GiB on a GPU
    assert not stages._lists_outgrow_gpus(cluster(40, "gpu", "gpu"), flat)
    assert not stages._lists_outgrow_gpus(cluster(10, "gpu", "cpu"), flat)  # not all on GPUs: CPU rules
    pq = SimpleNamespace(**{**flat.__dict__, "key": "IVF4096,PQ32", "ntotal": 400_000_000})  # 17 GiB of codes and ids
    assert not stages._lists_outgrow_gpus(cluster(10, "gpu"), pq)  # no vectors in list order: not routable
    (tmp_path / "ordered").mkdir()
    for name in ("vectors", "rows", "offsets", "row_lists"):
        np.save(tmp_path / "ordered" / f"{name}.npy", np.zeros(1))
    assert stages._lists_outgrow_gpus(cluster(10, "gpu"), pq)
    assert not stages._lists_outgrow_gpus(cluster(40, "gpu"), pq)
    # the fill's side: lossy codes over the GPUs have their vectors written in list order
    empty = make_index("IVF4096,PQ32", 128, "l2")
    assert stages._outgrows_gpus(cluster(10, "gpu"), empty, 400_000_000)
    assert stages._orders_vectors(empty, 400_000_000 * 128 * 4, None, routed=True)
    assert not stages._outgrows_gpus(cluster(10, "cpu"), empty, 400_000_000)


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
    runs = piece_runs(pieces, 10 * run_rows, min_piece_rows=floor)
    assert [p for r in runs for p in r.pieces] == pieces
    for r in runs:
        assert r.index == r.pieces[0].index and r.rows == sum(p.rows for p in r.pieces)
        if len(r.pieces) > 1:
            assert r.rows <= 10 * run_rows and min(p.rows for p in r.pieces) >= floor
    for a, b in zip(runs, runs[1:]):
        nxt = b.pieces[0]
        assert a.rows + nxt.rows > 10 * run_rows or min(p.rows for p in (*a.pieces, nxt)) < floor


def _join_tasks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The pieces of each join task run from now on, as the tasks run (the in-process cluster)."""
    ran: list[tuple[int, ...]] = []
    task_run = join.JoinTask.run

    def counted(task: join.JoinTask) -> join.Joined:
        ran.append(tuple(p.index for p in task.pieces))
        return task_run(task)

    monkeypatch.setattr(join.JoinTask, "run", counted)
    return ran


def test_small_pieces_are_joined_in_one_run_with_tables_of_their_own(make_config, dataset_dir, tmp_path, monkeypatch):
    """Three pieces of 2,000 rows, each smaller than the batch IVF-Flat wants: one join task takes
    all three in its batches, writes each piece's table and lists and records each piece; the
    tables equal those of a task a piece (up to ties)."""
    ran = _join_tasks(monkeypatch)
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


# lossy codes, re-ranked inside each list group ---------------------------------------------------
def _partial(x: np.ndarray, start: int, quantizer: faiss.Index, nlist: int) -> faiss.Index:
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist)
    index.add_with_ids(x, np.arange(start, start + len(x), dtype=np.int64))
    return index


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=5),
    nlist=st.integers(1, 24),
    merge_bytes=st.sampled_from([64, 1_000, 1 << 20]),
    half=st.lists(st.booleans(), min_size=5, max_size=5),
    seed=st.integers(0, 1_000),
)
def test_vectors_in_list_order_follow_the_merged_lists(
    tmp_path_factory: pytest.TempPathFactory,
    sizes: list[int],
    nlist: int,
    merge_bytes: int,
    half: list[bool],
    seed: int,
) -> None:
    """Pieces of any size (empty ones too) merged a range of lists at a time, the range as small
    as one list or as large as all: each list holds its rows, piece after piece, with their own
    vectors, and a group of lists reads back exactly its rows. Pieces of float16 values are kept
    as float16, and the merge too where every piece is; a float32 piece keeps the merge float32."""
    from pipeline.index import ordered

    d = 8
    folder = tmp_path_factory.mktemp("ordered")
    rng = np.random.default_rng(seed)
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(rng.standard_normal((nlist, d)).astype(np.float32))
    parts, xs, start = [], [], 0
    merged = faiss.IndexIVFFlat(quantizer, d, nlist)
    for i, size in enumerate(sizes):
        x = rng.standard_normal((size, d)).astype(np.float16 if half[i] else np.float32).astype(np.float32)
        partial = _partial(x, start, quantizer, nlist)
        part = folder / f"part-{i:05d}.faiss"
        ordered.write_piece_order(partial, x, start, part)
        merged.merge_from(partial, 0)  # the lists' own merge: pieces appended in order
        parts.append(str(part))
        xs.append(x)
        start += size
    every = np.concatenate(xs) if xs else np.zeros((0, d), np.float32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ordered, "MERGE_BYTES", merge_bytes)
        ordered.merge_ordered(parts, folder, d)
    assert ordered.has_ordered(folder)
    offsets = np.load(folder / "ordered" / "offsets.npy")
    rows = np.load(folder / "ordered" / "rows.npy")
    stored = np.load(folder / "ordered" / "vectors.npy")
    assert stored.dtype == (np.float16 if all(h or not s for h, s in zip(half, sizes)) else np.float32)
    vectors = stored.astype(np.float32).reshape(-1, d)
    for number in range(nlist):
        ids = faiss.rev_swig_ptr(merged.invlists.get_ids(number), merged.invlists.list_size(number))
        assert rows[offsets[number] : offsets[number + 1]].tolist() == ids.tolist()
    np.testing.assert_array_equal(vectors, every[rows])
    first, last = nlist // 3, max(nlist // 3 + 1, nlist - 1)
    group = ordered.read_group(folder, first, last, d)
    assert group.rows.tolist() == rows[offsets[first] : offsets[last]].tolist()
    np.testing.assert_array_equal(group.vectors, every[group.rows])
    assert group.vectors.dtype == np.float32 and group.nbytes == len(group.rows) * (d * stored.itemsize + 8)
    asked = np.array([[-1, *group.rows[:2].tolist(), start + 5]]) if len(group.rows) else np.array([[-1, start + 5]])
    at = group.place(asked)
    assert at[0, 0] == -1 and at[0, -1] == -1  # none, and a row of no list here
    assert (group.rows[at[0, 1:-1]] == asked[0, 1:-1]).all()


def test_the_fill_orders_vectors_only_for_routed_lossy_codes() -> None:
    from pipeline.jobs import stages

    def key(k: str) -> faiss.Index:
        return faiss.index_factory(32, k)

    assert not stages._orders_vectors(key("IVF16,Flat"), 1 << 40, 1 << 20, routed=True)  # exact codes: its lists
    assert not stages._orders_vectors(key("OPQ16,IVF16,PQ16"), 1 << 40, 1 << 20, routed=True)  # a transform
    assert stages._orders_vectors(key("IVF16,PQ16x4fs"), 1 << 20, 1 << 30, routed=True)  # asked for
    assert stages._orders_vectors(key("IVF16,SQ8"), 3 << 30, 4 << 30, routed=False)  # over half a worker
    assert not stages._orders_vectors(key("IVF16,SQ8"), 1 << 30, 4 << 30, routed=False)
    assert not stages._orders_vectors(key("IVF16,SQ8"), 1 << 40, None, routed=False)  # memory unknown


@pytest.mark.parametrize(("key", "metric"), [("IVF16,PQ16x4fs", "l2"), ("IVF16,SQ8", "cosine")])
def test_lossy_codes_are_routed_and_re_ranked_inside_each_group(
    make_config, dataset_dir, vectors, tmp_path, monkeypatch, key, metric
):
    """PQ (fast-scan, merged in memory) and SQ8 (lists on disk): the routed join reads each
    group's codes and vectors in list order once, gathers nothing from the row store, writes
    exact scores, and finds for every query a k-th neighbour at least as near as the batched
    join's (each group's candidates include the batched search's from its lists)."""
    from pipeline.io.store import RowStore
    from pipeline.search.join import JoinTask

    def config(out: str, **extra: object) -> object:  # settings held low: the codes miss neighbours to re-rank
        return _in_process(
            make_config,
            dataset_dir,
            tmp_path / out,
            index_key=key,
            nprobe=4,
            rerank=2,
            k=7,
            metric=metric,
            allow_below_target=True,
            **extra,
        )

    run(config("batched"))
    assert not (tmp_path / "batched" / "index" / "ordered").exists()  # in memory: no copy written

    def no_gathers(method):  # type: ignore[no-untyped-def]
        def wrapped(task):  # type: ignore[no-untyped-def]
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(RowStore, "gather_vectors", lambda *a, **k: pytest.fail("gathered from the row store"))
                return method(task)

        return wrapped

    monkeypatch.setattr(routed.ScoreTask, "run", no_gathers(routed.ScoreTask.run))
    monkeypatch.setattr(JoinTask, "run", no_gathers(JoinTask.run))
    monkeypatch.setattr(routed, "GROUP_BYTES", 6_000 * (32 * 4 + 40) // 4)  # several groups
    report = run(config("routed", routed_join=True))
    assert (tmp_path / "routed" / "index" / "ordered" / "vectors.npy").stat().st_size >= 6_000 * 32 * 4
    reads = report.join.lists_read
    assert reads is not None and reads.by_phase.get("join", 0) == 0
    assert reads.by_phase["routed score"] >= 6_000 * 32 * 4  # every group's vectors, once
    monkeypatch.setattr(routed, "RUNS_PER_WORKER", 1)  # the three pieces routed, searched and merged in one run
    run(config("runs", routed_join=True))
    assert _tables(tmp_path / "runs") == _tables(tmp_path / "routed")  # each piece's candidates re-ranked alike

    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True) if metric == "cosine" else vectors
    ids = {int(i): n for n, i in enumerate(_ids(dataset_dir))}
    both = _tables(tmp_path / "routed"), _tables(tmp_path / "batched")
    nearer = []
    for q, (nbrs, scores) in both[0].items():
        exact = x[[ids[n] for n in nbrs]] @ x[ids[q]] if metric == "cosine" else None
        if exact is None:
            exact = ((x[[ids[n] for n in nbrs]] - x[ids[q]]) ** 2).sum(1)
        np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-4)  # exact scores, from the group's vectors
        kth, kth_batched = scores[-1], both[1][q][1][-1]
        slack = 1e-4 * max(1.0, abs(kth_batched))  # the same score summed another way
        nearer.append(kth >= kth_batched - slack if metric == "cosine" else kth <= kth_batched + slack)
    assert np.mean(nearer) >= 0.995  # ties among equal codes aside


def _ids(dataset: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(dataset, columns=["id"]).column("id").to_numpy()


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 60),
    width=st.integers(1, 6),
    nlist=st.integers(1, 40),
    cuts=st.lists(st.integers(1, 39), max_size=6),
    other=st.lists(st.integers(1, 39), max_size=6),
    seed=st.integers(0, 1000),
)
def test_a_group_reads_its_own_run_of_each_route(tmp_path_factory, rows, width, nlist, cuts, other, seed):
    """A route of a run of pieces, written as pairs by list group, gives each group each piece's
    queries routed to it (numbered in the piece), with their lists in their ranks and ``-1``
    elsewhere (as filtering the whole route would), and reads only that group's run by range;
    routes grouped for other groups (a resumed join planned with another worker count) give the
    same, read whole."""
    rng = np.random.default_rng(seed)
    assign = rng.integers(-1, nlist, size=(rows, width))
    bounds = np.sort(rng.integers(0, rows + 1, size=int(rng.integers(0, 3))))
    sizes = np.diff(np.r_[0, bounds, rows]).tolist()
    run_ = PieceRun(tuple(Piece(7 + i, "a", (i,), 0, 0, n) for i, n in enumerate(sizes)))

    def layout_of(bounds: list[int]) -> routed.RoutedLayout:
        edges = sorted({0, *(b for b in bounds if b < nlist), nlist})
        groups = tuple(routed.ListGroup(i, a, b, 0) for i, (a, b) in enumerate(zip(edges, edges[1:])))
        return routed.RoutedLayout(str(folder), groups, width, 5, True)

    folder = tmp_path_factory.mktemp("routes")
    written, reading = layout_of(cuts), layout_of(other)
    routed.write_routes(written, run_, assign)
    read: list[int] = []
    rows_of = routed.npy_rows
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routed, "npy_rows", lambda path, lo, hi: read.append(hi - lo) or rows_of(path, lo, hi))
        for layout in (written, reading):
            for g in layout.groups:
                got = list(routed.routed_pieces(layout, g, run_))
                assert [piece for piece, _, _ in got] == list(run_.pieces)
                base = 0
                for piece, picked, lists in got:
                    share = assign[base : base + piece.rows]
                    inside = (share >= g.first) & (share < g.last)
                    want = np.flatnonzero(inside.any(axis=1))
                    assert np.array_equal(picked, want)
                    assert np.array_equal(lists, np.where(inside[want], share[want], -1))
                    base += piece.rows
            if layout is written:  # each pair read once, by its group (slots and lists)
                assert sum(read) == 2 * int((assign >= 0).sum())


@settings(max_examples=40, deadline=None)
@given(counts=st.lists(st.integers(0, 30), min_size=0, max_size=8), width=st.integers(1, 5), seed=st.integers(0, 99))
def test_a_groups_partial_lists_are_four_files_and_each_piece_reads_its_own_run(tmp_path_factory, counts, width, seed):
    """A score task writes every piece's partial lists into four files of its group (not a file a
    piece: groups x pieces files at scale); each piece reads back what it was given, by range,
    and a piece the group never met reads nothing. A task that fails publishes none of them."""
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("partial")
    layout = routed.RoutedLayout(str(folder), (routed.ListGroup(0, 0, 4, 0),), 3, width, True)
    numbers = sorted(rng.choice(20, size=len(counts), replace=False).tolist()) if counts else []
    given_ = {}
    with routed.PartialLists(layout, 0) as out:
        for piece, n in zip(numbers, counts):
            picked = np.sort(rng.choice(1000, size=n, replace=False))
            scores = rng.standard_normal((n, width)).astype(np.float32)
            rows = rng.integers(-1, 10**9, size=(n, width))
            out.add(piece, picked, scores, rows)
            given_[piece] = (picked, scores, rows)
    assert sorted(p.name for p in (folder / "partial").iterdir()) == sorted(
        f"group-00000.{kind}.npy" for kind in routed.PARTIAL_KINDS
    )
    for piece in range(22):
        got = routed.partial_run(layout, 0, piece)
        want = given_.get(piece, (np.zeros(0, np.int64), np.zeros((0, width)), np.zeros((0, width))))
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    failed = routed.RoutedLayout(str(folder / "failed"), layout.groups, 3, width, True)
    with pytest.raises(ValueError), routed.PartialLists(failed, 0) as out:
        out.add(0, np.arange(2), np.zeros((2, width)), np.zeros((2, width), np.int64))
        raise ValueError("the device failed")
    assert not any(p.is_file() for p in (folder / "failed").rglob("*"))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    groups=st.integers(1, 4),
    width=st.integers(1, 4),
    similarity=st.booleans(),
    seed=st.integers(0, 99),
)
def test_a_merge_reads_each_group_once_for_a_run_of_pieces(tmp_path_factory, rows, groups, width, similarity, seed):
    """A merge task of several pieces reads each group's four files once for them all (groups x
    runs ranged reads, not groups x pieces), and gives each piece the lists a merge of that piece
    alone gives, bit for bit; pieces between the run's (done already) are skipped."""
    rng = np.random.default_rng(seed)
    folder = tmp_path_factory.mktemp("merge")
    layout = routed.RoutedLayout(
        str(folder), tuple(routed.ListGroup(g, g, g + 1, 0) for g in range(groups)), 2, width, similarity
    )
    pieces = [Piece(i, "a", (i,), 0, 0, n) for i, n in enumerate(rows)]
    for g in range(groups):
        with routed.PartialLists(layout, g) as out:
            for p in pieces:
                picked = np.sort(rng.choice(p.rows, size=int(rng.integers(0, p.rows + 1)), replace=False))
                scores = np.round(rng.standard_normal((len(picked), width)), 1).astype(np.float32)  # ties
                found = rng.integers(-1, 10**6, size=(len(picked), width))
                out.add(p.index, picked, -np.sort(-scores, axis=1), np.where(found < 0, -1, found))
    run_ = [p for p in pieces if rng.random() < 0.7] or pieces[:1]
    read: list[str] = []
    rows_of = routed.npy_rows
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routed, "npy_rows", lambda path, lo, hi: read.append(str(path)) or rows_of(path, lo, hi))
        scores, found = routed.routed_lists(layout, run_)
    assert len(read) == 4 * groups  # starts, queries, scores, rows: once per group
    alone = [routed.routed_lists(layout, [p]) for p in run_]
    assert np.array_equal(scores, np.concatenate([a[0] for a in alone]))
    assert np.array_equal(found, np.concatenate([a[1] for a in alone]))
    with pytest.raises(ValueError, match="number order"):
        routed.routed_lists(layout, run_[::-1] if len(run_) > 1 else run_ * 2)


def test_routed_route_and_merge_tasks_take_runs_of_pieces_with_tables_of_their_own(
    make_config, dataset_dir, tmp_path, monkeypatch
):
    """The routed join's route and merge tasks each take as many pieces as their memory allows
    (one route a run; each group's files read once a run, not once a piece); every piece still
    gets its own table and record, and the tables equal those of a task a piece, bit for bit."""
    ran = _join_tasks(monkeypatch)
    monkeypatch.setattr(routed, "GROUP_BYTES", 6_000 * 32 * 4 // 3)  # three or four list groups
    monkeypatch.setattr(routed, "RUNS_PER_WORKER", 1)  # one worker may take every piece in one run
    settings_ = dict(index_key="IVF16,Flat", nprobe=4, k=5, routed_join=True)
    tables = {}
    for out, rows, runs in (
        ("apart", 1, [(0,), (1,), (2,)]),
        ("two", 4_500, [(0, 1), (2,)]),
        ("together", 10**9, [(0, 1, 2)]),
    ):
        ran.clear()
        monkeypatch.setattr(join, "merge_run_rows", lambda width, rows=rows: rows)
        monkeypatch.setattr(routed, "route_run_rows", lambda nprobe, candidates=0, rows=rows: rows)
        report = run(_in_process(make_config, dataset_dir, tmp_path / out, **settings_))
        assert sorted(ran) == runs
        stages = json.loads((tmp_path / out / "manifest.json").read_text())["stages"]
        assert sorted(stages["join"]["pieces"]) == ["0", "1", "2"]
        assert sorted(int(i) for i in stages["routed_route"]["pieces"]) == [r[0] for r in runs]
        tables[out] = _tables(tmp_path / out)
        assert tables[out] == tables["apart"]  # the same merge, bit for bit
        assert report.recall is not None and report.recall.met


def test_routed_runs_leave_every_worker_tasks_of_its_own():
    """Runs save reads, but they are the stage's tasks: never fewer than four a worker where the
    pieces allow, and never more rows than memory allows."""
    assert routed.spread(10**9, 6_000, 1) == 1_500
    assert routed.spread(10**9, 10**6, 2) == 125_000
    assert routed.spread(1_000, 10**9, 100) == 1_000
    assert routed.spread(5, 0, 3) == 1
    pieces = [Piece(i, "a", (i,), 0, 15_625 * i, 15_625) for i in range(64)]  # 1M rows in 64 files
    runs = piece_runs(pieces, routed.spread(routed.merge_run_rows(11), 10**6, 2))
    assert len(runs) == 8 and all(len(r.pieces) == 8 for r in runs)


def test_a_join_routed_by_an_earlier_layout_is_routed_and_scored_again(tmp_path):
    """Routes and groups an interrupted join recorded done in an earlier version's files (a route
    without its pairs; a partial file a (group, piece)) are done again; those in this layout's
    files stay done."""
    from pipeline.runtime.manifest import Manifest

    layout = routed.RoutedLayout(
        str(tmp_path / "_routed"), (routed.ListGroup(0, 0, 2, 0), routed.ListGroup(1, 2, 4, 0)), 2, 3, True
    )
    pieces = (Piece(0, "a", (0,), 0, 0, 5), Piece(1, "a", (1,), 5, 5, 5))
    routed.write_routes(layout, 1, np.array([[0, 3], [1, 2], [3, -1], [0, 1], [2, 2]]))
    old_route = layout.route_path(0)
    np.savez(old_route, assign=np.zeros((5, 2), np.int64))
    old_partial = tmp_path / "_routed" / "partial" / "group-00000" / "piece-00000.npz"
    old_partial.parent.mkdir(parents=True)
    np.savez(old_partial, queries=np.zeros(0, np.int64))
    with routed.PartialLists(layout, 1):
        pass
    manifest = Manifest(tmp_path)
    manifest.mark_piece("routed_route", 0, [old_route])
    manifest.mark_piece(
        "routed_route", 1, [layout.route_path(1), *(layout.pairs_path(1, k) for k in ("slots", "lists"))]
    )
    manifest.mark_piece("routed_score", 0, [old_partial])
    manifest.mark_piece("routed_score", 1, [layout.partial_path(1, k) for k in routed.PARTIAL_KINDS])
    routed.forget_other_layouts(manifest, layout, [PieceRun((p,)) for p in pieces])
    assert manifest.done_pieces("routed_route") == {1} and manifest.done_pieces("routed_score") == {1}
    # a route a piece, where this join routes both pieces in one run: routed again
    routed.write_routes(layout, 0, np.array([[0, 3], [1, 2], [3, -1], [0, 1], [2, 2]]))
    manifest.mark_piece(
        "routed_route", 0, [layout.route_path(0), *(layout.pairs_path(0, k) for k in ("slots", "lists"))]
    )
    routed.forget_other_layouts(manifest, layout, [PieceRun(pieces)])
    assert manifest.done_pieces("routed_route") == {1}
