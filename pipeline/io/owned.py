"""Which files below a run directory the tool wrote, so that it never touches anyone else's.

A *run directory* is an output or index directory: one holding the tool's lock file
(:data:`pipeline.io.workdir.LOCK_NAME`, made before anything is written there) or its ledger. Every file the
tool writes below one lands by :func:`pipeline.io.atomic.atomic_path`, and just before the rename
that makes it visible its path (relative to the run directory), size, modification time and CRC-32
are appended to the directory's ledger, ``.knn-pipeline.owned`` (one JSON line per file, written
with ``O_APPEND`` by whichever process wrote the file). A file is the tool's when a ledger line
names its path and size and either its time or its CRC-32 (a copied or pulled directory keeps the
content, not the times).

* ``--overwrite`` and the cleanup of the tool's own working folders remove only such files; a
  directory holding anything else is refused up front, naming what is there (:func:`foreign`).
* Nothing below a run directory is written, locked or removed through a symbolic link: a link on
  the way to a file of the tool's is refused in one line (:func:`check_no_links`), the ledger and
  lock are opened with ``O_NOFOLLOW``, and removal never descends into a link.
* A damaged ledger line (a crash mid-append, a hostile edit) only makes files *not* the tool's,
  which is refused, never deleted.

The same CRC-32 records a finished piece in the manifest, so a piece whose bytes changed at the
same size is found and redone on resume (:meth:`Ledger.crc_matches`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ResumeError
from pipeline.io import nodes
from pipeline.io.workdir import LOCK_NAME, LOG_DIR, TIMINGS_NAME, shown

__all__ = [
    "LEDGER_NAME",
    "Ledger",
    "run_root",
    "check_no_links",
    "has_links",
    "check_writable",
    "claim",
    "foreign",
    "remove_owned",
    "discard",
    "rename",
    "merge_ledger",
    "adopt",
    "adopt_file",
    "file_crc",
    "is_temp_name",
]

log = logging.getLogger(__name__)

LEDGER_NAME = ".knn-pipeline.owned"
_TEMP = re.compile(r"^.+\.tmp-[0-9a-f]{8}$")  # atomic_path's temporary names (hidden since 0.1)
_CHUNK = 4 << 20


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of :func:`pipeline.io.atomic.atomic_path`'s temporary names."""
    return bool(_TEMP.match(name))


def file_crc(path: str | os.PathLike[str]) -> int:
    """CRC-32 of a file's bytes, read without following a final symbolic link, into one reused
    buffer (a fresh chunk per read costs a page fault per 4 KiB: a 520 MB index 0.24-0.31 s
    against 0.18 s)."""
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


def run_root(path: str | os.PathLike[str]) -> Path | None:
    """The nearest run directory at or above ``path`` (one holding the tool's lock file or ledger), if any."""
    p = Path(os.path.abspath(path))
    for d in (p, *p.parents):
        for name in (LOCK_NAME, LEDGER_NAME):
            try:
                if stat.S_ISREG(os.lstat(d / name).st_mode):
                    return d
            except OSError:
                continue
    return None


def _link_error(path: Path) -> ResumeError:
    return ResumeError(
        f"{shown(path)} is a symbolic link where this tool keeps its own files; it never writes or "
        "deletes through a link: remove the link, or choose another directory"
    )


def has_links(root: Path, path: Path) -> bool:
    """Whether :func:`check_no_links` would refuse ``path``."""
    try:
        check_no_links(root, path)
    except ResumeError:
        return True
    return False


def check_no_links(root: Path, path: Path) -> None:
    """Refuse a symbolic link at ``path`` or between ``root`` and it (``root`` itself may be one)."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        return
    d = Path(os.path.abspath(root))
    for part in rel.parts:
        d = d / part
        try:
            if stat.S_ISLNK(os.lstat(d).st_mode):
                raise _link_error(d)
        except FileNotFoundError:
            return


def _append(root: Path, line: str) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    try:
        fd = os.open(root / LEDGER_NAME, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _link_error(root / LEDGER_NAME) from None
        raise
    try:
        os.write(fd, line.encode())  # one write per line: appends from several processes do not interleave
    finally:
        os.close(fd)


def _entry(root: Path, final: Path, written: Path) -> str:
    st = os.lstat(written)
    rel = Path(os.path.abspath(final)).relative_to(os.path.abspath(root)).as_posix()
    return json.dumps([rel, st.st_size, st.st_mtime_ns, file_crc(written)]) + "\n"


def claim(root: Path, final: Path, written: Path) -> str:
    """Record in ``root``'s ledger that the file at ``written`` (about to be renamed onto ``final``,
    below ``root``) is the tool's; returns the ledger line."""
    line = _entry(root, final, written)
    _append(root, line)
    return line


