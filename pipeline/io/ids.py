"""Ids: 64-bit keys for any id type, and a duplicate check whose memory does not grow with the data.

Each scanned piece writes its (key, global row) pairs split into hash buckets; one task per bucket
then looks for repeated keys. String ids are hashed (a vectorised polynomial hash over the Arrow
buffers), so a repeated key is confirmed against the real ids before it is reported.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched, listed

__all__ = ["id_keys", "write_key_buckets", "duplicate_rows", "BUCKET_ROWS"]

BUCKET_ROWS = 8_000_000  # rows per duplicate-check bucket: 128 MB of (key, row) pairs
_MULT = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads keys evenly over buckets."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def id_keys(ids: pa.Array) -> np.ndarray:
    """A uint64 key per id: the value itself for integers, a 64-bit hash for strings."""
    if pa.types.is_integer(ids.type):
        return ids.to_numpy(zero_copy_only=False).astype(np.int64).view(np.uint64)
    arr = ids.cast(pa.large_string()) if pa.types.is_string(ids.type) else ids
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if arr.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    out = np.full(len(arr), np.uint64(0x84222325), dtype=np.uint64)
    nonempty = lengths > 0
    if nonempty.any():
        lens = lengths[nonempty]
        seg_start = np.cumsum(lens) - lens  # where each string starts in the gathered bytes
        pos = np.arange(int(lens.sum())) - np.repeat(seg_start, lens)  # byte position in its string
        byte_idx = np.repeat(offsets[:-1][nonempty], lens) + pos
        with np.errstate(over="ignore"):
            contrib = data[byte_idx].astype(np.uint64) * _mix(pos.astype(np.uint64) + np.uint64(1))
            out[nonempty] = np.add.reduceat(contrib, seg_start)
    with np.errstate(over="ignore"):
        return _mix(out ^ (lengths.astype(np.uint64) * _MULT))


def n_buckets(total_rows: int) -> int:
    return max(1, -(-total_rows // BUCKET_ROWS))


def write_key_buckets(
    keys: np.ndarray, first_row: int, nbuckets: int, directory: str | os.PathLike[str], piece: int
) -> None:
    """Write this piece's (key, global row) pairs, one file per bucket."""
    rows = np.arange(first_row, first_row + keys.size, dtype=np.int64)
    bucket = (_mix(keys) % np.uint64(nbuckets)).astype(np.int64)
    for b in range(nbuckets):
        sel = bucket == b
        with atomic_path(Path(directory) / f"b{b:04d}" / f"p{piece:05d}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.stack([keys[sel].view(np.int64), rows[sel]]))


def duplicate_rows(bucket_dir: str | os.PathLike[str], limit: int = 5) -> list[np.ndarray]:
    """Groups of global rows sharing a key in one bucket (at most ``limit`` groups)."""
    parts = [np.load(fetched(f)) for f in listed(bucket_dir, "p*.npy")]
    if not parts:
        return []
    pairs = np.concatenate(parts, axis=1)
    order = np.argsort(pairs[0], kind="stable")
    keys, rows = pairs[0][order], pairs[1][order]
    repeat = keys[1:] == keys[:-1]  # repeat[i]: keys[i + 1] equals keys[i]
    run_starts = np.flatnonzero(repeat & ~np.concatenate([[False], repeat[:-1]]))
    groups = []
    for start in run_starts[:limit]:
        end = start + 1
        while end < keys.size and keys[end] == keys[start]:
            end += 1
        groups.append(rows[start:end])
    return groups
