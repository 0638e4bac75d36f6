"""A real single-node Slurm on localhost: ``submit run`` with a slurm profile equals a local run.

The fixture starts munged, slurmctld and slurmd (Debian's packages, which ``.ci/run`` installs
when it can) with a generated ``slurm.conf`` on free ports, and stops everything it started.
Where the packages or root are missing the test is skipped, with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import run

pytestmark = pytest.mark.slow  # whole jobs (in subprocesses, on S3 or under Slurm)

ROOT = Path(__file__).resolve().parent.parent
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 2048


def _munge_running() -> bool:
    return subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"no Slurm here ({', '.join(missing)} missing): install Debian's slurmctld slurmd slurm-client "
            "munge (.ci/run does when it runs as root with apt-get)"
        )
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    d = tmp_path_factory.mktemp("slurm")
    started_munge = not _munge_running()
    if started_munge:
        for p in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(p).mkdir(parents=True, exist_ok=True)
            shutil.chown(p, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=False)
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, check=False)
        time.sleep(0.5)
        if not _munge_running():
            pytest.skip("munged would not start (see /var/log/munge/munged.log)")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    node = "knnci"
    conf = d / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=knnci",
                f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"StateSaveLocation={d}/state",
                f"SlurmdSpoolDir={d}/spool",
                f"SlurmctldPidFile={d}/slurmctld.pid",
                f"SlurmdPidFile={d}/slurmd.pid",
                f"SlurmctldLogFile={d}/log/slurmctld.log",
                f"SlurmdLogFile={d}/log/slurmd.log",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "MpiDefault=none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={_memory_mb() - 512} "
                f"State=UNKNOWN",
                f"PartitionName=ci Nodes={node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    env = {**os.environ, "SLURM_CONF": str(conf)}
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True)
    subprocess.run(["slurmd", "-f", str(conf), "-N", node], env=env, check=True)
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                pytest.skip(
                    "slurmd did not register with slurmctld in 60 s: " + (d / "log" / "slurmd.log").read_text()[-500:]
                )
            time.sleep(0.5)
        yield env
    finally:
        for pidfile in ("slurmd.pid", "slurmctld.pid"):
            try:
                os.kill(int((d / pidfile).read_text().strip()), signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError):
                pass
        subprocess.run(["pkill", "-f", str(conf)], check=False)  # whatever did not write its pid file
        if started_munge:
            subprocess.run(["pkill", "-x", "munged"], check=False)


@pytest.mark.slurm
def test_self_join_through_a_slurm_profile_equals_a_local_run(slurm, make_config, dataset_dir, tmp_path):
    out = tmp_path / "slurm-out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "input": str(dataset_dir),
                "output": str(out),
                "k": 5,
                "exclude_self": True,
                "index_key": "Flat",
                "recall_queries": 0,
                "target_recall": "off",
                "profile": "ci",
                "profiles": {
                    "ci": {
                        "kind": "slurm",
                        "queue": "ci",
                        "cores": 1,
                        "memory": "1GiB",
                        "jobs": 1,
                        "walltime": "00:15:00",
                        "driver_memory": "1GiB",
                        "python": sys.executable,
                    }
                },
            }
        )
    )
    env = {**slurm, "PYTHONPATH": str(ROOT)}  # jobs inherit the environment (sbatch --export=ALL)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "submit", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.split("job ")[1].split(":")[0]
    assert (out / "logs" / "submit-run.sh").exists()
    deadline = time.monotonic() + 300
    while subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the driver job did not finish in 5 minutes"
        time.sleep(1)
    driver_log = (out / "logs" / f"driver-{job_id}.log").read_text()
    assert (out / "_SUCCESS").exists(), driver_log[-3000:]
    assert "slurm: asked for 1 worker job(s)" in driver_log
    assert list((out / "logs").glob("dask-worker-*.out")), "no worker job ran"
    run(
        make_config(
            input=str(dataset_dir),
            output=str(tmp_path / "local"),
            k=5,
            exclude_self=True,
            index_key="Flat",
            recall_queries=0,
            target_recall="off",
        )
    )

    def table(d: Path) -> dict:
        t = pq.read_table(d / "neighbors")
        return dict(zip(t.column("query_id").to_pylist(), t.column("neighbor_id").to_pylist()))

    assert table(out) == table(tmp_path / "local")


@pytest.mark.slurm
def test_driver_cancelled_mid_join_resumes_on_resubmit(slurm, tmp_path):
    """scancel the driver (as a walltime would) while it joins; submitting again completes the run
    with every row once, equal to a local run."""
    import json

    from pipeline import parse_config
    from pipeline.io.sample_data import clustered_vectors, write_shards

    data = tmp_path / "data"
    write_shards(data, clustered_vectors(8000, 16, clusters=20, seed=3), shards=2, row_group_rows=100)
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    settings = {
        "input": str(data),
        "output": str(out),
        "k": 5,
        "exclude_self": True,
        "index_key": "Flat",
        "recall_queries": 0,
        "target_recall": "off",
        "partition_size": 100 * 16 * 4,
    }
    cfg.write_text(
        yaml.safe_dump(
            {
                **settings,
                "profile": "ci",
                "profiles": {
                    "ci": {
                        "kind": "slurm",
                        "queue": "ci",
                        "cores": 1,
                        "memory": "1GiB",
                        "jobs": 1,
                        "walltime": "00:15:00",
                        "driver_memory": "1GiB",
                        "python": sys.executable,
                    }
                },
            }
        )
    )
    env = {**slurm, "PYTHONPATH": str(ROOT)}

    def submit() -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "submit", "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("job ")[1].split(":")[0]

    def joined() -> int:
        try:
            return len(json.loads((out / "manifest.json").read_text())["stages"]["join"]["pieces"])
        except (FileNotFoundError, KeyError, ValueError):
            return 0

    def wait_gone(job: str) -> None:
        deadline = time.monotonic() + 300
        while subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout.strip():
            assert time.monotonic() < deadline, f"job {job} did not end"
            time.sleep(0.5)

    first = submit()
    deadline = time.monotonic() + 300
    while joined() < 5:
        assert time.monotonic() < deadline and not (out / "_SUCCESS").exists(), "no chance to cancel mid-join"
        time.sleep(0.05)
    subprocess.run(["scancel", first], env=env, check=True)
    wait_gone(first)
    assert not (out / "_SUCCESS").exists() and 5 <= joined() < 80
    log = (out / "logs" / f"driver-{first}.log").read_text()
    assert "terminated (SIGTERM" in log, log[-2000:]
    second = submit()
    wait_gone(second)
    assert (out / "_SUCCESS").exists(), (out / "logs" / f"driver-{second}.log").read_text()[-3000:]
    local = tmp_path / "local"
    run(parse_config({**settings, "output": str(local), "threads_per_worker": 1, "workers": 1}))

    def table(d: Path) -> dict:
        t = pq.read_table(d / "neighbors")
        q = t.column("query_id").to_pylist()
        assert len(q) == len(set(q)) == 8000
        return dict(zip(q, t.column("neighbor_id").to_pylist()))

    assert table(out) == table(local)
