"""Batch submission: one driver job on Slurm or PBS that runs a pipeline command, which then asks
for its worker jobs through dask-jobqueue (the profile's ``jobs`` or adaptive bounds).

The driver gets the resolved configuration as a file (absolute paths) and runs the same command a
user would run by hand, so a driver that hits its walltime leaves a run that the next submission
resumes from the manifests. Scripts are built from checked values (see ``config.JobQueueSpec``)
with shell quoting, and submitted with an argument list, never through a shell.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from dask.utils import parse_bytes

from pipeline.cluster.clients import job_python, jobqueue_options
from pipeline.config import Config, JobQueueSpec, dump_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.staging import scratch_for
from pipeline.io.storage import is_remote
from pipeline.runtime.manifest import LOG_DIR

__all__ = ["JOBS", "Submission", "prepare", "submit"]

log = logging.getLogger(__name__)

JOBS = ("run", "build", "join", "dedup", "graph", "evaluate")


@dataclass(frozen=True)
class Submission:
    job: str
    kind: str  # slurm | pbs
    script: str  # the driver job script
    script_path: Path
    config_path: Path
    worker_script: str  # what each worker job the driver asks for looks like
    log_dir: Path
    argv: tuple[str, ...]  # the submit command


def _plain_path(p: Path, what: str) -> str:
    s = str(p)
    if any(c in s for c in "\n\r\0") or " " in s:
        raise ConfigError(
            f"{what} {s!r}: batch directives cannot hold spaces or line breaks in paths; choose a path without them"
        )
    return s


def _megabytes(memory: str) -> int:
    return max(1, parse_bytes(memory) // 2**20)


def _header(jq: JobQueueSpec, job: str, log_dir: Path) -> list[str]:
    logs = _plain_path(log_dir, "output")
    if jq.kind == "slurm":
        lines = [
            f"#SBATCH --job-name=knn-{job}",
            f"#SBATCH --output={logs}/driver-%j.log",
            f"#SBATCH --time={jq.walltime}",
            "#SBATCH --ntasks=1",
            "#SBATCH --cpus-per-task=1",
            f"#SBATCH --mem={_megabytes(jq.driver_memory)}M",
        ]
        lines += [f"#SBATCH --partition={jq.queue}"] if jq.queue else []
        lines += [f"#SBATCH --account={jq.account}"] if jq.account else []
        return lines + [f"#SBATCH {d}" for d in jq.directives]
    lines = [
        f"#PBS -N knn-{job}",
        f"#PBS -o {logs}/driver.log",
        "#PBS -j oe",
        f"#PBS -l walltime={jq.walltime}",
        f"#PBS -l select=1:ncpus=1:mem={_megabytes(jq.driver_memory)}mb",
    ]
    lines += [f"#PBS -q {jq.queue}"] if jq.queue else []
    lines += [f"#PBS -A {jq.account}"] if jq.account else []
    return lines + [f"#PBS {d}" for d in jq.directives]


def _absolute(config: Config) -> Config:
    """The config with every path made absolute (the driver may start in another directory)."""

    def absolute(p: str) -> str:
        return p if re.match(r"^[a-z][a-z0-9+.-]*://", p) else str(Path(p).expanduser().resolve())

    data = replace(config.data, paths=tuple(absolute(p) for p in config.data.paths))
    return replace(
        config,
        data=data,
        output=absolute(config.output) if config.output else None,
        index_dir=absolute(config.index_dir) if config.index_dir else None,
        scratch_dir=absolute(config.scratch_dir) if config.scratch_dir else None,
    )


def prepare(job: str, config: Config) -> Submission:
    """The driver script (and the worker job script it leads to) for ``job`` under ``config``'s profile."""
    if job not in JOBS:
        raise ConfigError(f"submit: unknown job {job!r}; choose one of {', '.join(JOBS)}")
    jq = config.cluster.jobqueue
    if jq is None:
        raise ConfigError(
            f"submit needs a slurm or pbs profile (got profile {config.cluster.profile!r}, "
            f"kind {config.cluster.kind}); pass --profile slurm or define one under profiles:"
        )
    if not config.output:
        raise ConfigError("submit: --output is required (logs, the driver script and results go there)")
    config = _absolute(config)
    if is_remote(str(config.output)):
        if not config.scratch_dir:
            raise ConfigError(
                "submit with --output on object storage: give --scratch-dir on a filesystem the "
                "cluster's nodes share (the job stages its output there; scripts and logs go there too)"
            )
        log_dir = scratch_for(str(config.output), config.scratch_dir) / LOG_DIR
    else:
        log_dir = Path(str(config.output)) / LOG_DIR
    config_path = log_dir / f"submit-{job}.yaml"
    script_path = log_dir / f"submit-{job}.sh"
    python = job_python(jq)
    body = [
        "set -euo pipefail",
        *jq.setup,
        f"cd {shlex.quote(str(Path.cwd()))}",
        f"exec {shlex.quote(python)} -m pipeline {job} --config {shlex.quote(str(config_path))}",
    ]
    script = "\n".join(["#!/usr/bin/env bash", *_header(jq, job, log_dir), "", *body]) + "\n"
    worker = _worker_script(jq, log_dir)
    argv = ("sbatch", "--parsable", str(script_path)) if jq.kind == "slurm" else ("qsub", str(script_path))
    return Submission(job, jq.kind, script, script_path, config_path, worker, log_dir, argv)


def _worker_script(jq: JobQueueSpec, log_dir: Path) -> str:
    try:
        from dask_jobqueue.pbs import PBSJob
        from dask_jobqueue.slurm import SLURMJob
    except ImportError:
        return "(pip install 'knn-pipeline[cluster]' to see the worker job script: it needs dask-jobqueue)\n"
    cls = SLURMJob if jq.kind == "slurm" else PBSJob
    opts = jobqueue_options(jq)
    opts.pop("interface", None)
    with tempfile.TemporaryDirectory() as tmp:  # the job class creates its log folder: not the real one yet
        script = str(cls(scheduler="tcp://DRIVER-HOST:PORT", log_directory=tmp, **opts).job_script())
        return script.replace(tmp, str(log_dir))


def submit(sub: Submission, config: Config) -> str:
    """Write the driver's config and script, submit the script; return the job id."""
    with atomic_path(sub.config_path) as tmp:
        # storage_options go with the driver's config (they may hold credentials: readable by the user only)
        tmp.touch(mode=0o600)
        tmp.write_text(dump_config(_absolute(config), storage_options=True))
    with atomic_path(sub.script_path) as tmp:
        tmp.write_text(sub.script)
    try:
        proc = subprocess.run(list(sub.argv), capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise PipelineError(
            f"{sub.argv[0]} not found: run submit on a {sub.kind} login node (or use --dry-run to see the scripts)"
        ) from None
    if proc.returncode:
        raise PipelineError(
            f"{' '.join(sub.argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    job_id = proc.stdout.strip().split(";")[0]
    log.info("submitted driver job %s (%s, %s): logs in %s", job_id, sub.kind, sub.job, sub.log_dir)
    return job_id
