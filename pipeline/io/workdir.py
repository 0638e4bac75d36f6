"""Run directories: where outputs may go, what the tool owns in them, and one job at a time.

Three guarantees, each checked before anything is written:

* an output or index directory never is, contains or lies inside an input path, nor each other
  (an index directory may be a direct child of the output: ``OUTPUT/index``);
* ``--overwrite`` removes only the files the tool recorded writing (:mod:`pipeline.io.owned`); a
  directory holding anything else is refused, naming it, before any work;
* a job holds an exclusive lock on each directory it writes (a shared one on an index it only
  reads). The lock is an ``flock`` on ``.knn-pipeline.lock``: the kernel releases it when the
  holder dies, even by ``kill -9``, so a stale lock never blocks; the file names the holder's
  host and pid for the message a second job gets. It is opened without following a link.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, ResumeError

__all__ = [
    "OUTPUT_NAMES",
    "INDEX_NAMES",
    "LOCK_NAME",
    "LOG_DIR",
    "PATCH_NAME",
    "TIMINGS_NAME",
    "TRUTH_NAME",
    "check_locations",
    "locked",
    "shown",
]

LOG_DIR = "logs"  # batch jobs' logs: kept through --overwrite
LOCK_NAME = ".knn-pipeline.lock"
TIMINGS_NAME = ".timings.json"  # the phases of an unfinished job, across its runs (written before the manifest)
TRUTH_NAME = "_recall_truth.npz"  # a self-join's recall sample and its exact neighbours, kept for updates
PATCH_NAME = "_patch"  # where earlier versions partitioned an update's reverse neighbours: removed when seen

# everything run, join, dedup and graph write in an output directory
OUTPUT_NAMES = frozenset(
    {
        "manifest.json",
        "_SUCCESS",
        "report.json",
        "report.md",
        "report.html",
        "neighbors",
        "knn",
        "_queries",
        "pairs",
        "groups",
        "kept",
        "deduplicated",
        "removed",
        "contamination",
        "against",
        "_dedup",
        "_explore",
        "edges",
        "nodes",
        "_graph",
        "graph.npz",
        "umap_knn.npz",
        "_exact",
        "_routed",
        PATCH_NAME,
        TRUTH_NAME,
        "recall_curve.svg",
        "kth_score.svg",
        "timings.svg",
        "group_sizes.svg",
        "degrees.svg",
        TIMINGS_NAME,
        # the PNG charts earlier versions drew: still ours, so an older output folder is reused
        "recall_curve.png",
        "kth_score.png",
        "timings.png",
        "group_sizes.png",
        "degrees.png",
    }
)
# everything build writes in an index directory
INDEX_NAMES = frozenset(
    {"manifest.json", "index.faiss", "index.ivfdata", "row_lists.npy", "trained.faiss", "store", "parts", "config.yaml"}
)


_SHOWN_AS: dict[str, str] = {}  # local staging folder -> the URL it stands for (pipeline.io.staging)


def show_as(local: str | os.PathLike[str], url: str) -> None:
    """Messages name ``url`` for paths inside the local folder ``local`` that stages it."""
    _SHOWN_AS[os.fspath(local).rstrip("/")] = url.rstrip("/")


def shown(path: str | os.PathLike[str]) -> str:
    """A path as messages show it: control characters escaped, so a file name cannot forge log
    lines; a path inside a staging folder as the URL it stands for."""
    s = os.fspath(path)
    for local, url in _SHOWN_AS.items():
        if s == local or s.startswith(local + "/"):
            s = url + s[len(local) :]
            break
    return s if s.isprintable() else repr(s)[1:-1]


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _real(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(p))))


def check_locations(
    inputs: Sequence[str],
    input_files: Iterable[str],
    output: str | os.PathLike[str] | None,
    index_dir: str | os.PathLike[str] | None,
) -> None:
    """Refuse an output or index directory that overlaps the input or each other, before any work.

    ``inputs`` are the entries given (directories, globs, files); ``input_files`` the files they
    resolved to. Directories given as input must neither hold nor lie inside a directory the tool
    writes (a second run would read its own outputs as input, and ``--overwrite`` could reach the
    input); a resolved input file must not lie inside one.
    """
    targets = [(flag, _real(p)) for flag, p in (("--output", output), ("--index-dir", index_dir)) if p]
    if output and index_dir:
        out, idx = _real(output), _real(index_dir)
        if out == idx:
            raise ConfigError(
                f"--index-dir {shown(idx)} is the --output directory; give the index its own "
                "directory (the default is OUTPUT/index)"
            )
        if _inside(out, idx):
            raise ConfigError(
                f"--output {shown(out)} lies inside --index-dir {shown(idx)}; choose an output "
                "directory outside the index"
            )
        if _inside(idx, out) and idx.parent != out:
            raise ConfigError(
                f"--index-dir {shown(idx)} lies deep inside --output {shown(out)}; put it directly "
                "under the output (OUTPUT/index, the default) or outside it"
            )
    dirs = [_real(e) for e in inputs if not any(ch in e for ch in "*?[") and os.path.isdir(e)]
    for flag, target in targets:
        for d in dirs:
            if _inside(target, d) or _inside(d, target):
                how = "is" if target == d else "lies inside" if _inside(target, d) else "contains"
                raise ConfigError(
                    f"{flag} {shown(target)} {how} the input directory {shown(d)}; write outputs to a "
                    "directory outside the input (the tool never writes among input files)"
                )
    for f in input_files:
        real = _real(f)
        for flag, target in targets:
            if _inside(real, target):
                raise ConfigError(
                    f"input file {shown(f)} lies inside {flag} {shown(target)}; write outputs to a "
                    "directory that holds no input"
                )


@contextlib.contextmanager
def locked(directory: str | os.PathLike[str], shared: bool = False) -> Iterator[None]:
    """Hold ``directory``'s lock for the block: exclusive for a writer, shared for a reader.

    A second job on the same directory is refused at once, naming the holder.
    """
    d = Path(directory)
    if shared and not d.is_dir():
        yield
        return
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ResumeError(
                f"{shown(d / LOCK_NAME)} is a symbolic link where this tool keeps its lock file; it "
                "never writes through a link: remove the link, or choose another directory"
            ) from None
        raise ConfigError(
            f"{shown(d)}: cannot create or lock this directory ({exc.strerror}); check its "
            "permissions or choose another directory"
        ) from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _holder(fd)
            raise ResumeError(
                f"{shown(d)} is in use by another job ({holder}); wait for it to finish, or use another directory"
            ) from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(
                fd,
                json.dumps(
                    {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
                ).encode(),
                0,
            )
        yield
    finally:
        os.close(fd)  # closing releases the flock


def gone_here(host: Any, pid: Any) -> bool:
    """Whether the process ``pid`` on ``host`` is known to be gone: it ran on this host and no
    longer exists (a holder elsewhere, or one we may not signal, might still run)."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        host, pid = str(info["host"]), int(info["pid"])
    except (ValueError, KeyError, TypeError, OSError):
        return "a job reading it"
    if gone_here(host, pid):  # the last writer is gone: readers hold it now
        return "a job reading it"
    return f"pid {pid} on {shown(host)}, since {info.get('since')}"
