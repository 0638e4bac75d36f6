"""Safety: outputs never reach input or foreign files, one job per directory, damaged state repaired."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import ConfigError, PipelineError, ResumeError, build, join, parse_config, run
from pipeline.io.sample_data import clustered_vectors, write_shards
from pipeline.io.workdir import LOCK_NAME, locked

DIM = 16


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    write_shards(d, clustered_vectors(2000, DIM, clusters=8, seed=3), shards=4, row_group_rows=250)
    (d / "README.txt").write_text("the user's notes")
    return d


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def rows_of(out: Path) -> list:
    return sorted(pq.read_table(out / "neighbors").column("query_id").to_pylist())


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_output_overlapping_the_input_is_refused_before_anything_is_touched(make_config, data, tmp_path, where):
    before = snapshot(data)
    output = {"same": data, "inside": data / "out", "contains": tmp_path}[where]
    with pytest.raises(ConfigError, match=r"--output .* the input directory .*; write outputs to a directory outside"):
        run(make_config(input=str(data), output=str(output), overwrite=True, k=3))
    assert snapshot(data) == before
    assert not (data / "out").exists() and not (data / "manifest.json").exists()


def test_input_file_inside_the_index_dir_is_refused(make_config, data, tmp_path):
    with pytest.raises(ConfigError, match=r"input file .*part-00000\.parquet lies inside --index-dir"):
        build(make_config(input=str(data / "part-00000.parquet"), index_dir=str(data), overwrite=True))
    assert (data / "part-00000.parquet").exists()


@pytest.mark.parametrize(
    "index_dir, message",
    [
        ("out", "is the --output directory"),
        ("out/a/b", "lies deep inside --output"),
    ],
)
def test_index_dir_clashing_with_output_is_refused_up_front(make_config, data, tmp_path, index_dir, message):
    with pytest.raises(ConfigError, match=message):
        run(make_config(input=str(data), index_dir=str(tmp_path / index_dir), k=3))
    assert not (tmp_path / "out" / "manifest.json").exists()  # refused before any build


def test_overwrite_removes_only_what_the_tool_wrote(make_config, data, tmp_path):
    out = tmp_path / "out"
    run(make_config(input=str(data), k=3, index_key="Flat"))
    (out / "logs").mkdir()
    (out / "logs" / "driver-1.log").write_text("batch log")
    run(make_config(input=str(data), k=4, index_key="Flat", overwrite=True))
    assert (out / "logs" / "driver-1.log").read_text() == "batch log"
    assert len(pq.read_table(out / "neighbors").column("neighbor_id")[0]) == 4
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError, match=r"holds files this tool did not write \(notes\.txt\)"):
        run(make_config(input=str(data), k=5, index_key="Flat", overwrite=True))
    assert (out / "notes.txt").read_text() == "mine" and (out / "neighbors").is_dir()


def test_copied_output_missing_a_part_redoes_it(make_config, data, tmp_path):
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    run(make_config(input=str(data), output=str(o1), k=3, index_key="Flat", partition_size=250 * DIM * 4))
    shutil.copytree(o1, o2)
    (o2 / "neighbors" / "part-00001.parquet").unlink()
    run(make_config(input=str(data), output=str(o2), k=3, index_key="Flat", partition_size=250 * DIM * 4))
    assert rows_of(o2) == list(range(2000))
    recorded = json.loads((o2 / "manifest.json").read_text())["stages"]["join"]["pieces"]
    assert all(not os.path.isabs(path) for files in recorded.values() for path, *_ in files)


@pytest.mark.parametrize("content", [b"", b'{"version": 1, "identity": {"comm'])
def test_damaged_manifest_is_named_and_overwrite_recovers(make_config, data, tmp_path, content):
    out = tmp_path / "out"
    run(make_config(input=str(data), k=3, index_key="Flat"))
    (out / "manifest.json").write_bytes(content)
    with pytest.raises(ResumeError, match=r"out/manifest\.json: damaged manifest .*pass --overwrite"):
        run(make_config(input=str(data), k=3, index_key="Flat"))
    run(make_config(input=str(data), k=3, index_key="Flat", overwrite=True))
    assert rows_of(out) == list(range(2000))


def test_damaged_index_manifest_on_join_names_the_file(make_config, data, tmp_path):
    run(make_config(input=str(data), k=3, index_key="Flat"))
    (tmp_path / "out" / "index" / "manifest.json").write_text("{")
    with pytest.raises(ResumeError, match=r"index/manifest\.json: damaged manifest .*build --index-dir"):
        join(make_config(input=str(data), index_dir=str(tmp_path / "out" / "index"), output=str(tmp_path / "j")))


def test_a_second_job_on_a_locked_directory_is_refused(make_config, data, tmp_path):
    out = tmp_path / "out"
    with locked(out):
        with pytest.raises(ResumeError, match=rf"out is in use by another job \(pid {os.getpid()} on "):
            run(make_config(input=str(data), k=3))
    # the holder is gone (its lock file stays, naming a finished job): the next run proceeds
    run(make_config(input=str(data), k=3, index_key="Flat"))
    assert (out / LOCK_NAME).exists() and rows_of(out) == list(range(2000))


@pytest.mark.slow
def test_two_concurrent_runs_one_is_refused_in_one_line(data, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        str(data),
        "--output",
        str(out),
        "--k",
        "3",
        "--index-key",
        "Flat",
        "--workers",
        "1",
    ]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / LOCK_NAME).exists() or f'"pid": {first.pid}' not in (out / LOCK_NAME).read_text():
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)  # the first job holds the lock until the second has tried
    try:
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"in use by another job (pid {first.pid} on" in errors[0]
    assert "Traceback" not in second.stderr
    assert rows_of(out) == list(range(2000))


def test_deleted_or_truncated_index_files_are_rebuilt(make_config, data, tmp_path):
    out = tmp_path / "out"
    config = make_config(input=str(data), k=3, index_key="IVF8,Flat", nprobe=8, rerank=0, partition_size=250 * DIM * 4)
    run(config)
    clean = pq.read_table(out / "neighbors").sort_by("query_id")
    (out / "index" / "index.faiss").unlink()
    store = out / "index" / "store" / "vectors" / "part-00002.npy"
    store.write_bytes(store.read_bytes()[:100])
    (out / "index" / "parts" / "part-00001.faiss").unlink()
    (out / "neighbors" / "part-00003.parquet").unlink()
    run(config)
    assert pq.read_table(out / "neighbors").sort_by("query_id").equals(clean)


@pytest.mark.parametrize("key, damaged", [("IVF8,Flat", "index.faiss"), ("Flat", "store/vectors/part-00000.npy")])
def test_join_against_a_damaged_index_says_what_to_do(make_config, data, tmp_path, key, damaged):
    run(make_config(input=str(data), k=3, index_key=key, **({"nprobe": 8} if key != "Flat" else {})))
    (tmp_path / "out" / "index" / damaged).write_bytes(b"")
    with pytest.raises(PipelineError, match=r"missing, truncated or changed; run `build` again with the same --input"):
        join(make_config(input=str(data), index_dir=str(tmp_path / "out" / "index"), output=str(tmp_path / "j")))


def test_memory_limit_below_the_minimum_is_refused_with_the_minimum(data, tmp_path):
    config = parse_config({"input": str(data), "output": str(tmp_path / "out"), "memory_limit": "200MiB"})
    with pytest.raises(ConfigError, match=r"--memory-limit 200\.00 MiB per worker cannot work: .* give at least "):
        run(config)


@pytest.mark.slow
def test_a_worker_paused_for_memory_fails_the_job_in_one_line(data, tmp_path, monkeypatch):
    import dask
    from distributed import LocalCluster

    import pipeline.cluster.clients

    monkeypatch.setattr(pipeline.cluster.clients, "PAUSE_GRACE_S", 1.0)
    with dask.config.set({"distributed.worker.memory.pause": 0.001}):  # paused from the start
        cluster = LocalCluster(
            n_workers=1, processes=False, memory_limit="4GiB", dashboard_address=":0", silence_logs=logging.ERROR
        )
    with cluster:
        config = parse_config(
            {"input": str(data), "output": str(tmp_path / "out"), "scheduler_address": cluster.scheduler_address}
        )
        started = time.monotonic()
        with pytest.raises(PipelineError, match=r"Dask worker .* is paused for memory: .*raise --memory-limit"):
            run(config)
        assert time.monotonic() - started < 60


def _die() -> None:
    os._exit(1)  # what a worker killed for memory looks like from the scheduler


@pytest.mark.slow
def test_a_worker_that_keeps_dying_fails_the_job_in_one_line():
    import dask

    from pipeline.cluster.clients import dask_client
    from pipeline.config import ClusterSpec

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with pytest.raises(
            PipelineError,
            match=r"Dask workers died running task '_die' \(1 attempt\(s\)\), usually for memory.*raise --memory-limit",
        ):
            with dask_client(ClusterSpec(workers=2, threads_per_worker=1)) as (client, _):
                client.submit(_die, pure=False).result()
