"""The GPU backend: faiss-gpu for k-means, coarse assignment and search, CuPy for exact scores.

The only module that touches GPU faiss symbols or CuPy, and only inside functions, so it imports
(and its pure rules are tested) on machines without either. What runs where:

* **train**: the IVF k-means and the PQ codebook k-means assign points with a GPU flat index
  (faiss's ``clustering_index`` / ``pq.assign_index`` hooks); the CPU index object is trained in
  place, so what is written is an ordinary CPU index.
* **add**: an empty piece index the GPU kernels take (IVF-Flat, IVF-SQ, 8-bit IVF-PQ) is cloned
  to the GPU, which assigns *and* encodes the piece there, and is copied back into the CPU index:
  the partial indexes on disk are the same files a CPU fill writes. Other IVF keys (fast-scan
  twins, transforms) get the coarse assignment (n x nlist distances) on the GPU in batches sized
  from free GPU memory and encode on the CPU with those assignments (``add_core``).
* **search**: the finished index is cloned to the worker's GPU once and reused by every task.
  What the GPU kernels cannot do (fast-scan codes, PQ sizes outside their set, k or nprobe above
  2048, an index larger than the GPU's free memory) is searched on the CPU instead, logged once
  with the reason.
* **a routed join's list group** (:meth:`GpuBackend.group_search`): only the group's lists are
  copied to the GPU, once per score task, and each routed piece is searched among its preassigned
  lists there (``search_preassigned``), so an index of any size is joined a group at a time.
* **the row store on the device**: when the join's stored vectors fit in ``RESIDENT_SHARE`` of
  the GPU's free memory they are copied there once per worker; re-ranking then gathers
  candidates and scores them on the device (:class:`~pipeline.backends.kernels.ResidentRows`), and
  the exact plan searches a GPU flat index over them (cuBLAS tiles, on-device k-selection).
  Larger stores stream piece by piece from the host: candidates gathered there, pieces scored
  on the GPU one at a time.

Unverified on a real GPU in this repository so far: see docs/gpus.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np

from pipeline.backends.cpu import CpuBackend
from pipeline.backends.kernels import FAISS_METRICS, ResidentRows, host_rerank, ivf_of, knn_topk, streamed_exact
from pipeline.backends.lists import (
    GroupSearch,
    add_with_assignments,
    group_lists,
    pack_like,
    packed,
    search_assigned,
)
from pipeline.errors import DeviceError
from pipeline.io.store import RowStore
from pipeline.kinds import Metric

__all__ = [
    "device_vector_bytes",
    "PQ_SUBQUANTIZERS",
    "PQ_SUB_DIMS",
    "GpuBackend",
    "GpuContext",
    "GPU_MAX_K",
    "gpu_search_limits",
    "batch_rows",
    "train_with_assigner",
    "gpu_runtime_problem",
    "gpu_encodes",
]

log = logging.getLogger(__name__)

# the sub-quantizer counts and sizes the GPU's IVF-PQ kernels take (the default plan keeps to them)
PQ_SUBQUANTIZERS = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
PQ_SUB_DIMS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 28, 32)
GPU_MAX_K = 2048  # k and nprobe on the classic GPU kernels (GPU_MAX_SELECTION_K)
FLOAT16_TABLES_FROM = 56  # 56, 64, 96 sub-quantizers need float16 lookup tables (shared memory)
FREE_SHARE = 0.5  # of the GPU's free memory a batch may take (faiss keeps its own temp memory too)
INDEX_SHARE = 0.8  # of the GPU's free memory a cloned index may take
RESIDENT_SHARE = 0.4  # of the GPU's free memory the row store may take resident (the clone and batches need the rest)


def gpu_search_limits(index: faiss.Index) -> tuple[str | None, bool]:
    """(why the classic GPU kernels cannot search ``index``, or None; whether float16 tables are needed)."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer)):
        return None, False
    if isinstance(inner, faiss.IndexIVFPQ) and not isinstance(inner, faiss.IndexIVFPQR):
        m, nbits, d = int(inner.pq.M), int(inner.pq.nbits), int(inner.d)
        if nbits != 8:
            return f"PQ codes of {nbits} bits (the GPU kernels take 8)", False
        if not inner.by_residual:
            return "PQ on raw vectors (the GPU kernels encode residuals)", False
        if m not in PQ_SUBQUANTIZERS:
            return f"PQ{m} (the GPU kernels take M in {PQ_SUBQUANTIZERS})", False
        if d // m not in PQ_SUB_DIMS:
            return f"{d // m} dimensions per sub-quantizer (the GPU kernels take {PQ_SUB_DIMS})", False
        return None, m >= FLOAT16_TABLES_FROM
    return f"{type(inner).__name__} has no GPU implementation", False


