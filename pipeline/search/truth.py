"""The exact truth of a self-join's recall sample, kept across input updates.

Measuring recall needs each sampled query's exact neighbours: one exact pass over every stored
row. After an input update (:mod:`pipeline.io.layout`) most sampled queries are still rows, and
their exact neighbours changed only where rows left or came. So a self-join keeps its sample's
truth ``k`` deeper than it measures (``_recall_truth.npz`` in the output, recorded in the
manifest), and an update brings it up to date:

- queries whose own row left are dropped; rows that left leave every list;
- the rest are searched exactly over the new rows only, and the two lists merged
  (:func:`merge_truth`): exact to the depth both sides vouch for;
- queries left with fewer than ``k`` exact neighbours (they lost more than the spare) are searched
  again over every row, with queries drawn from the new rows (those need every row anyway).

So an update's recall check costs a pass over the new rows, and one over all rows for a few
hundred queries, instead of one over all rows for every query.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.io.atomic import atomic_path
from pipeline.io.layout import in_holes
from pipeline.io.nodes import fetched
from pipeline.io.store import GatherRows, RowStore
from pipeline.io.workdir import TRUTH_NAME
from pipeline.kinds import Metric
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import result_of, submit
from pipeline.search.tuning import RecallSample, exact_truth, sample_of

__all__ = ["TRUTH_FILE", "TRUTH_SPARE_PER_K", "KeptTruth", "keep_truth", "kept_truth", "merge_truth", "refresh"]

log = logging.getLogger(__name__)

TRUTH_FILE = TRUTH_NAME
STAGE = "recall_truth"
# exact neighbours a kept sample holds past k, per k: a query keeps an exact top-k through an update
# that removes up to this many of its neighbours (more: it is searched again over every row)
TRUTH_SPARE_PER_K = 1


@dataclass(frozen=True)
class KeptTruth:
    """A self-join's sampled queries (global rows) and their exact neighbours, best first, over
    the rows of the ``live`` pieces: ``rows`` -1 padded, ``scores`` in the metric's convention,
    ``known`` the exact entries per query (``inf``: every row is listed). What it is exact over
    is recorded with it, so an update applies the changes since then, however many runs ago and
    whether or not a killed run had kept it already."""

    queries: np.ndarray
    rows: np.ndarray
    scores: np.ndarray
    known: np.ndarray
    live: frozenset[int]  # the store's live pieces it is exact over


def keep_truth(
    manifest: Manifest, sample: RecallSample, *, k: int, metric: Metric, exclude_self: bool, live: Sequence[int]
) -> None:
    """Write ``sample``'s deep truth (exact over the ``live`` pieces) beside the manifest and
    record it (self-joins drawn with a spare only)."""
    if sample.rows is None or sample.deep_rows is None or sample.deep_scores is None or sample.known is None:
        return
    path = manifest.dir / TRUTH_FILE
    buffer = io.BytesIO()
    np.savez(buffer, queries=sample.rows, rows=sample.deep_rows, scores=sample.deep_scores, known=sample.known)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    manifest.finish_stage(
        STAGE,
        {
            "k": k,
            "metric": metric,
            "exclude_self": exclude_self,
            "live": sorted(int(p) for p in live),
            "files": manifest.record([path]),
        },
    )


def kept_truth(manifest: Manifest, *, k: int, metric: Metric, exclude_self: bool) -> KeptTruth | None:
    """The truth :func:`keep_truth` recorded for these settings, if its file is intact."""
    info = manifest.stage_info(STAGE)
    if not info or (info.get("k"), info.get("metric"), info.get("exclude_self")) != (k, metric, exclude_self):
        return None
    if not manifest.files_intact(info.get("files", ())):
        return None
    with np.load(fetched(manifest.dir / TRUTH_FILE)) as z:
        return KeptTruth(z["queries"], z["rows"], z["scores"], z["known"], frozenset(info.get("live", ())))


def merge_truth(
    old_rows: np.ndarray,
    old_scores: np.ndarray,
    old_known: np.ndarray,
    *,
    holes: Sequence[tuple[int, int]],
    new_rows: np.ndarray,
    new_scores: np.ndarray,
    new_known: np.ndarray,
    higher_better: bool,
    depth: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact neighbours after an update, from those before (``old_*``: exact over the rows then)
    and those among the new rows alone (``new_*``): the old lists lose the rows in ``holes``, the
    two are merged by score, and the first ``min(old exact left, new exact)`` are exact (every
    row of the true top-m is then within both sides' exact prefixes). Returns ``(rows, scores,
    known)`` at most ``depth`` wide; ``known`` counts each query's exact entries (``inf``: all)."""
    gone = in_holes(old_rows, holes) & (old_rows >= 0)
    listed = np.arange(old_rows.shape[1])[None, :]
    lost_known = (gone & (listed < old_known[:, None])).sum(axis=1)
    old_left = old_known - lost_known  # inf stays inf
    rows = np.hstack([np.where(gone, -1, old_rows), new_rows])
    scores = np.hstack([np.where(gone, np.nan, old_scores), new_scores]).astype(np.float32)
    worst = -np.inf if higher_better else np.inf
    key = np.where(rows >= 0, scores, worst)
    order = np.argsort(-key if higher_better else key, axis=1, kind="stable")[:, :depth]
    rows, scores = np.take_along_axis(rows, order, axis=1), np.take_along_axis(scores, order, axis=1)
    known = np.minimum(old_left, new_known)
    count = (rows >= 0).sum(axis=1)
    known = np.where(np.isinf(known), np.where(count >= depth, float(depth), np.inf), np.minimum(known, depth))
    rows = np.where(np.arange(rows.shape[1])[None, :] < known[:, None], rows, -1)
    scores = np.where(rows >= 0, scores, np.nan).astype(np.float32)
    return rows.astype(np.int64), scores, known


def refresh(
    client: object,
    kept: KeptTruth,
    store: RowStore,
    *,
    holes: Sequence[tuple[int, int]],
    new_store: RowStore | None,
    k: int,
    metric: Metric,
    exclude_self: bool,
) -> tuple[RecallSample, np.ndarray]:
    """The kept queries still rows of ``store``, their truth brought up to date (rows in
    ``holes`` gone, ``new_store``'s rows searched exactly), and a mask of those left with fewer
    than ``k`` exact neighbours (to be searched again over every row)."""
    alive = ~in_holes(kept.queries, holes)
    queries = kept.queries[alive]
    vectors, ids = result_of(submit(client, GatherRows(store=store, rows=queries), "recall"))
    depth = kept.rows.shape[1]
    if new_store is not None and new_store.live and len(queries):
        new_rows, new_scores, new_known = exact_truth(
            client, new_store, vectors, ids, depth=depth, metric=metric, exclude_self=exclude_self
        )
    else:  # nothing came: the new side lists every new row (none)
        new_rows = np.full((len(queries), 0), -1, dtype=np.int64)
        new_scores = np.full((len(queries), 0), np.nan, dtype=np.float32)
        new_known = np.full(len(queries), np.inf)
    rows, scores, known = merge_truth(
        kept.rows[alive],
        kept.scores[alive],
        kept.known[alive],
        holes=holes,
        new_rows=new_rows,
        new_scores=new_scores,
        new_known=new_known,
        higher_better=metric != "l2",
        depth=depth,
    )
    sample = sample_of(client, store, vectors, ids, queries, deep_rows=rows, deep_scores=scores, known=known, k=k)
    return sample, known < k
