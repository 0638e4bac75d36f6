"""Object storage: run, dedup and graph from S3 to S3 against a real S3 API server on loopback
(moto's standalone server, as s3fs and dask test themselves), and a kill -9 mid-join on S3 that
resumes, on another machine's empty scratch folder, to the same output."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import ConfigError, ResumeError, dedup, graph, run
from pipeline.io.sample_data import clustered_vectors, write_shards
from tests.test_resume import kill_when, run_command

pytestmark = pytest.mark.slow  # whole jobs (in subprocesses, on S3 or under Slurm)

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a test dependency: pip install '.[test]'")
boto3 = pytest.importorskip("boto3")

BUCKET = "knn"
MANY, GROUP = 60_000, 500
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[dict[str, Any]]:
    """moto's S3 server on loopback with an empty ``bucket``: its pyarrow filesystem (``fs``), its
    ``storage_options`` (``options``) and the environment a job needs to reach it (``env``)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    options = {
        "endpoint_override": f"{host}:{port}",
        "scheme": "http",
        "access_key": "testing",
        "secret_key": "testing",
        "region": "us-east-1",
    }
    try:
        yield {
            "fs": pafs.S3FileSystem(**options),
            "options": options,
            "env": {**os.environ, **KEYS, "AWS_ENDPOINT_URL": endpoint},
        }
    finally:
        server.stop()


