"""The same job on workers that share the driver's folders and on workers that share nothing.

A Dask scheduler and ``--workers`` workers on this machine, started twice: once plainly (they see
the driver's staging folder), once each in a mount namespace of its own with a private tmpfs over
the staging root (a machine of its own, as in ``tests/test_nodes.py``). Input and output are on S3
served by moto on loopback, so the figures are our overhead through the S3 API (uploads, fetches,
the extra requests), not a cloud's network. Prints wall time, recall, the bytes each machine moved
(fetched whole, read by range, uploaded: ``report.json``'s ``workers``) and what the driver's folder
holds, and checks that the two runs wrote the same output (``run``: the lists; ``dedup``: the pairs
and the groups; ``graph``: the edges).

    sudo python scripts/nodes_benchmark.py --rows 200000 --dim 64 [--workers 2] [--arg=--routed-join]
    sudo python scripts/nodes_benchmark.py --command dedup --arg=--threshold --arg=0.9
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from job_runs import moto_s3, sample_on_s3

ROOT = Path(__file__).resolve().parents[1]
MOVED = ("fetched", "ranged", "sent")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster(scratch: Path, workers: int, private: bool, env: dict[str, str]) -> tuple[str, list[Any]]:
    """A scheduler and ``workers`` one-thread workers; ``private``: each sees an empty tmpfs over ``scratch``."""
    port = _port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    procs = [subprocess.Popen([*scheduler, "--dashboard-address", "127.0.0.1:0"], **quiet)]  # type: ignore[call-overload]
    for w in range(workers):
        worker = f"{sys.executable} -m distributed.cli.dask_worker {address} --nthreads 1 --no-nanny --name w{w + 1}"
        if private:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
            cmd += [f"mount -t tmpfs none {scratch} && exec {worker}"]
        else:
            cmd = worker.split()
        procs.append(subprocess.Popen(cmd, **quiet))  # type: ignore[call-overload]
    from distributed import Client

    deadline = time.monotonic() + 90
    while True:
        try:
            with Client(address, timeout=5) as client:
                client.wait_for_workers(workers, timeout=30)
            return address, procs
        except (OSError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _lists(table: Any) -> dict[Any, list[Any]]:
    return dict(zip(table.column("query_id").to_pylist(), table.column("neighbor_id").to_pylist(), strict=True))


def _output(fs: Any, command: str, prefix: str) -> Any:
    """What the job wrote that both runs must agree on."""
    import numpy as np
    import pyarrow.parquet as pq

    if command == "run":
        return _lists(pq.read_table(f"{prefix}/neighbors", filesystem=fs))
    if command == "dedup":
        pairs = pq.read_table(f"{prefix}/pairs", filesystem=fs)
        groups = pq.read_table(f"{prefix}/groups", filesystem=fs).sort_by("id")
        return sorted(zip(pairs.column("id_a").to_pylist(), pairs.column("id_b").to_pylist(), strict=True)), groups
    with fs.open_input_stream(f"{prefix}/graph.npz") as fh:
        csr = np.load(io.BytesIO(fh.read()))
        return csr["indptr"].tolist(), csr["indices"].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--command", choices=("run", "dedup", "graph"), default="run")
    parser.add_argument("--arg", action="append", default=[], help="an extra flag for the job (repeatable)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("unshare"):
        sys.exit("needs root and unshare(1): each worker of the shared-nothing run gets a mount namespace")

    with moto_s3() as (fs, env), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sample_on_s3(fs, root / "data", "bench/data", rows=args.rows, dim=args.dim, shards=args.shards)
        results = {}
        for mode in ("shared", "shared-nothing"):
            scratch = root / f"scratch-{mode}"
            scratch.mkdir()
            address, procs = _cluster(scratch, args.workers, mode == "shared-nothing", env)
            try:
                job = [sys.executable, "-m", "pipeline", args.command, "--input", "s3://bench/data"]
                job += ["--output", f"s3://bench/{mode}", "--scheduler-address", address]
                job += ["--k", "10", "--exclude-self"] if args.command == "run" else []
                job += ["--scratch-dir", str(scratch), *args.arg]
                start = time.perf_counter()
                proc = subprocess.run(job, env=env, cwd=ROOT, capture_output=True, text=True)
                wall = time.perf_counter() - start
            finally:
                for p in procs:
                    p.kill()
                for p in procs:
                    p.wait()
            if proc.returncode:
                sys.exit(proc.stderr)
            report = json.loads(fs.open_input_stream(f"bench/{mode}/report.json").read())
            held = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
            results[mode] = _output(fs, args.command, f"bench/{mode}")
            recall, index = report["recall"], report["index"]
            moved = [
                f"{w['worker']} " + " / ".join(f"{(w.get('moved') or {}).get(k, 0) / 2**20:.1f}" for k in MOVED)
                for w in report.get("workers", [])
            ]
            found = report.get("dedup") or {}
            pairs = f", {found['pairs']:,} pairs, {found['rows_dropped']:,} rows dropped" if found else ""
            print(
                f"{mode:>15}: wall {wall:6.1f} s, {args.rows / wall:,.0f} rows/s, recall {recall['recall']} "
                f"({index.get('key')}, nprobe {recall.get('nprobe')}){pairs}, driver's folder {held / 2**20:.1f} MiB"
                + (f"\n{'':>17}MiB fetched / read by range / uploaded: {'; '.join(moved)}" if mode != "shared" else "")
            )
        same = results["shared"] == results["shared-nothing"]
        print(f"same output: {same}")


if __name__ == "__main__":
    main()
