"""The Dask cluster a job runs on: an embedded LocalCluster, an existing scheduler, worker jobs on
Slurm or PBS (dask-jobqueue), or one worker per local GPU (dask-cuda)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask
from dask.utils import format_bytes
from distributed import Client, Future, KilledWorker, LocalCluster, NannyPlugin, WorkerPlugin

from pipeline.backends import gpu_count
from pipeline.backends.gpu import gpu_runtime_problem
from pipeline.backends.worker import WorkerDevice, install_device
from pipeline.config import ClusterSpec, JobQueueSpec
from pipeline.errors import DISK_ERROR_FIXES, ConfigError, PipelineError
from pipeline.io.workdir import LOCK_NAME, shown

__all__ = [
    "ClusterInfo",
    "local_layout",
    "dask_client",
    "worker_memory",
    "jobqueue_options",
    "check_memory_floor",
    "worker_names",
    "unseen_folders",
    "refuse_unseen",
    "NodeStaging",
    "Unseen",
]

log = logging.getLogger(__name__)

# the embedded cluster's scheduler, workers and dashboard listen on this machine only: the
# dashboard shows logs, task names, call stacks and paths, without authentication (to reach it
# from elsewhere, tunnel it with ssh -L, or start a scheduler of your own and pass its address)
LOOPBACK = "127.0.0.1"

NO_WORKERS_GRACE_S = 60.0  # the embedded cluster with no worker this long: its nannies gave up
PAUSE_GRACE_S = 10.0  # a worker paused for memory this long ends the job


@dataclass(frozen=True)
class ClusterInfo:
    workers: int
    faiss_threads: int | None  # per worker; None: the worker's Dask threads (remote clusters)
    dashboard: str | None
    devices: tuple[WorkerDevice, ...] = ()  # what each worker runs on, decided on the worker
    busy_since: float = 0.0  # when the task stream (busy time per worker) started recording
    moved_since: dict[str, dict[str, int]] | None = None  # staged per node: each worker's traffic at the start

    @property
    def backend(self) -> str:
        """``gpu`` when every worker runs on a GPU (the plan may assume GPU kernels), else ``cpu``."""
        return "gpu" if self.devices and all(d.backend == "gpu" for d in self.devices) else "cpu"

    @property
    def gpu_free(self) -> int:
        """The smallest free memory among the workers' GPUs at setup (bytes; 0 without GPUs or
        unknown): each worker holds a whole clone of the index, so the smallest decides."""
        free = [d.gpu_free_bytes for d in self.devices if d.backend == "gpu"]
        return min(free) if free else 0


def local_layout(spec: ClusterSpec, cpus: int | None = None, gpus: int = 0) -> tuple[int, int]:
    """(worker processes, FAISS threads per worker) for the embedded cluster.

    Default: one worker per 4 cores (at least 1, at most 8), the cores shared out as FAISS
    threads. FAISS parallelises each batch search itself; a few processes overlap I/O with it.
    On the GPU backend: one worker per GPU (each claims a free one: :func:`pipeline.backends.gpu.claim_gpu`).
    """
    cpus = cpus or os.cpu_count() or 1
    workers = spec.workers or (gpus if gpus else max(1, min(8, cpus // 4)))
    threads = spec.threads_per_worker or max(1, cpus // workers)
    return workers, threads


def job_python(jq: Any) -> str:
    """The interpreter a batch job runs: the profile's ``python``; else, where ``setup`` lines run
    first (they may activate another environment), ``python`` as found on the job's PATH after
    them; else this interpreter (the same environment on a shared filesystem)."""
    return str(jq.python or ("python" if jq.setup else sys.executable))


def jobqueue_options(jq: JobQueueSpec) -> dict[str, Any]:
    """dask-jobqueue keyword arguments for a worker job of profile ``jq``."""
    directives = list(jq.directives)
    if jq.gpus:
        directives.append(f"--gres=gpu:{jq.gpus}" if jq.kind == "slurm" else f"-l ngpus={jq.gpus}")
    opts: dict[str, Any] = {
        "queue": jq.queue,
        "account": jq.account,
        "walltime": jq.walltime,
        "cores": jq.cores,
        "memory": jq.memory,
        "processes": jq.processes,
        "job_extra_directives": directives,
        "job_script_prologue": list(jq.setup),
        "python": shlex.quote(job_python(jq)),
        "name": "knn-worker",
    }
    if jq.interface:
        opts["interface"] = jq.interface
    return opts


def _jobqueue_cluster(jq: JobQueueSpec, log_dir: str | None) -> Any:
    sigint = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(
            f"profile kind {jq.kind} needs dask-jobqueue: pip install 'knn-pipeline[cluster]' "
            "(or pip install dask-jobqueue)"
        ) from None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, sigint)  # importing dask_jobqueue makes Ctrl-C a bare sys.exit()
    cls = dask_jobqueue.SLURMCluster if jq.kind == "slurm" else dask_jobqueue.PBSCluster
    opts = jobqueue_options(jq)
    if log_dir:
        opts["log_directory"] = log_dir
    return cls(**opts, scheduler_options={"dashboard_address": ":0"})


@contextlib.contextmanager
def dask_client(spec: ClusterSpec, log_dir: str | None = None) -> Iterator[tuple[Client, ClusterInfo]]:
    """The job's cluster (see :func:`_start`), watched for memory trouble.

    A worker whose memory limit cannot even hold its imports is refused up front with the
    minimum that works (the stages check again once they know their piece size). A worker that Dask pauses for memory
    (it would wait forever: this job's tasks keep their memory) or that dies repeatedly (a nanny
    restarts a worker over 95% of its limit) ends the job with one line saying so. Workers and
    nannies judge a worker's private memory, not its mapped pages (:func:`judge_private_memory`);
    on a joined cluster only for the job's length.
    """
    with _start(spec, log_dir) as (client, info):
        judge_private_memory(client)
        try:
            with _watched(spec, client, info) as watched:
                yield watched
        finally:
            if spec.scheduler_address:  # a cluster of the user's: its workers and nannies as they were
                forget_private_memory(client)


@contextlib.contextmanager
def _watched(spec: ClusterSpec, client: Client, info: ClusterInfo) -> Iterator[tuple[Client, ClusterInfo]]:
    """:func:`dask_client`'s checks and watchdog on a started or joined cluster."""
    check_memory_floor(client, 0)
    info = replace(info, devices=tuple(install_device(client, spec.device, info.faiss_threads)))
    # the embedded cluster's nannies restart dead workers: none for a minute means they gave up
    watchdog = _PauseWatchdog(client, alone=NO_WORKERS_GRACE_S if spec.kind == "local" else None)
    watchdog.start()
    try:
        yield client, info
    except KilledWorker as exc:
        key = str(exc.args[0]) if exc.args else "a task"
        raise PipelineError(
            f"Dask workers died running task {key.split('-')[0]!r} "
            f"({dask.config.get('distributed.scheduler.allowed-failures') + 1} attempt(s)), usually for memory: a "
            "worker over 95% of --memory-limit is restarted; raise --memory-limit or lower --partition-size, then "
            "run the same command again to resume"
        ) from None
    except BaseException:
        if watchdog.reason:  # the watchdog cancelled the job's tasks: say why, in one line
            raise PipelineError(watchdog.reason) from None
        raise
    finally:
        watchdog.stop()