def upload_shards(fs: pafs.FileSystem, local: Path, prefix: str) -> None:
    """Copy the Parquet shards of folder ``local`` to ``prefix`` (``bucket/path``)."""
    for f in sorted(local.glob("*.parquet")):
        pafs.copy_files(str(f), f"{prefix}/{f.name}", destination_filesystem=fs)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A loopback S3 server with ``s3://knn/data`` (4,000 x 16 clustered vectors, 4 shards) and,
    for the kill test, ``s3://knn/many`` (60,000 x 64 in 120 one-row-group pieces: an exact join
    of several seconds, so the remote shows it part done)."""
    with moto_s3(BUCKET) as server:
        local = tmp_path_factory.mktemp("s3data")
        write_shards(local / "data", clustered_vectors(4000, 16, clusters=20, seed=3), shards=4, row_group_rows=500)
        write_shards(local / "many", clustered_vectors(MANY, 64, clusters=30, seed=7), shards=4, row_group_rows=GROUP)
        for name in ("data", "many"):
            upload_shards(server["fs"], local / name, f"{BUCKET}/{name}")
        yield {**server, "local": local}


def objects(fs: pafs.FileSystem, prefix: str) -> dict[str, int]:
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path[len(BUCKET) + len(prefix) + 2 :]: i.size for i in infos if i.type == pafs.FileType.File}


def remote_table(fs: pafs.FileSystem, prefix: str) -> Any:
    return pq.read_table(f"{BUCKET}/{prefix}", filesystem=fs)


def lists(table: Any) -> dict[int, list[int]]:
    return dict(zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist(), strict=True))


def test_run_dedup_and_graph_from_s3_to_s3(make_config, s3, tmp_path):
    fs, options = s3["fs"], s3["options"]
    before = objects(fs, "data")
    common = {
        "input": f"s3://{BUCKET}/data",
        "storage_options": options,
        "scratch_dir": str(tmp_path / "scratch"),
        "metric": "cosine",
        "k": 5,
    }

    # run: the same neighbour lists as the same job on local files
    report = run(make_config(output=f"s3://{BUCKET}/run", exclude_self=True, **common))
    local = run(
        make_config(
            input=str(s3["local"] / "data"), output=str(tmp_path / "local"), exclude_self=True, metric="cosine", k=5
        )
    )
    assert report.recall.met
    remote = objects(fs, "run")
    assert "_SUCCESS" in remote and "manifest.json" in remote and "index/manifest.json" in remote
    # no temporary, lock or lease file is left there; the ledgers of the tool's own files are
    assert {Path(r).name for r in remote if Path(r).name.startswith(".")} == {".knn-pipeline.owned"}
    assert {"index/.knn-pipeline.owned", ".knn-pipeline.owned"} <= set(remote)
    assert lists(remote_table(fs, "run/neighbors")) == lists(pq.read_table(tmp_path / "local" / "neighbors"))
    assert local.queries == 4000

    # dedup: the deduplicated dataset lands beside the groups, mirroring the input objects
    report = dedup(make_config(output=f"s3://{BUCKET}/dedup", threshold=0.98, **common))
    remote = objects(fs, "dedup")
    assert {r for r in remote if r.startswith("deduplicated/")} == {
        f"deduplicated/part-{i:05d}.parquet" for i in range(4)
    }
    kept = remote_table(fs, "dedup/deduplicated")
    assert kept.num_rows == report.dedup.rows_kept < 4000
    groups = remote_table(fs, "dedup/groups")
    assert sorted(kept.column("id").to_pylist()) == sorted(
        groups.filter(groups.column("is_kept")).column("id").to_pylist()
    )

    # graph: the CSR file and the edge list
    report = graph(make_config(output=f"s3://{BUCKET}/graph", **common))
    remote = objects(fs, "graph")
    assert "graph.npz" in remote and any(r.startswith("edges/") for r in remote)
    assert report.graph.nodes == 4000

    # a rerun of a finished job on S3 is a no-op (its report stays), and the input never changed
    again = run(make_config(output=f"s3://{BUCKET}/run", exclude_self=True, **common))
    assert again.wall_s == json.loads(fs.open_input_stream(f"{BUCKET}/run/report.json").read())["wall_s"]
    assert objects(fs, "data") == before


def test_an_s3_output_inside_the_input_or_holding_foreign_objects_is_refused(make_config, s3, tmp_path):
    fs, options = s3["fs"], s3["options"]
    with pytest.raises(ConfigError, match="overlaps the input"):
        run(make_config(input=f"s3://{BUCKET}/data", output=f"s3://{BUCKET}/data/out", storage_options=options))
    with fs.open_output_stream(f"{BUCKET}/foreign/notes.txt") as f:
        f.write(b"the user's notes")
    with pytest.raises(ConfigError, match="notes.txt, which this tool did not write"):
        run(
            make_config(
                input=f"s3://{BUCKET}/data",
                output=f"s3://{BUCKET}/foreign",
                storage_options=options,
                scratch_dir=str(tmp_path / "scratch"),
            )
        )
    assert objects(fs, "foreign") == {"notes.txt": 16}


def _remote_join_pieces(fs: pafs.FileSystem, prefix: str) -> int:
    try:
        manifest = json.loads(fs.open_input_stream(f"{BUCKET}/{prefix}/manifest.json").read())
    except (OSError, ValueError):
        return 0
    return len(manifest["stages"].get("join", {}).get("pieces", {}))


def test_kill_mid_join_on_s3_resumes_elsewhere_to_identical_output(s3, tmp_path):
    """kill -9 during the join, then resume from an empty scratch folder (another machine): the
    remote manifest's finished pieces are fetched, not searched again, and the result equals an
    uninterrupted local run's. IVF-Flat probing every list is exact and searches piece by piece
    (the exact plan's self-join scores pairs of pieces first, and its tables take too little time
    to be killed in)."""
    fs = s3["fs"]
    env = {**s3["env"], "KNN_PIPELINE_PUSH_SECONDS": "0.2"}

    def command(data: str, output: str, scratch: Path) -> list[str]:
        plan = ["--index-key", "IVF64,Flat", "--nprobe", "64", "--rerank", "0", "--partition-size", str(GROUP * 64 * 4)]
        cluster = ["--workers", "1", "--threads-per-worker", "1", "--scratch-dir", str(scratch)]
        return run_command(data, output, *plan, *cluster)

    kill_when(
        command(f"s3://{BUCKET}/many", f"s3://{BUCKET}/killed", tmp_path / "machine-a"),
        lambda: _remote_join_pieces(fs, "killed") >= 20,
        timeout=180,
        env=env,
    )
    done = _remote_join_pieces(fs, "killed")
    assert 20 <= done < 120 and "_SUCCESS" not in objects(fs, "killed")

    resumed = subprocess.run(
        command(f"s3://{BUCKET}/many", f"s3://{BUCKET}/killed", tmp_path / "machine-b"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "fetched into" in resumed.stderr
    joined = [int(n.replace(",", "")) for n in re.findall(r"join: ([\d,]+)/[\d,]+ rows \(100%\)", resumed.stderr)]
    assert joined and joined[-1] <= MANY - done * GROUP, resumed.stderr  # finished pieces not searched again
    remote = objects(fs, "killed")
    assert "_SUCCESS" in remote and len([r for r in remote if r.startswith("neighbors/")]) == 120

    clean = tmp_path / "clean"
    local = subprocess.run(
        command(str(s3["local"] / "many"), str(clean), tmp_path / "unused"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 0, local.stderr
    got, want = lists(remote_table(fs, "killed/neighbors")), lists(pq.read_table(clean / "neighbors"))
    assert len(got) == MANY and got == want
    assert np.all(np.diff(sorted(got)) == 1)  # every row once


def test_build_join_and_evaluate_with_the_index_on_s3(make_config, s3, tmp_path):
    """An index built to S3 is fetched for a join (another S3 prefix) and for evaluate; results
    name the URLs, never the scratch folders."""
    from pipeline.jobs.commands import build, evaluate, join

    fs, options = s3["fs"], s3["options"]
    common = {"storage_options": options, "scratch_dir": str(tmp_path / "scratch"), "k": 5}
    build(
        make_config(input=f"s3://{BUCKET}/data", index_dir=f"s3://{BUCKET}/idx", output=None, metric="cosine", **common)
    )
    assert "manifest.json" in objects(fs, "idx") and "store/vectors/part-00000.npy" in objects(fs, "idx")
    joined = join(
        make_config(
            input=f"s3://{BUCKET}/data", index_dir=f"s3://{BUCKET}/idx", output=f"s3://{BUCKET}/joined", **common
        )
    )
    assert joined.queries == 4000 and "_SUCCESS" in objects(fs, "joined")
    summary = evaluate(make_config(index_dir=f"s3://{BUCKET}/idx", output=f"s3://{BUCKET}/joined", **common))
    assert summary.to_json()["table"] == f"s3://{BUCKET}/joined/neighbors"
    assert summary.to_json()["tie_aware_recall@5"] >= 0.9
    assert not any(r.startswith(("index/", "store/")) for r in objects(fs, "joined"))  # the index stayed put


def test_a_remote_key_leaving_its_prefix_is_refused_and_nothing_escapes(make_config, s3, tmp_path):
    """A key like ``neighbors/../../../escape.txt`` must never be pulled outside the scratch folder."""
    client = boto3.client(
        "s3",
        endpoint_url=s3["env"]["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.put_object(Bucket=BUCKET, Key="evil/neighbors/../../../escape.txt", Body=b"planted")
    scratch = tmp_path / "scratch"
    with pytest.raises(ConfigError, match=r"s3://knn/evil holds a key whose path leaves its prefix .*escape\.txt"):
        run(
            make_config(
                input=f"s3://{BUCKET}/data",
                output=f"s3://{BUCKET}/evil",
                storage_options=s3["options"],
                scratch_dir=str(scratch),
                k=3,
            )
        )
    assert not list(tmp_path.rglob("escape.txt"))


def _plant_lease(fs: Any, prefix: str, host: str, pid: int, expires: float) -> None:
    with fs.open_output_stream(f"{BUCKET}/{prefix}/.knn-pipeline.lease") as out:
        out.write(json.dumps({"token": "someone-else", "host": host, "pid": pid, "expires": expires}).encode())


def test_two_jobs_on_one_prefix_are_refused_and_a_lapsed_lease_is_taken(make_config, s3, tmp_path):
    """Another job's live lease refuses a second job (from any scratch folder) before any work;
    a lease that lapsed, or whose job died on this host, is taken over; the user's files stay."""
    import socket
    import time

    fs = s3["fs"]
    common = {"input": f"s3://{BUCKET}/data", "storage_options": s3["options"], "k": 3, "index_key": "Flat"}
    _plant_lease(fs, "leased", "node7", 4242, time.time() + 600)
    with pytest.raises(ResumeError, match=r"s3://knn/leased is in use by another job \(pid 4242 on node7"):
        run(make_config(output=f"s3://{BUCKET}/leased", scratch_dir=str(tmp_path / "a"), **common))
    assert set(objects(fs, "leased")) == {".knn-pipeline.lease"}  # nothing else was written
    _plant_lease(fs, "leased", "node7", 4242, time.time() - 1)  # lapsed: its job is gone
    run(make_config(output=f"s3://{BUCKET}/leased", scratch_dir=str(tmp_path / "b"), **common))
    assert "_SUCCESS" in objects(fs, "leased") and ".knn-pipeline.lease" not in objects(fs, "leased")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _plant_lease(fs, "leased", socket.gethostname(), int(dead.stdout), time.time() + 600)  # killed here
    with fs.open_output_stream(f"{BUCKET}/leased/neighbors/my_notes.txt") as out:
        out.write(b"the user's")
    with pytest.raises(ResumeError, match=r"holds files this tool did not write \(neighbors/my_notes\.txt\)"):
        run(make_config(output=f"s3://{BUCKET}/leased", scratch_dir=str(tmp_path / "c"), overwrite=True, **common))
    assert "neighbors/my_notes.txt" in objects(fs, "leased") and "_SUCCESS" in objects(fs, "leased")


