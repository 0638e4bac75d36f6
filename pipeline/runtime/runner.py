"""The task seam: what a Dask task takes, what it returns, and the one runner of per-piece stages.

Every Dask task takes one *task record*: a frozen, keyword-only dataclass that holds the task's
inputs and whose ``run()`` does the work on a worker (:class:`Task`). Dask runs :func:`run_task`
on it, so a task's inputs are named and typed where they are made, not packed into a tuple.

A :class:`Stage` is a resumable phase with one task per item (a piece of the input or a partition
of pieces): its name, its items, the task record for an item, the files that task writes and the
type of its result. :func:`run_stage` skips the items the manifest records done, records each
finished item's files and typed result, and returns every item's result, this run's and earlier
runs' alike, as the same type (results are stored with :func:`pipeline.results.to_dict`).

Example::

    @dataclass(frozen=True, kw_only=True)
    class CountTask:
        piece: Piece
        out: str

        def run(self) -> Counted:
            ...

    counted = run_stage(client, manifest, Stage(
        name="count", items=dataset.pieces, result=Counted,
        task=lambda p: CountTask(piece=p, out=f"{out}/part-{p.index:05d}.npy"),
        files=lambda p: [f"{out}/part-{p.index:05d}.npy"],
    ))
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import threading
import uuid
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

import dask
import numpy as np
import pyarrow as pa
from distributed import KilledWorker, as_completed

from pipeline.errors import PipelineError
from pipeline.io import nodes
from pipeline.io.nodes import NodeResult
from pipeline.io.owned import adopt
from pipeline.results import from_dict, to_dict
from pipeline.runtime.progress import Progress, count_submitted, listening, task_key

__all__ = [
    "Task",
    "Stage",
    "WorkItem",
    "run_task",
    "result_of",
    "gather",
    "unwrap",
    "run_tasks",
    "run_stage",
    "submit",
    "say_resuming",
    "worker_name",
]

log = logging.getLogger(__name__)

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class WorkItem(Protocol):
    """What a stage runs one task for: a piece of the input or a partition of pieces."""

    @property
    def index(self) -> int: ...

    @property
    def rows(self) -> int: ...


T = TypeVar("T", bound=WorkItem)


class Task(Protocol[R_co]):
    """One Dask task's inputs, as a frozen keyword-only dataclass; ``run`` does its work on a worker."""

    def run(self) -> R_co: ...


def worker_name() -> str:
    """The name of the Dask worker running the calling task ("driver" outside a worker), for
    results that say where their work was done."""
    from distributed import get_worker

    try:
        return str(get_worker().name)
    except ValueError:
        return "driver"


def run_task(task: Task[R], shared: dict[str, Any] | None = None) -> R | NodeResult:
    """The function every Dask task of the pipeline runs: its record's own work. Afterwards the
    Arrow memory the task freed goes back to the system: pyarrow's allocator (mimalloc) keeps it
    otherwise, and Dask counts it against the worker (after scanning 4M x 128 rows a worker held
    1.47 GiB, 0.25 GiB once released, and paused inside a 2 GiB container).

    ``shared``: the record's large inputs that :func:`submit` sent once for every task that takes
    them, put back into the record here (arrays read-only: every task of the worker holds the same
    one). On a worker staging per node (:mod:`pipeline.io.nodes`) the result comes back with the
    ledger lines of the files the task wrote; :func:`result_of` and :func:`gather` unwrap it."""
    if shared:
        record: Any = task
        task = dataclasses.replace(record, **{name: _read_only(value) for name, value in shared.items()})
    try:
        if not nodes.active():
            return task.run()
        with nodes.task_writes() as lines:
            value = task.run()
        return NodeResult(value, tuple(lines))
    finally:
        pa.default_memory_pool().release_unused()
        _trim()


def _trim() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``): NumPy and FAISS
    allocate through malloc, whose arenas keep what a task freed, and Dask counts it against the
    worker (a routed score task of 4M x 128 IVF-PQ in a 2 GiB container paused its worker)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _glibc()


def unwrap(result: Any) -> Any:
    """A task's result as its record's ``run`` returned it; the files a node of its own wrote are
    added to this machine's ledgers first."""
    if isinstance(result, NodeResult):
        adopt(result.lines)
        return result.value
    return result


