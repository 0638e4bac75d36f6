"""Dedup: near-duplicate groups from the self-join, the rows to keep, and the pairs behind them.

After the self-join (which also writes its lists as global rows), each stage runs as bounded
tasks, one per partition (consecutive pieces whose edges fit twice ``partition_size``), and is
recorded in the output manifest, so a killed run resumes and a grown input adds its new pieces:

- ``pairs``: the lists' above-threshold edges, shuffled by source row and made symmetric
  (``_adj/``, internal) and written once per unordered pair as ``pairs/`` (id_a, id_b, score).
- ``components``: connected components of those pairs (:mod:`pipeline.shuffle.components`).
- ``groups``: members and pairs shuffled by component; each component's rows are ranked by the
  keep priority (``keep_by`` value, then the smallest id). ``components`` mode keeps the first row
  of each component; ``greedy`` walks the ranking and keeps a row unless a pair links it to a row
  already kept (as SemDeDup does), assigning it to the closest such row. Greedy never crosses
  components, so running it per component is exact. The assignments are shuffled back to their
  rows' partitions and written as ``groups/`` (one row per input row) and ``kept/``.

``group_id`` is the representative's internal row number: an opaque, stable int64 key.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.backends.worker import worker_device
from pipeline.errors import ConfigError, InputError
from pipeline.io.atomic import atomic_path
from pipeline.io.parquet import Dataset, Piece
from pipeline.io.store import RowStore
from pipeline.io.workdir import shown
from pipeline.search.join import SearchPlan, knn_path, search_batch, shared_index, to_padded
from pipeline.shuffle.components import connected_components, label_path
from pipeline.shuffle.edges import (
    Part,
    gather_1d,
    make_parts,
    map_edges,
    merge_histograms,
    part_starts,
    passes,
    pieces_per_part,
    read_edges,
    read_knn,
    read_partition,
    reduce_edges,
    write_edges,
    write_knn,
    write_partitioned,
)
from pipeline.stages.manifest import Manifest
from pipeline.stages.progress import run_stage

__all__ = ["DedupPlan", "dedup_stages", "explore", "read_keep_column", "pair_recall", "default_thresholds"]

log = logging.getLogger(__name__)

EXAMPLES_PER_BAND = 3
WIDEN_MAX = 1024  # rows with more duplicates than k are searched again with up to this many neighbours


@dataclass(frozen=True)
class DedupPlan:
    """Resolved dedup settings, as the tasks need them."""

    threshold: float
    mode: str  # components | greedy
    metric: str
    keep_by: str | None
    keep_order: str  # max | min


def default_thresholds(metric: str, threshold: float | None) -> list[float]:
    """The thresholds ``--explore`` reports: a range of similarities (or distances) near duplicates."""
    if metric == "l2":
        top = threshold * 4 if threshold else 0.5
        return [round(top * f, 6) for f in (1, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01, 0.0)]
    lo = min(threshold, 0.8) if threshold is not None else 0.8
    steps = [0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999]
    return sorted({round(t, 4) for t in steps + ([threshold] if threshold is not None else []) if t >= lo})


def _bands(plan: DedupPlan) -> list[float]:
    """Lower edges of the score bands the report shows examples from (closest band last)."""
    t = plan.threshold
    if plan.metric == "l2":
        return [t, t * 0.5, t * 0.1, 0.0]
    return [t, t + (1 - t) * 0.5, t + (1 - t) * 0.9, 1.0 - 1e-6]


# keep priority: a column read from the input --------------------------------------------------
def _read_keep_piece(piece: Piece, column: str, out: str) -> None:
    try:
        col = pq.ParquetFile(piece.path).read_row_groups(list(piece.row_groups), columns=[column]).column(column)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, KeyError) as exc:
        raise InputError(f"{piece.where()}, column '{column}': cannot be read for --keep-by ({exc})") from None
    col = col.combine_chunks()
    if col.null_count:
        bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(
            f"{piece.where(bad)}, column '{column}': null --keep-by value; fill it or choose another column"
        )
    t = col.type
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_duration(t) or pa.types.is_time(t):
        values = col.cast(pa.int64()).to_numpy()
    elif pa.types.is_integer(t) or pa.types.is_boolean(t):
        values = col.cast(pa.int64()).to_numpy()
    elif pa.types.is_floating(t):
        values = col.cast(pa.float64()).to_numpy()
        if np.isnan(values).any():
            bad = int(np.flatnonzero(np.isnan(values))[0])
            raise InputError(
                f"{piece.where(bad)}, column '{column}': NaN --keep-by value; fill it or choose another column"
            )
    else:
        raise InputError(
            f"{shown(piece.path)}, column '{column}': --keep-by needs a numeric, date or timestamp column, "
            f"not {t}; choose another column"
        )
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.save(fh, values)


def read_keep_column(client: Any, dataset: Dataset, column: str, out_dir: Path, manifest: Manifest) -> None:
    """Store the ``keep_by`` column per piece (``out_dir/part-NNNNN.npy``), checked as it is read."""
    for f in dataset.files:
        names = pq.ParquetFile(f.path).schema_arrow.names
        if column not in names:
            raise InputError(f"{f.path}: no column '{column}' for --keep-by; columns are {', '.join(names)}")
    run_stage(client, manifest, "dedup_keep", dataset.pieces, _read_keep_piece,
                lambda p: (p, column, str(label_path(out_dir, p.index))), lambda p: [label_path(out_dir, p.index)])


# pairs --------------------------------------------------------------------------------------------
def _pairs_task(map_dirs: Sequence[str], piece: int, plan: DedupPlan, store: RowStore, adj: str, pairs: str,
                seed: int) -> dict[str, Any]:
    src, dst, score, _ = reduce_edges(map_dirs, piece, plan.metric, "symmetric")
    write_edges(adj, src, dst, score)
    one = src < dst
    a, b, s = src[one], dst[one], score[one]
    table = pa.table({"id_a": store.gather_ids(a), "id_b": store.gather_ids(b), "score": pa.array(s, pa.float32())})
    with atomic_path(pairs) as tmp:
        pq.write_table(table, str(tmp))
    rng = np.random.default_rng([seed, piece])
    bands = _bands(plan)
    examples = []
    for i, lo in enumerate(bands):
        hi = bands[i + 1] if i + 1 < len(bands) else None
        sel = passes(s, lo, plan.metric) & (~passes(s, hi, plan.metric) if hi is not None else True)
        pick = rng.permutation(np.flatnonzero(sel))[:EXAMPLES_PER_BAND]
        examples += [{"band": i, "row_a": int(a[j]), "row_b": int(b[j]), "score": float(s[j])} for j in pick]
    return {"pairs": int(one.sum()), "examples": examples}


# groups --------------------------------------------------------------------------------------------
def _members_map(adj: str, labels_dir: str, starts: np.ndarray, piece: int, members: str, pair_dir: str) -> None:
    """Send each linked row, and each pair, to the partition of its component's label."""
    src, dst, score = read_edges(adj)
    lo = int(starts[piece])
    labels = np.load(label_path(labels_dir, piece))
    rows = np.unique(src)
    lab = labels[rows - lo]
    n = len(starts)
    write_partitioned(members, np.searchsorted(starts, lab, side="right") - 1, n, {"label": lab, "row": rows})
    one = src < dst
    plab = labels[src[one] - lo]
    write_partitioned(pair_dir, np.searchsorted(starts, plab, side="right") - 1, n,
                      {"label": plab, "a": src[one], "b": dst[one], "score": score[one]})


