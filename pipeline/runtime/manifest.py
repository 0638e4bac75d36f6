"""Run manifests: what a directory was built from, and which pieces of which stage are done.

A piece counts as done when the manifest records it *and* its file exists below the directory,
not through a link, with the recorded size and CRC-32 (checked from the file's bytes whenever its
time differs from the one the tool wrote, :mod:`pipeline.io.owned`). A record that points outside
the directory counts as not done. Files are written atomically, so a crash leaves at worst an
unrecorded piece, which is redone under the same name (no duplicate rows). A directory built from
another input or configuration is refused with a list of what changed, unless ``overwrite`` is set.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ResumeError
from pipeline.io import nodes
from pipeline.io.atomic import is_temp_name, remove_stale_temps, write_json
from pipeline.io.owned import LEDGER_NAME, Ledger, foreign, has_links, remove_owned
from pipeline.io.workdir import LOCK_NAME, LOG_DIR, TIMINGS_NAME, shown
from pipeline.results import Files, from_dict, to_dict

__all__ = ["Manifest", "describe_changes", "is_append", "is_update", "LOG_DIR"]

log = logging.getLogger(__name__)

VERSION = 1
R = TypeVar("R")


def describe_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += describe_changes(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    if old != new:
        if prefix.endswith("files") and isinstance(old, list) and isinstance(new, list):
            o = {f[0]: f[1:] for f in old}
            n = {f[0]: f[1:] for f in new}
            diffs = [f"{p} added" for p in n if p not in o] + [f"{p} removed" for p in o if p not in n]
            diffs += [f"{p} changed (size, mtime or footer)" for p in n if p in o and o[p] != n[p]]
            return [f"input files: {', '.join(diffs[:5])}" + (" ..." if len(diffs) > 5 else "")]
        return [f"{prefix}: {old!r} -> {new!r}"]
    return []


def upgrade_files(old: Any, new: Any) -> Any:
    """``old`` with file entries recorded before footers were hashed (path, size, mtime) taking
    the new entry's footer hash where path, size and mtime still match."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: upgrade_files(v, new.get(k)) for k, v in old.items()}
    if isinstance(old, list) and isinstance(new, list) and old and isinstance(old[0], list):
        fresh = {tuple(f[:3]): f for f in new if isinstance(f, list) and len(f) > 3}
        return [fresh.get(tuple(f), f) if len(f) == 3 else f for f in old]
    return old


def is_append(old: Any, new: Any) -> bool:
    """``new`` equals ``old`` except that input file lists gained files at their end (and row counts grew)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if set(old) != set(new):
            return False
        if isinstance(old.get("files"), list) and isinstance(new.get("files"), list):
            of, nf = old["files"], new["files"]
            if nf[: len(of)] != of:
                return False
            return all(is_append(old[k], new[k]) for k in old if k not in ("files", "rows"))
        return all(is_append(old[k], new[k]) for k in old)
    return bool(old == new)


def is_update(old: Any, new: Any) -> bool:
    """``new`` equals ``old`` except for the input's files and rows (added, removed or rewritten)."""
    if isinstance(old, dict) and isinstance(new, dict):
        if set(old) != set(new):
            return False
        return all(k in ("files", "rows") or is_update(old[k], new[k]) for k in old)
    return bool(old == new)


def _confined(rel: str) -> bool:
    """Whether a recorded path stays below its directory: relative, with no ``..``."""
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