def _baseline_rss() -> int:
    """A worker's resident memory once the modules its tasks use are imported."""
    import faiss  # noqa: F401
    import psutil
    import pyarrow.parquet  # noqa: F401

    return int(psutil.Process().memory_info().rss)


def check_memory_floor(client: Any, working_bytes: int) -> None:
    """Refuse worker memory limits below their imports plus ``working_bytes`` (what one piece in
    flight needs) per Dask thread, naming the minimum."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    limits = {a: int(w["memory_limit"]) for a, w in workers.items() if w.get("memory_limit")}
    if not limits:
        return
    memory = dask.config.get("distributed.worker.memory")
    fraction = memory.get("pause") or memory.get("terminate") or 1.0
    rss = client.run(_baseline_rss, workers=list(limits))
    for address, limit in limits.items():
        in_flight = max(1, int(workers[address].get("nthreads", 1) or 1))  # a piece per Dask thread
        need = int((rss[address] + in_flight * working_bytes) / fraction)
        if limit < need:
            raise ConfigError(
                f"--memory-limit {format_bytes(limit)} per worker cannot work: a worker uses "
                f"{format_bytes(rss[address])} before any data, a piece in flight and FAISS's working memory "
                f"need about {format_bytes(working_bytes)} more, and Dask pauses a worker at {fraction:.0%} of its "
                f"limit; give at least {format_bytes(need)} (or lower --partition-size)"
            )


class _PauseWatchdog(threading.Thread):
    """Polls the scheduler; a worker paused for memory longer than ``grace`` seconds ends the job:
    the client's tasks are cancelled, so whatever the job waits on fails at once, and
    :func:`dask_client` turns that into one line."""

    def __init__(self, client: Any, grace: float | None = None, interval: float = 1.0, alone: float | None = None):
        super().__init__(daemon=True, name="knn-memory-watchdog")
        self.client, self.interval = client, interval
        self.grace = PAUSE_GRACE_S if grace is None else grace
        self.alone = alone  # seconds without any worker that end the job (None: wait, workers may come)
        self.reason: str | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        since: dict[str, float] = {}
        empty_since: float | None = None
        while not self._halt.wait(self.interval):
            try:
                workers = self.client.scheduler_info(n_workers=-1).get("workers", {})
            except Exception:  # the cluster is closing
                return
            now = time.monotonic()
            if workers or self.alone is None:
                empty_since = None
            else:
                empty_since = empty_since or now
                if now - empty_since >= self.alone and not self._halt.is_set():
                    self._end(
                        f"every Dask worker of the embedded cluster died and none came back for {self.alone:.0f} "
                        "s (killed for memory, or a crash in native code); raise --memory-limit or lower "
                        "--partition-size, then run the same command again to resume"
                    )
                    return
            for address, w in workers.items():
                if w.get("status") != "paused":
                    since.pop(address, None)
                    continue
                if now - since.setdefault(address, now) >= self.grace and not self._halt.is_set():
                    used = w.get("metrics", {}).get("memory", 0)
                    self._end(
                        f"Dask worker {w.get('name', address)} is paused for memory: it uses {format_bytes(used)} of "
                        f"its {format_bytes(w.get('memory_limit') or 0)} limit and this job cannot free it; raise "
                        "--memory-limit or lower --partition-size, then run the same command again to resume"
                    )
                    return

    def _end(self, reason: str) -> None:
        """Cancel the job's tasks, so whatever it waits on fails at once, with ``reason`` to report."""
        self.reason = reason
        try:
            self.client.cancel([Future(key, self.client) for key in list(self.client.futures)])
        except Exception:  # the cluster is closing anyway
            pass