def gpu_encodes(index: faiss.Index) -> bool:
    """Whether an empty IVF index can be filled by its GPU twin (assign and encode on the GPU):
    no transform around it, and an IVF type the GPU kernels search."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform) or ivf_of(index) is None:
        return False
    return gpu_search_limits(index)[0] is None


def batch_rows(free_bytes: int, bytes_per_row: int, cap: int, share: float = FREE_SHARE) -> int:
    """Rows per GPU batch: ``share`` of the free memory over the bytes one row needs, at most ``cap``."""
    return int(max(1, min(cap, (free_bytes * share) // max(1, bytes_per_row))))


def train_with_assigner(index: faiss.Index, x: np.ndarray, assigner: Any) -> None:
    """Train ``index`` in place, its k-means assigning points with ``assigner(d, metric)`` indexes.

    The coarse k-means uses faiss's ``clustering_index`` hook (same metric as the quantizer), the
    PQ codebooks ``pq.assign_index`` (L2 on sub-vectors); the rest (OPQ rotation, SQ ranges)
    trains on the CPU. With a CPU ``IndexFlat`` as the assigner the result is what ``train`` gives.
    """
    found = ivf_of(index)
    ivf: Any = faiss.downcast_index(found) if found is not None else None  # SWIG: typed loosely
    pq = getattr(ivf, "pq", None)
    keep: list[Any] = []  # the assigner indexes must outlive training (faiss holds raw pointers)
    if ivf is not None and not ivf.is_trained and ivf.quantizer.ntotal == 0:
        keep.append(assigner(int(ivf.d), int(ivf.quantizer.metric_type)))
        ivf.clustering_index = keep[-1]
    if pq is not None and int(pq.nbits) <= 16:
        keep.append(assigner(int(pq.dsub), faiss.METRIC_L2))
        pq.assign_index = keep[-1]
    try:
        index.train(x)
    finally:
        if ivf is not None:
            ivf.clustering_index = None
        if pq is not None:
            pq.assign_index = None


def gpu_runtime_problem() -> str | None:
    """Why this process cannot run the GPU backend (None when it can)."""
    if not hasattr(faiss, "StandardGpuResources"):
        import importlib.util

        if importlib.util.find_spec("faiss._gpu_build") is not None:  # faiss-gpu's marker beside faiss-cpu's modules
            return (
                "faiss-cpu and faiss-gpu are both installed and faiss-cpu's modules load: "
                "pip uninstall -y faiss-cpu && pip install --force-reinstall --no-deps faiss-gpu"
            )
        return "this faiss is a CPU-only build (install faiss-gpu: docs/gpus.md)"
    n = faiss.get_num_gpus()
    if n == 0:
        return "this faiss build has GPU support but sees no CUDA device (driver, CUDA_VISIBLE_DEVICES)"
    return None


class GpuContext:
    """What one worker holds on its GPU, owned by the worker's device plugin (through its
    backend) and released with it: FAISS's resources (streams, cuBLAS handle, temporary memory),
    the search clones of the indexes it searched, the row store resident for re-ranking or exact
    search, the lock that serialises searches on a shared clone, and the fallbacks already logged.
    Nothing of it is module state: two workers in one process (tests, a threaded cluster) each
    have their own, and a worker's GPU memory goes when its plugin does."""

    def __init__(self, device: int, temp_memory: int | None = None, *, claim: Any = None) -> None:
        self.device = device
        self.temp_memory = temp_memory
        self.claim = claim  # the lock on this GPU (:func:`claim_gpu`), held as long as the context
        self.lock = threading.Lock()  # guards the fields below
        self.search_lock = threading.Lock()  # one search at a time on a shared clone (nprobe is set per call)
        self._resources: Any = None
        self.clones: dict[int, tuple[Any, Any]] = {}  # id(index) -> (the CPU index kept alive, its GPU clone or None)
        self.held: dict[str, tuple[tuple[Any, ...], Any]] = {}  # what -> (store key, resident object or None)
        self.warned: set[str] = set()

    def resources(self) -> Any:
        """The device's ``StandardGpuResources``, made on first use."""
        with self.lock:
            if self._resources is None:
                res = faiss.StandardGpuResources()
                if self.temp_memory is not None:
                    res.setTempMemory(int(self.temp_memory))
                self._resources = res
            return self._resources

    def first_time(self, what: str) -> bool:
        """True the first time ``what`` is asked about (a fallback is logged once per worker)."""
        with self.lock:
            if what in self.warned:
                return False
            self.warned.add(what)
            return True


