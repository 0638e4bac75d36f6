"""The self-join the benchmark scripts time: ``python -m pipeline run --k 10 --exclude-self`` on one
input, in a process of its own, and its ``report.json``; and S3 on loopback with generated data on
it. Imported by ``scale_benchmark.py``, ``plan_compare.py``, ``out_of_core.py``,
``storage_benchmark.py`` and ``nodes_benchmark.py`` (run as ``python scripts/NAME.py``, so this
folder is on the path)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def job_command(data: str, out: Path, extra: list[str]) -> list[str]:
    """The command line of the default self-join of ``data`` into ``out``, ``extra`` flags appended."""
    command = [sys.executable, "-m", "pipeline", "run", "--input", data, "--output", str(out)]
    return [*command, "--k", "10", "--exclude-self", *extra, "-q"]


def run_job(data: str, out: Path, extra: list[str]) -> tuple[float, dict[str, Any]]:
    """Run :func:`job_command` from the repository root; return its wall seconds and report."""
    start = time.perf_counter()
    subprocess.run(job_command(data, out, extra), check=True, cwd=ROOT)
    return time.perf_counter() - start, json.loads((out / "report.json").read_text())


@contextlib.contextmanager
def moto_s3(bucket: str = "bench") -> Iterator[tuple[Any, dict[str, str]]]:
    """moto's S3 server on loopback with an empty ``bucket``: its pyarrow filesystem, and the
    environment (credentials, endpoint) a job needs to reach it."""
    import boto3
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    keys = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    env = {**os.environ, **keys, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    fs = pafs.S3FileSystem(
        endpoint_override=f"{host}:{port}", scheme="http", access_key="bench", secret_key="bench", region="us-east-1"
    )
    try:
        yield fs, env
    finally:
        server.stop()


def sample_on_s3(fs: Any, data: Path, url_path: str, *, rows: int, dim: int, shards: int) -> None:
    """Generate ``rows`` x ``dim`` (``sample-data``) in ``data`` and copy its shards to ``url_path``."""
    import pyarrow.fs as pafs

    command = [sys.executable, "-m", "pipeline", "sample-data", str(data), "--rows", str(rows), "--dim", str(dim)]
    subprocess.run([*command, "--shards", str(shards), "-q"], check=True, cwd=ROOT)
    for f in sorted(data.glob("*.parquet")):
        pafs.copy_files(str(f), f"{url_path}/{f.name}", destination_filesystem=fs)
