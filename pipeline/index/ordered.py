"""Vectors in list order: what a routed join of a lossy-code index re-ranks from, a group at a time.

A PQ or SQ index finds candidates by their codes and re-ranks them with their stored vectors. The
batched join gathers those vectors from the row store by global row, at random: where the store
outgrows memory each candidate is a disk read (4M x 128, IVF-PQ in a 2 GiB container: 230 rows a
second). So the fill of such an index can also write every row's vector in the order of the
inverted lists. The vectors of a group of consecutive lists are then one contiguous range, which
the routed join's score task (:mod:`pipeline.search.routed`) reads once, with the group's codes,
and re-ranks every candidate found in the group from memory: nothing is gathered at random.

Files under the index directory's ``ordered/`` folder:

* ``vectors.npy``: ``ntotal * d`` values, flat, so a group is one range of it (read by range from
  the object store, :func:`pipeline.io.nodes.npy_rows`); float16 where every vector is exactly a
  float16 one (embeddings stored as float16, l2 or ip: half the bytes, nothing lost), else float32;
* ``rows.npy``: the global row of each vector;
* ``offsets.npy``: ``nlist + 1`` starts, list ``i`` at ``[offsets[i], offsets[i + 1])``;
* ``row_lists.npy``: by global row, the list holding it (``-1``: none), so a candidate found
  anywhere is sent to the group that holds its vector.

Each fill task writes its piece's share, sorted by list, beside its partial index (three ``.npy``
files a piece, kept like the partial indexes so an updated input merges again); the merge
interleaves them a bounded range of lists at a time, reading each piece's file front to back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched, npy_rows, present

__all__ = [
    "ORDERED_DIR",
    "OrderedGroup",
    "has_ordered",
    "merge_ordered",
    "ordered_files",
    "piece_order_files",
    "read_group",
    "write_piece_order",
]

ORDERED_DIR = "ordered"
_NAMES = ("vectors", "rows", "offsets", "row_lists")
MERGE_BYTES = 128 << 20  # vectors the merge interleaves at once (a range of lists; one list may exceed it)


def ordered_files(index_dir: str | Path) -> list[Path]:
    """The merged files of ``index_dir``'s vectors in list order."""
    return [Path(index_dir) / ORDERED_DIR / f"{name}.npy" for name in _NAMES]


def has_ordered(index_dir: str | Path) -> bool:
    """Whether the fill wrote ``index_dir``'s vectors in list order."""
    return all(present(p) for p in ordered_files(index_dir))


