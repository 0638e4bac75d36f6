"""Filling the trained index: pieces encoded in parallel on the workers, merged once.

Five ways, chosen from the index type:

* ``ondisk``: IVF indexes with plain inverted lists. Each piece becomes a partial index holding
  its global rows as ids; their lists are merged into ``index.ivfdata``, memory-mapped by every
  reader, so worker processes on a node share one copy through the page cache.
* ``fastscan``: ``IVFn,PQmx4fs``. Pieces are encoded with the plain 4-bit ``IndexIVFPQ`` twin
  (see :func:`pipeline.index.choice.encoding_key`), merged in memory, and converted to fast-scan once.
* ``memory``: IVFPQR, whose lists cannot live on disk: merged in memory with ``merge_from``.
* ``serial``: every other index (HNSW, PQ, other fast-scan layouts, ...) is filled by one task
  adding pieces in row order, so positions equal global rows.
* ``none``: ``Flat``. Exact search reads the memory-mapped row store piece by piece
  (the backends' ``exact_search``, :mod:`pipeline.backends.kernels`), so no copy of the vectors is built.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from pipeline.backends.kernels import ivf_of
from pipeline.backends.lists import row_list_map
from pipeline.backends.worker import worker_device
from pipeline.errors import ResumeError
from pipeline.index.choice import encoding_key
from pipeline.index.ordered import ORDERED_DIR, merge_ordered, ordered_files, piece_order_files, write_piece_order
from pipeline.io import nodes
from pipeline.io.atomic import atomic_path, storage_error
from pipeline.io.nodes import fetched, present
from pipeline.io.owned import discard
from pipeline.io.parquet import Piece
from pipeline.io.store import RowStore
from pipeline.io.workdir import shown
from pipeline.results import Files
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.progress import Progress
from pipeline.runtime.runner import result_of, run_tasks, submit

__all__ = [
    "fill_mode",
    "fill_index",
    "load_index",
    "load_lists",
    "read_cached",
    "row_lists",
    "part_path",
    "part_index",
    "FillRecord",
    "ROW_LISTS",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FillRecord:
    """The manifest's ``fill`` stage: the filled index's size, how it was merged, its files."""

    ntotal: int
    mode: str
    files: Files = ()


def fill_mode(key: str, encoder: faiss.Index) -> str:
    """How to fill an index of ``key`` whose pieces are encoded by ``encoder`` (see module doc)."""
    if key == "Flat":
        return "none"
    ivf = ivf_of(encoder)
    if ivf is None or ivf.invlists is None:
        return "serial"
    if not isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.ArrayInvertedLists):
        return "serial"
    if key != encoding_key(key):
        return "fastscan"
    return "memory" if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQR) else "ondisk"


@contextmanager
def _faiss_quiet() -> Iterator[None]:
    """Drop what FAISS's on-disk lists print to stdout ("resizing ...", "IO_FLAG_ONDISK_SAME_DIR:
    updating ondisk filename ...") while they are merged or opened: our output is logs on stderr
    and files, and a user's stdout is theirs. C's buffer is flushed before fd 1 is restored."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            try:
                yield
            finally:
                _LIBC.fflush(None)
                os.dup2(saved, 1)
    finally:
        os.close(saved)


_LIBC = ctypes.CDLL(None)


@lru_cache(maxsize=8)
def _read(path: str, mtime_ns: int, flags: int) -> faiss.Index:
    if flags & faiss.IO_FLAG_ONDISK_SAME_DIR:
        with _faiss_quiet():
            return faiss.read_index(path, flags)
    return faiss.read_index(path, flags)


def read_cached(path: str | os.PathLike[str], flags: int = 0) -> faiss.Index:
    """Read an index once per process (keyed by path and mtime); callers must not modify it."""
    p = fetched(Path(path))
    return _read(str(p), p.stat().st_mtime_ns, flags)


def load_index(index_dir: str | os.PathLike[str], *, private: bool = False) -> faiss.Index:
    """The finished index of ``index_dir``, once per process; on-disk lists are memory-mapped.

    ``private``: a copy of the caller's own where the lists are on disk, unmapped when the caller
    drops it, so the pages it read leave the process (a task bounded to part of the lists)."""
    d = Path(index_dir)
    ondisk = nodes.present(d / "index.ivfdata")
    if ondisk:
        fetched(d / "index.ivfdata")
    if private and ondisk:
        with _faiss_quiet():
            return faiss.read_index(str(fetched(d / "index.faiss")), faiss.IO_FLAG_ONDISK_SAME_DIR)
    return read_cached(d / "index.faiss", faiss.IO_FLAG_ONDISK_SAME_DIR if ondisk else 0)


ROW_LISTS = "row_lists.npy"  # beside an index with on-disk lists: the list of each stored row (by id)


