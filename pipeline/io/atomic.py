"""Atomic file writes: write to a temporary name in the same directory, then ``os.replace``.

A reader (or a resumed run) therefore sees either no file or a complete one, never a torn one.
Below a run directory, the file is recorded as the tool's just before the rename
(:mod:`pipeline.io.owned`), and a symbolic link on its way is refused: nothing is written through one.
In a directory staged per node, the file is uploaded once in place (:mod:`pipeline.io.nodes`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StorageError
from pipeline.io import nodes
from pipeline.io.owned import check_no_links, claim, is_temp_name, run_root
from pipeline.io.workdir import shown

TMP_MARK = ".tmp-"

__all__ = ["atomic_path", "write_json", "write_npz", "npz_rows", "npz_take", "remove_stale_temps", "TMP_MARK"]


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` if the block succeeds."""
    final = Path(final)
    root = run_root(final.parent)
    if root is not None:  # before mkdir, which would make folders through a link
        check_no_links(root, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # hidden (leading dot): readers of the folder (pyarrow datasets, our input planner) skip it,
    # even while a task killed mid-write has left it behind
    tmp = final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        line = claim(root, final, tmp) if root is not None else None
        os.replace(tmp, final)
        nodes.wrote(final, root, line)
    except StorageError:  # already one line naming the file
        raise
    except OSError as exc:
        raise storage_error(final, exc) from None
    except RuntimeError as exc:  # FAISS reports a short write as "write error in ..."
        if "write error" not in str(exc):
            raise
        raise storage_error(final, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


_FIX = {
    errno.ENOSPC: "the disk is full: free space there or choose another directory",
    errno.EDQUOT: "the quota is used up: free space there or choose another directory",
    errno.EROFS: "the filesystem is read-only: choose another directory",
    errno.EACCES: "the directory is not writable: fix its permissions or choose another directory",
    errno.EPERM: "the directory is not writable: fix its permissions or choose another directory",
    errno.EFBIG: "the file grew past the filesystem's or the process's file-size limit: lower --partition-size "
    "or choose another directory",
}


def storage_error(path: Path, exc: BaseException) -> StorageError:
    """A failed write of ``path`` as one line naming it and the fix. A short write without an
    errno (NumPy, FAISS) is a full disk or a file-size limit."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code not in _FIX and code is not None:
        fix = "check the directory, then"
    else:
        fix = (
            _FIX.get(code or 0, "the disk is full or a file-size limit was hit: free space or choose another directory")
            + "; then"
        )
    reason = getattr(exc, "strerror", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
    return StorageError(
        code or errno.EIO,
        f"{shown(path)}: cannot be written ({reason}); {fix} run the same "
        "command again to resume (finished parts are kept)",
    )


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_npz(path: str | os.PathLike[str], **arrays: Any) -> None:
    """Write ``arrays`` as one uncompressed ``.npz``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _stored_member(path: str | os.PathLike[str], fh: Any, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype]:
    """Seek ``fh`` to the first value of a stored (uncompressed) ``.npy`` member of an ``.npz``;
    return its shape and dtype."""
    fh.seek(info.header_offset + 26)  # the local header's name and extra lengths
    name_len, extra_len = struct.unpack("<HH", fh.read(4))
    fh.seek(info.header_offset + 30 + name_len + extra_len)
    shape, fortran, dtype = nodes.npy_header(fh)
    if fortran or not shape or dtype.hasobject:
        raise ValueError(f"{path}: {info.filename.removesuffix('.npy')} is not a C-ordered array of plain values")
    return shape, dtype


def npz_rows(path: str | os.PathLike[str], lo: int, hi: int) -> dict[str, np.ndarray]:
    """Rows ``[lo, hi)`` of every array in an ``.npz`` that :func:`write_npz` wrote, each read from
    its place in the file (the members are stored, not compressed): a task that wants a slice of a
    large file holds the slice, not the file. The arrays are the caller's (writable)."""
    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:  # not ours: read it whole
                out[name] = np.load(zf.open(info))[lo:hi]
                continue
            shape, dtype = _stored_member(path, fh, info)
            a, b = min(max(lo, 0), shape[0]), min(max(hi, 0), shape[0])
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            part = np.empty((max(0, b - a), *shape[1:]), dtype=dtype)
            fh.seek(fh.tell() + a * row_bytes)
            if part.size:
                fh.readinto(part.data.cast("B"))
            out[name] = part
    return out


def npz_take(path: str | os.PathLike[str], name: str, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (in that order) of the array ``name`` in an ``.npz`` that :func:`write_npz`
    wrote, each read from its place in the file: a few rows of a large file without the file."""
    wanted = np.asarray(rows, dtype=np.int64)
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:  # not ours: read it whole
            return np.load(zf.open(info))[wanted]
        shape, dtype = _stored_member(path, fh, info)
        data = fh.tell()
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((len(wanted), *shape[1:]), dtype=dtype)
        for i, row in enumerate(wanted.tolist()):
            fh.seek(data + row * row_bytes)
            fh.readinto(out[i : i + 1].data.cast("B"))
        return out


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Delete temporary files left by a killed run under ``directory`` (regular files under
    :func:`atomic_path`'s temporary names; links are neither followed nor removed); return how many."""
    n = 0
    for dirpath, _, filenames in os.walk(directory, followlinks=False):
        for name in filenames:
            p = Path(dirpath) / name
            if is_temp_name(name) and not p.is_symlink():
                p.unlink()
                n += 1
    return n