class Manifest:
    """``manifest.json`` of one run directory (an index directory or an output directory)."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        self.path = self.dir / "manifest.json"
        self.data: dict[str, Any] = {"version": VERSION, "identity": None, "stages": {}}
        self.damaged: str | None = None  # why manifest.json could not be read
        self._last_save = 0.0
        self._min_interval = 0.0
        if self.path.exists():
            try:
                data = json.loads(self.path.read_bytes())
                if not isinstance(data, dict) or not isinstance(data.get("stages"), dict) or "identity" not in data:
                    raise ValueError("not a manifest of this tool")
                self.data = data
            except (ValueError, UnicodeDecodeError, OSError) as exc:
                self.damaged = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    def check_readable(self, fix: str) -> None:
        """Refuse a damaged ``manifest.json`` in one line naming it and ``fix``."""
        if self.damaged is not None:
            raise ResumeError(
                f"{shown(self.path)}: damaged manifest ({self.damaged}), so what is finished here is unknown; {fix}"
            )

    def open(
        self,
        identity: dict[str, Any],
        overwrite: bool,
        what: str,
        *,
        keep: str | None = None,
        allow_append: bool = False,
        allow_update: bool = False,
    ) -> bool:
        """Start or resume this directory for ``identity``; return True if the input changed.

        ``overwrite`` starts afresh (sub-directory ``keep`` excepted: it has its own manifest).
        With ``allow_append``, an input that only gained files after the old ones is accepted;
        with ``allow_update``, one whose files were added, removed or rewritten (every other
        setting the same): the caller updates the stages that must see the change.
        Otherwise a directory made from another identity, or a non-empty one without a manifest,
        is refused with what changed.
        """
        new = json.loads(json.dumps(identity, default=str))
        if not overwrite:
            self.check_readable("pass --overwrite to redo this directory from scratch, or use another directory")
        old = upgrade_files(self.data.get("identity"), new)
        appended = False
        if overwrite:
            self.reset(keep)
        elif allow_update and old is not None and old != new and is_update(old, new):
            appended = True
        elif allow_append and old is not None and old != new and is_append(old, new):
            appended = True
            log.info(
                "%s: the input gained files (%s); adding them incrementally",
                self.dir,
                "; ".join(describe_changes(old, new)),
            )
        elif old is not None and old != new:
            raise ResumeError(
                f"{self.dir} holds a {what} made from other input or settings "
                f"({'; '.join(describe_changes(old, new))}); pass --overwrite to discard it, or use another directory"
            )
        elif old is None and self._entries(keep):
            unknown = foreign(self.dir, keep)
            if unknown:
                raise ResumeError(
                    f"{shown(self.dir)} is not empty and was not written by this tool (it holds "
                    f"{', '.join(shown(n) for n in unknown[:5])}{' ...' if len(unknown) > 5 else ''}); "
                    "choose an empty or new directory"
                )
            raise ResumeError(
                f"{shown(self.dir)} holds outputs of this tool but no manifest.json; pass --overwrite to replace "
                "them, or use another directory"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        removed = remove_stale_temps(self.dir)
        if removed:
            log.info("removed %d partial file(s) left by an interrupted run in %s", removed, self.dir)
        self.data["identity"] = new
        self.save(force=True)
        return appended

    def _entries(self, keep: str | None) -> list[str]:
        """What the directory holds besides the tool's bookkeeping, its logs and ``keep``."""
        if not self.dir.is_dir():
            return []
        return [
            n
            for n in os.listdir(self.dir)
            if n not in (LOCK_NAME, LEDGER_NAME, TIMINGS_NAME, LOG_DIR, keep) and not is_temp_name(n)
        ]

    def reopen_stage(self, stage: str) -> None:
        """Mark a finished stage unfinished, keeping its done pieces (new pieces are to be added)."""
        if stage in self.data["stages"]:
            self.data["stages"][stage]["done"] = None
            self.save(force=True)

    def reset(self, keep: str | None = None) -> None:
        """Delete what the tool wrote here except ``keep`` and the logs (the caller asked to overwrite).

        A directory that also holds anything else is refused, naming it, before anything is removed.
        """
        remove_owned(self.dir, keep)
        self.data = {"version": VERSION, "identity": None, "stages": {}}
        self.damaged = None

    # stages ------------------------------------------------------------------------------
    def _stage(self, stage: str) -> dict[str, Any]:
        return self.data["stages"].setdefault(stage, {"pieces": {}, "done": None})

    def _relative(self, path: str | os.PathLike[str]) -> str:
        """``path`` as recorded: relative to this directory (a copied or moved directory checks its
        own files, not the original's)."""
        p = Path(path).absolute()
        return p.relative_to(self.dir.absolute()).as_posix()  # the tool records only files it wrote here

    def files_intact(self, files: Iterable[Any]) -> bool:
        """Whether every recorded ``[path, size, crc32]`` is a file below this directory (no link on
        the way) with that size and CRC-32. A record pointing elsewhere is not intact."""
        return self.first_damaged(files) is None

    def first_damaged(self, files: Iterable[Any]) -> str | None:
        """The first recorded file that is missing, changed or outside this directory (None: all intact)."""
        ledger = Ledger.of(self.dir)
        for entry in files:
            path, size, crc = (*entry, None)[:3]
            if not _confined(str(path)):
                log.warning(
                    "%s: the manifest records %s, outside this directory; redoing that part",
                    shown(self.dir),
                    shown(str(path)),
                )
                return str(path)
            if has_links(self.dir, self.dir / path):
                return str(path)
            if crc is None:  # recorded before CRCs were: the size alone
                try:
                    if os.lstat(self.dir / path).st_size != size:
                        return str(path)
                except OSError:
                    return str(path)
            elif not ledger.crc_matches(str(path), int(size), int(crc)):
                return str(path)
        return None

    def record(self, files: Iterable[str | os.PathLike[str]]) -> Files:
        """``(path, size, crc32)`` records of ``files`` as they are now, for :meth:`files_intact`."""
        ledger = Ledger.of(self.dir)
        out = []
        for f in files:
            rel = self._relative(f)
            crc = ledger.crc_of(rel)
            if crc is None:
                raise ResumeError(
                    f"{shown(self.dir / rel)}: written by this job but gone or replaced by a link (was "
                    "the directory removed or changed while the job ran?); keep it in place and run "
                    "the same command again to resume"
                )
            try:
                size = os.lstat(self.dir / rel).st_size
            except FileNotFoundError:  # written by another machine, staged per node: on the object store
                size = nodes.remote_size(self.dir / rel) or 0
            out.append((rel, size, crc))
        return tuple(out)

    def done_pieces(self, stage: str) -> set[int]:
        """Pieces recorded done whose files still exist with their recorded sizes."""
        return {int(key) for key, files in self._stage(stage)["pieces"].items() if self.files_intact(files)}

    def first_lost_file(self, stage: str) -> str | None:
        """A file of a finished piece of ``stage`` that is missing or changed (None: all intact)."""
        for files in self._stage(stage)["pieces"].values():
            bad = self.first_damaged(files)
            if bad is not None:
                return bad
        return None

    def lost_pieces(self, stage: str) -> list[int]:
        """Pieces recorded done whose files are gone or changed size (they must be done again)."""
        return sorted(int(key) for key, files in self._stage(stage)["pieces"].items() if not self.files_intact(files))

    def verify_stage(self, stage: str) -> bool:
        """Reopen a finished stage some of whose recorded files are gone or truncated; True if it was.

        Its intact pieces stay done; the lost ones are forgotten, so the stage redoes them.
        """
        lost = self.lost_pieces(stage)
        info = self.stage_info(stage)
        files = (info or {}).get("files")
        if not lost and (files is None or self.files_intact(files)):
            return False
        if lost:
            log.warning(
                "%s: %d finished piece(s) of stage %s are missing, truncated or changed (e.g. piece %d); redoing them",
                shown(self.dir),
                len(lost),
                stage,
                lost[0],
            )
            for piece in lost:
                self._stage(stage)["pieces"].pop(str(piece), None)
                self._stage(stage).get("results", {}).pop(str(piece), None)
        else:
            log.warning(
                "%s: a file of finished stage %s is missing, truncated or changed; redoing the stage",
                shown(self.dir),
                stage,
            )
        self._stage(stage)["done"] = None
        self.save(force=True)
        return True

    def mark_piece(self, stage: str, piece: int, files: Iterable[str | os.PathLike[str]], result: Any = None) -> None:
        """Record ``piece`` done with its files (and a small JSON-able result, kept for the summary)."""
        st = self._stage(stage)
        st["pieces"][str(piece)] = self.record(files)
        if result is not None:
            st.setdefault("results", {})[str(piece)] = result
        self.save()

    def forget_piece(self, stage: str, piece: int) -> None:
        """Drop a piece's record: it will be done again (nothing to do, and nothing written, for a
        piece the stage does not record)."""
        st = self.data["stages"].get(stage)
        if st is None or str(piece) not in st["pieces"]:
            return
        st["pieces"].pop(str(piece), None)
        st.get("results", {}).pop(str(piece), None)
        self.save(force=True)

    def piece_results(self, stage: str) -> dict[int, Any]:
        """The results recorded with the pieces of ``stage`` that are still done."""
        done = self.done_pieces(stage)
        return {int(k): v for k, v in self._stage(stage).get("results", {}).items() if int(k) in done}

    def stage_info(self, stage: str) -> dict[str, Any] | None:
        """What a finished stage recorded, or None if it has not finished."""
        return self._stage(stage)["done"]

    def stage_record(self, stage: str, cls: type[R]) -> R | None:
        """A finished stage's typed record (written by :meth:`finish_stage`), or None if unfinished."""
        info = self.stage_info(stage)
        return None if info is None else from_dict(cls, info)

    def finish_stage(self, stage: str, info: Any = None) -> None:
        """Mark ``stage`` finished with what it recorded: a typed record (a dataclass, stored with
        its type's name) or a small JSON dict."""
        if is_dataclass(info) and not isinstance(info, type):
            info = {**to_dict(info), "record": type(info).__name__}
        self._stage(stage)["done"] = info or {}
        self.save(force=True)

    def clear_stage(self, stage: str) -> None:
        self.data["stages"].pop(stage, None)
        self.save(force=True)

    def save(self, force: bool = False) -> None:
        """Write the manifest atomically.

        Piece updates wait at least 20x the last write's duration, so recording progress costs
        at most ~5% however large the manifest grows, and a crash loses only the latest pieces.
        """
        now = time.monotonic()
        if force or now - self._last_save >= self._min_interval:
            write_json(self.path, self.data)
            self._last_save = time.monotonic()
            self._min_interval = 20 * (self._last_save - now)