@contextlib.contextmanager
def _start(spec: ClusterSpec, log_dir: str | None = None) -> Iterator[tuple[Client, ClusterInfo]]:
    """Start (and stop) the cluster of ``spec.kind``, or connect to ``spec.scheduler_address``.

    slurm / pbs: worker jobs are asked for through dask-jobqueue (fixed ``jobs``, or adaptive
    between ``adaptive_min`` and ``adaptive_max``); the job waits until the first worker joins.
    A worker lost mid-run (pre-empted, node killed) costs only its running tasks: Dask runs
    them again on the others, and outputs are written atomically, so no row is lost or doubled.
    """
    if spec.kind in ("slurm", "pbs"):
        assert spec.jobqueue is not None
        jq = spec.jobqueue
        with _jobqueue_cluster(jq, log_dir) as cluster, Client(cluster) as client:
            if jq.adaptive_max is not None:
                cluster.adapt(minimum_jobs=jq.adaptive_min, maximum_jobs=jq.adaptive_max)
                want = max(1, jq.adaptive_min or 0)
            else:
                cluster.scale(jobs=jq.jobs)
                want = jq.jobs
            log.info(
                "%s: asked for %s worker job(s) (%d cores, %s each); waiting for the first worker; dashboard %s",
                jq.kind,
                want if jq.adaptive_max is None else f"{jq.adaptive_min}-{jq.adaptive_max}",
                jq.cores,
                jq.memory,
                cluster.dashboard_link,
            )
            client.wait_for_workers(1)
            threads = max(1, jq.cores // jq.processes)
            yield client, ClusterInfo(want * jq.processes, threads, cluster.dashboard_link)
        return
    if spec.kind == "local-cuda":
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ConfigError(
                "profile local-cuda needs dask-cuda (one worker per GPU): "
                "pip install dask-cuda, or use the conda environment.yml"
            ) from None
        with (
            LocalCUDACluster(
                host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0", silence_logs=_dask_log_level()
            ) as cluster,
            Client(cluster) as client,
        ):
            n = len(client.scheduler_info().get("workers", {}))
            log.info("local CUDA cluster: %d worker(s), one per GPU; dashboard %s", n, cluster.dashboard_link)
            yield client, ClusterInfo(n, spec.threads_per_worker, cluster.dashboard_link)
        return
    if spec.scheduler_address:
        try:
            joined = Client(spec.scheduler_address)
        except (OSError, TimeoutError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"--scheduler-address {spec.scheduler_address}: no Dask scheduler answered ({reason}); "
                "check the address and that the scheduler runs, or drop the flag to use the "
                "embedded cluster"
            ) from None
        with joined as client:
            n = len(client.scheduler_info().get("workers", {}))
            log.info("joined Dask scheduler %s (%d workers)", spec.scheduler_address, n)
            yield client, ClusterInfo(n, spec.threads_per_worker, client.dashboard_link)
        return
    # the embedded cluster runs on this machine: one worker per GPU it can use
    gpus = gpu_count() if spec.device != "cpu" and gpu_runtime_problem() is None else 0
    workers, threads = local_layout(spec, gpus=gpus)
    # one worker gains nothing from its own process (FAISS and NumPy release the GIL) and would
    # cost a nanny and a second interpreter; several workers get a process each. Two Dask threads
    # a worker with two cores or more: heavy work takes the device one block at a time
    # (worker_device), so the second thread reads, decodes and writes beside it (the scan's
    # Parquet decoding, the join's output; measured in docs/benchmarks.md)
    with (
        dask.config.set(
            {
                "distributed.dashboard.link": f"{{scheme}}://{LOOPBACK}:{{port}}/status",
                # Dask's statistical profiler takes the GIL every 10 ms to walk each thread's stack,
                # for a dashboard page the tool never reads: 1.9% of a 1M x 128 run's CPU samples,
                # and a GIL the join's walking threads wait for
                "distributed.worker.profile.enabled": False,
            }
        ),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=2 if threads >= 2 else 1,
            processes=workers > 1,
            memory_limit=spec.memory_limit,
            **({"host": LOOPBACK} if workers > 1 else {}),  # one worker: in-process, no socket at all (inproc://)
            dashboard_address=f"{LOOPBACK}:0",
            worker_dashboard_address=f"{LOOPBACK}:0",
            silence_logs=_dask_log_level(),
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(_QuietFailures(), name="knn-quiet-failures")
        log.info(
            "local Dask cluster: %d worker(s) x %d FAISS thread(s); dashboard %s",
            workers,
            threads,
            cluster.dashboard_link,
        )
        yield client, ClusterInfo(workers, threads, cluster.dashboard_link)


def _dask_log_level() -> int:
    """Dask's own log lines are silenced below ERROR, unless ``-v`` asked for debug logging."""
    return logging.INFO if logging.getLogger("pipeline").isEnabledFor(logging.DEBUG) else logging.ERROR


REPORTED_ERRNOS = frozenset(DISK_ERROR_FIXES)  # the CLI reports these in one line


def is_reported(exception_text: str) -> bool:
    """Whether a task's exception (its repr) is one the CLI reports in one line: ours, or a full
    or read-only disk. Dask's "Compute Failed" dump of those would only repeat it."""
    match = re.match(r"^(\w+)\((\d+)?", exception_text)
    if match is None:
        return False
    name, number = match.groups()
    ours = {c.__name__ for c in _subclasses(PipelineError)}
    return name in ours or (number is not None and int(number) in REPORTED_ERRNOS)


def _subclasses(cls: type) -> set[type]:
    out = {cls}
    sub: type
    for sub in cls.__subclasses__():
        out |= _subclasses(sub)
    return out


class _DropReported(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Compute Failed") and isinstance(record.args, tuple) and len(record.args) > 3:
            return not is_reported(str(record.args[3]))
        return True


class StorageOptions(WorkerPlugin):
    """The job's ``storage_options`` on every worker (and on workers that join later), for the
    tasks that open remote input files."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = dict(options)

    def setup(self, worker: Any) -> None:
        from pipeline.io.storage import set_storage_options

        set_storage_options(self.options)


def private_bytes(proc: Any) -> int:
    """A process's memory that the kernel cannot drop on its own: resident pages minus the
    file-backed ones (``rss - shared``). The row store, the index's lists and the training sample
    are memory-mapped files: their pages are page cache, dropped under memory pressure and read
    again, yet counted in ``rss``."""
    info = proc.memory_info()
    return max(0, int(info.rss) - int(getattr(info, "shared", 0)))


class PrivateMemory(WorkerPlugin):
    """On the job's workers: Dask pauses a worker by the memory its monitor samples; sample the
    private memory (:func:`private_bytes`), not ``rss``. Mapped pages made a worker in a 2 GiB
    container pause for good (4M x 128: 1.7 GiB resident, most of it mapped store pages the
    kernel would have dropped only at the container's limit, above Dask's 80% pause). Removing
    the plugin puts Dask's own sampling back."""

    def setup(self, worker: Any) -> None:
        monitor = getattr(worker, "monitor", None)
        proc = getattr(monitor, "proc", None)
        if monitor is not None and proc is not None:
            monitor.get_process_memory = lambda: private_bytes(proc)

    def teardown(self, worker: Any) -> None:
        monitor = getattr(worker, "monitor", None)
        if monitor is not None and "get_process_memory" in vars(monitor):
            del monitor.get_process_memory  # the class's own method again


WORKER_MEMORY_PLUGIN = "knn-private-memory"
NANNY_MEMORY_PLUGIN = "knn-private-memory-nanny"


def judge_private_memory(client: Any) -> None:
    """Have every worker (pauses, :class:`PrivateMemory`) and every nanny (restarts,
    :class:`PrivateMemoryNanny`) of ``client``'s cluster judge a worker by its private memory,
    workers and nannies that join later included: on the embedded cluster, on worker jobs
    (Slurm, PBS: the same nanny check runs there) and on a joined scheduler's, whose workers'
    limits are as likely to sit below the index."""
    client.register_plugin(PrivateMemory(), name=WORKER_MEMORY_PLUGIN)
    client.register_plugin(PrivateMemoryNanny(), name=NANNY_MEMORY_PLUGIN)


def forget_private_memory(client: Any) -> None:
    """Undo :func:`judge_private_memory` (a joined cluster at the job's end); a cluster already
    gone needs nothing."""
    for name, nanny in ((WORKER_MEMORY_PLUGIN, False), (NANNY_MEMORY_PLUGIN, True)):
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name, nanny=nanny)


class PrivateMemoryNanny(NannyPlugin):
    """On the job's nannies: Dask restarts a worker past 95% of its limit by the worker's ``rss``;
    judge it by its private memory instead, as :class:`PrivateMemory` has the worker judge its
    pauses. By ``rss``, 4 workers of 800 MiB joining a 0.95 GiB index were restarted within 0.1 s
    of the recall stage, four times each, and the job failed: mapped pages of the index and the
    store, which the kernel drops by itself, counted as the worker's. Removing the plugin puts
    Dask's own check back."""

    def setup(self, nanny: Any) -> None:
        manager = getattr(nanny, "memory_manager", None)
        callback = getattr(nanny, "periodic_callbacks", {}).get("memory_monitor")
        if manager is not None and callback is not None and getattr(manager, "memory_limit", None):
            self._dask_check = callback.callback
            callback.callback = lambda: _restart_past_limit(manager, nanny)

    def teardown(self, nanny: Any) -> None:
        callback = getattr(nanny, "periodic_callbacks", {}).get("memory_monitor")
        original = getattr(self, "_dask_check", None)
        if callback is not None and original is not None:
            callback.callback = original


def _restart_past_limit(manager: Any, nanny: Any) -> None:
    """Dask's nanny memory check (``NannyMemoryManager.memory_monitor``) on private memory: past
    the terminate fraction, SIGTERM once, then SIGKILL if the worker is still there."""
    import psutil
    from distributed.core import Status

    process = getattr(nanny.process, "process", None) if nanny.process is not None else None
    if nanny.status != Status.running or process is None or process.pid is None:
        return
    try:
        memory = private_bytes(psutil.Process(process.pid))
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return
    fraction = manager.memory_terminate_fraction
    if fraction is False or memory / manager.memory_limit <= fraction:
        return
    if manager._last_terminated_pid != process.pid:
        logging.getLogger("distributed.nanny").warning(
            "Worker %s (pid=%d) exceeded %.0f%% memory budget (private memory). Restarting...",
            nanny.worker_address,
            process.pid,
            fraction * 100,
        )
        manager._last_terminated_pid = process.pid
        nanny.log_event("worker-restart-memory", {"worker": nanny.worker_address, "pid": process.pid, "rss": memory})
        process.terminate()
    else:
        process.kill()


class _DropClosingHeartbeat(logging.Filter):
    """The embedded cluster's scheduler lives in the driver: a worker's heartbeat that fails finds
    it closed at the end of the job (seen with the one in-process worker), and Dask logs that at
    ERROR with a traceback, after the job's own last line. Nothing is lost: drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to communicate with scheduler during heartbeat")


class _QuietFailures(WorkerPlugin):
    """On the embedded cluster's workers: no "Compute Failed" dump for errors the CLI reports in one
    line, and no traceback for a heartbeat that meets the scheduler closed (:class:`_DropClosingHeartbeat`)."""

    def setup(self, worker: Any) -> None:
        logger = logging.getLogger("distributed.worker")
        for kind in (_DropReported, _DropClosingHeartbeat):
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())


def _read_or_none(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return None


def _seen(paths: list[str]) -> dict[str, bytes | None]:
    """On a worker: the bytes of each of ``paths`` as this worker sees them (None: not there)."""
    return {p: _read_or_none(p) for p in paths}


def worker_names(client: Any) -> dict[str, str]:
    """Each worker's name (its address where it has none), by address."""
    return {a: str(w.get("name", a)) for a, w in client.scheduler_info(n_workers=-1).get("workers", {}).items()}


@dataclass(frozen=True)
class Unseen:
    """A worker that does not see one of the job's folders as the driver does."""

    worker: str
    address: str
    folder: Path
    there: str  # "no lock file" or "another job's lock file"


def unseen_folders(client: Any, folders: list[Path]) -> list[Unseen]:
    """The workers that do not see the job's folders as the driver does. Tasks read and write the
    output and index folders by path; the proof that a worker mounts them at the same path is each
    folder's lock file, which the driver has just written (its host and process): a worker that
    finds it missing, or holding another job's, is looking at a folder of its own."""
    wanted = {str(f / LOCK_NAME): got for f in folders if (got := _read_or_none(str(f / LOCK_NAME))) is not None}
    if not wanted:
        return []
    seen = client.run(_seen, list(wanted))
    names = worker_names(client)
    out = []
    for address, found in sorted(seen.items()):
        for path, content in wanted.items():
            if found.get(path) != content:
                there = "no lock file" if found.get(path) is None else "another job's lock file"
                out.append(Unseen(names.get(address, address), address, Path(path).parent, there))
    return out


def refuse_unseen(unseen: Unseen) -> ConfigError:
    """One line for a worker that does not see a folder that is not staged from object storage."""
    return ConfigError(
        f"Dask worker {unseen.worker} ({unseen.address}) does not see {shown(unseen.folder)} as this "
        f"machine does ({unseen.there} there): the job's folders must be on a filesystem every worker "
        "mounts at the same path; give --output and --index-dir there, or as object-storage URLs "
        "(each machine then keeps its own copy, staged through the object store)"
    )


class NodeStaging(WorkerPlugin):
    """On every worker of a job whose staged folders some workers do not see: each keeps its own
    copy of each staged directory, fetching what its tasks read and uploading what they write
    (:mod:`pipeline.io.nodes`). A worker that does see the driver's folders (on its machine, or on
    a filesystem they share) does the same in them: the driver's copy holds only what it read, so
    the other machines' files must be fetched there too."""

    def __init__(self, dirs: list[tuple[str, str]], roots: list[str], options: dict[str, Any]) -> None:
        self.dirs = dirs  # (url, local folder)
        self.roots = roots  # the run directories (a ledger in each: the tool's own files there)
        self.options = dict(options)

    def setup(self, worker: Any) -> None:
        from pipeline.io import nodes
        from pipeline.io.owned import LEDGER_NAME
        from pipeline.io.staging import StagedDir, private_root
        from pipeline.io.storage import set_storage_options

        set_storage_options(self.options)
        for _, local in self.dirs:  # the default staging root: private to this user, as on the driver
            if Path(local).parent == Path(tempfile.gettempdir()) / f"knn-pipeline-{os.getuid()}":
                private_root()
        for root in self.roots:
            Path(root).mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(Path(root) / LEDGER_NAME, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        nodes.activate(StagedDir(url, Path(local)) for url, local in self.dirs)

    def teardown(self, worker: Any) -> None:
        from pipeline.io import nodes

        nodes.deactivate()


def worker_memory(client: Any) -> int | None:
    """The smallest memory limit among the cluster's workers (bytes), if they have one."""
    limits = [w.get("memory_limit") for w in client.scheduler_info().get("workers", {}).values()]
    limits = [int(m) for m in limits if m]
    return min(limits) if limits else None
