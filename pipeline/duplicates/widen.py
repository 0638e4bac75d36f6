"""Searching rows near the threshold more widely, so dedup finds (nearly) every above-threshold pair.

Two kinds of rows are searched again after the join:

* *saturated* rows, whose ``k`` neighbours all passed the threshold: they may have more
  duplicates than ``k``, so they get 4x, 16x, ... the neighbours (up to ``WIDEN_MAX``) until each
  list ends below the threshold; rows still full there get every pair by exact range search
  over the row store (:func:`range_pairs`), however many there are;
* *linked* rows, with at least one neighbour past the threshold, when the dedup's pair-recall
  target needs more inverted lists than the join's recall target did (``pair_nprobe``): a
  duplicate in a list the join did not probe is found there.

:func:`tune_pair_nprobe` picks ``pair_nprobe`` on a sample of rows against their exact
above-threshold pairs (range search), emulating exactly this re-search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.backends.worker import worker_device
from pipeline.duplicates.exactness import exact_pairs, sampled_exact_pairs
from pipeline.duplicates.plan import DedupPlan
from pipeline.io.parquet import Piece
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.runtime.runner import result_of, submit
from pipeline.search.join import SearchPlan, knn_path, search_batch, shared_index, to_padded
from pipeline.search.tuning import probe_steps
from pipeline.shuffle.edges import passes, read_knn, write_knn_blocks

__all__ = ["WidenTask", "Widened", "tune_pair_nprobe", "WIDEN_MAX"]

log = logging.getLogger(__name__)

WIDEN_MAX = 1024  # rows with more duplicates than k are searched again with up to this many neighbours
PAIR_SAMPLE = 1000  # rows whose exact pairs tune pair_nprobe


def _lists(plan: SearchPlan, store: RowStore, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows``' lists under ``plan``, ``-1``/NaN-padded to ``plan.k``."""
    index = shared_index(plan)
    out_rows = np.full((rows.size, plan.k), -1, dtype=np.int64)
    out_scores = np.full((rows.size, plan.k), np.nan, dtype=np.float32)
    for lo in range(0, rows.size, 256):
        q_rows = rows[lo : lo + 256]
        offsets, sc, nbr = search_batch(
            index, plan, store.gather_vectors(q_rows), q_rows=q_rows, q_ids=store.gather_ids(q_rows), index_store=store
        )
        to_padded(out_rows, out_scores, lo, offsets=offsets, rows=nbr, scores=sc)
    return out_rows, out_scores


def _full(rows: np.ndarray, scores: np.ndarray, threshold: float, metric: Metric) -> np.ndarray:
    """Rows whose every neighbour passes the threshold (more may lie beyond the list)."""
    if not rows.shape[1]:
        return np.zeros(rows.shape[0], dtype=bool)
    return (rows[:, -1] >= 0) & passes(scores[:, -1], threshold, metric)