def result_of(future: Any) -> Any:
    """The result of one submitted task (waits for it)."""
    return unwrap(future.result())


def gather(client: Any, futures: Sequence[Any]) -> list[Any]:
    """The results of submitted tasks, in order (waits for all)."""
    return [unwrap(r) for r in client.gather(list(futures))]


SHARE_BYTES = 64 << 10  # a task input at least this large goes to the cluster once, not in every task
SHARE_ITEMS = 1024  # so does a tuple of this many items (a routed score task's query pieces)

# client -> id(input) -> (the input where it takes no weak reference, its future)
_sent: weakref.WeakKeyDictionary[Any, dict[int, tuple[Any, Any]]] = weakref.WeakKeyDictionary()
_sent_lock = threading.Lock()


def submit(client: Any, task: Task[R], label: str) -> Any:
    """Submit one task record as a task of phase ``label`` (its key groups it in the task stream);
    returns the future of its result.

    An input of ``SHARE_BYTES`` or more (an array, or an object whose ``task_bytes()`` says so, such
    as a store of many pieces), or a tuple of ``SHARE_ITEMS`` items or more, goes to the cluster
    once, as a task of its own that every record holding that same object depends on; the record
    travels with an empty stand-in. Sent inside each record, a recall sample of 2,000 x 768
    float32 queries went to the scheduler once per stored piece: 6 MiB a task, 140 GB for the
    23,000 pieces of 10^9 rows, all held at once; and a routed score task's query pieces once per
    list group. The shared input's task is made again from its graph if its worker dies."""
    record: Any = task
    fields = dataclasses.fields(record) if dataclasses.is_dataclass(record) else ()
    shared = {f.name: _share(client, value) for f in fields if f.init and _large(value := getattr(record, f.name))}
    if shared:
        record = dataclasses.replace(record, **{name: _stand_in(getattr(record, name)) for name in shared})
    return client.submit(run_task, record, shared or None, key=task_key(label))