def _ranking(rows: np.ndarray, labels: np.ndarray, store: RowStore, keys_dir: str | None, starts: np.ndarray,
             keep_order: str) -> np.ndarray:
    """Order of ``rows``: by component, then keep priority (keep_by value, then the smallest id)."""
    cols: dict[str, Any] = {"label": pa.array(labels), "id": store.gather_ids(rows), "row": pa.array(rows)}
    sort = [("label", "ascending")]
    if keys_dir is not None:
        cols["key"] = pa.array(gather_1d(keys_dir, starts, rows))
        sort.append(("key", "descending" if keep_order == "max" else "ascending"))
    sort += [("id", "ascending"), ("row", "ascending")]
    return pc.sort_indices(pa.table(cols), sort_keys=sort).to_numpy()


def _greedy(n: int, ia: np.ndarray, ib: np.ndarray, score: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
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
    closer = np.less if metric == "l2" else np.greater
    for i in range(n):  # ranks: earlier rows first
        nbr, ns = v[indptr[i] : indptr[i + 1]], s[indptr[i] : indptr[i + 1]]
        mask = kept[nbr] & (nbr < i)
        if mask.any():
            cand, cs = nbr[mask], ns[mask]
            best = 0
            for j in range(1, cand.size):
                if closer(cs[j], cs[best]):
                    best = j
            rep[i] = cand[best]
        else:
            kept[i] = True
    return rep, kept


def _choose_task(member_dirs: Sequence[str], pair_dirs: Sequence[str], piece: int, plan: DedupPlan,
                 store: RowStore, keys_dir: str | None, piece_starts: np.ndarray, starts: np.ndarray,
                 assign: str) -> dict[int, int]:
    """Representatives (and kept rows) of the components labelled in this partition."""
    m = read_partition(member_dirs, piece, ("label", "row"))
    rows, labels = m["row"].astype(np.int64), m["label"].astype(np.int64)
    if rows.size == 0:
        write_partitioned(assign, np.zeros(0, np.int64), len(starts),
                          {"row": rows, "rep": rows, "kept": np.zeros(0, bool)})
        return {}
    order = _ranking(rows, labels, store, keys_dir, piece_starts, plan.keep_order)
    rows, labels = rows[order], labels[order]
    if plan.mode == "components":
        first = np.r_[True, labels[1:] != labels[:-1]]
        rep = rows[np.maximum.accumulate(np.where(first, np.arange(rows.size), 0))]
        kept = rep == rows
    else:
        p = read_partition(pair_dirs, piece, ("a", "b", "score"))
        # rank within the partition = position in `rows` (ordered by component, then priority)
        srt = np.argsort(rows)
        ra = srt[np.searchsorted(rows[srt], p["a"].astype(np.int64))]
        rb = srt[np.searchsorted(rows[srt], p["b"].astype(np.int64))]
        rep_rank, kept = _greedy(rows.size, ra, rb, p["score"].astype(np.float32), plan.metric)
        rep = rows[rep_rank]
    _, sizes = np.unique(rep, return_counts=True)
    values, counts = np.unique(sizes, return_counts=True)
    write_partitioned(assign, np.searchsorted(starts, rows, side="right") - 1, len(starts),
                      {"row": rows, "rep": rep, "kept": kept})
    return {int(v): int(c) for v, c in zip(values, counts)}


def _exact_pair_scores(store: RowStore, rows: np.ndarray, x: np.ndarray, other: np.ndarray, metric: str) -> np.ndarray:
    if not rows.size:
        return np.zeros(0, np.float32)
    y = store.gather_vectors(other)
    with worker_device() as be:
        return be.exact_scores(x, y[:, None, :], metric)[:, 0]


def _groups_task(assign_dirs: Sequence[str], part: Part, plan: DedupPlan, store: RowStore, groups: str,
                 kept_path: str) -> int:
    a = read_partition(assign_dirs, part.index, ("row", "rep", "kept"))
    rows = np.arange(part.start, part.start + part.rows, dtype=np.int64)
    rep = rows.copy()
    kept = np.ones(part.rows, dtype=bool)
    local = a["row"].astype(np.int64) - part.start
    rep[local] = a["rep"]
    kept[local] = a["kept"].astype(bool)
    ids = pa.concat_arrays([store.ids(p) for p in part.pieces])
    linked = np.flatnonzero(rep != rows)
    score = np.full(part.rows, np.nan, dtype=np.float32)
    if linked.size:
        x = store.gather_vectors(rows[linked])
        score[linked] = _exact_pair_scores(store, linked, x, rep[linked], plan.metric)
    table = pa.table({
        "id": ids, "group_id": pa.array(rep), "representative_id": store.gather_ids(rep),
        "is_kept": pa.array(kept), "score_to_representative": pa.array(score, mask=rep == rows),
    })
    with atomic_path(groups) as tmp:
        pq.write_table(table, str(tmp))
    with atomic_path(kept_path) as tmp:
        pq.write_table(pa.table({"id": ids.filter(pa.array(kept))}), str(tmp))
    return int((~kept).sum())


# the stages -------------------------------------------------------------------------------------
def _clear(manifest: Manifest, output: Path, stages: Sequence[str], dirs: Sequence[str]) -> None:
    for s in stages:
        manifest.clear_stage(s)
    for d in dirs:
        shutil.rmtree(output / d, ignore_errors=True)


def dedup_stages(client: Any, plan: DedupPlan, dataset: Dataset, store: RowStore, output: Path, manifest: Manifest,
                 seed: int, k: int, budget: int, search: SearchPlan) -> tuple[dict[str, Any], np.ndarray]:
    """Pairs, components and groups for the self-join in ``output``.

    Returns the dedup summary and the first rows of the shuffle partitions (which hold the pairs).

    The shuffles work on partitions of consecutive pieces whose edges fit ``budget`` bytes.
    Rows whose ``k`` neighbours all pass the threshold are first searched again with ``search``
    and longer lists (up to ``WIDEN_MAX``), so a group larger than ``k`` is found whole.
    """
    n = dataset.total_rows
    params = {"threshold": plan.threshold, "mode": plan.mode, "keep_by": plan.keep_by, "keep_order": plan.keep_order}
    if manifest.stage_info("dedup_params") not in (None, params):
        log.info("dedup settings changed (%s): regrouping from the existing join",
                 ", ".join(f"{k}={v}" for k, v in params.items()))
        _clear(
            manifest,
            output,
            [
                "dedup_keep",
                "dedup_widen",
                "dedup_map",
                "dedup_pairs",
                "dedup_components",
                "dedup_members",
                "dedup_assign",
                "dedup_groups",
            ],
            ["_dedup", "pairs", "groups", "kept"],
        )
    manifest.finish_stage("dedup_params", params)
    work = output / "_dedup"
    warm = None
    grown = manifest.stage_info("dedup_rows")
    # the grouping of pieces into partitions is fixed by the first run, so a grown input keeps
    # the old partitions (only the last may take in new pieces) and their map outputs
    per_part = grown["per_part"] if grown else pieces_per_part(dataset.pieces, k, budget)
    parts = make_parts(dataset.pieces, per_part)
    starts = part_starts(parts)
    if grown is not None and grown["rows"] != n:
        # the input grew: new pieces are mapped (their lists hold every new pair); partitions are
        # reduced again to take in the new reverse edges; components start from the old labels
        log.info("dedup: %d new rows since the last run; updating pairs and groups", n - grown["rows"])
        warm = work / "components" / "previous"
        if (work / "components" / "labels").exists():
            (work / "components" / "labels").rename(warm)
        _clear(manifest, output, ["dedup_pairs", "dedup_components", "dedup_members", "dedup_assign",
                                  "dedup_groups"], ["_dedup/adj", "_dedup/members", "_dedup/linked", "_dedup/assign"])
        for part in parts:  # a partition that took in new pieces is mapped again
            if manifest.piece_results("dedup_map").get(part.index, {}).get("pieces") != len(part.pieces):
                manifest.forget_piece("dedup_map", part.index)
    manifest.finish_stage("dedup_rows", {"rows": n, "per_part": per_part})
    keys_dir = None
    if plan.keep_by:
        keys_dir = work / "keep"
        read_keep_column(client, dataset, plan.keep_by, keys_dir, manifest)

    wide_dir = work / "wide"
    cap = min(WIDEN_MAX, n - 1)
    widen_stats: dict[int, Any] = {}
    run_stage(client, manifest, "dedup_widen", dataset.pieces, _widen_piece,
              lambda p: (search, store, p, output / "knn", str(knn_path(wide_dir, p.index)), plan.threshold, cap),
              lambda p: [knn_path(wide_dir, p.index)], widen_stats)
    widened = sum(w["rows"] for w in widen_stats.values())
    if widened:
        log.info("%d rows had all k=%d neighbours above the threshold: searched again with up to %d", widened, k, cap)
    maps = [str(work / "edges" / f"from-{p.index:05d}") for p in parts]
    map_stats: dict[int, Any] = {}
    run_stage(client, manifest, "dedup_map", parts, _map_part,
              lambda p: (p, output / "knn", starts, maps[p.index], plan.metric, plan.threshold, wide_dir),
              lambda p: [Path(maps[p.index]) / "bounds.npy"], map_stats)
    adj = [str(work / "adj" / f"part-{p.index:05d}.parquet") for p in parts]
    pair_out = [str(output / "pairs" / f"part-{p.index:05d}.parquet") for p in parts]
    pair_stats: dict[int, Any] = {}
    run_stage(client, manifest, "dedup_pairs", parts, _pairs_task,
                lambda p: (maps, p.index, plan, store, adj[p.index], pair_out[p.index], seed),
                lambda p: [adj[p.index], pair_out[p.index]], pair_stats)

    info = manifest.stage_info("dedup_components")
    labels_dir = work / "components" / "labels"
    if info is None or not labels_dir.exists():
        labels_dir = connected_components(client, adj, starts, n, work / "components",
                                          warm if warm is not None and warm.exists() else None)
        manifest.finish_stage("dedup_components", {"labels": str(labels_dir)})

    members = [str(work / "members" / f"from-{p.index:05d}") for p in parts]
    linked = [str(work / "linked" / f"from-{p.index:05d}") for p in parts]
    run_stage(client, manifest, "dedup_members", parts, _members_map,
                lambda p: (adj[p.index], str(labels_dir), starts, p.index, members[p.index], linked[p.index]),
                lambda p: [Path(members[p.index]) / "bounds.npy", Path(linked[p.index]) / "bounds.npy"])
    assign = [str(work / "assign" / f"from-{p.index:05d}") for p in parts]
    size_parts: dict[int, Any] = {}
    run_stage(client, manifest, "dedup_assign", parts, _choose_task,
                lambda p: (members, linked, p.index, plan, store, str(keys_dir) if keys_dir else None,
                           dataset.starts, starts, assign[p.index]),
                lambda p: [Path(assign[p.index]) / "bounds.npy"], size_parts)
    dropped: dict[int, Any] = {}
    run_stage(client, manifest, "dedup_groups", parts, _groups_task,
                lambda p: (assign, p, plan, store, str(output / "groups" / f"part-{p.index:05d}.parquet"),
                           str(output / "kept" / f"part-{p.index:05d}.parquet")),
                lambda p: [output / "groups" / f"part-{p.index:05d}.parquet",
                           output / "kept" / f"part-{p.index:05d}.parquet"], dropped)

    sizes = merge_histograms(list(size_parts.values()))
    n_grouped = sum(s * c for s, c in sizes.items())
    rows_dropped = int(sum(dropped.values()))
    saturated = int(sum(s["saturated"] for s in map_stats.values()))
    if saturated:
        log.warning("%d rows still had all %d neighbours above the threshold: they may have more duplicates; "
                    "those groups can be incomplete", saturated, cap)
    examples = sorted((e for r in pair_stats.values() for e in r["examples"]), key=lambda e: (e["band"], -e["score"]))
    by_band: dict[int, list[dict[str, Any]]] = {}
    for e in examples:
        if len(by_band.setdefault(e["band"], [])) < EXAMPLES_PER_BAND:
            by_band[e["band"]].append(e)
    summary = {
        "threshold": plan.threshold, "mode": plan.mode, "metric": plan.metric,
        "keep_by": plan.keep_by, "keep_order": plan.keep_order if plan.keep_by else None,
        "rows_in": n, "pairs": int(sum(r["pairs"] for r in pair_stats.values())),
        "groups": int(sum(sizes.values())), "rows_in_groups": int(n_grouped),
        "rows_dropped": rows_dropped, "rows_kept": n - rows_dropped,
        "group_sizes": {str(k): v for k, v in sizes.items()},
        "saturated_rows": saturated, "searched_again": widened,
        "examples": [dict(e, band_low=_bands(plan)[e["band"]]) for b in sorted(by_band) for e in by_band[b]],
        "outputs": {d: str(output / d) for d in ("groups", "kept", "pairs")},
    }
    return summary, starts


def explore(client: Any, plan: DedupPlan, dataset: Dataset, output: Path, thresholds: Sequence[float], k: int,
            budget: int) -> list[dict[str, Any]]:
    """Pairs and rows dropped (components mode) at each threshold, from one join.

    The pairs at the loosest threshold are shuffled and symmetrised like a real run; their union
    is then counted on the driver in one pass, closest pairs first (Kruskal), so every threshold
    costs nothing extra. Memory is the pairs at the loosest threshold, not the dataset.
    """
    loosest = max(thresholds) if plan.metric == "l2" else min(thresholds)
    work = output / "_explore"
    shutil.rmtree(work, ignore_errors=True)
    groups = make_parts(dataset.pieces, pieces_per_part(dataset.pieces, k, budget))
    starts = part_starts(groups)
    maps = [str(work / f"from-{p.index:05d}") for p in groups]
    client.gather([client.submit(_map_part, p, output / "knn", starts, maps[p.index], plan.metric, loosest, pure=False)
                   for p in groups])
    parts = client.gather([client.submit(_canonical_pairs, maps, p.index, plan.metric, pure=False) for p in groups])
    shutil.rmtree(work)
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    s = np.concatenate([p[2] for p in parts])
    order = np.argsort(s if plan.metric == "l2" else -s, kind="stable")
    a, b, s = a[order], b[order], s[order]
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = inv[: a.size], inv[a.size :]
    parent = np.arange(nodes.size)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    merged = np.zeros(a.size, dtype=np.int64)
    count = 0
    for i in range(a.size):
        ra, rb = find(int(ia[i])), find(int(ib[i]))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
            count += 1
        merged[i] = count
    out = []
    for t in sorted(thresholds, reverse=plan.metric != "l2"):
        n_pairs = int(passes(s, t, plan.metric).sum())
        out.append({"threshold": t, "pairs": n_pairs, "rows_dropped": int(merged[n_pairs - 1]) if n_pairs else 0,
                    "rows_in": dataset.total_rows})
    return out


def _map_part(part: Part, knn_dir: Path, starts: np.ndarray, out: str, metric: str, threshold: float,
              wide_dir: Path | None = None) -> dict[str, int]:
    paths = [str(knn_path(knn_dir, p)) for p in part.pieces]
    wide = [str(knn_path(wide_dir, p)) for p in part.pieces] if wide_dir is not None else []
    return {**map_edges(paths, part.start, starts, out, metric, threshold, wide), "pieces": len(part.pieces)}


# rows with more duplicates than k ----------------------------------------------------------------
def _widen_piece(plan: SearchPlan, store: RowStore, piece: Piece, knn_dir: Path, out: str, threshold: float,
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


def _canonical_pairs(map_dirs: Sequence[str], piece: int, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    src, dst, score, _ = reduce_edges(map_dirs, piece, metric, "symmetric")
    one = src < dst
    return src[one], dst[one], score[one]


# exactness -------------------------------------------------------------------------------------
def _exact_pairs_piece(store: RowStore, piece: int, q_rows: np.ndarray, q: np.ndarray, threshold: float,
                       metric: str) -> tuple[np.ndarray, np.ndarray]:
    x = store.vectors(piece)
    first = int(store.starts[piece])
    qa, xb = [], []
    step = max(1, (32 << 20) // (4 * max(1, len(q))))
    for lo in range(0, len(x), step):
        block = x[lo : lo + step]
        if metric == "l2":
            sc = (q**2).sum(1)[:, None] - 2 * q @ block.T + (block**2).sum(1)[None, :]
        else:
            sc = q @ block.T
        i, j = np.nonzero(passes(sc, threshold, metric))
        j = j + first + lo
        keep = j != q_rows[i]
        qa.append(q_rows[i[keep]])
        xb.append(j[keep])
    return np.concatenate(qa), np.concatenate(xb)


def pair_recall(client: Any, plan: DedupPlan, store: RowStore, output: Path, queries: int, seed: int,
                adj_starts: np.ndarray) -> dict[str, Any]:
    """Share of the exact above-threshold pairs of sampled rows that the dedup found.

    Exact pairs come from brute force over every stored piece (on the workers); found pairs are
    the sampled rows' entries in the symmetric adjacency. Found pairs whose exact score fails the
    threshold are counted too (none, when re-ranking made the scores exact).
    """
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.total_rows, size=min(queries, store.total_rows), replace=False))
    q = store.gather_vectors(rows)
    parts = client.gather([client.submit(_exact_pairs_piece, store, p, rows, q, plan.threshold, plan.metric,
                                         pure=False) for p in range(len(store.starts))])
    exact = {(int(a), int(b)) for qa, xb in parts for a, b in zip(qa, xb)}
    found = set()
    part_of = np.searchsorted(adj_starts, rows, side="right") - 1
    for p in np.unique(part_of):
        src, dst, _ = read_edges(output / "_dedup" / "adj" / f"part-{int(p):05d}.parquet")
        sel = np.isin(src, rows)
        found |= {(int(a), int(b)) for a, b in zip(src[sel], dst[sel])}
    wrong = 0
    if found:
        fa = np.array([a for a, _ in found])
        fb = np.array([b for _, b in found])
        xa, xb = store.gather_vectors(fa), store.gather_vectors(fb)
        with worker_device() as be:
            sc = be.exact_scores(xa, xb[:, None, :], plan.metric)[:, 0]
        wrong = int((~passes(sc, plan.threshold, plan.metric)).sum())
    hit = len(exact & found)
    return {"queries": int(rows.size), "exact_pairs": len(exact), "found_pairs": len(found),
            "pair_recall": round(hit / len(exact), 4) if exact else None, "below_threshold": wrong}


def check_plan(plan: DedupPlan) -> None:
    if plan.metric == "cosine" and not -1.0 <= plan.threshold <= 1.0:
        raise ConfigError(
            f"--threshold {plan.threshold}: cosine similarity lies in [-1, 1]; near-duplicates are ~0.9-1.0"
        )
    if plan.metric == "l2" and plan.threshold < 0:
        raise ConfigError(f"--threshold {plan.threshold}: a squared l2 distance is >= 0")


def attach_examples(examples: list[dict[str, Any]], dataset: Dataset, store: RowStore, text_column: str | None,
                    limit: int = 300) -> None:
    """Add ids (and, with ``text_column``, the texts, cut to ``limit`` characters) to the example pairs."""
    rows = np.array(sorted({e[k] for e in examples for k in ("row_a", "row_b")}), dtype=np.int64)
    if rows.size == 0:
        return
    ids = dict(zip(rows.tolist(), store.gather_ids(rows).to_pylist()))
    texts: dict[int, Any] = {}
    if text_column:
        piece_of = np.searchsorted(dataset.starts, rows, side="right") - 1
        for p in np.unique(piece_of):
            piece = dataset.pieces[int(p)]
            try:
                col = (
                    pq.ParquetFile(piece.path).read_row_groups(list(piece.row_groups), columns=[text_column]).column(0)
                )
            except (pa.ArrowInvalid, KeyError) as exc:
                raise InputError(
                    f"{shown(piece.path)}: cannot read --text-column '{text_column}' ({exc}); name an existing column"
                ) from None
            local = rows[piece_of == p] - piece.start
            for r, v in zip(rows[piece_of == p].tolist(), col.take(pa.array(local)).to_pylist()):
                texts[r] = v if not isinstance(v, str) or len(v) <= limit else v[:limit] + "…"
    for e in examples:
        e["id_a"], e["id_b"] = ids[e["row_a"]], ids[e["row_b"]]
        if text_column:
            e["text_a"], e["text_b"] = texts.get(e["row_a"]), texts.get(e["row_b"])
