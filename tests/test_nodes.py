"""Shared-nothing: a Dask scheduler and two workers, each in a mount namespace of its own whose
scratch folder is a private tmpfs, so no worker sees a file of the driver's or of the other's;
input, index and output on S3 (moto's server on loopback). Every byte the machines exchange goes
through the object store (:mod:`pipeline.io.nodes`)."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.io.sample_data import clustered_vectors, write_shards
from pipeline.io.workdir import TRUTH_NAME
from tests.conftest import private_workers
from tests.test_resume import kill_when, run_command
from tests.test_storage import moto_s3, upload_shards

pytestmark = pytest.mark.slow  # a scheduler, two workers and whole jobs in subprocesses

BUCKET = "nodes"
ROWS, PIECE = 24_000, 500  # the kill test's data: 48 one-row-group pieces


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """S3 with ``s3://nodes/data`` (6,000 x 16, 4 shards) and ``s3://nodes/many`` (24,000 x 32 in
    48 pieces); a scheduler; workers w1 and w2, each seeing an empty tmpfs of its own over
    ``scratch`` (the driver's staging root)."""
    root = tmp_path_factory.mktemp("nodes")
    scratch = root / "scratch"
    scratch.mkdir()
    local = root / "data"
    write_shards(local / "data", clustered_vectors(6000, 16, clusters=20, seed=3), shards=4, row_group_rows=750)
    write_shards(local / "many", clustered_vectors(ROWS, 32, clusters=30, seed=7), shards=4, row_group_rows=PIECE)
    with moto_s3(BUCKET) as server:
        for name in ("data", "many"):
            upload_shards(server["fs"], local / name, f"{BUCKET}/{name}")
        with private_workers(scratch, ["w1", "w2"], server["env"]) as address:
            yield {"fs": server["fs"], "local": local, "env": server["env"], "address": address, "scratch": scratch}


def _on_nodes(nodes: Any, data: str, output: str, *extra: str) -> list[str]:
    return run_command(
        data, output, "--scheduler-address", nodes["address"], "--scratch-dir", str(nodes["scratch"]), *extra
    )


def _ran_on_nodes(nodes: Any, data: str, output: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """``s3://nodes/DATA`` joined into ``s3://nodes/OUTPUT`` on the workers, which must succeed."""
    proc = subprocess.run(
        _on_nodes(nodes, f"s3://{BUCKET}/{data}", f"s3://{BUCKET}/{output}", *extra),
        env=nodes["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def _lists(table: Any) -> dict[int, list[int]]:
    return dict(zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist(), strict=True))


def _objects(fs: pafs.FileSystem, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + len(prefix) + 2 :] for i in infos if i.type == pafs.FileType.File)


def _local_run(nodes: Any, name: str, out: Path, *extra: str) -> dict[int, list[int]]:
    proc = subprocess.run(run_command(nodes["local"] / name, out, *extra), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return _lists(pq.read_table(out / "neighbors"))


@pytest.mark.parametrize(
    "plan",
    [("--index-key", "IVF32,Flat", "--routed-join"), ("--index-key", "IVF32,PQ8x4fs", "--routed-join"), ()],
    ids=["ivf-routed", "pq-routed", "default"],
)
def test_a_run_on_workers_that_share_nothing_equals_a_local_run(nodes, tmp_path, plan):
    """Workers that see no file of the driver's: the job says so, every machine works in its own
    copy, and the output on S3 equals a local run's. The driver keeps metadata only: no stored
    row, list or table ever reaches it."""
    name = "out-" + (re.sub(r"[^a-z0-9]+", "-", " ".join(plan).lower()).strip("-") or "default")
    proc = _ran_on_nodes(nodes, "data", name, *plan)
    assert "Dask workers w1, w2 do not see this machine's folders" in proc.stderr
    assert "Traceback" not in proc.stderr
    remote = _objects(nodes["fs"], name)
    assert "_SUCCESS" in remote and not [r for r in remote if r.startswith(("_routed", "_exact"))]
    got = _lists(pq.read_table(f"{BUCKET}/{name}/neighbors", filesystem=nodes["fs"]))
    assert got == _local_run(nodes, "data", tmp_path / "local", *plan)
    assert len(got) == 6000
    report = json.loads(nodes["fs"].open_input_stream(f"{BUCKET}/{name}/report.json").read())
    if "--routed-join" in plan:  # list groups scored on the workers, lossy codes from the vectors in list order
        assert report["lists_read"]["by_phase"]["routed score"] > 0
    moved = {w["worker"]: w["moved"] for w in report["workers"]}
    assert set(moved) == {"w1", "w2"} and all(m["sent"] > 0 for m in moved.values())  # each wrote its tasks' files
    assert sum(m["fetched"] for m in moved.values()) > 0  # and read the other's
    if "--routed-join" in plan:  # each score task reads its routes' and each merge its partials' slices by range
        assert sum(m["reads"] for m in moved.values()) > 0
    with nodes["fs"].open_input_stream(f"{BUCKET}/{name}/report.md") as fh:
        assert "fetched MiB" in (text := fh.read().decode()) and "reads by range" in text
    driver = next(nodes["scratch"].glob(f"{name}-*"))
    held = {p.relative_to(driver).as_posix() for p in driver.rglob("*") if p.is_file()}
    assert not [h for h in held if not _metadata(h)], sorted(held)  # the driver holds no rows, lists or tables


def _metadata(rel: str) -> bool:
    """The files a driver keeps: manifests, ledgers, locks, the report and its charts, and the
    recall sample's truth (its size is the sample's, never the data's)."""
    name = rel.rsplit("/", 1)[-1]
    return (
        name.startswith(".knn-pipeline.")
        or name in ("manifest.json", "config.yaml", "_SUCCESS", ".timings.json", TRUTH_NAME)
        or ("/" not in rel and name.startswith("report.") or name.endswith(".svg"))
    )


def _join_pieces(fs: pafs.FileSystem, prefix: str) -> int:
    try:
        manifest = json.loads(fs.open_input_stream(f"{BUCKET}/{prefix}/manifest.json").read())
    except (OSError, ValueError):
        return 0
    return len(manifest["stages"].get("join", {}).get("pieces", {}))


def test_the_driver_killed_mid_join_resumes_to_the_same_output(nodes, tmp_path):
    """kill -9 of the driver during the join (the workers live on); the same command again, from
    an empty scratch folder (another driver machine), resumes: finished pieces are not searched
    again, and the output equals an uninterrupted local run's."""
    fs = nodes["fs"]
    env = {**nodes["env"], "KNN_PIPELINE_PUSH_SECONDS": "0.2"}
    plan = ("--index-key", "IVF32,Flat", "--nprobe", "32", "--rerank", "0", "--partition-size", str(PIECE * 32 * 4))
    first = [*_on_nodes(nodes, f"s3://{BUCKET}/many", f"s3://{BUCKET}/killed", *plan)]
    kill_when(first, lambda: _join_pieces(fs, "killed") >= 8, timeout=240, env=env)
    done = _join_pieces(fs, "killed")
    pieces = ROWS // PIECE
    assert 8 <= done < pieces and "_SUCCESS" not in _objects(fs, "killed")

    # another driver machine: an empty scratch folder of its own at the same path
    again = shlex.join(_on_nodes(nodes, f"s3://{BUCKET}/many", f"s3://{BUCKET}/killed", *plan))
    resumed = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
        + [f"mount -t tmpfs none {nodes['scratch']} && exec {again}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "do not see this machine's folders" in resumed.stderr and "fetched into" in resumed.stderr
    joined = [int(n.replace(",", "")) for n in re.findall(r"join: ([\d,]+)/[\d,]+ rows \(100%\)", resumed.stderr)]
    assert joined and joined[-1] <= ROWS - done * PIECE, resumed.stderr  # finished pieces not searched again
    got = _lists(pq.read_table(f"{BUCKET}/killed/neighbors", filesystem=fs))
    assert len(got) == ROWS and np.all(np.diff(sorted(got)) == 1)  # every row once
    assert got == _local_run(nodes, "many", tmp_path / "local", *plan)


def test_a_routed_join_on_workers_that_share_nothing_reads_by_range_once_a_run(nodes):
    """48 pieces routed and merged in runs of pieces: each score task reads a group's pairs once a
    route, each merge a group's partial lists once a run, so the reads by range are far fewer than
    the groups x pieces a task a piece made; every row is joined once, at the recall target."""
    plan = ("--index-key", "IVF32,Flat", "--routed-join", "--k", "5", "--partition-size", str(PIECE * 32 * 4))
    proc = _ran_on_nodes(nodes, "many", "runs", *plan)
    said = re.search(r"routed join: (\d+) list group\(s\) .* for 48 query piece\(s\) in (\d+) route\(s\)", proc.stderr)
    assert said, proc.stderr
    groups, routes = int(said[1]), int(said[2])
    assert routes == 8  # runs of six pieces: four a worker
    report = json.loads(nodes["fs"].open_input_stream(f"{BUCKET}/runs/report.json").read())
    reads = sum(w["moved"]["reads"] for w in report["workers"])
    assert 0 < reads < 4 * groups * ROWS // PIECE, reads  # a task a piece: 4 reads a (group, piece) for routes alone
    got = _lists(pq.read_table(f"{BUCKET}/runs/neighbors", filesystem=nodes["fs"]))
    assert len(got) == ROWS and np.all(np.diff(sorted(got)) == 1)  # every row once
    assert report["recall"]["met"]  # held-out queries against exact search (tables: the local-run test above)


def _pairs(table: Any) -> set[tuple[Any, Any]]:
    return set(zip(table.column("id_a").to_pylist(), table.column("id_b").to_pylist(), strict=True))


def test_dedup_and_graph_on_workers_that_share_nothing_equal_local_runs(nodes, tmp_path):
    """dedup (its shuffles, connected components, renamed label folders, the deduplicated files)
    and graph on workers of their own write what local runs write."""
    fs, env = nodes["fs"], nodes["env"]
    for command, extra in (("dedup", ["--threshold", "0.95"]), ("graph", ["--k", "5"])):
        remote = [
            sys.executable,
            "-m",
            "pipeline",
            command,
            "--input",
            f"s3://{BUCKET}/data",
            "--output",
            f"s3://{BUCKET}/{command}",
            "--scheduler-address",
            nodes["address"],
            "--scratch-dir",
            str(nodes["scratch"]),
            *extra,
        ]
        proc = subprocess.run(remote, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "do not see this machine's folders" in proc.stderr
        local = tmp_path / command
        here = [sys.executable, "-m", "pipeline", command, "--input", str(nodes["local"] / "data")]
        done = subprocess.run([*here, "--output", str(local), *extra], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        if command == "dedup":
            got = pq.read_table(f"{BUCKET}/dedup/pairs", filesystem=fs)
            assert got.num_rows > 0 and _pairs(got) == _pairs(pq.read_table(local / "pairs"))
            for sub in ("groups", "deduplicated"):
                a = pq.read_table(f"{BUCKET}/dedup/{sub}", filesystem=fs)
                b = pq.read_table(local / sub)
                assert a.num_rows > 0 and a.sort_by("id").equals(b.sort_by("id"))
        else:
            with fs.open_input_stream(f"{BUCKET}/graph/graph.npz") as fh:
                got_csr = np.load(io.BytesIO(fh.read()))
            want_csr = np.load(local / "graph.npz")
            for name in ("indptr", "indices"):
                assert np.array_equal(got_csr[name], want_csr[name])
            np.testing.assert_allclose(got_csr["data"], want_csr["data"], atol=1e-5)


class _FolderRemote:
    """A :class:`pipeline.io.nodes.Remote` over a local folder standing for the object store:
    what a machine of its own fetches, whole or by range, is counted."""

    def __init__(self, local: Path, remote: Path) -> None:
        self.local, self.remote = local, remote
        self.whole: list[str] = []
        self.ranged = 0
        self.reads = 0

    def fetch(self, rel: str) -> bool:
        if not (self.remote / rel).exists():
            return False
        if not (self.local / rel).exists():
            (self.local / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.remote / rel, self.local / rel)
            self.whole.append(rel)
        return True

    def size(self, rel: str) -> int | None:
        return (self.remote / rel).stat().st_size if (self.remote / rel).is_file() else None

    def open(self, rel: str) -> Any:
        remote = self

        class Counted:
            def read_at(self, n: int, offset: int) -> bytes:
                remote.ranged += n
                remote.reads += 1
                with open(remote.remote / rel, "rb") as fh:
                    fh.seek(offset)
                    return fh.read(n)

        return Counted()

    def send(self, rel: str) -> None: ...
    def drop(self, rel: str) -> None: ...
    def drop_below(self, rel: str, keep: str | None) -> None: ...
    def knows(self, rel: str, size: int) -> None: ...
    def names(self, rel: str) -> list[str]:
        return []

    def exists(self, rel: str) -> bool:
        return (self.remote / rel).exists()

    def move(self, src: str, dst: str) -> list[tuple[str, str, int]]:
        return []


def test_a_list_group_task_fetches_only_its_lists(make_config, dataset_dir, tmp_path):
    """A routed score task on a machine without the index's list file reads its group's lists by
    one ranged read into a sparse stand-in: its lists (codes and ids) equal the whole index's, and
    the list file is never fetched whole."""
    import faiss

    from pipeline import build
    from pipeline.index.fill import load_index, load_lists
    from pipeline.io import nodes as staged

    remote = tmp_path / "remote"
    build(make_config(input=str(dataset_dir), index_dir=str(remote), index_key="IVF16,Flat", output=None))
    assert (remote / "index.ivfdata").exists()
    whole_index = load_index(remote, private=True)  # held: the IVF views below point into them
    whole = faiss.extract_index_ivf(whole_index)
    here = tmp_path / "machine" / "index"
    here.mkdir(parents=True)
    folder = _FolderRemote(here, remote)
    staged.activate([folder])
    try:
        part_index = load_lists(here, 5, 9)
        part = faiss.extract_index_ivf(part_index)
    finally:
        staged.deactivate()
    assert folder.whole == ["index.faiss"] and not (here / "index.ivfdata").exists()
    entry = whole.code_size + 8
    group = sum(whole.invlists.list_size(i) for i in range(5, 9)) * entry
    assert 0 < folder.ranged and group <= folder.ranged <= 2 * group + 8 * entry * 4  # capacities round up
    for i in range(5, 9):
        n = whole.invlists.list_size(i)
        assert part.invlists.list_size(i) == n
        ids = [faiss.rev_swig_ptr(x.invlists.get_ids(i), n).copy() for x in (whole, part)]
        codes = [faiss.rev_swig_ptr(x.invlists.get_codes(i), n * whole.code_size).copy() for x in (whole, part)]
        assert np.array_equal(*ids) and np.array_equal(*codes)


def test_a_recall_computed_without_the_list_file_reads_the_row_map(make_config, dataset_dir, tmp_path):
    """The fill saves beside the index the list each stored row went into (what a pass over every
    list's ids finds). A recall computed from list ranks on a machine without the list file reads
    that map and the quantizer only, never the list file, and computes what the whole index gives."""
    import faiss

    from pipeline import build
    from pipeline.index.fill import ROW_LISTS, load_index
    from pipeline.io import nodes as staged
    from pipeline.search.join import SearchPlan
    from pipeline.search.probes import neighbour_lists
    from pipeline.search.tuning import ComputedSweep, RecallSample, _computed_points

    remote = tmp_path / "remote"
    build(make_config(input=str(dataset_dir), index_dir=str(remote), index_key="IVF16,Flat", output=None))
    whole_index = load_index(remote, private=True)
    whole = faiss.extract_index_ivf(whole_index)
    stored = np.load(remote / ROW_LISTS)
    assert len(stored) == whole.ntotal == 6000
    assert np.array_equal(neighbour_lists(whole, np.arange(6000)), stored)
    vectors = np.vstack([np.load(f) for f in sorted((remote / "store" / "vectors").glob("*.npy"))])
    queries = vectors[::97]
    scores, rows = faiss.knn(queries, vectors, 5, metric=whole.metric_type)
    sample = RecallSample(queries, None, None, [list(r) for r in rows], scores, rows)
    plan = SearchPlan(
        index_dir=str(tmp_path / "machine" / "index"),
        metric="cosine",
        k=5,
        nprobe=None,
        rerank=0,
        exclude_self=False,
        self_join=False,
    )
    Path(plan.index_dir).mkdir(parents=True)
    folder = _FolderRemote(Path(plan.index_dir), remote)
    staged.activate([folder])
    try:
        points = ComputedSweep(plan=plan, sample=sample, nprobes=(1, 2, 4, 16)).run()
    finally:
        staged.deactivate()
    assert sorted(folder.whole) == ["index.faiss", ROW_LISTS] and folder.ranged == 0
    scanned = _computed_points(whole, sample)  # the lists' ids read, no map
    assert [p.recall for p in points] == [scanned(n).recall for n in (1, 2, 4, 16)]
    assert points[-1].recall == 1.0 and points[0].recall < 1.0


@pytest.mark.parametrize("prefix", [512, 16])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_a_slice_of_another_machines_array_is_read_by_range(tmp_path, monkeypatch, version, prefix):
    """A reduce task's partition of a map output (a structured .npy another machine wrote) is read
    by range: a first read holding the header (or, where it is longer, the header again), then
    its rows' bytes; the file is never fetched whole. Where the file is here, the same rows come
    from the memory map."""
    from pipeline.io import nodes as staged

    monkeypatch.setattr(staged, "NPY_PREFIX_BYTES", prefix)

    rows = np.zeros(1000, dtype=[("a", np.int64), ("b", np.float32), ("c", np.int32)])
    rows["a"], rows["b"], rows["c"] = np.arange(1000) * 7, np.linspace(0, 1, 1000), -np.arange(1000)
    remote, here = tmp_path / "remote", tmp_path / "machine"
    remote.mkdir()
    here.mkdir()
    with open(remote / "data.npy", "wb") as fh:
        np.lib.format.write_array(fh, rows, version=version)
    folder = _FolderRemote(here, remote)
    staged.activate([folder])
    try:
        got = staged.npy_rows(here / "data.npy", 120, 345)
        past = staged.npy_rows(here / "data.npy", 990, 2000)
    finally:
        staged.deactivate()
    assert np.array_equal(got, rows[120:345]) and np.array_equal(past, rows[990:])
    assert folder.whole == [] and not (here / "data.npy").exists()
    header = (remote / "data.npy").stat().st_size - rows.nbytes
    first = prefix if prefix >= header else prefix + header
    assert folder.ranged == 2 * first + (225 + 10) * rows.itemsize
    assert folder.reads == 2 * (2 if prefix >= header else 3)  # the header within the first read
    assert np.array_equal(staged.npy_rows(remote / "data.npy", 120, 345), rows[120:345])  # a file here


def test_component_tasks_fetch_only_their_own_partitions_labels(tmp_path):
    """On a machine of its own, each step of a components round fetches whole only its own
    partition's edges and labels (and map outputs' small bounds); the labels of other
    partitions' rows come as answers, read by range. What it writes equals the same task's output
    on a machine that holds everything."""
    from pipeline.io import nodes as staged
    from pipeline.shuffle.components import ApplyHooks, AskEnds, HooksTask, JumpTask, label_path
    from pipeline.shuffle.edges import write_edges
    from pipeline.shuffle.lookup import AnswerTask

    n, starts = 30, np.array([0, 10, 20])
    chain = np.random.default_rng(1).permutation(n)  # one component through all three partitions
    src, dst = np.r_[chain[:-1], chain[1:]], np.r_[chain[1:], chain[:-1]]
    remote, machine = tmp_path / "remote", tmp_path / "machine"
    for p in range(3):
        sel = (src >= starts[p]) & (src < starts[p] + 10)
        write_edges(remote / f"edges/e{p}.parquet", src[sel], dst[sel], np.ones(sel.sum(), np.float32))
        (remote / "labels").mkdir(exist_ok=True)
        np.save(label_path(remote / "labels", p), np.arange(starts[p], starts[p] + 10))

    def every(root: Path, name: str) -> tuple[str, ...]:
        return tuple(str(root / name / f"part-{q:05d}") for q in range(3))

    def answer(root: Path, p: int, *, asks: str, labels: str, out: str) -> AnswerTask:
        values = str(label_path(root / labels, p))
        return AnswerTask(
            ask_dirs=every(root, asks), values=values, first_row=int(starts[p]), part=p, out=out_of(root, out, p)
        )

    def out_of(root: Path, name: str, p: int) -> str:
        return str(root / name / f"part-{p:05d}")

    steps: list[tuple[str, Any]] = [
        (
            "ask-ends",
            lambda r, p: AskEnds(
                edge_path=str(r / f"edges/e{p}.parquet"),
                starts=starts,
                piece=p,
                out=str(r / "ask-ends" / f"part-{p:05d}"),
            ),
        ),
        ("ends", lambda r, p: answer(r, p, asks="ask-ends", labels="labels", out="ends")),
        (
            "hooks",
            lambda r, p: HooksTask(
                edge_path=str(r / f"edges/e{p}.parquet"),
                labels_dir=str(r / "labels"),
                asked=str(r / "ask-ends" / f"part-{p:05d}"),
                answer_dirs=every(r, "ends"),
                starts=starts,
                piece=p,
                out=str(r / "hooks" / f"part-{p:05d}"),
            ),
        ),
        (
            "hooked",
            lambda r, p: ApplyHooks(
                hook_dirs=every(r, "hooks"),
                labels_dir=str(r / "labels"),
                starts=starts,
                piece=p,
                out=str(r / "hooked"),
                asks=str(r / "asks" / f"part-{p:05d}"),
            ),
        ),
        ("answers", lambda r, p: answer(r, p, asks="asks", labels="hooked", out="answers")),
        (
            "jumped",
            lambda r, p: JumpTask(
                labels_dir=str(r / "hooked"),
                answer_dirs=every(r, "answers"),
                starts=starts,
                piece=p,
                out=str(r / "jumped"),
                asks=str(r / "asks-2" / f"part-{p:05d}"),
            ),
        ),
    ]
    done: dict[str, int] = {}
    for name, make in steps:
        values = [make(remote, p).run() for p in range(3)]
        done[name] = sum(values)
        shutil.rmtree(machine, ignore_errors=True)
        machine.mkdir()
        folder = _FolderRemote(machine, remote)
        staged.activate([folder])
        try:
            assert make(machine, 1).run() == values[1]
        finally:
            staged.deactivate()
        own = {"edges/e1.parquet", "labels/part-00001.npy", "hooked/part-00001.npy", "ask-ends/part-00001/where.npy"}
        assert all(f in own or f.endswith("bounds.npy") for f in folder.whole), (name, folder.whole)
        for written in machine.rglob("*.npy"):
            rel = written.relative_to(machine).as_posix()
            if rel not in folder.whole:  # the step's own output: equal to the same step's on the store
                assert np.array_equal(np.load(written), np.load(remote / rel)), rel
    # far ends asked and answered, edges crossing trees, hooked labels pointing across partitions
    assert min(done["ask-ends"], done["ends"], done["hooks"], done["hooked"], done["answers"]) > 0, done
    jumped = np.concatenate([np.load(label_path(remote / "jumped", p)) for p in range(3)])
    assert jumped.min() == 0 and (jumped <= np.arange(n)).all()


def test_components_choose_request_and_answer_only_where_it_moves_less(tmp_path):
    """Staged per node, sparse edges (dedup's pairs) go by request and answer; dense ones (a k-NN
    graph on a few machines) through the label files; with the driver's folders seen by every
    worker, always the files, read in place."""
    from pipeline.io import nodes as staged
    from pipeline.shuffle.components import by_answers
    from pipeline.shuffle.edges import write_edges

    class Workers:
        def __init__(self, n: int) -> None:
            self.n = n

        def scheduler_info(self, n_workers: int = 0) -> dict[str, Any]:
            return {"workers": {f"w{i}": {} for i in range(self.n)}}

    rows = 10_000
    sparse, dense = tmp_path / "sparse.parquet", tmp_path / "dense.parquet"
    few, many = np.arange(500), np.repeat(np.arange(rows), 10)
    write_edges(sparse, few, few[::-1], np.ones(few.size, np.float32))
    write_edges(dense, many, many[::-1], np.ones(many.size, np.float32))
    assert not by_answers(Workers(2), [str(sparse)], rows)  # not staged: the files, in place
    staged.activate([_FolderRemote(tmp_path / "here", tmp_path)])
    try:
        assert by_answers(Workers(2), [str(sparse)], rows)
        assert not by_answers(Workers(2), [str(dense)], rows)
        assert by_answers(Workers(64), [str(dense)], rows)  # many machines: each copy of the files costs
    finally:
        staged.deactivate()
