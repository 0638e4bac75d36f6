"""Which row of each near-duplicate group is kept, and which kept row each dropped row belongs to.

Rows are ranked by component, then keep priority (the ``--keep-by`` value, then the smallest
id). ``components`` mode keeps the first row of each component; ``greedy`` walks the ranking and
keeps a row unless a pair links it to a row already kept (as SemDeDup does), assigning it to the
closest such row. Greedy never crosses components, so running it per partition of components is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.duplicates.plan import DedupPlan
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.shuffle.edges import gather_1d, read_partition, write_partitioned

__all__ = ["ChooseTask", "greedy", "member_keys"]


def member_keys(
    rows: np.ndarray, store: RowStore, *, keys_dir: str | None, starts: np.ndarray
) -> dict[str, np.ndarray]:
    """What ranks the given rows of one partition, read where they live and sent along with them
    to their component's partition: their ids (integers as they are, strings as UTF-8 bytes, whose
    order is Arrow's) and, with ``--keep-by``, their keep values. The choosing task then reads no
    other partition's files."""
    ids = store.gather_ids(rows)
    if pa.types.is_integer(ids.type):
        out = {"id": ids.to_numpy(zero_copy_only=False)}
    else:
        raw = ids.cast(pa.large_binary()).to_numpy(zero_copy_only=False)
        out = {"id": raw.astype(np.bytes_) if raw.size else np.zeros(0, "S1")}
    if keys_dir is not None:
        out["key"] = gather_1d(keys_dir, starts, rows)
    return out


def _ranking(rows: np.ndarray, labels: np.ndarray, m: dict[str, np.ndarray], keep_order: str) -> np.ndarray:
    """Order of ``rows``: by component, then keep priority (keep_by value, then the smallest id)."""
    cols: dict[str, Any] = {"label": pa.array(labels), "id": pa.array(m["id"]), "row": pa.array(rows)}
    sort = [("label", "ascending")]
    if "key" in m:
        cols["key"] = pa.array(m["key"])
        sort.append(("key", "descending" if keep_order == "max" else "ascending"))
    sort += [("id", "ascending"), ("row", "ascending")]
    return pc.sort_indices(pa.table(cols), sort_keys=sort).to_numpy()


def greedy(n: int, ia: np.ndarray, ib: np.ndarray, score: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Walk ranks ``0..n-1`` in order: keep one unless a pair links it to a rank already kept.

    ``ia``/``ib`` are the ranks of each pair's ends. Returns (representative rank, kept) per rank;
    a dropped rank's representative is its closest kept partner.
    """
    u, v = np.concatenate([ia, ib]), np.concatenate([ib, ia])
    s = np.concatenate([score, score])
    by = np.argsort(u, kind="stable")
    u, v, s = u[by], v[by], s[by]
    indptr = np.searchsorted(u, np.arange(n + 1))
    kept = np.zeros(n, dtype=bool)
    rep = np.arange(n)
    best = np.argmin if metric == "l2" else np.argmax  # the first of equally close rows, as ranked
    for i in range(n):  # ranks: earlier rows first
        nbr, ns = v[indptr[i] : indptr[i + 1]], s[indptr[i] : indptr[i + 1]]
        mask = kept[nbr] & (nbr < i)
        if mask.any():
            cand, cs = nbr[mask], ns[mask]
            rep[i] = cand[best(cs)]
        else:
            kept[i] = True
    return rep, kept


@dataclass(frozen=True, kw_only=True)
class ChooseTask:
    """Representatives (and kept rows) of the components labelled in partition ``part``: reads
    the members and pairs shuffled to it, writes each row's representative and kept flag to
    ``assign`` (shuffled back to the rows' partitions, first rows ``starts``). Returns the
    partition's group sizes as {size: groups}."""

    member_dirs: tuple[str, ...]
    pair_dirs: tuple[str, ...]
    part: int
    plan: DedupPlan
    starts: np.ndarray
    assign: str
    keep_by: bool  # the members carry keep values (``--keep-by``)

    def run(self) -> dict[int, int]:
        plan, starts, assign = self.plan, self.starts, self.assign
        m = read_partition(self.member_dirs, self.part, ("label", "row", "id", *(("key",) if self.keep_by else ())))
        rows, labels = m["row"].astype(np.int64), m["label"].astype(np.int64)
        if rows.size == 0:
            write_partitioned(
                assign, np.zeros(0, np.int64), len(starts), {"row": rows, "rep": rows, "kept": np.zeros(0, bool)}
            )
            return {}
        order = _ranking(rows, labels, m, plan.keep_order)
        rows, labels = rows[order], labels[order]
        if plan.mode == "components":
            first = np.r_[True, labels[1:] != labels[:-1]]
            rep = rows[np.maximum.accumulate(np.where(first, np.arange(rows.size), 0))]
            kept = rep == rows
        else:
            p = read_partition(self.pair_dirs, self.part, ("a", "b", "score"))
            # rank within the partition = position in `rows` (ordered by component, then priority)
            srt = np.argsort(rows)
            ra = srt[np.searchsorted(rows[srt], p["a"].astype(np.int64))]
            rb = srt[np.searchsorted(rows[srt], p["b"].astype(np.int64))]
            rep_rank, kept = greedy(rows.size, ra, rb, p["score"].astype(np.float32), plan.metric)
            rep = rows[rep_rank]
        _, sizes = np.unique(rep, return_counts=True)
        values, counts = np.unique(sizes, return_counts=True)
        write_partitioned(
            assign,
            np.searchsorted(starts, rows, side="right") - 1,
            len(starts),
            {"row": rows, "rep": rep, "kept": kept},
        )
        return {int(v): int(c) for v, c in zip(values, counts)}
