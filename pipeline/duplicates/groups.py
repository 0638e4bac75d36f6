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
The plan lives in :mod:`.plan`, the input columns in :mod:`.columns`, the widening search in
:mod:`.widen`, ``--explore`` in :mod:`.explore` and pair recall in :mod:`.exactness`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.backends.worker import worker_device
from pipeline.duplicates.columns import read_keep_column
from pipeline.duplicates.explore import map_task
from pipeline.duplicates.keep import ChooseTask, member_keys
from pipeline.duplicates.plan import DedupPlan, bands
from pipeline.duplicates.widen import WIDEN_MAX, Widened, WidenTask
from pipeline.io import nodes
from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched
from pipeline.io.owned import discard, rename
from pipeline.io.parquet import Dataset
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.results import DedupExample, DedupResult
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import Stage, run_stage
from pipeline.search.join import SearchPlan, knn_path
from pipeline.shuffle.components import connected_components, label_path
from pipeline.shuffle.edges import (
    EDGE_BYTES,
    EdgesMapped,
    Part,
    make_parts,
    merge_histograms,
    part_starts,
    passes,
    read_edges,
    read_partition,
    reduce_edges,
    write_edges,
    write_partitioned,
)

__all__ = ["dedup_stages", "follow_update"]

log = logging.getLogger(__name__)

EXAMPLES_PER_BAND = 3
MIN_ROOM = 1 << 20  # list entries a widening task may always add (~42 MiB of shuffled edges)
STAGES = (
    "dedup_keep",
    "dedup_widen",
    "dedup_map",
    "dedup_pairs",
    "dedup_components",
    "dedup_members",
    "dedup_assign",
    "dedup_groups",
)


# pairs --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairsFound:
    """One partition's pairs written, and example pairs per score band (for the report)."""

    pairs: int
    examples: tuple[DedupExample, ...]


@dataclass(frozen=True, kw_only=True)
class PairsTask:
    """Reduce partition ``part``'s shuffled edges: symmetric adjacency to ``adj`` (internal), each
    unordered pair once to ``pairs`` as (id_a, id_b, score), and a few seeded example pairs."""

    map_dirs: tuple[str, ...]
    part: int
    plan: DedupPlan
    store: RowStore
    adj: str
    pairs: str
    seed: int

    def run(self) -> PairsFound:
        plan, store = self.plan, self.store
        src, dst, score, _ = reduce_edges(self.map_dirs, self.part, plan.metric, "symmetric")
        write_edges(self.adj, src, dst, score)
        one = src < dst
        a, b, s = src[one], dst[one], score[one]
        ids = {"id_a": store.gather_ids(a), "id_b": store.gather_ids(b)}
        table = pa.table({**ids, "score": pa.array(s, pa.float32())})
        with atomic_path(self.pairs) as tmp:
            pq.write_table(table, str(tmp))
        rng = np.random.default_rng([self.seed, self.part])
        lows = bands(plan)
        examples = []
        for i, lo in enumerate(lows):
            hi = lows[i + 1] if i + 1 < len(lows) else None
            sel = passes(s, lo, plan.metric) & (~passes(s, hi, plan.metric) if hi is not None else True)
            pick = rng.permutation(np.flatnonzero(sel))[:EXAMPLES_PER_BAND]
            examples += [DedupExample(i, int(a[j]), int(b[j]), float(s[j]), lo) for j in pick]
        return PairsFound(pairs=int(one.sum()), examples=tuple(examples))


# groups --------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MembersTask:
    """Send each linked row of partition ``part`` (to ``members``), with what ranks it (its id and
    keep value, :func:`~pipeline.duplicates.keep.member_keys`), and each of its pairs (to
    ``pair_dir``), to the partition of its component's label."""

    adj: str
    labels_dir: str
    starts: np.ndarray
    part: int
    members: str
    pair_dir: str
    store: RowStore
    keys_dir: str | None
    piece_starts: np.ndarray

    def run(self) -> None:
        starts = self.starts
        src, dst, score = read_edges(self.adj)
        lo = int(starts[self.part])
        labels = np.load(fetched(label_path(self.labels_dir, self.part)))
        rows = np.unique(src)
        lab = labels[rows - lo]
        n = len(starts)
        ranks = member_keys(rows, self.store, keys_dir=self.keys_dir, starts=self.piece_starts)
        write_partitioned(
            self.members, np.searchsorted(starts, lab, side="right") - 1, n, {"label": lab, "row": rows, **ranks}
        )
        one = src < dst
        plab = labels[src[one] - lo]
        write_partitioned(
            self.pair_dir,
            np.searchsorted(starts, plab, side="right") - 1,
            n,
            {"label": plab, "a": src[one], "b": dst[one], "score": score[one]},
        )


