"""Row stores written by the scan: per-piece float32 vectors (``.npy``) and ids (Arrow IPC).

Everything after the scan (training sample, fill, join queries, exact re-ranking, ground truth)
reads these instead of re-parsing Parquet. Whole pieces are read with plain reads; gathers by
global row number (re-ranking, samples) go through memory maps kept open per process.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched

__all__ = ["RowStore", "GatherRows"]


class RowStore:
    """The vectors and ids of one scanned dataset, stored piece by piece under ``root``."""

    def __init__(
        self, root: str | os.PathLike[str], starts: np.ndarray, total_rows: int, live: tuple[int, ...] | None = None
    ):
        """``starts``: the first global row of every piece number; ``total_rows``: the row space
        they cover; ``live``: the pieces stored (default all). The others are retired pieces of
        an updated input (:mod:`pipeline.io.layout`): their rows are holes nothing reads."""
        self.root = Path(root)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.total_rows = int(total_rows)
        self.live = tuple(range(len(self.starts))) if live is None else tuple(int(p) for p in live)
        sizes = np.diff(np.append(self.starts, self.total_rows))
        self._live_starts = self.starts[list(self.live)]
        self._live_sizes = sizes[list(self.live)]
        self.rows = int(self._live_sizes.sum())  # the live rows (total_rows less the holes)

    def task_bytes(self) -> int:
        """About what the store weighs in a task record: its tables of pieces, four numbers a piece
        (:func:`pipeline.runtime.runner.submit` sends a store of thousands of pieces to the
        cluster once instead of inside every task)."""
        return 4 * 8 * len(self.starts)

    def piece_rows(self, piece: int) -> int:
        end = self.starts[piece + 1] if piece + 1 < len(self.starts) else self.total_rows
        return int(end - self.starts[piece])

    def live_rows(self, dense: np.ndarray) -> np.ndarray:
        """The global rows of live rows numbered ``0 .. rows - 1`` in row order (the identity
        without holes): how a sample drawn among the live rows is placed."""
        dense = np.asarray(dense, dtype=np.int64)
        if self.rows == self.total_rows:
            return dense
        ends = np.cumsum(self._live_sizes)
        at = np.searchsorted(ends, dense, side="right")
        return self._live_starts[at] + dense - (ends[at] - self._live_sizes[at])

    def sample_rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` distinct live global rows drawn by ``rng``, sorted."""
        return np.sort(self.live_rows(rng.choice(self.rows, size=min(n, self.rows), replace=False)))

    # paths -------------------------------------------------------------------------------
    def vectors_path(self, piece: int) -> Path:
        return self.root / "vectors" / f"part-{piece:05d}.npy"

    def ids_path(self, piece: int) -> Path:
        return self.root / "ids" / f"part-{piece:05d}.arrow"

    # writing -----------------------------------------------------------------------------
    def write_piece(self, piece: int, ids: pa.Array, vectors: np.ndarray) -> None:
        """Store one piece's ids and vectors, each file atomically."""
        with atomic_path(self.vectors_path(piece)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(vectors, dtype=np.float32))
        with atomic_path(self.ids_path(piece)) as tmp:
            table = pa.table({"id": ids})
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)

    # reading -----------------------------------------------------------------------------
    def vectors(self, piece: int) -> np.ndarray:
        """One piece's vectors, read into memory (a plain read: nothing stays mapped)."""
        return np.load(fetched(self.vectors_path(piece)))

    def mapped_vectors(self, piece: int) -> np.ndarray:
        """One piece's vectors as a read-only memory map (kept open per process): read again and
        again (the exact plan scores every query block against every piece) without a copy."""
        return _open_npy(*_stamp(self.vectors_path(piece)))

    def ids(self, piece: int) -> pa.Array:
        """One piece's ids as an Arrow array (memory-mapped)."""
        return _open_ids(*_stamp(self.ids_path(piece)))

    def _group(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.total_rows):
            raise IndexError(f"row out of range [0, {self.total_rows}) in gather")
        return rows, np.searchsorted(self.starts, rows, side="right") - 1

    def gather_vectors(self, rows: np.ndarray, *, mapped: bool = True) -> np.ndarray:
        """Vectors of the given global rows (any order, repeats allowed), shape ``rows.shape + (d,)``.

        Each distinct row is read once (k-NN candidates repeat a lot) through a memory map of its
        piece file, kept open per process: page faults are paid once, and the pages are the
        shared, reclaimable page cache rather than private memory. ``mapped=False`` reads each
        piece with a plain read instead, so nothing stays mapped: for a training sample, which
        touches most pages of every piece (262,144 rows of 4M x 128 mapped 0.85 GiB into the
        process, and Dask counts mapped pages as the worker's memory).
        """
        shape = np.shape(rows)
        flat, _ = self._group(rows)
        unique, inverse = np.unique(flat, return_inverse=True)
        piece_of = np.searchsorted(self.starts, unique, side="right") - 1
        vecs: np.ndarray | None = None
        for p in np.unique(piece_of) if unique.size else [0]:
            mm = _open_npy(*_stamp(self.vectors_path(int(p)))) if mapped else self.vectors(int(p))
            if vecs is None:
                vecs = np.empty((unique.size, mm.shape[1]), dtype=np.float32)
            sel = piece_of == p
            vecs[sel] = mm[unique[sel] - self.starts[p]]
            del mm  # a piece read whole is freed before the next is read
        assert vecs is not None
        return vecs[inverse].reshape(*shape, vecs.shape[1])

    def gather_ids(self, rows: np.ndarray) -> pa.Array:
        """Ids of the given global rows (flattened, in the given order).

        Rows are sorted by piece once (a radix sort of the piece numbers) and each piece's ids
        are taken for its run of them. Integer ids go through NumPy straight into their places;
        other ids (strings) are taken by Arrow and put back in order with one more take."""
        flat, piece_of = self._group(rows)
        keys = piece_of.astype(np.uint16) if len(self.starts) <= 1 << 16 else piece_of
        order = np.argsort(keys, kind="stable")
        grouped = piece_of[order]  # sorted already: each piece's run starts where the number changes
        first = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]]) if grouped.size else np.zeros(0, np.int64)
        pieces = grouped[first]
        bounds = [*first.tolist(), order.size]
        if not pieces.size:
            return self.ids(self.live[0]).slice(0, 0)
        runs = [(int(p), order[bounds[i] : bounds[i + 1]]) for i, p in enumerate(pieces.tolist())]
        kind = self.ids(runs[0][0]).type
        if pa.types.is_integer(kind):
            out = np.empty(order.size, dtype=kind.to_pandas_dtype())
            for p, at in runs:
                out[at] = self.ids(p).to_numpy(zero_copy_only=False)[flat[at] - self.starts[p]]
            return pa.array(out, type=kind)
        chunks = [self.ids(p).take(pa.array(flat[at] - self.starts[p])) for p, at in runs]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return pa.concat_arrays(chunks).take(pa.array(inverse))


