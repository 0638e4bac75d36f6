"""The device belongs to the worker: a Dask worker plugin chooses each worker's backend where the
work runs, pins FAISS's threads, and lets one heavy task at a time use the device.

The driver never chooses a device for the workers and may have no GPU at all. ``--device`` is a
requirement checked on every worker: ``gpu`` needs one on each (else one line naming the
worker), ``cpu`` uses none, ``auto`` lets each worker use what it has, so a mixed cluster works.
Tasks ask their worker with :func:`worker_device`; no backend name or thread count travels in
task arguments.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

from distributed import WorkerPlugin, get_worker

from pipeline.backends import Backend, CpuBackend, GpuBackend, gpu_count
from pipeline.backends.gpu import GpuContext, claim_gpu, gpu_runtime_problem
from pipeline.errors import DeviceError
from pipeline.results import WorkerDevice

__all__ = ["DevicePlugin", "WorkerDevice", "install_device", "worker_device", "PLUGIN_NAME"]

log = logging.getLogger(__name__)

PLUGIN_NAME = "knn-device"


def choose(device: str) -> tuple[str, str]:
    """(backend, reason) for this process under the ``--device`` requirement."""
    if device == "cpu":
        return "cpu", "--device cpu"
    problem = gpu_runtime_problem()
    if problem is None:
        return "gpu", f"faiss sees {gpu_count()} GPU(s)"
    return "cpu", problem


class DevicePlugin(WorkerPlugin):
    """Set up once per worker: its backend, FAISS threads and the lock that admits one heavy task.

    ``threads``: FAISS threads per worker; None gives FAISS the worker's Dask threads (on
    Slurm/PBS, ``cores / processes``): they share one device, so FAISS gets them all while a
    task holds it.
    """

    name = PLUGIN_NAME

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        self.device = device
        self.threads = threads
        self.backend: Backend = CpuBackend()
        self.info: WorkerDevice | None = None
        self.lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:  # sent to the workers: the settings, not the state
        return {"device": self.device, "threads": self.threads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def setup(self, worker: Any) -> None:
        name, reason = choose(self.device)
        # the worker's GPU state (its claim on the GPU, resources, clones, resident rows) lives in
        # this plugin's backend, for the worker's life
        self.backend = CpuBackend()
        if name == "gpu":
            device, claim = claim_gpu()
            self.backend = GpuBackend(context=GpuContext(device, claim=claim))
        threads = self.threads or max(1, int(getattr(worker.state, "nthreads", 1) or 1))
        self.backend.set_threads(threads)
        gpu = self.backend.describe() if isinstance(self.backend, GpuBackend) else ("", 0, 0)
        self.info = WorkerDevice(
            str(worker.name), socket.gethostname(), name, reason, threads, gpu_count() if name == "gpu" else 0, *gpu
        )


def _plugin() -> DevicePlugin | None:
    try:
        worker = get_worker()
    except ValueError:  # not inside a Dask task
        return None
    plugin = worker.plugins.get(PLUGIN_NAME)
    return plugin if isinstance(plugin, DevicePlugin) else None


_fallback = DevicePlugin("cpu")  # outside a worker (helpers called in the driver, unit tests)


@contextlib.contextmanager
def worker_device() -> Iterator[Backend]:
    """This worker's backend, held for the block: one heavy task at a time per device, with FAISS
    on the worker's cores (set in the calling thread: OpenMP keeps a count per thread, and the
    plugin was set up in another). Re-entrant, so a task's helpers may ask again."""
    plugin = _plugin() or _fallback
    with plugin.lock:
        if plugin.info is not None:  # set up on a worker
            plugin.backend.set_threads(plugin.info.faiss_threads)
        yield plugin.backend


def _describe(dask_worker: Any) -> dict[str, Any] | None:
    plugin = dask_worker.plugins.get(PLUGIN_NAME)
    info = getattr(plugin, "info", None)
    return None if info is None else {**info.__dict__}


def install_device(client: Any, device: str, threads: int | None) -> list[WorkerDevice]:
    """Set the device plugin up on every worker (and workers that join later); check ``device``.

    Returns what each worker runs on. ``--device gpu`` with a worker that has no usable GPU is
    refused in one line naming the worker and its reason.
    """
    client.register_plugin(DevicePlugin(device, threads), name=PLUGIN_NAME)
    described = client.run(_describe)
    devices = [WorkerDevice(**d) for d in described.values() if d is not None]
    missing = [d for d in devices if d.backend != "gpu"]
    if device == "gpu" and missing:
        d = missing[0]
        raise DeviceError(
            f"--device gpu: Dask worker {d.worker} on {d.host} has no usable GPU ({d.reason})"
            + (f", nor do {len(missing) - 1} other worker(s)" if len(missing) > 1 else "")
            + "; ask GPUs for the workers (profile gpus:) or use --device auto or cpu"
        )
    for kind in sorted({d.backend for d in devices}):
        group = [d for d in devices if d.backend == kind]
        log.info(
            "device: %d worker(s) on %s (%s), %d FAISS thread(s) each",
            len(group),
            kind,
            group[0].reason,
            group[0].faiss_threads,
        )
    return devices