def _large(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return value.nbytes >= SHARE_BYTES
    if isinstance(value, tuple):
        return len(value) >= SHARE_ITEMS
    size = getattr(value, "task_bytes", None)
    return callable(size) and int(size()) >= SHARE_BYTES


def _stand_in(value: Any) -> Any:
    """What a record holds in transit in place of a shared input: an empty array or tuple, else nothing."""
    return value[:0] if isinstance(value, (np.ndarray, tuple)) else None


def _read_only(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.view()
        value.flags.writeable = False
    return value


def _same(value: Any) -> Any:
    """A shared input's own task: the input itself, kept on a worker while records depend on it."""
    return value


def _share(client: Any, value: Any) -> Any:
    """The future of ``value`` on ``client``'s cluster, submitted the first time it is shared and
    released when ``value`` is garbage-collected here (a value without weak references, a tuple,
    is held until the client closes, so its id names no other value meanwhile)."""
    with _sent_lock:
        sent = _sent.setdefault(client, {})
        entry = sent.get(id(value))
        if entry is None:
            with warnings.catch_warnings():  # Dask's advice for data embedded in many tasks; this one task is the cure
                warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
                future = client.submit(_same, value, key=f"shared-{uuid.uuid4().hex}", pure=False)
            try:
                weakref.finalize(value, _forget, weakref.ref(client), id(value))
                entry = (None, future)
            except TypeError:
                entry = (value, future)
            sent[id(value)] = entry
    return entry[1]


def _forget(client: weakref.ref[Any], key: int) -> None:
    with _sent_lock:
        live = client()
        if live is not None and live in _sent:
            _sent[live].pop(key, None)


@dataclass(frozen=True, kw_only=True)
class Stage(Generic[T, R]):
    """A resumable per-item phase (see the module's docstring).

    ``result`` is the type the task records' ``run`` returns: a dataclass is stored in the manifest
    as a dict and read back as that class; ``None`` keeps plain JSON values (ints, dicts) as they are.
    ``before_record``: called with each finished item and its result just before the item is
    recorded done (what must already hold when it counts as done, e.g. another stage's record of
    the files it rewrote).
    """

    name: str
    items: Sequence[T]
    task: Callable[[T], Task[R]]
    files: Callable[[T], Sequence[str | os.PathLike[str]]]
    result: type[R] | None = None
    before_record: Callable[[T, R], None] | None = None

    def read(self, stored: Any) -> R:
        """A result as the manifest stored it, back as its type."""
        if self.result is not None and dataclasses.is_dataclass(self.result):
            return from_dict(self.result, stored)
        return cast(R, stored)


def run_tasks(
    client: Any,
    *,
    label: str,
    items: Sequence[T],
    task: Callable[[T], Task[Any]],
    on_done: Callable[[T, Any], None] | None = None,
    rows: Callable[[T], int] = lambda item: int(item.rows),
) -> float:
    """Run ``task(item)`` for every item on the cluster, reporting rows done.

    ``on_done(item, result)`` runs in this process as each task finishes (to record it in the
    manifest). The first failure cancels the rest and is re-raised. Returns the wall time.
    """
    progress = Progress(label, sum(rows(i) for i in items))
    count_submitted(len(items))
    if not items:
        return progress.close()
    partial: dict[int, int] = {}  # rows done inside running items, from the workers' events
    finished = [0]
    lock = threading.Lock()

    def refresh() -> None:  # under the lock
        progress.done = finished[0] + sum(partial.values())
        progress.show()

    def on_event(event: Any) -> None:
        _, msg = event
        if not isinstance(msg, dict) or msg.get("stage") != label or "rows" not in msg:  # rows, not notes
            return
        with lock:
            if msg["index"] in pending:  # an event that arrives after its task ended is stale
                partial[msg["index"]] = int(msg["rows"])
                refresh()

    pending = {item.index for item in items}
    futures: dict[Any, T] = {}
    try:
        with listening(client, on_event):  # subscribed before the first task can report
            futures.update({submit(client, task(item), label): item for item in items})
            for future in as_completed(list(futures)):
                item = futures[future]
                try:
                    result = result_of(future)
                except KilledWorker:
                    raise _killed(label, item) from None
                if on_done is not None:
                    on_done(item, result)
                log.debug("%s: piece %d done (%d rows)", label, item.index, rows(item))
                with lock:
                    pending.discard(item.index)
                    partial.pop(item.index, None)
                    finished[0] += rows(item)
                    refresh()
    except BaseException:
        client.cancel(list(futures))
        raise
    return progress.close()


def _killed(label: str, item: WorkItem) -> PipelineError:
    """One line for a task whose workers kept dying: the stage, the piece and, where it is one, its file."""
    where = getattr(item, "where", None)
    place = f" ({where()})" if callable(where) else ""
    tries = int(dask.config.get("distributed.scheduler.allowed-failures")) + 1
    return PipelineError(
        f"Dask workers died {tries} times running {label} of piece {item.index}{place}, usually for "
        "memory (a worker over 95% of --memory-limit is restarted) or a crash in native code; raise "
        "--memory-limit or lower --partition-size, then run the same command again to resume"
    )


def say_resuming(label: str, items: Sequence[WorkItem], todo: Sequence[WorkItem]) -> None:
    """One line when an earlier run finished part of a phase: how much is left."""
    if todo and len(todo) < len(items):
        total = sum(int(i.rows) for i in items)
        left = sum(int(i.rows) for i in todo)
        log.info("%s: resuming: %s of %s rows done by an earlier run", label, f"{total - left:,}", f"{total:,}")


def run_stage(client: Any, manifest: Any, stage: Stage[T, R]) -> dict[int, R]:
    """Run ``stage``'s items that ``manifest`` does not record done, recording each as it finishes
    (its files and its typed result); the stage is then marked finished. Returns every item's
    result by item index, earlier runs' included."""
    done = manifest.done_pieces(stage.name)

    def finished(item: T, result: Any) -> None:
        if stage.before_record is not None:
            stage.before_record(item, result)
        stored = to_dict(result) if dataclasses.is_dataclass(result) else result
        manifest.mark_piece(stage.name, item.index, stage.files(item), stored)

    todo = [item for item in stage.items if item.index not in done]
    say_resuming(stage.name, stage.items, todo)
    run_tasks(client, label=stage.name, items=todo, task=stage.task, on_done=finished)
    manifest.finish_stage(stage.name, {})
    return {index: stage.read(value) for index, value in manifest.piece_results(stage.name).items()}