def _exact_pair_scores(
    store: RowStore, rows: np.ndarray, x: np.ndarray, other: np.ndarray, metric: Metric
) -> np.ndarray:
    if not rows.size:
        return np.zeros(0, np.float32)
    y = store.gather_vectors(other)
    with worker_device() as be:
        return be.exact_scores(x, y[:, None, :], metric)[:, 0]


@dataclass(frozen=True, kw_only=True)
class GroupsTask:
    """Write partition ``part``'s rows with their group (``groups``) and its kept ids (``kept``),
    from the assignments shuffled back to it; returns the rows it drops."""

    assign_dirs: tuple[str, ...]
    part: Part
    plan: DedupPlan
    store: RowStore
    groups: str
    kept: str
    id_column: str = "id"  # named as the input's id column

    def run(self) -> int:
        part, store = self.part, self.store
        a = read_partition(self.assign_dirs, part.index, ("row", "rep", "kept"))
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
            score[linked] = _exact_pair_scores(store, linked, x, rep[linked], self.plan.metric)
        table = pa.table(
            {
                self.id_column: ids,
                "group_id": pa.array(rep),
                "representative_id": store.gather_ids(rep),
                "is_kept": pa.array(kept),
                "score_to_representative": pa.array(score, mask=rep == rows),
            }
        )
        with atomic_path(self.groups) as tmp:
            pq.write_table(table, str(tmp))
        with atomic_path(self.kept) as tmp:
            pq.write_table(pa.table({self.id_column: ids.filter(pa.array(kept))}), str(tmp))
        return int((~kept).sum())


# the stages -------------------------------------------------------------------------------------
GROUP_COLUMNS = ("group_id", "representative_id", "is_kept", "score_to_representative")


def output_id_column(id_column: str) -> str:
    """The id column of ``groups/``, ``kept/`` and ``contamination/``: named as the input's, unless
    that name is one of the other columns there (then ``id``)."""
    return "id" if id_column in (*GROUP_COLUMNS, "reference_id", "reference_file", "score") else id_column


def _clear(manifest: Manifest, output: Path, stages: Sequence[str], dirs: Sequence[str]) -> None:
    for s in stages:
        manifest.clear_stage(s)
    for d in dirs:
        discard(output / d)


def _forget_changed(plan: DedupPlan, output: Path, manifest: Manifest) -> None:
    """Changed dedup settings regroup from the existing join: every dedup stage is redone."""
    params = {"threshold": plan.threshold, "mode": plan.mode, "keep_by": plan.keep_by, "keep_order": plan.keep_order}
    if manifest.stage_info("dedup_params") not in (None, params):
        log.info(
            "dedup settings changed (%s): regrouping from the existing join",
            ", ".join(f"{k}={v}" for k, v in params.items()),
        )
        _clear(manifest, output, STAGES, ["_dedup", "pairs", "groups", "kept"])  # deduplicated/: by digest
    manifest.finish_stage("dedup_params", params)


