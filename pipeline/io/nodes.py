"""Machines that share no filesystem: each keeps its own copy of a staged directory.

A job whose ``--output`` or ``--index-dir`` is a URL works in a local folder that stands for it
(:mod:`pipeline.io.staging`). On one machine, or on nodes that mount one filesystem, every worker
reads and writes that folder. When the workers see a folder of their own there instead (pods, cloud
VMs, nodes with only local disks), the job runs *staged per node*: the object store is the only
place the machines meet, and every machine, the driver included, keeps at the same path a partial
copy of the directory holding only what it has read or written.

* **Reads fetch.** A task about to read a file of the directory calls :func:`fetched`: the file
  is downloaded when this machine lacks it, or when the remote object changed since this
  machine last fetched or wrote it (its size and time are checked, one request per read).
* **Writes go through.** A file written below the directory (by :func:`pipeline.io.atomic.atomic_path`)
  is uploaded as soon as it is renamed into place, before its task returns, so a finished task's
  files are on the object store when the driver records it done.
* **The driver keeps the records.** A task on such a worker returns, with its result, the ledger
  lines of the files it wrote (:class:`NodeResult`); the driver adds them to its own ledger, so
  its manifest records each file's size and CRC-32 without ever holding the file.
* **Removal follows.** Where the tool removes its own file or folder, the remote copy goes too.

Every machine registers the directories' remotes here (:func:`activate`); nothing happens in a
process where none is active. The driver is active from the moment it stages a directory (it
pulls data files only when read), until its cluster shows that the workers share its folders:
then it fetches the rest and works as on one machine.
"""

from __future__ import annotations

import fnmatch
import io
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

__all__ = [
    "Remote",
    "NodeResult",
    "activate",
    "deactivate",
    "active",
    "fetched",
    "wrote",
    "dropped",
    "remote_size",
    "present",
    "listed",
    "children",
    "source",
    "npy_rows",
    "moved",
    "dropped_below",
    "known",
    "task_writes",
    "count",
    "traffic",
]

P = TypeVar("P", bound=str | os.PathLike[str])


class Remote(Protocol):
    """A remote directory and this machine's folder at ``local`` that stands for it."""

    @property
    def local(self) -> Path: ...

    def fetch(self, rel: str) -> bool:
        """Bring file ``rel`` up to date here; False when the remote has no such file."""
        ...

    def send(self, rel: str) -> None:
        """Upload file ``rel`` as it is here."""
        ...

    def drop(self, rel: str) -> None:
        """Remove file or folder ``rel`` from the remote (the tool's own names only)."""
        ...

    def size(self, rel: str) -> int | None:
        """The remote file's size (None: not there)."""
        ...

    def knows(self, rel: str, size: int) -> None:
        """Another machine uploaded ``rel`` at ``size`` bytes."""
        ...

    def names(self, rel: str) -> list[str]:
        """The names of the remote files and folders directly in folder ``rel``."""
        ...

    def exists(self, rel: str) -> bool:
        """Whether the remote holds file or folder ``rel``."""
        ...

    def move(self, src: str, dst: str) -> list[tuple[str, str, int]]:
        """Rename remote file or folder ``src`` to ``dst``: each file moved, as ``(src, dst, size)``."""
        ...

    def drop_below(self, rel: str, keep: str | None) -> None:
        """Remove the remote files below folder ``rel`` that no local copy stands for, but ``keep``."""
        ...

    def open(self, rel: str) -> Any:
        """The remote file ``rel`` opened for random access (a pyarrow file)."""
        ...


@dataclass(frozen=True)
class NodeResult:
    """What a task on a node of its own returns: its result and the ledger lines of the files it
    wrote, as ``(run directory, line)``."""

    value: Any
    lines: tuple[tuple[str, str], ...]