def row_lists(index_dir: str | os.PathLike[str]) -> np.ndarray | None:
    """The list each stored row of ``index_dir``'s index was filled into (memory-mapped, by id;
    :func:`pipeline.backends.lists.row_list_map`), where the fill wrote one (on-disk lists, since
    this map was added); None otherwise. 4 bytes a row: a recall computed from list ranks reads it
    instead of every list's ids, so a machine staging per node fetches it, not the list file."""
    path = Path(index_dir) / ROW_LISTS
    if not nodes.present(path):
        return None
    return np.load(fetched(path), mmap_mode="r")


def load_lists(index_dir: str | os.PathLike[str], first: int, last: int) -> faiss.Index:
    """The finished index of ``index_dir`` for a task that reads only its lists ``[first, last)``
    (a routed join's list group), as a private copy (see :func:`load_index`).

    Where the list file is on the object store and not on this machine (staged per node,
    :mod:`pipeline.io.nodes`), only those lists' bytes are fetched, with one ranged read, into a
    sparse file of the list file's size that stands in for it in a folder of this task's own; the
    other lists read as empty there and must not be read."""
    d = Path(index_dir)
    lists_file = d / "index.ivfdata"
    size = None if os.path.exists(lists_file) else nodes.remote_size(lists_file)
    if size is None:
        return load_index(d, private=True)
    own = d / "_lists" / f"{first:07d}-{last:07d}-{uuid.uuid4().hex[:8]}"  # this machine's, never uploaded
    own.mkdir(parents=True)
    try:
        shutil.copyfile(fetched(d / "index.faiss"), own / "index.faiss")
        with open(own / "index.ivfdata", "wb") as fh:
            fh.truncate(size)  # sparse: no disk for the lists not read
        with _faiss_quiet():
            index = faiss.read_index(str(own / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
        ivf: Any = faiss.extract_index_ivf(index)
        ondisk: Any = faiss.downcast_InvertedLists(ivf.invlists)
        entry = ivf.code_size + 8  # a list's codes, then its ids (int64), each for its capacity
        spans = [(int(ondisk.lists.at(i).offset), int(ondisk.lists.at(i).capacity) * entry) for i in range(first, last)]
        spans = [(o, n) for o, n in spans if n]
        if spans:
            lo, hi = min(o for o, _ in spans), max(o + n for o, n in spans)
            remote = nodes.source(lists_file)
            with open(own / "index.ivfdata", "r+b") as fh:  # the map sees these pages (one page cache)
                fh.seek(lo)
                fh.write(remote.read_at(hi - lo, lo))
            nodes.count("ranged", hi - lo, requests=1)
        return index
    finally:
        shutil.rmtree(own, ignore_errors=True)  # the map holds the file until the index is dropped


def part_path(index_dir: str | os.PathLike[str], piece: int) -> Path:
    """The partial index one piece was encoded into (``ondisk``, ``fastscan`` and ``memory`` fills)."""
    return Path(index_dir) / "parts" / f"part-{piece:05d}.faiss"


def part_index(index_dir: str | os.PathLike[str], piece: int) -> faiss.Index | None:
    """The partial index of one piece (its rows under their global rows as ids), as the finished
    index searches it, once per process: a fast-scan index's pieces are encoded by the plain twin
    and converted here as the merge converts them. Searching it at a plan's ``nprobe`` finds among
    the piece's rows what a search of the whole index finds among them (an input update's new
    rows, :mod:`pipeline.search.update`). None where the fill keeps no partial indexes (exact
    plans, ``serial`` fills)."""
    d = Path(index_dir)
    path = part_path(d, piece)
    if not present(path):
        return None
    fastscan = isinstance(faiss.extract_index_ivf(load_index(d)), faiss.IndexIVFPQFastScan)
    local = fetched(path)
    return _part(str(local), local.stat().st_mtime_ns, fastscan)


@lru_cache(maxsize=2)
def _part(path: str, mtime_ns: int, fastscan: bool) -> faiss.Index:
    index = faiss.read_index(path)
    return faiss.IndexIVFPQFastScan(index) if fastscan else index


def _write(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


@dataclass(frozen=True, kw_only=True)
class FillPieceTask:
    """Encode one piece with a copy of the trained index; write the partial index to ``out``."""

    trained: str
    store: RowStore
    piece: Piece
    out: str
    ordered: bool = False  # also write the piece's vectors in list order (:mod:`pipeline.index.ordered`)

    def run(self) -> int:
        trained, store, piece, out = self.trained, self.store, self.piece, self.out
        index = faiss.clone_index(read_cached(trained))
        x = np.ascontiguousarray(store.vectors(piece.index))
        with worker_device() as be:
            be.add(index, x, np.arange(piece.start, piece.start + piece.rows, dtype=np.int64))
        if self.ordered:
            write_piece_order(index, x, piece.start, out)
        _write(index, Path(out))
        return piece.rows


@dataclass(frozen=True, kw_only=True)
class FillSerialTask:
    """Add every piece to one copy of the trained index in order, in one task (``fill: serial``),
    and write it to ``out``."""

    trained: str
    store: RowStore
    pieces: tuple[Piece, ...]
    out: str

    def run(self) -> int:
        trained, store, pieces, out = self.trained, self.store, self.pieces, self.out
        index = faiss.clone_index(read_cached(trained))
        progress = Progress("fill", sum(p.rows for p in pieces))
        for piece in pieces:
            x = np.ascontiguousarray(store.vectors(piece.index))
            with worker_device() as be:
                be.add(index, x, None)
            progress.advance(piece.rows)
        progress.close()
        _write(index, Path(out))
        return int(index.ntotal)


@dataclass(frozen=True, kw_only=True)
class MergeTask:
    """Merge the partial indexes into ``index_dir``: in memory, or with the lists in one file on
    disk (``ondisk``); returns the rows indexed."""

    trained: str
    parts: tuple[str, ...]
    index_dir: str
    mode: str
    ordered: bool = False  # also merge the pieces' vectors in list order

    def run(self) -> int:
        trained, parts, index_dir, mode = self.trained, self.parts, self.index_dir, self.mode
        index = faiss.read_index(fetched(trained))
        parts = tuple(str(fetched(p)) for p in parts)  # each machine reads its own copies
        d = Path(index_dir)
        if mode == "ondisk":
            ivfdata = d / "index.ivfdata"
            if discard(ivfdata):  # the rename below would replace a list file that is not the tool's
                raise ResumeError(f"{shown(ivfdata)} was not written by this tool; move it away and run again")
            with atomic_path(ivfdata) as tmp:  # merged under a temporary name, renamed once complete
                try:
                    with _faiss_quiet():
                        merge_ondisk(index, list(parts), str(tmp))
                except (RuntimeError, OSError) as exc:  # FAISS grows the file in place: a size limit or full disk
                    raise storage_error(ivfdata, exc) from None
                # the index names its list file: the final name (readers find it beside index.faiss)
                lists: Any = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)  # type: ignore[arg-type]
                lists.filename = str(ivfdata)
            with atomic_path(d / ROW_LISTS) as tmp, open(tmp, "wb") as fh:
                np.save(fh, row_list_map(faiss.extract_index_ivf(index)))
        else:
            for part in parts:
                index.merge_from(faiss.read_index(part), 0)
            if mode == "fastscan":
                index = faiss.IndexIVFPQFastScan(index)
        if self.ordered:
            merge_ordered(list(parts), d, int(index.d))
        else:  # vectors in list order from an earlier fill would not match these lists
            discard(d / ORDERED_DIR)
        _write(index, d / "index.faiss")
        return int(index.ntotal)


def fill_index(
    client: Any,
    trained: Path,
    store: RowStore,
    *,
    pieces: Sequence[Piece],
    index_dir: Path,
    manifest: Manifest,
    mode: str,
    ordered: bool = False,
) -> int:
    """Add every piece to the trained index and write ``index.faiss``; return its size.
    ``ordered``: also write the vectors in list order (:mod:`pipeline.index.ordered`; IVF indexes
    with lists of codes, for a routed join that re-ranks inside each list group)."""
    info = manifest.stage_record("fill", FillRecord)
    if info is not None:
        return info.ntotal
    ordered = ordered and mode in ("ondisk", "fastscan")  # lists of codes merged from pieces
    if mode == "none":  # exact search reads the row store itself: no copy of the vectors to build
        manifest.finish_stage("fill", FillRecord(store.rows, mode))
        return store.rows
    if mode == "serial":
        serial = FillSerialTask(
            trained=str(trained), store=store, pieces=tuple(pieces), out=str(index_dir / "index.faiss")
        )
        fut = submit(client, serial, "fill")
        ntotal = int(result_of(fut))
    else:
        part = {p.index: str(part_path(index_dir, p.index)) for p in pieces}

        def files(p: Piece) -> list[Path]:
            return [Path(part[p.index])] + (piece_order_files(part[p.index]) if ordered else [])

        # a piece encoded before without its ordered vectors is encoded again
        done = {p.index for p in pieces if p.index in manifest.done_pieces("fill") and all(map(present, files(p)))}
        run_tasks(
            client,
            label="fill",
            items=[p for p in pieces if p.index not in done],
            task=lambda p: FillPieceTask(
                trained=str(trained), store=store, piece=p, out=part[p.index], ordered=ordered
            ),
            on_done=lambda p, _: manifest.mark_piece("fill", p.index, files(p)),
        )
        log.info("merging %d partial indexes (%s)", len(part), "on disk" if mode == "ondisk" else "in memory")
        merge = MergeTask(
            trained=str(trained),
            parts=tuple(part[p.index] for p in pieces),
            index_dir=str(index_dir),
            mode=mode,
            ordered=ordered,
        )
        fut = submit(client, merge, "fill")
        ntotal = int(result_of(fut))
    written = (
        [index_dir / "index.faiss"]
        + ([index_dir / "index.ivfdata", index_dir / ROW_LISTS] if mode == "ondisk" else [])
        + (ordered_files(index_dir) if ordered else [])
    )
    manifest.finish_stage("fill", FillRecord(ntotal, mode, manifest.record(written)))
    # the partial indexes are kept: an input that grows (incremental dedup) encodes only its new
    # pieces and merges again; they hold the codes once more, small beside the row store
    return ntotal