def piece_order_files(part: str | Path) -> list[Path]:
    """One piece's share (``vectors``, ``rows``, ``counts`` per list) beside its partial index ``part``."""
    p = Path(part)
    return [p.with_name(f"{p.stem}.{name}.npy") for name in ("vectors", "rows", "counts")]


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def write_piece_order(partial: faiss.Index, x: np.ndarray, start: int, part: str | Path) -> None:
    """Write one piece's vectors ``x`` (global rows ``start ..``), ordered as the partial index
    ``partial`` (filled with them, ids = global rows) holds them in its lists."""
    ivf: Any = faiss.extract_index_ivf(partial)
    invlists = ivf.invlists
    counts = np.array([invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
    rows = np.empty(int(counts.sum()), dtype=np.int64)
    at = 0
    for number in np.flatnonzero(counts).tolist():
        size = int(counts[number])
        rows[at : at + size] = faiss.rev_swig_ptr(invlists.get_ids(number), size)
        at += size
    vectors, rows_path, counts_path = piece_order_files(part)
    _save(vectors, _narrowest(np.ascontiguousarray(x[rows - start], dtype=np.float32).ravel()))
    _save(rows_path, rows)
    _save(counts_path, counts)


def _narrowest(v: np.ndarray) -> np.ndarray:
    """``v`` as float16 where that loses nothing (float16 input, not normalised), else as is."""
    half = v.astype(np.float16)
    return half if np.array_equal(half.astype(np.float32), v) else v


def merge_ordered(parts: list[str], index_dir: str | Path, dim: int) -> None:
    """Interleave the pieces' shares (in ``parts`` order, as the lists' merge appends them) into
    ``index_dir/ordered``: a range of lists at a time, each piece's slice of it copied into place."""
    shares = [[np.load(fetched(f), mmap_mode="r") for f in piece_order_files(p)] for p in parts]
    counts = np.stack([np.asarray(c, dtype=np.int64) for _, _, c in shares]) if shares else np.zeros((0, 0), np.int64)
    nlist = counts.shape[1] if shares else 0
    per_list = counts.sum(axis=0)
    offsets = np.zeros(nlist + 1, dtype=np.int64)
    np.cumsum(per_list, out=offsets[1:])
    starts = np.zeros((len(parts), nlist + 1), dtype=np.int64)  # each piece's start of each list in its share
    np.cumsum(counts, axis=1, out=starts[:, 1:])
    before = np.cumsum(counts, axis=0) - counts  # rows of earlier pieces in each list
    vectors_path, rows_path, offsets_path, lists_path = ordered_files(index_dir)
    total = int(offsets[-1])
    top = max((int(r.max()) for _, r, _ in shares if len(r)), default=-1)
    row_lists = np.full(top + 1, -1, dtype=np.int32)
    # float16 only where every piece's share is (an update's new file may hold float32)
    kind = np.float16 if shares and all(v.dtype == np.float16 for v, _, _ in shares) else np.float32
    with atomic_path(vectors_path) as vtmp, atomic_path(rows_path) as rtmp:
        out_v = np.lib.format.open_memmap(vtmp, mode="w+", dtype=kind, shape=(total * dim,))
        out_r = np.lib.format.open_memmap(rtmp, mode="w+", dtype=np.int64, shape=(total,))
        a = 0
        step = max(1, MERGE_BYTES // (np.dtype(kind).itemsize * dim))
        while a < nlist:
            b = int(np.searchsorted(offsets, offsets[a] + step, side="right"))
            b = min(nlist, max(a + 1, b - 1))
            lo, hi = int(offsets[a]), int(offsets[b])
            buf_v = np.empty((hi - lo, dim), dtype=kind)
            buf_r = np.empty(hi - lo, dtype=np.int64)
            for (vec, rows, _), first, earlier, count in zip(shares, starts, before, counts, strict=True):
                s, e = int(first[a]), int(first[b])
                if e == s:
                    continue
                # where each of this piece's rows of lists [a, b) goes: its list's start, the earlier
                # pieces' rows in that list, then its place among this piece's rows of the list
                own = count[a:b]
                dest = np.repeat(offsets[a:b] - lo + earlier[a:b] - (first[a:b] - s), own) + np.arange(e - s)
                buf_v[dest] = np.asarray(vec[s * dim : e * dim]).reshape(-1, dim)
                buf_r[dest] = rows[s:e]
                row_lists[rows[s:e]] = np.repeat(np.arange(a, b, dtype=np.int32), own)
            out_v[lo * dim : hi * dim] = buf_v.ravel()
            out_r[lo:hi] = buf_r
            a = b
        out_v.flush()
        out_r.flush()
        del out_v, out_r
    _save(offsets_path, offsets)
    _save(lists_path, row_lists)


@dataclass(frozen=True)
class OrderedGroup:
    """The vectors of lists ``[first, last)`` in list order, with their global rows, in memory;
    :meth:`place` finds a row's vector among them."""

    rows: np.ndarray
    vectors: np.ndarray  # float32, whatever the file stores
    _order: np.ndarray  # positions of the rows in row order
    _sorted: np.ndarray  # the rows in row order
    stored: int  # bytes the group took in its files (vectors as stored, rows)

    def place(self, rows: np.ndarray) -> np.ndarray:
        """Positions in :attr:`vectors` of global ``rows``; ``-1`` where the group lacks the row.
        The rows asked are sorted first, so the search walks the group's sorted rows forward
        (4x faster than searching them in any order through a sorter)."""
        flat = rows.ravel()
        if not len(self.rows) or not flat.size:
            return np.full(rows.shape, -1, dtype=np.int64)
        asked = np.argsort(flat, kind="stable")
        at = np.empty(flat.size, dtype=np.int64)
        at[asked] = np.searchsorted(self._sorted, flat[asked])
        at = np.minimum(at, len(self.rows) - 1)
        found = (flat >= 0) & (self._sorted[at] == flat)
        return np.where(found, self._order[at], -1).reshape(rows.shape)

    @property
    def nbytes(self) -> int:
        """Bytes read for the group: its vectors as the file stores them, and its rows."""
        return self.stored


def read_group(index_dir: str | Path, first: int, last: int, dim: int) -> OrderedGroup:
    """Lists ``[first, last)``'s vectors and rows, read once into memory (by range where the
    files are on the object store and not here)."""
    vectors_path, rows_path, offsets_path, _ = ordered_files(index_dir)
    ends = npy_rows(offsets_path, first, last + 1)
    lo, hi = int(ends[0]), int(ends[-1])
    rows = np.array(npy_rows(rows_path, lo, hi), dtype=np.int64)
    stored = npy_rows(vectors_path, lo * dim, hi * dim)
    vectors = np.array(stored, dtype=np.float32).reshape(-1, dim)
    order = np.argsort(rows, kind="stable")
    return OrderedGroup(rows, vectors, order, rows[order], stored=int(stored.nbytes + rows.nbytes))
