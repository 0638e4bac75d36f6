"""Atomic file writes: write to a temporary name in the same directory, then ``os.replace``.

A reader (or a resumed run) therefore sees either no file or a complete one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

TMP_MARK = ".tmp-"

__all__ = ["atomic_path", "write_json", "remove_stale_temps", "TMP_MARK"]


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # hidden (leading dot): readers of the folder (pyarrow datasets, our input planner) skip it,
    # even while a task killed mid-write has left it behind
    tmp = final.with_name(f".{final.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def remove_stale_temps(directory: str | os.PathLike[str]) -> int:
    """Delete temporary files left by a killed run under ``directory``; return how many."""
    n = 0
    root = Path(directory)
    if not root.exists():
        return 0
    for p in root.rglob(f"*{TMP_MARK}*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n
