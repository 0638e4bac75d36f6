"""The Dask cluster a job runs on: an embedded LocalCluster, or an existing scheduler."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

from distributed import Client, LocalCluster

from .config import ClusterSpec

__all__ = ["ClusterInfo", "local_layout", "dask_client", "worker_memory"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusterInfo:
    workers: int
    faiss_threads: int | None  # per worker; None: leave FAISS's default (remote clusters)
    dashboard: str | None


def local_layout(spec: ClusterSpec, cpus: int | None = None) -> tuple[int, int]:
    """(worker processes, FAISS threads per worker) for the embedded cluster.

    Default: one worker per 4 cores (at least 1, at most 8), the cores shared out as FAISS
    threads. FAISS parallelises each batch search itself; a few processes overlap I/O with it.
    """
    cpus = cpus or os.cpu_count() or 1
    workers = spec.workers or max(1, min(8, cpus // 4))
    threads = spec.threads_per_worker or max(1, cpus // workers)
    return workers, threads


@contextlib.contextmanager
def dask_client(spec: ClusterSpec) -> Iterator[tuple[Client, ClusterInfo]]:
    """Start (and stop) the embedded cluster, or connect to ``spec.scheduler_address``."""
    if spec.scheduler_address:
        with Client(spec.scheduler_address) as client:
            n = len(client.scheduler_info().get("workers", {}))
            log.info("joined Dask scheduler %s (%d workers)", spec.scheduler_address, n)
            yield client, ClusterInfo(n, spec.threads_per_worker, client.dashboard_link)
        return
    workers, threads = local_layout(spec)
    # one worker gains nothing from its own process (FAISS and NumPy release the GIL) and would
    # cost a nanny and a second interpreter; several workers get a process each
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=workers > 1,
        memory_limit=spec.memory_limit,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        log.info(
            "local Dask cluster: %d worker(s) x %d FAISS thread(s); dashboard %s",
            workers, threads, cluster.dashboard_link,
        )
        yield client, ClusterInfo(workers, threads, cluster.dashboard_link)


def worker_memory(client: Any) -> int | None:
    """The smallest memory limit among the cluster's workers (bytes), if they have one."""
    limits = [w.get("memory_limit") for w in client.scheduler_info().get("workers", {}).values()]
    limits = [int(m) for m in limits if m]
    return min(limits) if limits else None