@dataclass(frozen=True, kw_only=True)
class GatherRows:
    """The vectors (where ``vectors``) and ids of some global rows of a store, read on a worker:
    the driver holds no stored rows (on nodes of their own it would fetch whole pieces)."""

    store: RowStore
    rows: np.ndarray
    vectors: bool = True

    def run(self) -> tuple[np.ndarray | None, pa.Array]:
        vectors = np.ascontiguousarray(self.store.gather_vectors(self.rows)) if self.vectors else None
        return vectors, self.store.gather_ids(self.rows)


def _map_budget() -> tuple[int, int]:
    """How many vector and id files a process keeps mapped: a quarter of its open-file limit
    (each map holds a descriptor; sockets, Parquet readers and FAISS need the rest)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    maps = max(8, (4096 if soft == resource.RLIM_INFINITY else soft) // 4)
    return max(4, maps * 3 // 4), max(2, maps // 4)


_VECTOR_MAPS, _ID_MAPS = _map_budget()


def _stamp(path: Path) -> tuple[str, int, int]:
    """Cache key: a rewritten file (same name, new content) is opened afresh."""
    st = fetched(path).stat()
    return str(path), st.st_mtime_ns, st.st_size


@lru_cache(maxsize=_VECTOR_MAPS)
def _open_npy(path: str, mtime_ns: int, size: int) -> np.ndarray:
    return np.load(path, mmap_mode="r")


@lru_cache(maxsize=_ID_MAPS)
def _open_ids(path: str, mtime_ns: int, size: int) -> pa.Array:
    column = pa.ipc.open_file(pa.memory_map(path, "r")).read_all().column("id")
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
