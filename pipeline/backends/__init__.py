"""The device seam: one small interface, chosen once, that stages call without branching on it.

A backend trains, adds, searches and does the exact arithmetic around FAISS (re-ranking
candidates). :func:`select_backend` decides which one a job uses and says why.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from ..errors import DeviceError
from .cpu import CpuBackend

__all__ = ["Backend", "select_backend", "backend_named", "CpuBackend"]

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str

    def set_threads(self, n: int) -> None: ...

    def train(self, index: object, x: np.ndarray) -> None: ...

    def add(self, index: object, x: np.ndarray, ids: np.ndarray | None) -> None: ...

    def search(self, index: object, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def exact_scores(self, q: np.ndarray, candidates: np.ndarray, metric: str) -> np.ndarray: ...


def gpu_count() -> int:
    """GPUs visible to faiss (0 for a CPU-only build of faiss)."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def select_backend(device: str) -> Backend:
    """``cpu``, ``gpu`` or ``auto`` (GPU when this build has a GPU backend and faiss sees a GPU)."""
    n = gpu_count()
    if device == "gpu":
        if n == 0:
            raise DeviceError(
                "--device gpu: faiss reports no GPU (a CPU-only faiss build, or no visible CUDA device); "
                "install faiss-gpu (pip install '.[gpu]' or the conda environment.yml) or use --device cpu"
            )
        raise DeviceError(
            f"--device gpu: faiss sees {n} GPU(s) but this version has no GPU backend yet; use --device cpu"
        )
    if device == "auto":
        reason = "faiss reports no GPU" if n == 0 else f"faiss sees {n} GPU(s) but no GPU backend is built in"
        log.info("device: cpu (%s)", reason)
    return CpuBackend()


def backend_named(name: str) -> Backend:
    """The backend a driver chose, re-created by name inside a worker task."""
    if name == "cpu":
        return CpuBackend()
    raise DeviceError(f"unknown backend {name!r}")