def _local_stages(scratch: Path) -> dict[str, Any]:
    """The stages of the manifest a job staging into ``scratch`` keeps there, as it saves them."""
    for manifest in scratch.glob("*/manifest.json"):
        try:
            return json.loads(manifest.read_text())["stages"]
        except (OSError, ValueError, KeyError):
            pass
    return {}


@pytest.mark.parametrize("job, stage", [("dedup", "dedup_map"), ("graph", "graph_map")])
def test_dedup_and_graph_killed_mid_stage_on_s3_resume_elsewhere(s3, tmp_path, job, stage):
    """kill -9 once the job's own stage has begun, then rerun from an empty scratch folder (another
    machine): it resumes from what reached S3 and finishes, with every row once."""
    fs = s3["fs"]
    env = {**s3["env"], "KNN_PIPELINE_PUSH_SECONDS": "0.1"}
    prefix = f"killed-{job}"

    def command(scratch: Path) -> list[str]:
        extra = ["--threshold", "0.98"] if job == "dedup" else []
        return [
            sys.executable,
            "-m",
            "pipeline",
            job,
            "--input",
            f"s3://{BUCKET}/many",
            "--output",
            f"s3://{BUCKET}/{prefix}",
            "--k",
            "5",
            "--index-key",
            "Flat",
            "--partition-size",
            str(10 * GROUP * 64 * 4),
            "--workers",
            "1",
            "--threads-per-worker",
            "1",
            "--scratch-dir",
            str(scratch),
            *extra,
        ]

    # the first machine's own manifest, not the object store's copy: an upload can lag the stage
    # long enough for a short job to finish first (a push every 0.1 s is a thread among busy ones)
    staged = tmp_path / "machine-a"
    kill_when(command(staged), lambda: stage in _local_stages(staged), timeout=240, env=env)
    assert "_SUCCESS" not in objects(fs, prefix)
    resumed = subprocess.run(command(tmp_path / "machine-b"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "_SUCCESS" in objects(fs, prefix)
