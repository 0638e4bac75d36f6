"""The device seam: one small interface, chosen once, that stages call without branching on it.

A backend trains, adds, searches and does the exact arithmetic around FAISS (re-ranking
candidates). :func:`select_backend` decides which one a job uses and says why.
"""

from __future__ import annotations

import logging
from typing import Protocol

import faiss
import numpy as np

from pipeline.backends.cpu import CpuBackend
from pipeline.backends.gpu import GpuBackend, gpu_runtime_problem
from pipeline.errors import DeviceError

__all__ = ["Backend", "select_backend", "backend_named", "gpu_count", "CpuBackend", "GpuBackend"]

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    search_rows: int  # queries per search call

    def set_threads(self, n: int) -> None: ...

    def train(self, index: faiss.Index, x: np.ndarray) -> None: ...

    def add(self, index: faiss.Index, x: np.ndarray, ids: np.ndarray | None) -> None: ...

    def search(
        self, index: faiss.Index, x: np.ndarray, k: int, params: faiss.SearchParameters | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def exact_scores(self, q: np.ndarray, candidates: np.ndarray, metric: str) -> np.ndarray: ...


def gpu_count() -> int:
    """GPUs visible to faiss (0 for a CPU-only build of faiss)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def select_backend(device: str) -> Backend:
    """``cpu``, ``gpu`` or ``auto`` (the GPU when faiss has GPU support and sees a GPU), saying why."""
    if device == "cpu":
        log.info("device: cpu (--device cpu)")
        return CpuBackend()
    problem = gpu_runtime_problem()
    if problem is None:
        log.info("device: gpu (faiss sees %d GPU(s))", gpu_count())
        return GpuBackend()
    if device == "gpu":
        raise DeviceError(f"--device gpu: {problem}; or use --device cpu")
    log.info("device: cpu (%s)", problem)
    return CpuBackend()


def backend_named(name: str) -> Backend:
    """The backend a driver chose, re-created by name inside a worker task."""
    if name == "cpu":
        return CpuBackend()
    if name == "gpu":
        return GpuBackend()
    raise DeviceError(f"unknown backend {name!r}")