def _to_search(
    rows: np.ndarray, scores: np.ndarray, threshold: float, metric: Metric, linked_too: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Which rows of the join's lists are searched again: (saturated, picked) masks. Saturated rows
    always; rows with any neighbour past the threshold too when ``linked_too``."""
    full = _full(rows, scores, threshold, metric)
    if not linked_too:
        return full, full
    return full, full | ((rows >= 0) & passes(scores, threshold, metric)).any(axis=1)


def search_again(
    plan: SearchPlan,
    store: RowStore,
    rows: np.ndarray,
    saturated: np.ndarray,
    *,
    threshold: float,
    cap: int,
    nprobe: int | None,
    budget: int | None = None,
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], int, np.ndarray, int]:
    """Lists for ``rows`` under ``nprobe``: the join's ``k`` neighbours for linked rows, 4x that
    for ``saturated`` ones, growing 4x while a list is still full, up to ``cap``, holding at most
    ``budget`` list entries (rows that would pass it keep their last list). Returns the lists by
    row, the longest width, the rows still full at ``cap`` and the entries held."""
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    widths = np.where(saturated, min(cap, 4 * plan.k), min(cap, plan.k))
    longest, held, at_cap = plan.k, 0, [np.zeros(0, np.int64)]
    while rows.size:
        again, again_widths = [], []
        for width in np.unique(widths).tolist():
            batch = rows[widths == width]
            # each row's longer list replaces the one it holds
            grow = width - np.array([found[r][0].size if r in found else 0 for r in batch.tolist()], dtype=np.int64)
            if budget is not None:
                batch = batch[np.cumsum(grow) <= budget - held]
            held += int(grow[: batch.size].sum())
            if not batch.size:
                continue
            lr, ls = _lists(replace(plan, k=width, nprobe=nprobe, knn_dir=None), store, batch)
            found.update(zip(batch.tolist(), zip(lr, ls)))
            longest = max(longest, width)
            full = _full(lr, ls, threshold, plan.metric)
            if width >= cap:
                at_cap.append(batch[full])
            else:
                again.append(batch[full])
                again_widths.append(np.full(int(full.sum()), min(cap, 4 * width)))
        rows = np.concatenate(again) if again else np.zeros(0, np.int64)
        widths = np.concatenate(again_widths) if again_widths else np.zeros(0, np.int64)
    return found, longest, np.concatenate(at_cap), held


def range_pairs(
    store: RowStore, rows: np.ndarray, threshold: float, metric: Metric, budget: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every other row whose exact score with one of ``rows`` passes the threshold: FAISS's range
    search over each stored piece in turn (no cap on how many per row). Rows are taken 256 at a
    time until ``budget`` pairs are held. Returns (src, dst, score, the rows not searched)."""
    src, dst, score = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    held = 0
    for lo in range(0, rows.size, 256):
        if budget is not None and held >= budget:
            return np.concatenate(src), np.concatenate(dst), np.concatenate(score), rows[lo:]
        block = rows[lo : lo + 256]
        q = store.gather_vectors(block)
        for piece in store.live:
            with worker_device():
                i, j, sc = exact_pairs(q, store.vectors(piece), threshold, metric)
            j = j + int(store.starts[piece])
            other = j != block[i]
            src.append(block[i[other]])
            dst.append(j[other])
            score.append(sc[other].astype(np.float32))
            held += int(other.sum())
    return np.concatenate(src), np.concatenate(dst), np.concatenate(score), rows[:0]


@dataclass(frozen=True)
class Widened:
    """What one piece's wider search did: rows searched again, of them saturated ones, rows still
    full at the cap, rows left capped (past the budget), the longest list, the list entries held."""

    rows: int
    saturated: int
    at_cap: int
    capped: int
    width: int
    entries: int


@dataclass(frozen=True, kw_only=True)
class WidenTask:
    """Search one piece's saturated rows (and, with ``pair_nprobe``, its linked rows) again; write
    the longer lists, with their rows, to ``out``, one block per width. With ``range_out``, rows
    still full at ``cap`` get every pair past the threshold by exact range search, written there as
    one-column lists. Lists and pairs together hold at most ``budget`` entries beyond the join's
    (the shuffle holds a partition's entries in memory): rows past it stay capped, and counted."""

    plan: SearchPlan
    store: RowStore
    piece: Piece
    knn_dir: Path
    out: str
    threshold: float
    cap: int
    pair_nprobe: int | None = None
    range_out: str | None = None
    budget: int | None = None

    def run(self) -> Widened:
        plan, store, piece, threshold, budget = self.plan, self.store, self.piece, self.threshold, self.budget
        pair_nprobe = self.pair_nprobe
        rows, scores = read_knn(knn_path(self.knn_dir, piece.index))
        full, pick = _to_search(rows, scores, threshold, plan.metric, pair_nprobe is not None)
        todo = piece.start + np.flatnonzero(pick)
        found, width, still, held = search_again(
            plan,
            store,
            todo,
            full[pick],
            threshold=threshold,
            cap=self.cap,
            nprobe=pair_nprobe if pair_nprobe is not None else plan.nprobe,
            budget=budget,
        )
        capped, n_range = still, 0
        if self.range_out is not None:
            room = None if budget is None else max(0, budget - held)
            src, dst, score, capped = range_pairs(store, np.sort(still), threshold, plan.metric, room)
            write_knn_blocks(self.range_out, [(src, dst[:, None], score[:, None])])
            n_range = int(src.size)
        by_width: dict[int, list[int]] = {}
        for r, (lr, _) in found.items():
            by_width.setdefault(lr.size, []).append(r)
        blocks = []
        for w, members in sorted(by_width.items()):
            src = np.array(sorted(members), dtype=np.int64)
            blocks.append(
                (
                    src,
                    np.stack([found[r][0] for r in src.tolist()]).reshape(src.size, w),
                    np.stack([found[r][1] for r in src.tolist()]).reshape(src.size, w),
                )
            )
        write_knn_blocks(self.out, blocks)
        return Widened(
            rows=len(found),
            saturated=int(full.sum()),
            at_cap=int(still.size),
            capped=int(capped.size),
            width=int(width),
            entries=int(rows.size + held + n_range),
        )


def _pairs_found(
    plan: SearchPlan, store: RowStore, rows: np.ndarray, *, threshold: float, cap: int, nprobe: int | None
) -> set[tuple[int, int]]:
    """The above-threshold pairs the sampled rows' own searches find: the join's list, then the
    re-search of saturated and linked rows under ``nprobe`` (as :class:`WidenTask` does)."""
    lr, ls = _lists(plan, store, rows)
    full, pick = _to_search(lr, ls, threshold, plan.metric, nprobe != plan.nprobe)
    lists = dict(zip(rows.tolist(), zip(lr, ls)))
    found, _, still, _ = search_again(plan, store, rows[pick], full[pick], threshold=threshold, cap=cap, nprobe=nprobe)
    lists.update(found)
    src, dst, score, _ = range_pairs(store, np.sort(still), threshold, plan.metric)
    lists.update({int(r): (dst[src == r], score[src == r]) for r in np.unique(src).tolist()})
    pairs = set()
    for r, (nbr, sc) in lists.items():
        ok = (nbr >= 0) & passes(sc, threshold, plan.metric)
        pairs |= {(r, int(b)) for b in nbr[ok].tolist()}
    return pairs


@dataclass(frozen=True, kw_only=True)
class PairNprobeWalk:
    """Pair recall of ``rows``' re-search against their ``exact`` pairs at each of ``probes`` in
    turn, stopping at the first that reaches ``target``: the curve as (nprobe, recall)."""

    plan: SearchPlan
    store: RowStore
    rows: np.ndarray
    exact: frozenset[tuple[int, int]]
    threshold: float
    cap: int
    probes: tuple[int | None, ...]
    target: float

    def run(self) -> list[tuple[int | None, float]]:
        curve = []
        for nprobe in self.probes:
            found = _pairs_found(
                self.plan, self.store, self.rows, threshold=self.threshold, cap=self.cap, nprobe=nprobe
            )
            curve.append((nprobe, len(self.exact & found) / len(self.exact)))
            if curve[-1][1] >= self.target:
                break
        return curve


def tune_pair_nprobe(
    client: Any, dplan: DedupPlan, search: SearchPlan, *, store: RowStore, nlist: int | None, seed: int, target: float
) -> tuple[int | None, list[tuple[int | None, float]]]:
    """The fewest inverted lists (``nprobe`` >= the join's) whose re-search of linked rows finds
    ``target`` of a row sample's exact above-threshold pairs; None when the join's suffices (or
    there is nothing to tune: exact search, no lists, no pairs in the sample). Also the curve."""
    if search.strategy == "exact" or not nlist or search.nprobe is None:
        return None, []
    rng = np.random.default_rng(seed + 104_729)  # another sample than the pair recall reported
    rows = store.sample_rows(rng, PAIR_SAMPLE)
    exact = sampled_exact_pairs(client, dplan, store, rows)
    if not exact:
        return None, []
    cap = min(WIDEN_MAX, store.rows - 1)
    probes = [p for p in probe_steps(nlist) if p is not None and p >= search.nprobe]
    walk = PairNprobeWalk(
        plan=search,
        store=store,
        rows=rows,
        exact=frozenset(exact),
        threshold=dplan.threshold,
        cap=cap,
        probes=tuple(probes),
        target=target,
    )
    curve = result_of(submit(client, walk, "pair_tuning"))
    nprobe, reached = curve[-1]
    if reached < target:
        log.warning(
            "dedup: even nprobe=%s finds only %.4f of the sampled rows' pairs (target %.2f)", nprobe, reached, target
        )
    return (None if nprobe == search.nprobe else nprobe), curve