def adopt_file(final: Path, written: Path) -> None:
    """Claim ``written``, a copy fetched from object storage about to be renamed onto ``final``, as
    :func:`pipeline.io.atomic.atomic_path` claims what it writes: where ``final`` lies in a run
    directory, with no symbolic link on the way."""
    root = run_root(final.parent)
    if root is not None:
        check_no_links(root, final)
        claim(root, final, written)


def adopt(lines: Iterable[tuple[str, str]]) -> None:
    """Add ledger lines another machine wrote (``(run directory, line)``: files a task there wrote
    and uploaded) to the ledgers of this machine's run directories holding those files (the other
    machine may know fewer of them), and tell the staged directory their sizes."""
    by_root: dict[Path, list[str]] = {}
    for root, line in lines:
        try:
            rel, size, mtime, crc = json.loads(line)
        except (ValueError, TypeError):
            continue
        path = Path(root) / str(rel)
        here = run_root(path.parent)
        if here is None:
            continue
        entry = [path.relative_to(here).as_posix(), int(size), int(mtime), int(crc)]
        by_root.setdefault(here, []).append(json.dumps(entry) + "\n")
        nodes.known(path, int(size))
    for here, got in by_root.items():
        _append(here, "".join(got))


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    crc: int


class Ledger:
    """A run directory's ledger, read once and then only where it grew (:meth:`refresh`)."""

    _open: dict[str, Ledger] = {}

    def __init__(self, root: Path):
        self.root = Path(os.path.abspath(root))
        self.entries: dict[str, list[_Seen]] = {}
        self._offset = 0
        self._head = b""  # the first line read: another file (the folder made again) begins otherwise
        self._crcs: dict[tuple[str, int, int, int], int] = {}  # (rel, size, mtime, inode) -> crc, this process

    @classmethod
    def of(cls, root: str | os.PathLike[str]) -> Ledger:
        """The ledger of ``root``, up to date."""
        key = os.path.abspath(root)
        ledger = cls._open.get(key)
        if ledger is None:
            ledger = cls._open[key] = cls(Path(key))
        ledger.refresh()
        return ledger

    def refresh(self) -> None:
        try:
            fd = os.open(self.root / LEDGER_NAME, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            self.entries, self._offset, self._head = {}, 0, b""
            return
        with os.fdopen(fd, "rb") as fh:
            if fh.read(len(self._head)) != self._head:  # truncated, or another file (inodes are reused)
                self.entries, self._offset, self._head = {}, 0, b""
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a line still being appended is read next time
        if not self._head and end:
            self._head = data[: data.index(b"\n") + 1]
        for raw in data[:end].splitlines():
            try:
                rel, size, mtime, crc = json.loads(raw)
                self.entries.setdefault(str(rel), []).append(_Seen(int(size), int(mtime), int(crc)))
            except (ValueError, TypeError):
                continue  # a damaged line owns nothing
        self._offset += end

    def _crc(self, rel: str, st: os.stat_result) -> int:
        key = (rel, st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in self._crcs:
            self._crcs[key] = file_crc(self.root / rel)
        return self._crcs[key]

    def _regular(self, rel: str) -> os.stat_result | None:
        """``rel``'s status if it is a regular file (not a link, not missing)."""
        try:
            st = os.lstat(self.root / rel)
        except OSError:
            return None
        return st if stat.S_ISREG(st.st_mode) else None

    def crc_of(self, rel: str) -> int | None:
        """The CRC-32 of the tool's file ``rel`` as it is now (from the ledger where its size and
        time match, computed otherwise); None if it is missing or a link."""
        st = self._regular(rel)
        if st is None:
            return self._remote_crc(rel)
        for seen in self.entries.get(rel, ()):
            if seen.size == st.st_size and seen.mtime_ns == st.st_mtime_ns:
                return seen.crc
        return self._crc(rel, st)

    def owns(self, rel: str) -> bool:
        """Whether the regular file ``rel`` is one the tool wrote (size and time, or size and CRC)."""
        st = self._regular(rel)
        if st is None:
            return False
        seen = [s for s in self.entries.get(rel, ()) if s.size == st.st_size]
        if any(s.mtime_ns == st.st_mtime_ns for s in seen):
            return True
        return bool(seen) and self._crc(rel, st) in {s.crc for s in seen}

    def _remote_crc(self, rel: str) -> int | None:
        """For a file another machine wrote to a directory staged per node (:mod:`pipeline.io.nodes`),
        not held here: the CRC its ledger line gives at the remote copy's size."""
        size = nodes.remote_size(self.root / rel)
        if size is None or os.path.lexists(self.root / rel):
            return None
        return self.crc_at(rel, size)

    def crc_at(self, rel: str, size: int) -> int | None:
        """The CRC-32 the latest ledger line for ``rel`` at ``size`` bytes gives (None: no such line)."""
        crcs = [s.crc for s in self.entries.get(rel, ()) if s.size == size]
        return crcs[-1] if crcs else None

    def crc_matches(self, rel: str, size: int, crc: int) -> bool:
        """Whether ``rel`` is a regular file of ``size`` bytes whose content has CRC-32 ``crc`` (or,
        staged per node, a remote copy of that size that a ledger line gives that CRC)."""
        st = self._regular(rel)
        if st is None:
            return nodes.remote_size(self.root / rel) == size and self._remote_crc(rel) == crc
        return st.st_size == size and self.crc_of(rel) == crc


_ALWAYS = {LOCK_NAME, LEDGER_NAME, TIMINGS_NAME}  # the tool's bookkeeping, recognised by name


def _walk(root: Path, top: Path, keep: str | None) -> Iterator[tuple[Path, Path | None]]:
    """Every non-directory entry below ``top`` as (path, its run directory), never following links;
    ``keep`` (a name directly below ``root``) and ``root``'s logs are skipped."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        d = Path(dirpath)
        if d == root:
            dirnames[:] = [n for n in dirnames if n not in (keep, LOG_DIR)]
        links = [n for n in dirnames if os.path.islink(d / n)]
        dirnames[:] = sorted(n for n in dirnames if n not in links)
        owner = run_root(d)
        for name in sorted(filenames + links):
            yield d / name, owner


def foreign(
    root: str | os.PathLike[str], keep: str | None = None, top: str | os.PathLike[str] | None = None
) -> list[str]:
    """Entries below ``top`` (default ``root``) the tool cannot show it wrote, relative to ``root``:
    files its ledgers do not record with their size, and every symbolic link."""
    r = Path(os.path.abspath(root))
    start = Path(os.path.abspath(top)) if top is not None else r
    out = []
    for path, owner in _walk(r, start, keep):
        if not _is_ours(path, owner):
            out.append(path.relative_to(r).as_posix())
    return out


def _is_ours(path: Path, owner: Path | None) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True  # gone meanwhile: nothing to protect
    if not stat.S_ISREG(st.st_mode):
        return False
    if path.name in _ALWAYS or is_temp_name(path.name):
        return True
    if owner is None:
        return False
    if path.name == "manifest.json" and path.parent == owner and os.path.lexists(owner / LEDGER_NAME):
        return True  # the tool's bookkeeping where it keeps a ledger, even when damaged (it is rewritten)
    return Ledger.of(owner).owns(path.relative_to(owner).as_posix())


def _listed(names: list[str]) -> str:
    return ", ".join(shown(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def remove_owned(root: str | os.PathLike[str], keep: str | None = None) -> None:
    """Delete what the tool wrote below ``root`` (``keep`` and the logs excepted), after checking that
    nothing else is there: a directory holding any other file or link is refused, naming them,
    before anything is removed."""
    r = Path(os.path.abspath(root))
    if not r.is_dir():
        return
    strange = foreign(r, keep)
    if strange:
        raise ResumeError(
            f"{shown(r)} holds files this tool did not write ({_listed(strange)}); --overwrite removes "
            "only its own outputs: move those away or choose another directory"
        )
    _remove(r, r, keep)
    nodes.dropped_below(r, keep)
    fd = os.open(r / LEDGER_NAME, os.O_WRONLY | os.O_TRUNC | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    os.close(fd)  # what it recorded is gone


def discard(path: str | os.PathLike[str]) -> list[str]:
    """Remove the tool's working folder or file ``path`` where it is the tool's: its own files go,
    anything else stays (and is returned, relative to ``path``'s run directory, for a warning)."""
    p = Path(os.path.abspath(path))
    root = run_root(p.parent)
    if root is not None:
        nodes.dropped(p)
    if root is None or not os.path.lexists(p):
        return []
    check_no_links(root, p)
    if not p.is_dir():
        if _is_ours(p, root):
            p.unlink()
            return []
        return [p.relative_to(root).as_posix()]
    strange = foreign(root, top=p)
    _remove(root, p, None)
    if strange:
        log.warning("%s: kept %s, which this tool did not write", shown(p), _listed(strange))
    return strange


def _remove(root: Path, top: Path, keep: str | None) -> None:
    """Unlink the tool's files below ``top``, then the folders left empty (``top`` included unless it
    is ``root``)."""
    # decided before anything goes: a nested run directory's ledger must still vouch for the files
    # listed after it
    doomed = [
        path
        for path, owner in _walk(root, top, keep)
        if (path.name not in (LOCK_NAME, LEDGER_NAME) or path.parent != root) and _is_ours(path, owner)
    ]
    for path in doomed:
        path.unlink()
    skipped = [root / n for n in (keep, LOG_DIR) if n]
    for dirpath, _, _ in os.walk(top, topdown=False, followlinks=False):
        d = Path(dirpath)
        if d == root or any(d == s or s in d.parents for s in skipped):
            continue
        if not os.path.islink(d):
            try:
                d.rmdir()
            except OSError:  # not empty: it holds something the tool leaves alone
                pass


def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename the tool's file or folder ``src`` to ``dst`` in the same run directory, recording the
    files at their new paths (their CRCs carried over, not recomputed)."""
    s, d = Path(os.path.abspath(src)), Path(os.path.abspath(dst))
    root = run_root(s.parent)
    if root is None:
        os.replace(s, d)
        return
    check_no_links(root, s)
    check_no_links(root, d.parent)
    ledger = Ledger.of(root)
    moved = []
    for was, now, size in nodes.moved(s, d):  # staged per node: the copies other machines wrote
        crc = ledger.crc_at(was.relative_to(root).as_posix(), size)
        if crc is not None and not os.path.lexists(was):
            moved.append(json.dumps([now.relative_to(root).as_posix(), size, 0, crc]) + "\n")
            nodes.known(now, size)
    for path, _ in _walk(root, s, None) if s.is_dir() else [(s, root)]:
        rel = path.relative_to(root).as_posix()
        crc = ledger.crc_of(rel) if ledger.owns(rel) else None
        if crc is not None:
            st = os.lstat(path)
            new = (d / path.relative_to(s) if path != s else d).relative_to(root).as_posix()
            moved.append(json.dumps([new, st.st_size, st.st_mtime_ns, crc]) + "\n")
    if moved:
        _append(root, "".join(moved))
    if os.path.lexists(s):
        os.replace(s, d)


def check_writable(directory: str | os.PathLike[str], overwrite: bool, keep: str | None = None) -> None:
    """Before any work and before anything is created there: refuse, in one line naming what is
    there, a directory holding a symbolic link, one the tool did not write (it holds files but no
    ledger or manifest of the tool's), and, with ``overwrite``, one holding anything the tool did
    not write. ``keep`` is a
    run directory nested inside (the default index directory), checked on its own."""
    d = Path(directory)
    if os.path.lexists(d) and not d.is_dir():
        raise ResumeError(f"{shown(d)} is a file, not a directory; choose a directory for the tool's outputs")
    if not d.is_dir():
        return
    for path, _ in _walk(Path(os.path.abspath(d)), Path(os.path.abspath(d)), keep):
        if path.is_symlink():
            raise _link_error(path)
    entries = sorted(n for n in os.listdir(d) if n not in (LOG_DIR, LOCK_NAME, keep))
    if not entries:
        return
    if not ({LEDGER_NAME, "manifest.json"} & set(entries)):
        why = "--overwrite removes only the tool's own outputs, so " if overwrite else ""
        raise ResumeError(
            f"{shown(d)} is not empty and was not written by this tool (it holds {_listed(entries)}); "
            f"{why}nothing there is changed: choose an empty or new directory"
        )
    if overwrite:
        strange = foreign(d, keep)
        if strange:
            raise ResumeError(
                f"{shown(d)} holds files this tool did not write ({_listed(strange)}); --overwrite "
                "removes only its own outputs: move those away or choose another directory"
            )


def merge_ledger(ledger: str | os.PathLike[str], lines: bytes) -> None:
    """Add to the ledger file ``ledger`` the complete lines of ``lines`` it lacks (a ledger pulled
    from object storage, where the job that wrote those files kept it)."""
    path = Path(ledger)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            have = set(fh.read().splitlines())
    except FileNotFoundError:
        have = set()
    complete = lines[: lines.rfind(b"\n") + 1]
    new = [ln for ln in complete.splitlines() if ln and ln not in have]
    if new:
        _append(path.parent, b"\n".join(new).decode(errors="replace") + "\n")
