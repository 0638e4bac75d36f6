"""Rows with more near-duplicates than ``k``: searched again with longer lists until each list
ends below the threshold (up to ``WIDEN_MAX`` neighbours), so a group larger than ``k`` is found whole."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.io.parquet import Piece
from pipeline.io.store import RowStore
from pipeline.search.join import SearchPlan, knn_path, search_batch, shared_index, to_padded
from pipeline.shuffle.edges import passes, read_knn, write_knn

__all__ = ["widen_piece", "WIDEN_MAX"]

WIDEN_MAX = 1024  # rows with more duplicates than k are searched again with up to this many neighbours


def widen_piece(plan: SearchPlan, store: RowStore, piece: Piece, knn_dir: Path, out: str, threshold: float,
                 cap: int) -> dict[str, int]:
    """Search again, with 4x, 16x, ... the neighbours (up to ``cap``), the rows whose ``k`` neighbours
    all passed the threshold, until each list ends below it; write the longer lists (with rows)."""
    rows, scores = read_knn(knn_path(knn_dir, piece.index))
    k = rows.shape[1]
    sat = np.flatnonzero((rows[:, -1] >= 0) & passes(scores[:, -1], threshold, plan.metric)) if k else np.zeros(0, int)
    todo = piece.start + sat
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    width = k
    while todo.size and width < cap:
        width = min(cap, width * 4)
        wide = replace(plan, k=width, knn_dir=None)
        index = shared_index(wide)
        lists_rows = np.full((todo.size, width), -1, dtype=np.int64)
        lists_scores = np.full((todo.size, width), np.nan, dtype=np.float32)
        for lo in range(0, todo.size, 256):
            q_rows = todo[lo : lo + 256]
            offsets, sc, nbr = search_batch(index, wide, store.gather_vectors(q_rows), q_rows,
                                            store.gather_ids(q_rows), store)
            to_padded(lists_rows, lists_scores, lo, offsets, nbr, sc)
        for r, lr, ls in zip(todo.tolist(), lists_rows, lists_scores):
            found[r] = (lr, ls)
        still = (lists_rows[:, -1] >= 0) & passes(lists_scores[:, -1], threshold, plan.metric)
        todo = todo[still]
    src = np.array(sorted(found), dtype=np.int64)
    out_rows = np.full((src.size, width), -1, dtype=np.int64)
    out_scores = np.full((src.size, width), np.nan, dtype=np.float32)
    for i, r in enumerate(src.tolist()):
        lr, ls = found[r]
        out_rows[i, : lr.size], out_scores[i, : ls.size] = lr, ls
    write_knn(out, out_rows, out_scores, src=src)
    return {"rows": int(src.size), "still": int(todo.size), "width": int(width)}
