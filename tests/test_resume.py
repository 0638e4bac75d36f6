"""Crash and resume: kill -9 mid-fill and mid-join, then re-run; changed settings are refused."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import ResumeError, run
from pipeline.io.sample_data import clustered_vectors, write_shards

pytestmark = pytest.mark.slow  # whole jobs, most of them killed and resumed in subprocesses

ROWS, DIM, GROUP = 12_000, 32, 100  # 120 pieces of one 100-row group each


@pytest.fixture(scope="module")
def many_pieces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("many")
    write_shards(d, clustered_vectors(ROWS, DIM, clusters=30, seed=7), shards=4, row_group_rows=GROUP)
    return d


def run_command(data: str | Path, out: str | Path, *extra: str) -> list[str]:
    """``run --k 5 --exclude-self`` of ``data`` into ``out`` in a process of its own, ``extra`` appended."""
    job = [sys.executable, "-m", "pipeline", "run", "--input", str(data), "--output", str(out)]
    return [*job, "--k", "5", "--exclude-self", *extra]


def command(data: Path, out: Path, *extra: str) -> list[str]:
    return run_command(
        data,
        out,
        "--partition-size",
        str(GROUP * DIM * 4),
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
        *extra,
    )


def kill_when(cmd: list[str], ready, timeout: float = 120.0, env: dict[str, str] | None = None) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group once ``ready()``."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill the run"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def finish(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr


def neighbours(out: Path) -> dict:
    t = pq.read_table(out / "neighbors")
    q = t.column("query_id").to_pylist()
    assert len(q) == len(set(q)) == ROWS, "duplicate or missing query rows"
    return dict(zip(q, t.column("neighbor_id").to_pylist()))


def recorded(manifest: Path, stage: str) -> dict:
    return json.loads(manifest.read_text())["stages"].get(stage, {}).get("pieces", {})


def test_kill_mid_join_then_resume(many_pieces, tmp_path):
    out = tmp_path / "out"
    cmd = command(many_pieces, out, "--index-key", "Flat")
    parts = out / "neighbors"
    kill_when(cmd, lambda: len(recorded_safe(out / "manifest.json", "join")) >= 20)
    assert not (out / "_SUCCESS").exists()
    done = recorded(out / "manifest.json", "join")
    assert 20 <= len(done) < ROWS // GROUP
    before = {p: os.stat(out / p).st_mtime_ns for p, *_ in (files[0] for files in done.values())}
    log = finish(cmd)
    assert (out / "_SUCCESS").exists()
    # the report covers the whole job: the build phases ran only before the kill
    phases = json.loads((out / "report.json").read_text())["timings_s"]
    assert {"scan", "train", "fill", "join"} <= set(phases) and not (out / ".timings.json").exists()
    after = {p: os.stat(out / p).st_mtime_ns for p in before}
    assert before == after, "finished pieces were recomputed"
    assert re.search(rf"join: {ROWS - len(done) * GROUP:,}/{ROWS - len(done) * GROUP:,} rows", log)
    assert len(list(parts.glob("part-*.parquet"))) == ROWS // GROUP
    clean = tmp_path / "clean"
    finish(command(many_pieces, clean, "--index-key", "Flat"))
    assert neighbours(out) == neighbours(clean)


def test_kill_mid_fill_then_resume(many_pieces, tmp_path):
    out = tmp_path / "out"
    # IVF-Flat probing every list is exact, so the resumed output must equal a clean run's
    cmd = command(many_pieces, out, "--index-key", "IVF64,Flat", "--nprobe", "64", "--rerank", "0")
    kill_when(cmd, lambda: len(recorded_safe(out / "index" / "manifest.json", "fill")) >= 20)
    assert not (out / "index" / "index.faiss").exists()
    done = recorded(out / "index" / "manifest.json", "fill")
    log = finish(cmd)
    left = ROWS - len(done) * GROUP
    assert re.search(rf"fill: {left:,}/{left:,} rows", log), log
    assert "scan:" not in log  # the scan finished before the kill and is not repeated
    clean = tmp_path / "clean"
    finish(command(many_pieces, clean, "--index-key", "IVF64,Flat", "--nprobe", "64", "--rerank", "0"))
    assert neighbours(out) == neighbours(clean)


def recorded_safe(manifest: Path, stage: str) -> dict:
    try:
        return recorded(manifest, stage)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_rerun_of_finished_job_is_a_no_op(make_config, dataset_dir, tmp_path):
    config = make_config(input=str(dataset_dir), k=5, index_key="Flat")
    run(config)
    out = tmp_path / "out"
    part = next((out / "neighbors").glob("part-*.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in (part, out / "report.json", out / "report.md")}
    first = json.loads((out / "report.json").read_text())
    again = run(config)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # the report of the run that did the work stays
    assert again.to_json() == first and again.wall_s > 0.0 and (out / "_SUCCESS").exists()


def test_changed_settings_are_refused_then_overwritten(make_config, dataset_dir, tmp_path):
    run(make_config(input=str(dataset_dir), k=5, index_key="Flat"))
    with pytest.raises(
        ResumeError, match=r"neighbour table made from other input or settings \(k: 5 -> 3\); pass --overwrite"
    ):
        run(make_config(input=str(dataset_dir), k=3, index_key="Flat"))
    with pytest.raises(
        ResumeError, match=r"index made from other input or settings \(index_key: 'Flat' -> 'IVF16,Flat'\)"
    ):
        run(make_config(input=str(dataset_dir), k=5, index_key="IVF16,Flat"))
    report = run(make_config(input=str(dataset_dir), k=3, index_key="IVF16,Flat", overwrite=True))
    assert report.index.key == "IVF16,Flat"
    t = pq.read_table(tmp_path / "out" / "neighbors")
    assert len(t) == 6000 and all(len(n) == 3 for n in t.column("neighbor_id").to_pylist())


def test_changed_input_is_updated_not_refused(make_config, tmp_path, caplog):
    data = tmp_path / "d"
    x = clustered_vectors(300, DIM, clusters=3, seed=2)
    write_shards(data, x, shards=2)
    run(make_config(input=str(data), k=2))
    write_shards(data, x[::-1].copy(), shards=2)  # same names, new content
    with caplog.at_level("INFO", logger="pipeline"):
        updated = run(make_config(input=str(data), k=2))  # an update: both files rewritten
    assert "2 files rewritten (300 rows)" in caplog.text
    fresh = run(make_config(input=str(data), k=2, output=str(tmp_path / "fresh")))
    assert updated.join.queries == fresh.join.queries == 300


def test_non_empty_directory_without_manifest_is_refused(make_config, dataset_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(ResumeError, match=r"was not written by this tool \(it holds precious\.txt\)"):
        run(make_config(input=str(dataset_dir), k=2))
    with pytest.raises(
        ResumeError,
        match=r"was not written by this tool \(it holds precious\.txt\); --overwrite "
        r"removes only the tool's own outputs, so nothing there is changed",
    ):
        run(make_config(input=str(dataset_dir), k=2, overwrite=True))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path / "out")) == ["precious.txt"]  # refused before anything was made there


def test_stale_temp_files_are_cleared(make_config, dataset_dir, tmp_path):
    config = make_config(input=str(dataset_dir), k=2, index_key="Flat")
    run(config)
    stale = tmp_path / "out" / "neighbors" / "part-00000.parquet.tmp-deadbeef"
    stale.write_bytes(b"half a file")
    run(config)
    assert not stale.exists()


def test_kill_mid_dedup_then_resume(many_pieces, tmp_path):
    """kill -9 while groups are being chosen: the resumed run equals a clean one, with no duplicate rows."""

    def dedup_command(out: Path) -> list[str]:
        cmd = command(many_pieces, out, "--index-key", "Flat", "--threshold", "0.98")
        cmd[3] = "dedup"
        return cmd + ["--partition-size", str(4 * GROUP * DIM * 4)]  # 30 pieces and shuffle partitions

    out = tmp_path / "out"
    kill_when(dedup_command(out), lambda: len(recorded_safe(out / "manifest.json", "dedup_assign")) >= 3)
    assert not (out / "_SUCCESS").exists()
    log = finish(dedup_command(out))
    assert "join: 0/0 rows" in log  # the join finished before the kill and is not repeated
    clean = tmp_path / "clean"
    finish(dedup_command(clean))
    got, want = pq.read_table(out / "groups"), pq.read_table(clean / "groups")
    assert got.num_rows == ROWS and len(set(got.column("id").to_pylist())) == ROWS
    assert got.sort_by("id").equals(want.sort_by("id"))
    assert json.loads((out / "report.json").read_text())["dedup"]["rows_dropped"] > 0


def test_worker_killed_mid_join_costs_only_its_tasks(many_pieces, tmp_path):
    """SIGKILL one worker process while the join runs: its tasks are retried elsewhere and the
    output is complete, duplicate-free and equal to a clean run's."""
    import logging
    import threading

    from distributed import Client, LocalCluster

    from pipeline import parse_config

    def config(out: Path, address: str) -> object:
        return parse_config(
            {
                "input": str(many_pieces),
                "output": str(out),
                "k": 5,
                "exclude_self": True,
                "index_key": "Flat",
                "partition_size": GROUP * DIM * 4,
                "recall_queries": 0,
                "target_recall": "off",
                "scheduler_address": address,
                "threads_per_worker": 1,
            }
        )

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL
        ) as cluster,
        Client(cluster) as client,
    ):
        out = tmp_path / "out"
        result: dict = {}
        job = threading.Thread(target=lambda: result.setdefault("report", run(config(out, cluster.scheduler_address))))
        job.start()
        deadline = time.monotonic() + 120
        while len(recorded_safe(out / "manifest.json", "join")) < 10:
            assert job.is_alive() and time.monotonic() < deadline, "the join ended before a worker could be killed"
            time.sleep(0.01)
        victim = next(iter(client.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        job.join(timeout=300)
        assert "report" in result, "the job did not finish after losing a worker"
        assert victim not in client.run(os.getpid).values()  # the nanny started a new worker
    clean = tmp_path / "clean"
    finish(command(many_pieces, clean, "--index-key", "Flat"))
    assert neighbours(out) == neighbours(clean)
    assert not list((out / "neighbors").glob("part-*.tmp-*"))  # a half-written part is never visible


@pytest.fixture(scope="module")
def clean_ivfpq(many_pieces: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted IVF-PQ run (its plan tunes nprobe and the re-rank factor) to compare with."""
    out = tmp_path_factory.mktemp("clean") / "out"
    finish(command(many_pieces, out, "--index-key", "IVF32,PQ8"))
    return out


def _parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "neighbors").glob("*.parquet"))}


def _plan(out: Path) -> tuple:
    r = json.loads((out / "report.json").read_text())["recall"]
    return r["nprobe"], r["rerank"], r["strategy"], r["recall"], [(p["nprobe"], p["rerank"]) for p in r["curve"]]


def _stage_done(out: Path, where: str, stage: str):
    def ready() -> bool:
        path = out / where / "manifest.json"
        try:
            stages = json.loads(path.read_text())["stages"]
        except (OSError, ValueError):
            return False
        if stage == "join":  # part way through the join
            return len(stages.get("join", {}).get("pieces", {})) >= 30
        return stages.get(stage, {}).get("done") is not None

    return ready


@pytest.mark.parametrize(
    "where, stage", [("index", "scan"), ("index", "train"), ("index", "fill"), ("", "recall"), ("", "join")]
)
def test_killed_at_each_stage_and_resumed_gives_the_same_bytes_and_plan(
    many_pieces, clean_ivfpq, tmp_path, where, stage
):
    out = tmp_path / "out"
    cmd = command(many_pieces, out, "--index-key", "IVF32,PQ8")
    kill_when(cmd, _stage_done(out, where, stage))
    assert not (out / "_SUCCESS").exists()
    finish(cmd)
    assert _parts(out) == _parts(clean_ivfpq)
    assert _plan(out) == _plan(clean_ivfpq)


def test_ctrl_c_says_it_is_stopping_and_the_rerun_says_what_is_left(many_pieces, tmp_path):
    """Ctrl-C mid-join: a "stopping" line at once, exit status 130, finished pieces kept; the rerun
    says how many rows the earlier run did, and its last line times this run apart from both."""
    out = tmp_path / "out"
    cmd = command(many_pieces, out, "--index-key", "Flat")
    err = tmp_path / "stderr.txt"
    with open(err, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh)
        deadline = time.monotonic() + 120
        while len(recorded_safe(out / "manifest.json", "join")) < 20:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    text = err.read_text()
    assert "stopping: cancelling the running tasks and closing the cluster" in text
    assert "interrupted; run the same command again to resume" in text and "Traceback" not in text
    done = len(recorded(out / "manifest.json", "join"))
    log = finish(cmd)
    assert re.search(rf"join: resuming: {done * GROUP:,} of {ROWS:,} rows done by an earlier run", log)
    assert re.search(r"done in [\d.]+ s; [\d.]+ s with the earlier, interrupted run\(s\)", log)