def follow_update(manifest: Manifest, output: Path, dataset: Dataset) -> None:
    """Take in what an input update changed (the join's ``changed`` stage, consumed here): the
    pieces joined in full are widened; every partition is mapped and reduced again; where rows
    left, the partitions are laid out afresh and components start from scratch (old labels may hold
    links through rows now gone).

    Patched pieces keep their longer lists and range pairs: an entry of a row gone is dropped
    when mapped (a hole), and a pair with a new row is found from the new row's side, whose lists
    are widened in full (pairs are made symmetric), so an old row needs no search again."""
    changes = manifest.stage_info("changed")
    if not changes:
        return
    work = output / "_dedup"
    retired = {p.index for p in dataset.retired}
    for piece in sorted(set(changes.get("new", changes["pieces"])) | retired):
        for stage in ("dedup_widen", "dedup_keep") if piece in retired else ("dedup_widen",):
            manifest.forget_piece(stage, piece)
        for folder in ("wide", "range"):
            discard(knn_path(work / folder, piece))
    if changes.get("left"):
        dirs = ["edges", "adj", "components", "members", "linked", "assign"]
        _clear(
            manifest, output, (*STAGES[2:], "dedup_rows"), [*(f"_dedup/{d}" for d in dirs), "pairs", "groups", "kept"]
        )
    else:
        _clear(manifest, output, STAGES[2:3], [])
    manifest.clear_stage("changed")
    log.info(
        "dedup: %d new piece(s) widened, %d patched ones keep their longer lists; pairs and groups updated",
        len(changes.get("new", ())),
        len(set(changes["pieces"]) - set(changes.get("new", ()))),
    )


