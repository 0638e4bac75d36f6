"""Progress of long phases: a live line on a terminal, plain log lines otherwise.

The CLI decides whether a live line is wanted (:func:`configure`); library code only reports
rows done through :class:`Progress`, :class:`PieceProgress` or the stage runner
(:mod:`pipeline.runtime.runner`).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "PieceProgress",
    "Progress",
    "configure",
    "tasks_submitted",
    "watch",
    "listening",
    "count_submitted",
    "task_key",
    "busy_by_worker",
    "record_busy",
    "peak_rss",
]

log = logging.getLogger(__name__)


_LIVE = False
_submitted = [0]  # tasks this process has submitted through the stage runner


def tasks_submitted() -> int:
    """Tasks submitted through :func:`pipeline.runtime.runner.run_tasks` so far in this process (a
    rerun that submits none found everything done)."""
    return _submitted[0]


def count_submitted(tasks: int) -> None:
    """Count ``tasks`` more submitted (:func:`tasks_submitted`)."""
    _submitted[0] += tasks


def task_key(label: str) -> str:
    """A unique Dask key for one task of phase ``label``: the task stream (and the dashboard)
    group tasks by it, so busy time is counted per phase (:func:`busy_by_worker`)."""
    return f"{label}-{uuid.uuid4().hex}"


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB); run on each worker too."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def record_busy(client: Any) -> float:
    """Start recording the scheduler's task stream; returns the time to count busy time from."""
    since = time.time()
    client.get_task_stream(start=since)  # the first call adds the scheduler's task-stream plugin
    return since


def busy_by_worker(client: Any, since: float) -> dict[str, dict[str, float]]:
    """Seconds each worker spent computing tasks of each phase since ``since`` (:func:`record_busy`)."""
    from dask.utils import key_split

    busy: dict[str, dict[str, float]] = {}
    for record in client.get_task_stream(start=since):
        phases = busy.setdefault(str(record.get("worker", "?")), {})
        label = key_split(record["key"])
        for span in record.get("startstops", ()):
            if span.get("action") == "compute":
                phases[label] = phases.get(label, 0.0) + float(span["stop"]) - float(span["start"])
    return busy


def configure(live: bool) -> None:
    """Show a live progress line on stderr (``True``) or log every 10 s (``False``)."""
    global _LIVE
    _LIVE = live


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


TOPIC = "knn-progress"  # worker -> driver events: rows done inside a running piece
EVENT_INTERVAL = 1.0  # seconds between one task's events


class PieceProgress:
    """Rows done inside one running piece, sent from the worker to the driver (a Dask event) at
    most once a second, so a long piece moves the driver's progress line before it ends.
    Outside a Dask worker (tests, helpers run in the driver) it does nothing."""

    def __init__(self, stage: str, index: int) -> None:
        self.stage, self.index, self.done, self._last = stage, index, 0, 0.0
        try:
            from distributed import get_worker

            self._worker: Any = get_worker()
        except ValueError:
            self._worker = None

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self._worker is not None and now - self._last >= EVENT_INTERVAL:
            self._last = now
            self._worker.log_event(TOPIC, {"stage": self.stage, "index": self.index, "rows": self.done})

    def note(self, text: str) -> None:
        """Say what the task is doing now (a step with no row count: k-means, a tuning setting);
        the driver shows it beside the phase's elapsed time (:func:`watch`)."""
        if self._worker is not None:
            self._worker.log_event(TOPIC, {"stage": self.stage, "index": self.index, "note": text})


class Progress:
    """Rows done out of ``total`` for one phase, with rows/s and ETA."""

    def __init__(self, label: str, total: int, interval: float = 10.0):
        self.label, self.total, self.interval = label, max(total, 0), interval
        self.done = 0
        self.start = self._last = time.monotonic()

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done:,}/{self.total:,} rows ({pct:.0f}%), {rate:,.0f} rows/s, "
            f"elapsed {_duration(elapsed)}, ETA {_duration(eta)}"
        )

    def advance(self, rows: int) -> None:
        self.done += rows
        self.show()

    def show(self) -> None:
        now = time.monotonic()
        if _LIVE:
            sys.stderr.write("\r" + self.line() + "\033[K")
            sys.stderr.flush()
        elif now - self._last >= self.interval:
            log.info("%s", self.line())
            self._last = now

    def close(self) -> float:
        """End the phase; return its wall time in seconds."""
        if _LIVE:
            sys.stderr.write("\r" + self.line() + "\033[K\n")
            sys.stderr.flush()
        else:
            log.info("%s", self.line())
        return time.monotonic() - self.start


def watch(client: Any, future: Any, label: str, note: str = "", interval: float = 10.0) -> Any:
    """Wait for one long task (training, the tuning walk), showing the phase, its elapsed time and
    the latest step the worker reported through :meth:`PieceProgress.note`; return its result.
    Live: the line is redrawn every second and on every step; in logs: a line every ``interval``
    seconds while the task runs (a quick phase logs nothing here)."""
    state = {"note": note}
    start = last = time.monotonic()
    lock = threading.Lock()

    def line() -> str:
        return f"{label}: {state['note'] or 'running'}, elapsed {_duration(time.monotonic() - start)}"

    def show() -> None:
        nonlocal last
        now = time.monotonic()
        if _LIVE:
            sys.stderr.write("\r" + line() + "\033[K")
            sys.stderr.flush()
        elif now - last >= interval:
            log.info("%s", line())
            last = now

    def on_event(event: Any) -> None:
        _, msg = event
        if isinstance(msg, dict) and msg.get("stage") == label and "note" in msg:
            with lock:
                state["note"] = str(msg["note"])
                show()

    with listening(client, on_event):
        while True:
            try:
                result = future.result(timeout=1.0)
                break
            except TimeoutError:
                with lock:
                    show()
    if _LIVE:
        sys.stderr.write("\r" + line() + "\033[K\n")
        sys.stderr.flush()
    return result


@contextlib.contextmanager
def listening(client: Any, handler: Callable[[Any], None]) -> Iterator[None]:
    """Receive the workers' progress events while waiting (clients without topics: no events);
    on a failure, end the live line so the error starts on a line of its own."""
    subscribe = getattr(client, "subscribe_topic", None)
    if subscribe is not None:
        subscribe(TOPIC, handler)
    try:
        yield
    except BaseException:
        if _LIVE:
            sys.stderr.write("\n")
        raise
    finally:
        if subscribe is not None:
            client.unsubscribe_topic(TOPIC)
