"""Fault injection: files the tool did not write are never changed or deleted, links are never
followed, and damaged or crafted state is redone, not trusted (issue 26)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import ResumeError, build, run
from pipeline.io.owned import LEDGER_NAME, Ledger, discard, foreign, remove_owned
from pipeline.io.sample_data import clustered_vectors, write_shards
from pipeline.io.workdir import LOCK_NAME

DIM = 16
ROWS = 1200


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    write_shards(d, clustered_vectors(ROWS, DIM, clusters=8, seed=5), shards=4, row_group_rows=150)
    return d


def tree(d: Path) -> dict[str, bytes]:
    """Every regular file below ``d`` (links not followed) and its bytes."""
    out = {}
    for dirpath, _, names in os.walk(d):
        for n in names:
            p = Path(dirpath) / n
            if not p.is_symlink():
                out[str(p.relative_to(d))] = p.read_bytes()
    return out


def query_ids(out: Path) -> list:
    return sorted(pq.read_table(out / "neighbors").column("query_id").to_pylist())


def small(make_config, data: Path, **extra):
    return make_config(**{"input": str(data), "k": 3, "index_key": "Flat", "partition_size": 150 * DIM * 4, **extra})


# data loss -------------------------------------------------------------------------------------
def test_build_overwrite_refuses_a_directory_holding_only_the_users_file(make_config, data, tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / "config.yaml").write_text("mine: true\n")
    with pytest.raises(ResumeError, match=r"idx is not empty and was not written by this tool \(it holds config\.yaml"):
        build(make_config(input=str(data), index_dir=str(idx), output=None, overwrite=True))
    assert tree(idx) == {"config.yaml": b"mine: true\n"}
    assert sorted(os.listdir(idx)) == ["config.yaml"]  # no lock, no ledger: refused before anything


def test_run_overwrite_without_a_manifest_touches_nothing(make_config, data, tmp_path):
    out = tmp_path / "out"
    (out / "pairs").mkdir(parents=True)
    (out / "report.md").write_text("my report")
    (out / "pairs" / "mine.csv").write_text("a,b\n")
    with pytest.raises(ResumeError, match=r"it holds pairs, report\.md\); --overwrite removes only"):
        run(small(make_config, data, overwrite=True))
    assert tree(out) == {"report.md": b"my report", "pairs/mine.csv": b"a,b\n"}


@pytest.mark.parametrize("planted", ["neighbors/my_notes.txt", "index/store/notes.txt", "report.md"])
def test_overwrite_of_a_finished_output_keeps_what_the_user_added_or_changed(make_config, data, tmp_path, planted):
    out = tmp_path / "out"
    run(small(make_config, data))
    (out / planted).write_text("the user's words")  # a new file, or one of the tool's rewritten by the user
    before = tree(out)
    named = planted.removeprefix("index/")  # the index directory is checked on its own
    with pytest.raises(ResumeError, match=rf"holds files this tool did not write \({named}\)"):
        run(small(make_config, data, k=4, overwrite=True))
    assert tree(out) == before  # refused before any work: nothing removed, nothing rewritten


def test_overwrite_removes_every_file_the_tool_wrote(make_config, data, tmp_path):
    out = tmp_path / "out"
    run(small(make_config, data))
    (out / "logs").mkdir()
    (out / "logs" / "job.log").write_text("kept")
    remove_owned(out, keep=None)  # the index directory nested inside, with its own ledger, goes too
    assert tree(out) == {"logs/job.log": b"kept", LOCK_NAME: (out / LOCK_NAME).read_bytes(), LEDGER_NAME: b""}


def test_a_linked_output_folder_is_refused_and_its_target_untouched(make_config, data, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    run(small(make_config, data))
    (out / "neighbors" / "part-00002.parquet").unlink()  # the rerun must redo a part
    (out / "neighbors").rename(elsewhere)
    (out / "neighbors").symlink_to(elsewhere, target_is_directory=True)
    before = tree(elsewhere)
    with pytest.raises(ResumeError, match=r"neighbors is a symbolic link where this tool keeps its own files"):
        run(small(make_config, data))
    assert tree(elsewhere) == before


def test_a_planted_lock_link_is_refused_and_its_target_untouched(make_config, data, tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("do not touch")
    (out / LOCK_NAME).symlink_to(victim)
    with pytest.raises(ResumeError, match=r"\.knn-pipeline\.lock is a symbolic link"):
        run(small(make_config, data))
    assert victim.read_text() == "do not touch"


def test_stale_temp_links_are_not_followed_or_removed(make_config, data, tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    run(small(make_config, data))
    victim.write_text("do not touch")
    link = out / "neighbors" / ".part-00000.parquet.tmp-0123abcd"
    link.symlink_to(victim)
    with pytest.raises(ResumeError, match="symbolic link"):
        run(small(make_config, data))
    assert victim.read_text() == "do not touch" and link.is_symlink()


# silent wrong results --------------------------------------------------------------------------
def test_a_manifest_pointing_outside_the_output_is_not_trusted(make_config, data, tmp_path):
    out = tmp_path / "out"
    run(small(make_config, data))
    manifest = json.loads((out / "manifest.json").read_text())
    pieces = manifest["stages"]["join"]["pieces"]
    elsewhere = tmp_path / "elsewhere.parquet"
    (out / "neighbors" / "part-00003.parquet").rename(elsewhere)
    pieces["3"] = [[str(elsewhere), elsewhere.stat().st_size, pieces["3"][0][2]]]
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "_SUCCESS").unlink()
    run(small(make_config, data))
    assert query_ids(out) == list(range(ROWS))
    assert (out / "_SUCCESS").exists()


def test_a_bit_flipped_part_of_the_same_size_is_redone(make_config, data, tmp_path):
    out = tmp_path / "out"
    run(small(make_config, data))
    part = out / "neighbors" / "part-00001.parquet"
    good = part.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0xFF
    part.write_bytes(bytes(raw))
    (out / "_SUCCESS").unlink()
    run(small(make_config, data))
    assert part.read_bytes() == good  # the same input and settings give the same bytes
    assert query_ids(out) == list(range(ROWS))


# the ledger itself -----------------------------------------------------------------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.dictionaries(st.sampled_from(["a", "b/c", "b/d", "e/f/g"]), st.binary(max_size=64), min_size=1),
    user=st.dictionaries(st.sampled_from(["a", "b/c", "x", "b/y", "e/f/z"]), st.binary(max_size=64)),
)
def test_only_recorded_files_are_removed_whatever_the_user_adds_or_changes(tmp_path_factory, files, user):
    from pipeline.io.atomic import atomic_path

    root = tmp_path_factory.mktemp("run")
    (root / LOCK_NAME).write_text("")
    for rel, content in files.items():
        with atomic_path(root / rel) as tmp:
            tmp.write_bytes(content)
    changed = set()
    for rel, content in user.items():  # the user adds files, or rewrites some of the tool's
        p = root / rel
        if p.exists() and p.read_bytes() == content:
            continue
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content)
        os.utime(p, ns=(1, 1))  # a time the tool never wrote: only the CRC can vouch for it
        changed.add(rel)
    assert sorted(foreign(root)) == sorted(changed)
    before = tree(root)
    if changed:
        with pytest.raises(ResumeError, match="holds files this tool did not write"):
            remove_owned(root)
        assert tree(root) == before
        discard(root / "b") if (root / "b").is_dir() else None
        assert all((root / rel).read_bytes() == user[rel] for rel in changed)
    else:
        remove_owned(root)
        assert sorted(os.listdir(root)) == sorted([LOCK_NAME, LEDGER_NAME])
    assert Ledger.of(root).root == root


def test_a_dotted_vector_column_name_sizes_pieces_by_its_real_dimension(tmp_path):
    import numpy as np
    import pyarrow as pa

    from pipeline.io.parquet import plan_dataset

    x = clustered_vectors(3000, 32, seed=1)
    table = pa.table(
        {
            "id": pa.array(np.arange(3000)),
            "meta": pa.array([{"a": 1, "b": [1.0, 2.0]}] * 3000),
            "emb.v": pa.array(list(x), type=pa.list_(pa.float32())),
        }
    )
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "a.parquet", row_group_size=100)
    dataset = plan_dataset([str(tmp_path / "d")], "id", "emb.v", 100 * 32 * 4)
    assert len(dataset.pieces) == 30  # one row group each: 100 rows of 32 float32s fill a piece


@pytest.mark.parametrize(
    "flags", [["--rows", "0"], ["--dim", "0"], ["--shards", "0"], ["--rows", "2", "--shards", "3"], ["--rows", "-5"]]
)
def test_sample_data_refuses_sizes_that_make_no_dataset(tmp_path, capsys, flags):
    from pipeline.cli import main

    assert main(["sample-data", str(tmp_path / "s"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sample-data: --" in err[0]
    assert not (tmp_path / "s").exists()


# determinism -----------------------------------------------------------------------------------
def test_three_runs_of_one_job_write_identical_tables_and_plans(make_config, tmp_path):
    data = tmp_path / "big"
    write_shards(data, clustered_vectors(6000, 24, clusters=30, seed=9), shards=3, row_group_rows=500)
    tables, plans = [], []
    for i in range(3):
        out = tmp_path / f"out{i}"
        run(
            make_config(
                input=str(data), output=str(out), k=5, index_key="IVF32,PQ6", target_recall=0.9, exclude_self=True
            )
        )
        tables.append({p.name: p.read_bytes() for p in sorted((out / "neighbors").glob("*.parquet"))})
        report = json.loads((out / "report.json").read_text())
        recall = report["recall"]
        plans.append(
            (
                recall["nprobe"],
                recall["rerank"],
                recall["strategy"],
                recall["recall"],
                [(p["nprobe"], p["rerank"], p["recall"], p["cost"]) for p in recall["curve"]],
            )
        )
    assert tables[0] == tables[1] == tables[2]
    assert plans[0] == plans[1] == plans[2]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 64), st.sampled_from([0, 2, 4, 8]), st.floats(0.5, 1.0), st.floats(1e-4, 10.0)),
        min_size=1,
        max_size=12,
        unique_by=lambda t: t[:2],
    ),
    st.floats(0.5, 1.0),
)
def test_the_choice_of_setting_ignores_timings(points, target):
    from pipeline.search.tuning import TunePoint, choose, query_cost

    def make(seconds: list[float]) -> list[TunePoint]:
        return [
            TunePoint(
                n,
                r,
                rec,
                rec,
                0.0,
                s,
                100,
                cost=query_cost(None, ntotal=0, dim=0, k=10, nprobe=n, rerank=r) + n * 1000.0 + r * 10.0,
            )
            for (n, r, rec, _), s in zip(points, seconds)
        ]

    a = choose(make([p[3] for p in points]), target)
    b = choose(make([p[3] for p in reversed(points)]), target)
    assert (a.nprobe, a.rerank) == (b.nprobe, b.rerank)


# security --------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2])
def test_the_embedded_cluster_listens_on_loopback_only(workers):
    from urllib.parse import urlsplit

    from pipeline.cluster.clients import dask_client
    from pipeline.config import ClusterSpec

    with dask_client(ClusterSpec(workers=workers, threads_per_worker=1)) as (client, info):
        addresses = [client.scheduler_info()["address"], *client.scheduler_info()["workers"]]
        assert all(a.startswith(("inproc://", "tcp://127.0.0.1:")) for a in addresses), addresses
        assert urlsplit(info.dashboard).hostname == "127.0.0.1"


@pytest.mark.parametrize("key", ["input", "output", "index_dir", "scratch_dir"])
def test_credentials_in_a_url_are_refused_and_never_shown(key, tmp_path):
    from pipeline import ConfigError, parse_config

    values = {"input": str(tmp_path), "output": str(tmp_path / "o"), key: "s3://AKIAXYZ:s3cr3t@bucket/data"}
    with pytest.raises(ConfigError, match="credentials") as err:
        parse_config(values)
    assert "s3cr3t" not in str(err.value) and "AKIAXYZ" not in str(err.value)


def test_a_planted_staging_folder_is_refused(tmp_path, monkeypatch):
    import tempfile

    from pipeline import ConfigError
    from pipeline.io.staging import scratch_for

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    elsewhere = tmp_path / "attacker"
    elsewhere.mkdir()
    (tmp_path / f"knn-pipeline-{os.getuid()}").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="not a private directory of this user"):
        scratch_for("s3://bucket/out", None)
    (tmp_path / f"knn-pipeline-{os.getuid()}").unlink()
    root = scratch_for("s3://bucket/out", None).parent
    assert root.stat().st_mode & 0o777 == 0o700
    root.chmod(0o777)
    with pytest.raises(ConfigError, match="not a private directory"):
        scratch_for("s3://bucket/out", None)


# tracebacks become one line --------------------------------------------------------------------
@pytest.mark.parametrize("key, said", [("IVF0,Flat", "0 lists"), ("IDMap,Flat", "IDMap"), ("IDMap2,HNSW32", "IDMap")])
def test_index_keys_the_planner_cannot_run_are_refused_while_parsing(key, said):
    from pipeline import ConfigError, parse_config

    with pytest.raises(ConfigError, match=f"index_key: .*{said}"):
        parse_config({"input": "x", "index_key": key})


def test_an_unreachable_scheduler_is_one_line(make_config, data):
    import dask

    from pipeline import ConfigError

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConfigError, match=r"--scheduler-address tcp://127\.0\.0\.1:9: no Dask scheduler answered"):
            run(small(make_config, data, scheduler_address="tcp://127.0.0.1:9"))


def test_garbage_in_index_faiss_is_one_line_naming_it(make_config, data, tmp_path):
    from pipeline import PipelineError, join

    run(make_config(input=str(data), k=3, index_key="IVF8,Flat"))
    (tmp_path / "out" / "index" / "index.faiss").write_bytes(b"garbage" * 100)
    with pytest.raises(PipelineError, match=r"index/index\.faiss: this index file is missing, truncated or changed"):
        join(make_config(input=str(data), index_dir=str(tmp_path / "out" / "index"), output=str(tmp_path / "j"), k=3))


def _many_pieces_run(tmp_path: Path, out: Path, key: str) -> list[str]:
    """test_resume's CLI run (12,000 x 32 rows in 120 one-row-group pieces: seconds, so a fault can
    land mid-stage) over data written here, with ``key`` as the index."""
    from tests.test_resume import DIM, GROUP, ROWS, command

    data = tmp_path / "data"
    write_shards(data, clustered_vectors(ROWS, DIM, clusters=30, seed=7), shards=4, row_group_rows=GROUP)
    return command(data, out, "--index-key", key)


@pytest.mark.slow
def test_the_output_removed_while_a_join_runs_ends_in_one_line(tmp_path):
    import shutil
    import subprocess
    import time

    out = tmp_path / "out"
    cmd = _many_pieces_run(tmp_path, out, "Flat")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, "the join ended before the output could go"
        try:
            if len(json.loads((out / "manifest.json").read_text())["stages"].get("join", {}).get("pieces", {})) >= 5:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    out.rename(tmp_path / "gone")  # gone at once (a plain rmtree races the job's own writes)
    shutil.rmtree(tmp_path / "gone", ignore_errors=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if "ERROR" in ln]) == 1, err


@pytest.mark.slow
def test_a_file_size_limit_hit_by_the_list_file_is_one_line_and_the_rerun_finishes(tmp_path):
    import resource
    import subprocess

    out = tmp_path / "out"
    cmd = _many_pieces_run(tmp_path, out, "IVF64,Flat")

    def limit() -> None:  # the partial indexes fit; the merged list file (1.6 MB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert failed.returncode == 2, failed.stderr
    errors = [ln for ln in failed.stderr.splitlines() if "ERROR" in ln]
    assert "Traceback" not in failed.stderr and len(errors) == 1 and "index.ivfdata: cannot be written" in errors[0]
    assert not (out / "index" / "index.ivfdata").exists()  # never a partial list file under the final name
    finished = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert query_ids(out) == list(range(12_000))


# hangs become bounded --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _DieTask:
    """A task record whose worker is killed on every attempt."""

    piece: object

    def run(self) -> int:
        os._exit(1)


@pytest.mark.slow
def test_a_task_whose_workers_keep_dying_names_its_piece_and_file(data):
    import dask

    from pipeline import PipelineError
    from pipeline.cluster.clients import dask_client
    from pipeline.config import ClusterSpec
    from pipeline.io.parquet import plan_dataset
    from pipeline.runtime.runner import run_tasks

    pieces = plan_dataset([str(data)], "id", "embedding", 150 * DIM * 4).pieces
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with pytest.raises(
            PipelineError,
            match=r"Dask workers died 2 times running join of piece 3 \(.*part-0000\d\."
            r"parquet \(rows \d+-\d+\)\), usually for memory",
        ):
            with dask_client(ClusterSpec(workers=2, threads_per_worker=1)) as (client, _):
                run_tasks(client, label="join", items=[pieces[3]], task=lambda p: _DieTask(piece=p))


def test_no_worker_left_ends_the_job_instead_of_waiting_forever():
    from pipeline.cluster.clients import _PauseWatchdog

    class Alone:
        futures: dict = {}
        cancelled: list = []

        def scheduler_info(self, n_workers: int = 0) -> dict:
            return {"workers": {}}

        def cancel(self, futures: list) -> None:
            self.cancelled.append(futures)

    dog = _PauseWatchdog(Alone(), interval=0.01, alone=0.05)
    dog.start()
    dog.join(timeout=5)
    assert not dog.is_alive() and dog.reason and "every Dask worker of the embedded cluster died" in dog.reason
    assert Alone.cancelled


def test_a_ledger_made_again_in_the_same_place_is_read_afresh(tmp_path):
    """A run directory removed and made again has a new ledger; one process that read the old one
    must not keep its lines, even once the new file grows past where it had read to."""
    import shutil

    from pipeline.io.atomic import atomic_path

    root = tmp_path / "run"

    def fill(names: list[str], content: bytes) -> None:
        root.mkdir(exist_ok=True)
        (root / LOCK_NAME).write_text("")
        for name in names:
            with atomic_path(root / name) as tmp:
                tmp.write_bytes(content)

    fill(["a"], b"old")
    assert Ledger.of(root).owns("a")
    shutil.rmtree(root)
    fill(["b", "c", "d"], b"new!")  # a longer ledger than the first
    (root / "a").write_bytes(b"old")  # the user's now: the old ledger's line must not vouch for it
    ledger = Ledger.of(root)
    assert not ledger.owns("a") and all(ledger.owns(n) for n in "bcd")


def test_a_temporary_file_left_by_a_kill_does_not_block_the_resume(tmp_path):
    """A run killed while writing (its timings, say) leaves a temporary file in the output before
    the output has a manifest: the rerun removes it and starts, instead of refusing the folder."""
    from pipeline.runtime.manifest import Manifest

    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".timings.json.tmp-0123abcd"
    stale.write_text("{")
    Manifest(out).open({"input": "x"}, overwrite=False, what="neighbour table", keep="index")
    assert not stale.exists() and (out / "manifest.json").exists()