# bytes this process moved, staged per node, and its requests for ranges ("reads")
TRAFFIC: dict[str, int] = {"fetched": 0, "ranged": 0, "sent": 0, "reads": 0}
_REMOTES: list[Remote] = []  # this process's staged directories, deepest first, while staging per node
_TASK = threading.local()  # .lines: the running task's written files (a list), on a worker


def activate(remotes: Iterable[Remote]) -> None:
    """Stage per node in this process: ``remotes`` are the job's staged directories."""
    _REMOTES[:] = sorted(remotes, key=lambda r: len(os.fspath(r.local)), reverse=True)


def count(kind: str, nbytes: int, requests: int = 0) -> None:
    """Add ``nbytes`` to this process's traffic of ``kind`` ("fetched", "ranged" or "sent"), and
    ``requests`` to its reads by range (a list group, a slice of an array: what grows with the
    number of tasks x the number of files they read from)."""
    TRAFFIC[kind] = TRAFFIC.get(kind, 0) + int(nbytes)
    TRAFFIC["reads"] = TRAFFIC.get("reads", 0) + int(requests)


def traffic() -> dict[str, int]:
    """The bytes this process has fetched whole, read by range and sent, staged per node, and its
    reads by range."""
    return dict(TRAFFIC)


def deactivate() -> None:
    _REMOTES.clear()


def active() -> bool:
    return bool(_REMOTES)


def _find(path: str | os.PathLike[str], *, folder: bool = False) -> tuple[Remote, str] | None:
    """The staged directory holding ``path`` and the path relative to it; ``folder``: ``path`` may
    be the directory itself (relative path ``""``)."""
    p = os.path.abspath(path)
    for remote in _REMOTES:
        root = os.path.abspath(remote.local)
        if p.startswith(root + os.sep):
            return remote, Path(p).relative_to(root).as_posix()
        if folder and p == root:
            return remote, ""
    return None


def fetched(path: P) -> P:
    """``path``, brought onto this machine first where it lies in a directory staged per node."""
    hit = _find(path)
    if hit is not None:
        hit[0].fetch(hit[1])
    return path


def wrote(path: str | os.PathLike[str], root: str | os.PathLike[str] | None, line: str | None) -> None:
    """``path`` was just written (``line``: its ledger line in run directory ``root``): upload it
    where it is staged per node, and keep the line for the running task's result."""
    hit = _find(path)
    if hit is None:
        return
    hit[0].send(hit[1])
    lines = getattr(_TASK, "lines", None)
    if lines is not None and root is not None and line is not None:
        lines.append((os.path.abspath(root), line))


def dropped(path: str | os.PathLike[str]) -> None:
    """The tool removed its file or folder ``path`` here: remove the remote copy too."""
    hit = _find(path)
    if hit is not None:
        hit[0].drop(hit[1])


def present(path: str | os.PathLike[str]) -> bool:
    """Whether file or folder ``path`` exists here or, staged per node, on the object store."""
    if os.path.exists(path):
        return True
    hit = _find(path)
    return hit is not None and hit[0].exists(hit[1])


def source(path: str | os.PathLike[str]) -> Any:
    """``path`` to read in place (a Parquet footer and some columns, say): the local file where it
    is here, else, staged per node, the remote object opened for random access (only the bytes
    read cross the network)."""
    if os.path.exists(path):
        return str(path)
    hit = _find(path)
    return str(path) if hit is None else hit[0].open(hit[1])