def _partitions(
    dataset: Dataset, output: Path, manifest: Manifest, budget: int, entries: dict[int, int]
) -> tuple[list[Part], Path | None]:
    """The shuffle partitions: consecutive pieces whose list entries (``entries`` per piece: the
    join's lists, longer lists and range pairs) fit ``budget`` bytes of edges. A grown input keeps
    the first run's grouping; its new pieces are mapped and the partitions reduced again.

    Returns the partitions and, for a grown input, the previous labels to start components from.
    """
    n = dataset.total_rows
    work = output / "_dedup"
    warm = None
    grown = manifest.stage_info("dedup_rows")
    most = max(entries.values(), default=1)
    per_part = grown["per_part"] if grown else max(1, budget // (2 * EDGE_BYTES * max(1, most)))
    parts = make_parts(dataset.pieces, per_part)
    if grown is not None and grown["rows"] != n:
        # the input grew: new pieces are mapped (their lists hold every new pair); partitions are
        # reduced again to take in the new reverse edges; components start from the old labels
        log.info("dedup: %d new rows since the last run; updating pairs and groups", n - grown["rows"])
        warm = work / "components" / "previous"
        if nodes.present(work / "components" / "labels"):
            rename(work / "components" / "labels", warm)
        _clear(manifest, output, STAGES[3:], ["_dedup/adj", "_dedup/members", "_dedup/linked", "_dedup/assign"])
        for part in parts:  # a partition that took in new pieces is mapped again
            if manifest.piece_results("dedup_map").get(part.index, {}).get("pieces") != len(part.pieces):
                manifest.forget_piece("dedup_map", part.index)
    manifest.finish_stage("dedup_rows", {"rows": n, "per_part": per_part})
    return parts, warm


def _examples(plan: DedupPlan, found: Sequence[PairsFound]) -> tuple[DedupExample, ...]:
    """Up to ``EXAMPLES_PER_BAND`` example pairs per score band, closest first within a band."""
    ranked = sorted((e for r in found for e in r.examples), key=lambda e: (e.band, -e.score))
    by_band: dict[int, list[DedupExample]] = {}
    for e in ranked:
        if len(by_band.setdefault(e.band, [])) < EXAMPLES_PER_BAND:
            by_band[e.band].append(e)
    lows = bands(plan)
    return tuple(replace(e, band_low=lows[e.band]) for b in sorted(by_band) for e in by_band[b])


def dedup_stages(
    client: Any,
    plan: DedupPlan,
    *,
    dataset: Dataset,
    store: RowStore,
    output: Path,
    manifest: Manifest,
    seed: int,
    k: int,
    budget: int,
    search: SearchPlan,
    pair_nprobe: int | None = None,
    room_bytes: int | None = None,
) -> tuple[DedupResult, np.ndarray]:
    """Pairs, components and groups for the self-join in ``output``.

    Returns the dedup summary and the first rows of the shuffle partitions (which hold the pairs).

    The shuffles work on partitions of consecutive pieces whose edges fit ``budget`` bytes.
    Rows whose ``k`` neighbours all pass the threshold are first searched again with ``search``
    and longer lists (up to ``WIDEN_MAX``), so a group larger than ``k`` is found whole; with
    ``pair_nprobe``, every row with a pair is searched again over that many inverted lists. The
    longer lists of a piece hold at most ``room_bytes`` (default: ``budget``) of shuffled edges.
    """
    n = dataset.total_rows
    _forget_changed(plan, output, manifest)
    work = output / "_dedup"
    keys_dir = None
    if plan.keep_by:
        keys_dir = work / "keep"
        read_keep_column(client, dataset, plan.keep_by, keys_dir, manifest)

    wide_dir, range_dir = work / "wide", work / "range"
    cap = min(WIDEN_MAX, n - 1)
    # list entries one piece's widening may hold, for the shuffle that later holds them (at least MIN_ROOM)
    room = max(budget, room_bytes or 0) // (2 * EDGE_BYTES)
    widened = run_stage(
        client,
        manifest,
        Stage(
            name="dedup_widen",
            items=dataset.pieces,
            result=Widened,
            task=lambda p: WidenTask(
                plan=search,
                store=store,
                piece=p,
                knn_dir=output / "knn",
                out=str(knn_path(wide_dir, p.index)),
                threshold=plan.threshold,
                cap=cap,
                pair_nprobe=pair_nprobe,
                range_out=str(knn_path(range_dir, p.index)),
                budget=max(MIN_ROOM, room - p.rows * k),
            ),
            files=lambda p: [knn_path(wide_dir, p.index), knn_path(range_dir, p.index)],
        ),
    )
    entries = {p.index: widened[p.index].entries if p.index in widened else p.rows * k for p in dataset.pieces}
    parts, warm = _partitions(dataset, output, manifest, budget, entries)
    starts = part_starts(parts)
    searched = sum(w.rows for w in widened.values())
    full = sum(w.saturated for w in widened.values())
    at_cap = sum(w.at_cap for w in widened.values())
    capped = sum(w.capped for w in widened.values())
    if full:
        log.info("%d rows had all k=%d neighbours above the threshold: searched again with up to %d", full, k, cap)
    if at_cap > capped:
        log.info("%d rows had more than %d: every pair of theirs found by exact range search", at_cap - capped, cap)
    if searched > full:
        log.info("%d rows with a pair searched again with nprobe=%s", searched - full, pair_nprobe)
    maps = [str(work / "edges" / f"from-{p.index:05d}") for p in parts]
    mapped = run_stage(
        client,
        manifest,
        Stage(
            name="dedup_map",
            items=parts,
            result=EdgesMapped,
            task=lambda p: map_task(
                p,
                knn_dir=output / "knn",
                starts=starts,
                out=maps[p.index],
                metric=plan.metric,
                threshold=plan.threshold,
                wide_dir=wide_dir,
                range_dir=range_dir,
                holes=dataset.holes,
            ),
            files=lambda p: [Path(maps[p.index]) / "bounds.npy"],
        ),
    )
    adj = [str(work / "adj" / f"part-{p.index:05d}.parquet") for p in parts]
    pair_out = [str(output / "pairs" / f"part-{p.index:05d}.parquet") for p in parts]
    found = run_stage(
        client,
        manifest,
        Stage(
            name="dedup_pairs",
            items=parts,
            result=PairsFound,
            task=lambda p: PairsTask(
                map_dirs=tuple(maps),
                part=p.index,
                plan=plan,
                store=store,
                adj=adj[p.index],
                pairs=pair_out[p.index],
                seed=seed,
            ),
            files=lambda p: [adj[p.index], pair_out[p.index]],
        ),
    )

    labels_dir = work / "components" / "labels"
    if manifest.stage_info("dedup_components") is None or not nodes.present(labels_dir):
        labels_dir = connected_components(
            client,
            adj,
            starts=starts,
            total=dataset.row_space,
            work_dir=work / "components",
            warm=warm if warm is not None and nodes.present(warm) else None,
        )
        manifest.finish_stage("dedup_components", {"labels": str(labels_dir)})
    size_parts, dropped = _group_stages(
        client,
        plan,
        dataset=dataset,
        store=store,
        output=output,
        manifest=manifest,
        parts=parts,
        adj=adj,
        labels_dir=labels_dir,
        keys_dir=keys_dir,
    )

    sizes = merge_histograms(list(size_parts.values()))
    rows_dropped = int(sum(dropped.values()))
    saturated = int(sum(m.saturated for m in mapped.values()))
    if saturated:
        log.warning(
            "%d rows still had every neighbour in their list above the threshold (the list was cut at %d, "
            "or at what partition_size lets the shuffle hold): they may have more duplicates; those groups "
            "can be incomplete",
            saturated,
            cap,
        )
    result = DedupResult(
        threshold=plan.threshold,
        mode=plan.mode,
        metric=plan.metric,
        keep_by=plan.keep_by,
        keep_order=plan.keep_order if plan.keep_by else None,
        rows_in=n,
        pairs=int(sum(r.pairs for r in found.values())),
        groups=int(sum(sizes.values())),
        rows_in_groups=int(sum(s * c for s, c in sizes.items())),
        rows_dropped=rows_dropped,
        rows_kept=n - rows_dropped,
        group_sizes={str(k): v for k, v in sizes.items()},
        saturated_rows=saturated,
        searched_again=searched,
        examples=_examples(plan, list(found.values())),
        pair_nprobe=pair_nprobe,
        outputs={d: str(output / d) for d in ("groups", "kept", "pairs")},
    )
    return result, starts


def _group_stages(
    client: Any,
    plan: DedupPlan,
    *,
    dataset: Dataset,
    store: RowStore,
    output: Path,
    manifest: Manifest,
    parts: list[Part],
    adj: list[str],
    labels_dir: Path,
    keys_dir: Path | None,
) -> tuple[dict[int, Any], dict[int, int]]:
    """Members and pairs shuffled by component, representatives chosen, ``groups/`` and ``kept/``
    written. Returns the group-size histograms and the rows dropped, per partition."""
    work = output / "_dedup"
    starts = part_starts(parts)
    members = [str(work / "members" / f"from-{p.index:05d}") for p in parts]
    linked = [str(work / "linked" / f"from-{p.index:05d}") for p in parts]
    run_stage(
        client,
        manifest,
        Stage(
            name="dedup_members",
            items=parts,
            task=lambda p: MembersTask(
                adj=adj[p.index],
                labels_dir=str(labels_dir),
                starts=starts,
                part=p.index,
                members=members[p.index],
                pair_dir=linked[p.index],
                store=store,
                keys_dir=str(keys_dir) if keys_dir else None,
                piece_starts=dataset.starts,
            ),
            files=lambda p: [Path(members[p.index]) / "bounds.npy", Path(linked[p.index]) / "bounds.npy"],
        ),
    )
    assign = [str(work / "assign" / f"from-{p.index:05d}") for p in parts]
    size_parts = run_stage(
        client,
        manifest,
        Stage(
            name="dedup_assign",
            items=parts,
            task=lambda p: ChooseTask(
                member_dirs=tuple(members),
                pair_dirs=tuple(linked),
                part=p.index,
                plan=plan,
                starts=starts,
                assign=assign[p.index],
                keep_by=keys_dir is not None,
            ),
            files=lambda p: [Path(assign[p.index]) / "bounds.npy"],
        ),
    )
    groups = [output / "groups" / f"part-{p.index:05d}.parquet" for p in parts]
    kept = [output / "kept" / f"part-{p.index:05d}.parquet" for p in parts]
    dropped = run_stage(
        client,
        manifest,
        Stage(
            name="dedup_groups",
            items=parts,
            result=int,
            task=lambda p: GroupsTask(
                assign_dirs=tuple(assign),
                part=p,
                plan=plan,
                store=store,
                groups=str(groups[p.index]),
                kept=str(kept[p.index]),
                id_column=output_id_column(dataset.id_column),
            ),
            files=lambda p: [groups[p.index], kept[p.index]],
        ),
    )
    return size_parts, dropped
