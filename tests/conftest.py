"""Shared fixtures: small seeded datasets written as Parquet, and one Dask cluster per session."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distributed import LocalCluster

from pipeline import parse_config
from pipeline.io.sample_data import clustered_vectors, write_shards

DIM = 32


def write_store(root: Path, x: np.ndarray, pieces: int = 3) -> Any:
    """A row store of ``x`` in ``pieces`` equal pieces under ``root`` (ids are the global rows)."""
    import pyarrow as pa

    from pipeline.io.store import RowStore

    bounds = np.linspace(0, len(x), pieces + 1).astype(int)
    store = RowStore(root, bounds[:-1], len(x))
    for p in range(pieces):
        store.write_piece(p, pa.array(np.arange(bounds[p], bounds[p + 1])), x[bounds[p] : bounds[p + 1]])
    return store


@contextlib.contextmanager
def private_workers(folder: Path, names: Sequence[str], env: dict[str, str] | None = None) -> Iterator[str]:
    """A Dask scheduler on loopback and one-thread workers ``names``, each in a mount namespace of
    its own with an empty tmpfs over ``folder`` (a machine that sees none of this one's files
    there); yields the scheduler's address once every worker has joined. Skips the test where
    root, unshare(1) or such a mount is missing."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to give a worker a filesystem view of its own")
    private = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
    if subprocess.run([*private, f"mount -t tmpfs none {folder}"], capture_output=True).returncode:
        pytest.skip("this machine does not let a mount namespace mount a tmpfs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    scheduler = [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port)]
    procs = [subprocess.Popen([*scheduler, "--dashboard-address", "127.0.0.1:0"], **quiet)]
    for name in names:
        worker = f"{sys.executable} -m distributed.cli.dask_worker {address} --nthreads 1 --no-nanny --name {name}"
        procs.append(subprocess.Popen([*private, f"mount -t tmpfs none {folder} && exec {worker}"], **quiet))
    try:
        from distributed import Client

        deadline = time.monotonic() + 90
        while True:  # the scheduler is up, and every worker has joined it
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(len(names), timeout=30)
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield address
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


# a test using these runs whole jobs on a Dask cluster: it belongs to the slow tier
WHOLE_JOB_FIXTURES = frozenset({"make_config", "dask_address"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Whole-job tests carry ``slow`` (``pytest -m "not slow"`` is the fast tier: units and
    properties); ``gpu`` tests skip without a GPU."""
    from pipeline.backends import gpu_count

    for item in items:
        if WHOLE_JOB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if gpu_count() == 0:
        skip = pytest.mark.skip(reason="no GPU visible to faiss (CPU-only faiss build or no CUDA device)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def dask_address() -> Any:
    """One local cluster for the whole session (jobs join it with scheduler_address)."""
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def vectors() -> np.ndarray:
    return clustered_vectors(6000, DIM, clusters=40, seed=1)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory, vectors: np.ndarray) -> Path:
    """6,000 clustered 32-d float32 vectors with int64 ids, in 3 shards of 2 row groups each."""
    d = tmp_path_factory.mktemp("data")
    write_shards(d, vectors, shards=3, row_group_rows=1000)
    return d


@pytest.fixture
def make_config(dask_address: str, tmp_path: Path) -> Callable[..., Any]:
    """A Config on the shared cluster, writing under this test's tmp_path; keys override."""

    def make(**values: Any) -> Any:
        base = {"output": str(tmp_path / "out"), "scheduler_address": dask_address, "threads_per_worker": 1}
        base.update(values)
        return parse_config(base)

    return make


def exact_neighbours(x: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine") -> np.ndarray:
    """Brute-force row numbers of the ``k`` nearest rows (NumPy, for checking the pipeline)."""
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    if metric == "l2":
        scores = -((queries**2).sum(1)[:, None] - 2 * queries @ x.T + (x**2).sum(1)[None, :])
    else:
        scores = queries @ x.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