def visible_gpus() -> list[str]:
    """The GPUs this process may use, by their host-wide names: ``CUDA_VISIBLE_DEVICES``'s entries
    where it is set (faiss numbers them 0..n-1 in that order), else 0..n-1 as faiss counts them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(max(0, faiss.get_num_gpus()))]


def claim_gpu(lock_dir: str | None = None) -> tuple[int, Any]:
    """This worker's GPU, and the lock it holds on it (keep it for the worker's life).

    A worker that sees one GPU (dask-cuda, or a scheduler that gives each worker its own in
    ``CUDA_VISIBLE_DEVICES``) takes it. Workers that share several (the embedded cluster, a
    Slurm/PBS job's worker processes) each take the first GPU of the host that no other worker
    holds: an exclusive ``flock`` on one file per GPU under ``lock_dir`` (a folder of this user's
    in the host's temporary directory), released by the kernel when the worker ends, however it
    ends. With more workers than GPUs, the later ones share, spread by process id. Nothing comes
    from the worker's name."""
    gpus = visible_gpus()
    if len(gpus) <= 1:
        return 0, None
    folder = Path(lock_dir or Path(tempfile.gettempdir()) / f"knn-pipeline-gpus-{os.getuid()}")
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():
        raise DeviceError(f"{folder}: not a folder of this user's; remove it so GPU locks can be made")
    for i, name in enumerate(gpus):
        fd = os.open(folder / f"gpu-{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return i, os.fdopen(fd, "r+")
    return os.getpid() % len(gpus), None


class GpuBackend:
    """faiss-gpu and CuPy on this worker's GPU; the CPU backend for what the GPU cannot do."""

    name = "gpu"
    search_rows = 65_536  # queries per search call: the GPU wants large batches

    def __init__(
        self, device: int | None = None, temp_memory: int | None = None, *, context: GpuContext | None = None
    ) -> None:
        self._device = device if context is None else context.device  # none given: device 0
        self._temp_memory = temp_memory
        self._context = context
        self._cpu = CpuBackend()

    @property
    def context(self) -> GpuContext:
        """This backend's hold on its GPU (made on first use where the plugin gave none)."""
        if self._context is None:
            self._context = GpuContext(self.device, self._temp_memory)
        return self._context

    @property
    def device(self) -> int:
        return 0 if self._device is None else self._device

    def resources(self) -> Any:
        """The device's FAISS resources (streams, cuBLAS handle, temp memory): one per worker."""
        return self.context.resources()

    def free_memory(self) -> int | None:
        """Free bytes on this worker's GPU (CuPy), or None without CuPy."""
        try:
            import cupy
        except ImportError:
            self._warn_once("CuPy is missing: GPU batches and the index-size check cannot see free memory")
            return None
        with cupy.cuda.Device(self.device):
            # CuPy keeps freed blocks in its pool, free for CuPy but not for faiss: hand them back first
            cupy.get_default_memory_pool().free_all_blocks()
            free, _total = cupy.cuda.runtime.memGetInfo()
        return int(free)

    def describe(self) -> tuple[str, int, int]:
        """(name, total bytes, free bytes) of this worker's GPU, for the report and the default
        plan; ("", 0, 0) without CuPy."""
        try:
            import cupy
        except ImportError:
            return "", 0, 0
        with cupy.cuda.Device(self.device):
            free, total = cupy.cuda.runtime.memGetInfo()
            name = cupy.cuda.runtime.getDeviceProperties(self.device)["name"]
        return (name.decode() if isinstance(name, bytes) else str(name)), int(total), int(free)

    def _warn_once(self, what: str) -> None:
        if self.context.first_time(what):
            log.warning("%s", what)

    def set_threads(self, n: int) -> None:
        self._cpu.set_threads(n)

    def _flat(self, d: int, metric: int) -> Any:
        return faiss.index_cpu_to_gpu(self.resources(), self.device, faiss.IndexFlat(d, metric))

    def train(self, index: faiss.Index, x: np.ndarray) -> None:
        train_with_assigner(index, x, self._flat)

    def add(self, index: faiss.Index, x: np.ndarray, ids: np.ndarray | None) -> None:
        ivf = ivf_of(index)
        if ivf is None:
            self._cpu.add(index, x, ids)
            return
        if gpu_encodes(index) and index.ntotal == 0:
            self._add_on_gpu(index, x, ids)
            return
        quantizer = faiss.downcast_index(cast(Any, faiss.downcast_index(ivf)).quantizer)
        if not isinstance(quantizer, faiss.IndexFlat):
            self._warn_once(f"coarse quantizer {type(quantizer).__name__} has no GPU clone: assigning on the CPU")
            self._cpu.add(index, x, ids)
            return
        gpu_q = faiss.index_cpu_to_gpu(self.resources(), self.device, quantizer)
        per_row = 4 * (x.shape[1] + quantizer.ntotal // 64 + 4)  # the row, distance tiles, results

        def assign(_q: Any, xb: np.ndarray) -> np.ndarray:
            return gpu_q.search(xb, 1)[1].ravel()

        free = self.free_memory()
        add_with_assignments(index, x, ids, assign, batch_rows(free if free is not None else 1 << 30, per_row, 1 << 20))

    def _add_on_gpu(self, index: faiss.Index, x: np.ndarray, ids: np.ndarray | None) -> None:
        """Fill the empty ``index`` through its GPU twin: the GPU assigns and encodes, the lists
        come back into the CPU index (``merge_from``), which is what gets written."""
        co: Any = faiss.GpuClonerOptions()
        co.useFloat16 = gpu_search_limits(index)[1]  # float16 lookup tables (IVF-PQ): the field is useFloat16
        co.indicesOptions = faiss.INDICES_64_BIT  # type: ignore[attr-defined]  # GPU builds only
        gpu = faiss.index_cpu_to_gpu(self.resources(), self.device, index, co)
        if ids is None:
            ids = np.arange(len(x), dtype=np.int64)
        free = self.free_memory()
        step = batch_rows(free if free is not None else 1 << 30, 2 * 4 * x.shape[1] + 16, 1 << 20)
        for lo in range(0, len(x), step):
            gpu.add_with_ids(
                np.ascontiguousarray(x[lo : lo + step], dtype=np.float32),
                np.ascontiguousarray(ids[lo : lo + step], dtype=np.int64),
            )
        filled = faiss.index_gpu_to_cpu(gpu)
        del gpu
        cast(Any, faiss.downcast_index(cast(Any, ivf_of(index)))).merge_from(
            faiss.downcast_index(cast(Any, ivf_of(filled))), 0
        )
        outer: Any = faiss.downcast_index(index)
        outer.ntotal = cast(Any, ivf_of(index)).ntotal

    def _clone(self, index: faiss.Index) -> Any | None:
        """The GPU copy of ``index`` (made once per worker), or None with the reason logged."""
        ctx = self.context
        key = id(index)  # the entry keeps the index alive, so its id is not reused while it stands
        with ctx.lock:
            if key in ctx.clones:
                return ctx.clones[key][1]
        why, float16 = gpu_search_limits(index)
        if why is None:
            need = _index_bytes(index)
            free = self.free_memory()
            if free is not None and need > INDEX_SHARE * free:
                why = (
                    f"the index needs {need / 2**30:.1f} GiB, over {INDEX_SHARE:.0%} of the GPU's "
                    f"{free / 2**30:.1f} GiB free"
                )
        clone = None
        if why is None:
            co: Any = faiss.GpuClonerOptions()
            co.useFloat16 = float16
            co.indicesOptions = faiss.INDICES_64_BIT  # type: ignore[attr-defined]  # GPU builds only
            clone = faiss.index_cpu_to_gpu(self.resources(), self.device, index, co)
            log.info(
                "index cloned to GPU %d (%d vectors%s)",
                self.device,
                index.ntotal,
                ", float16 lookup tables" if float16 else "",
            )
        else:
            self._warn_once(f"searching on the CPU: {why}")
        with ctx.lock:
            ctx.clones[key] = (index, clone)
        return clone

    def search(
        self,
        index: faiss.Index,
        x: np.ndarray,
        k: int,
        params: faiss.SearchParameters | None = None,
        *,
        assign: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """On the GPU (the clone assigns the queries itself: ``assign`` is not used), or on the
        host where the kernels cannot."""
        ivf = ivf_of(index)
        given = getattr(params, "nprobe", None)
        nprobe = 0
        if ivf is not None:
            nprobe = int(given if given is not None else cast(Any, faiss.downcast_index(ivf)).nprobe)
        if k > GPU_MAX_K or nprobe > GPU_MAX_K:
            self._warn_once(f"searching on the CPU: k={k}, nprobe={nprobe} (the GPU kernels take at most {GPU_MAX_K})")
            return self._cpu.search(index, x, k, params)
        clone = self._clone(index)
        if clone is None:
            return self._cpu.search(index, x, k, params)
        with self.context.search_lock:  # the clone is shared by the worker's threads: nprobe is set per call
            if ivf is not None:
                faiss.GpuParameterSpace().set_index_parameter(clone, "nprobe", nprobe)
            return clone.search(x, k)

    @contextlib.contextmanager
    def group_search(self, ivf: faiss.IndexIVF, first: int, last: int) -> Iterator[GroupSearch]:
        """A search of ``ivf``'s lists ``[first, last)`` on this GPU for the block: those lists
        alone (:func:`~pipeline.backends.lists.group_lists`: the vectors, or the PQ or SQ codes with
        their codec) are copied to the device once, and each batch is searched among its
        preassigned lists there (``search_preassigned``: the same result as the host's up to ties);
        the copy is freed when the block ends. On the host instead, logged once with the reason,
        where the GPU kernels cannot search the codes (:func:`gpu_search_limits`), the group needs
        over ``INDEX_SHARE`` of the free GPU memory, or faiss cannot copy it; and for a batch whose
        ``k`` or lists per query pass ``GPU_MAX_K``."""
        clone = None
        try:
            group = group_lists(ivf, first, last)
            why, float16 = gpu_search_limits(group)
        except TypeError as exc:  # no group index of this type (fast-scan codes)
            why, float16 = str(exc), False
        if why is None:
            need, free = _index_bytes(group), self.free_memory()
            if free is not None and need > INDEX_SHARE * free:
                why = (
                    f"a group needs {need / 2**30:.1f} GiB, over {INDEX_SHARE:.0%} of the GPU's "
                    f"{free / 2**30:.1f} GiB free"
                )
        if why is None:
            co: Any = faiss.GpuClonerOptions()
            co.useFloat16 = float16  # float16 lookup tables (IVF-PQ from 56 sub-quantizers)
            co.indicesOptions = faiss.INDICES_64_BIT  # type: ignore[attr-defined]  # GPU builds only
            try:
                clone = faiss.index_cpu_to_gpu(self.resources(), self.device, group, co)
            except RuntimeError as exc:  # faiss refused the copy; its message says why
                why = f"faiss could not copy one to the GPU ({exc})"
        if why is not None:
            self._warn_once(f"list groups searched on the CPU: {why}")
        with self._cpu.group_search(ivf, first, last) as on_host:

            def search(
                x: np.ndarray, k: int, assign: np.ndarray, coarse: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
                if clone is None or k > GPU_MAX_K or assign.shape[1] > GPU_MAX_K:
                    return on_host(x, k, assign, coarse)
                local = np.where(assign >= 0, assign - first, -1)
                keys = packed(local)  # FAISS reads at most nlist columns
                near = np.zeros(keys.shape, np.float32) if coarse is None else pack_like(local, coarse)
                with self.context.search_lock:
                    return search_assigned(clone, np.ascontiguousarray(x, dtype=np.float32), k, keys, near)

            try:
                yield search
            finally:
                clone = None  # the group's device memory goes back before the next group comes

    def exact_scores(self, q: np.ndarray, candidates: np.ndarray, metric: Metric) -> np.ndarray:
        """As :meth:`CpuBackend.exact_scores`, as one batched matrix product on the GPU (CuPy)."""
        try:
            import cupy
        except ImportError:
            self._warn_once("CuPy is missing: exact scores on the CPU (pip install '.[gpu]')")
            return self._cpu.exact_scores(q, candidates, metric)
        with cupy.cuda.Device(self.device):
            qd = cupy.asarray(q, dtype=cupy.float32)
            cd = cupy.asarray(candidates, dtype=cupy.float32)
            dots = cupy.matmul(cd, qd[:, :, None])[:, :, 0]
            if metric == "l2":
                dots = (cd * cd).sum(axis=2) - 2 * dots + (qd * qd).sum(axis=1)[:, None]
            return cupy.asnumpy(dots.astype(cupy.float32))

    def knn(
        self, q: np.ndarray, x: np.ndarray, k: int, metric: Metric, *, whole: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` with faiss's brute-force GPU search (cuBLAS GEMM tiles, on-device k-selection)."""
        if k > GPU_MAX_K:
            self._warn_once(f"exact search on the CPU: k={k} (the GPU kernels take at most {GPU_MAX_K})")
            return self._cpu.knn(q, x, k, metric, whole=whole)
        with self.context.search_lock:
            return faiss.knn_gpu(self.resources(), q, x, k, metric=FAISS_METRICS[metric], device=self.device)

    def _held(self, store: RowStore, what: str, tag: str, build: Any, growth: float = 1.0) -> Any | None:
        """``build()`` of ``store`` kept on this worker's GPU (one store at a time per ``what``,
        made once), or None when the store does not fit ``RESIDENT_SHARE`` of the free memory or
        CuPy is missing: decided once per store, the reason logged once. ``growth``: the peak
        while ``build`` runs, as a multiple of the resident size."""
        ctx = self.context
        key = (str(store.root), store.total_rows, tag)
        with ctx.lock:
            held = ctx.held.get(what)
        if held is not None and held[0] == key:
            return held[1]
        with ctx.lock:
            ctx.held.pop(what, None)  # release the last store before sizing the next
        made = None
        need = int(growth * ResidentRows.nbytes(store, store.mapped_vectors(store.live[0]).shape[1]))
        free = self.free_memory()  # None without CuPy (said once)
        if free is not None and need > RESIDENT_SHARE * free:
            self._warn_once(
                f"{what}: the row store ({need / 2**30:.1f} GiB) is over {RESIDENT_SHARE:.0%} of the "
                f"GPU's {free / 2**30:.1f} GiB free, so it streams from the host"
            )
        elif free is not None:
            made = build()
            log.info(
                "%s: row store resident on GPU %d (%d vectors, %.2f GiB)",
                what,
                self.device,
                store.total_rows,
                need / 2**30,
            )
        with ctx.lock:
            ctx.held[what] = (key, made)
        return made

    def _resident(self, store: RowStore) -> ResidentRows | None:
        """The store's vectors on this worker's GPU for re-ranking (see :meth:`_held`)."""

        def build() -> ResidentRows:
            import cupy  # free_memory found it

            with cupy.cuda.Device(self.device):
                return ResidentRows(cupy, store, cupy.asnumpy)

        return cast("ResidentRows | None", self._held(store, "re-ranking", "", build))

    def rerank(self, q: np.ndarray, rows: np.ndarray, store: RowStore, metric: Metric) -> np.ndarray:
        """Exact scores of each query against its candidate rows: on the device against the
        resident store when it fits, else gathered on the host and scored on the GPU."""
        resident = self._resident(store)
        if resident is None:
            return host_rerank(self.exact_scores, q, rows, store, metric)
        import cupy

        with cupy.cuda.Device(self.device):
            return resident.rerank(q, rows, metric)

    def self_topk(self, x: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of ``x``'s rows among themselves: one brute-force GPU search (the
        arithmetic the CPU saves by symmetry is cheap here)."""
        return knn_topk(self.knn, x, x, k, metric)

    def pair_topk(
        self, a: np.ndarray, b: np.ndarray, k: int, metric: Metric, b_floor: np.ndarray
    ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """Both sides' exact top-``k`` by two brute-force GPU searches (``b_floor`` unused)."""
        return knn_topk(self.knn, a, b, k, metric), knn_topk(self.knn, b, a, k, metric)

    def exact_search(self, q: np.ndarray, store: RowStore, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` over the row store: a GPU flat index over the whole store when it fits
        (made once per worker), else piece by piece from the host (:meth:`knn`)."""
        flat = self._resident_flat(store, metric) if k <= GPU_MAX_K else None
        if flat is None:
            return streamed_exact(self.knn, q, store, k, metric)
        with self.context.search_lock:
            scores, rows = flat.search(np.ascontiguousarray(q, dtype=np.float32), k)
        return scores, np.where(rows >= 0, store.live_rows(np.maximum(rows, 0)), -1)

    def _resident_flat(self, store: RowStore, metric: Metric) -> Any | None:
        """A GPU flat index over the whole store for the exact plan (see :meth:`_held`)."""

        def build() -> Any:
            flat = faiss.index_cpu_to_gpu(
                self.resources(),
                self.device,
                faiss.IndexFlat(store.mapped_vectors(store.live[0]).shape[1], FAISS_METRICS[metric]),
            )
            for piece in store.live:  # positions are live rows in row order (store.live_rows maps them)
                flat.add(store.vectors(piece))
            return flat

        # a GPU flat index filled piece by piece grows its storage as it goes: about twice its
        # final size at the peak (the old block and the new one), so it is sized at twice
        return self._held(store, "exact search", metric, build, growth=2.0)


DEVICE_VECTOR_2X_LIMIT = 4 << 20  # faiss's GPU vectors: below this an allocation rounds up to a power of two,
DEVICE_VECTOR_125_LIMIT = 128 << 20  # below this it grows by a quarter, above it is exact (DeviceVector.cuh)


def device_vector_bytes(nbytes: int) -> int:
    """Bytes faiss's GPU allocates for a vector of ``nbytes`` (``DeviceVector``'s growth rule): an
    IVF list of 100 KiB takes 128 KiB, one of 5 MiB takes 6.25 MiB."""
    if nbytes <= 0:
        return 0
    if nbytes < DEVICE_VECTOR_2X_LIMIT:
        return 1 << (nbytes - 1).bit_length()
    if nbytes < DEVICE_VECTOR_125_LIMIT:
        return nbytes + nbytes // 4
    return nbytes


def _index_bytes(index: faiss.Index) -> int:
    """GPU bytes of the index's clone: each inverted list's codes and 64-bit ids as faiss's GPU
    allocates them (rounded up, :func:`device_vector_bytes`: the plain sum ran 1.6 to 2x low for
    lists of a few hundred KiB), plus the coarse centroids."""
    found = ivf_of(index)
    if found is None:
        return int(index.ntotal) * (int(index.d) * 4 + 8)
    ivf: Any = faiss.downcast_index(found)
    invlists: Any = ivf.invlists
    code_size = int(ivf.code_size)
    held = 0
    for number in range(int(ivf.nlist)):
        size = int(invlists.list_size(number))
        held += device_vector_bytes(size * code_size) + device_vector_bytes(size * 8)
    return held + int(ivf.nlist) * int(ivf.d) * 4