def npy_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` array whose magic string ``fh`` is at; ``fh``
    is left at the array's first byte."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(fh)


NPY_PREFIX_BYTES = 512  # first read of a remote .npy: NumPy pads a 1-d array's header to 128 bytes


def npy_rows(path: str | os.PathLike[str], lo: int, hi: int) -> np.ndarray:
    """Rows ``[lo, hi)`` of the 1-d array saved at ``.npy`` ``path``, read-only (callers copy what
    they keep): a view of the memory map where the file is here (or is not staged per node);
    staged per node and not here, read by range from the remote object (its header, then those
    rows' bytes: two reads, the header within the first), so a task that wants its slice of
    another machine's file moves that slice, not the file."""
    hit = None if os.path.exists(path) else _find(path)
    if hit is None:
        return np.load(fetched(path), mmap_mode="r")[lo:hi]
    remote = hit[0].open(hit[1])
    start = remote.read_at(NPY_PREFIX_BYTES, 0)  # the magic and, nearly always, the whole header
    version = np.lib.format.read_magic(io.BytesIO(start))
    length = int.from_bytes(start[8:10] if version == (1, 0) else start[8:12], "little")
    ends = length + (10 if version == (1, 0) else 12)
    whole = start if ends <= len(start) else remote.read_at(ends, 0)
    head = io.BytesIO(whole)
    shape, fortran, dtype = npy_header(head)
    if len(shape) != 1 or fortran or dtype.hasobject:
        raise ValueError(f"{path}: not a 1-d array of plain values")
    lo, hi = max(0, min(lo, shape[0])), max(0, min(hi, shape[0]))
    data = remote.read_at((hi - lo) * dtype.itemsize, head.tell() + lo * dtype.itemsize) if hi > lo else b""
    again = whole is not start
    count("ranged", len(start) + (len(whole) if again else 0) + len(data), requests=1 + again + (hi > lo))
    return np.frombuffer(data, dtype=dtype)


def children(directory: str | os.PathLike[str]) -> list[Path]:
    """The entries of ``directory`` here and, staged per node, on the object store, sorted."""
    d = Path(directory)
    found = {p.name for p in d.iterdir()} if d.is_dir() else set()
    hit = _find(d, folder=True)
    if hit is not None:
        found |= set(hit[0].names(hit[1]))
    return [d / n for n in sorted(found)]


def moved(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> list[tuple[Path, Path, int]]:
    """Staged per node: rename the remote copy of file or folder ``src`` to ``dst`` (in the same
    staged directory); returns each remote file moved, as ``(src, dst, size)``."""
    a, b = _find(src), _find(dst)
    if a is None or b is None or a[0] is not b[0]:
        return []
    root = Path(os.fspath(a[0].local))
    return [(root / s, root / d, n) for s, d, n in a[0].move(a[1], b[1])]


def listed(directory: str | os.PathLike[str], pattern: str) -> list[Path]:
    """The files in ``directory`` whose names match ``pattern`` (a glob), sorted: those here and,
    staged per node, those on the object store (written by other machines)."""
    found = {p.name: p for p in Path(directory).glob(pattern)}
    hit = _find(directory, folder=True)
    if hit is not None:
        for name in hit[0].names(hit[1]):
            if fnmatch.fnmatchcase(name, pattern):
                found.setdefault(name, Path(directory) / name)
    return [found[n] for n in sorted(found)]


def dropped_below(root: str | os.PathLike[str], keep: str | None) -> None:
    """The tool removed its files below run directory ``root`` (but folder ``keep``): remove the
    remote files no local copy stood for too (data files never fetched here)."""
    hit = _find(root, folder=True)
    if hit is not None:
        hit[0].drop_below(hit[1], keep)


def remote_size(path: str | os.PathLike[str]) -> int | None:
    """The size of ``path``'s remote copy where it is staged per node (None: not staged so, or absent)."""
    hit = _find(path)
    return None if hit is None else hit[0].size(hit[1])


def known(path: str | os.PathLike[str], size: int) -> None:
    """Another machine uploaded ``path`` at ``size`` bytes (its task's ledger line says so)."""
    hit = _find(path)
    if hit is not None:
        hit[0].knows(hit[1], size)


@contextmanager
def task_writes() -> Iterator[list[tuple[str, str]]]:
    """Collect the ledger lines of the files the calling thread writes (one task's)."""
    lines: list[tuple[str, str]] = []
    _TASK.lines = lines
    try:
        yield lines
    finally:
        _TASK.lines = None
