"""The shared stages of every job: build (scan, train, fill) and join, each resumable from its manifest.

Everything that can be checked from metadata and settings (columns, dimensions, the index key,
``k``, ``nprobe``, the training sample size) is checked before the first heavy pass.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import faiss
import pyarrow as pa

from pipeline.backends.gpu import INDEX_SHARE
from pipeline.backends.kernels import ivf_of
from pipeline.backends.lists import list_major_rows
from pipeline.cluster.clients import ClusterInfo, check_memory_floor, worker_memory
from pipeline.config import Config, IndexSpec, SearchSpec, dump_config
from pipeline.errors import ConfigError, InputError, PipelineError
from pipeline.index.built import BuiltIndex, IndexRecord
from pipeline.index.choice import (
    ROUTED_WHEN_LISTS_OVER,
    check_training_rows,
    default_index_key,
    default_nprobe,
    default_rerank,
    explain_index_key,
    gpu_index_bytes,
    has_exact_codes,
    make_encoder,
    make_index,
    nlist_of,
    training_rows,
)
from pipeline.index.drift import measure_drift
from pipeline.index.fill import FillRecord, fill_index, fill_mode
from pipeline.index.ordered import has_ordered
from pipeline.index.scan import scan_dataset
from pipeline.index.shape import index_shape
from pipeline.index.train import TrainRecord, train_index
from pipeline.io import nodes
from pipeline.io.atomic import atomic_path, write_json
from pipeline.io.layout import InputDiff, Layout, layout_of, relayout
from pipeline.io.owned import discard
from pipeline.io.parquet import Dataset, Piece, plan_dataset
from pipeline.io.store import RowStore
from pipeline.io.workdir import PATCH_NAME, shown
from pipeline.jobs.recall import check_lists, measure_recall
from pipeline.results import (
    IndexSummary,
    JoinResult,
    ListReads,
    MemoryUse,
    RecallResult,
    SearchSummary,
    from_dict,
    to_dict,
)
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.progress import peak_rss
from pipeline.search.join import SearchPlan, join_pieces, knn_path
from pipeline.search.update import Patched, patch_pieces, spare_for

__all__ = ["BuiltIndex", "Timings", "build_index", "open_index", "join_index", "search_plan", "check_query_ids"]

log = logging.getLogger(__name__)

WORKING_COPIES = 4  # a piece in flight: the Arrow column, its float32 copy, the normalised copy, the write
FAISS_WORKING = 160 << 20  # k-means distance blocks, search batches: measured ~130 MiB on the demo data


@dataclass
class Timings:
    """Seconds per phase of one job, across the runs it took: with a ``path``, every phase is
    saved as it ends, so a job killed and resumed reports the time of all its runs."""

    phases: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    earlier_wall: float = 0.0  # wall time of the earlier, interrupted runs of this job
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def resume(cls, path: Path, fresh: bool) -> Timings:
        """The job's timings so far (``fresh``: a new job, earlier ones forgotten)."""
        saved: dict[str, Any] = {}
        if not fresh and path.exists():
            try:
                saved = json.loads(path.read_text())
            except ValueError:
                saved = {}
        phases = {str(k): float(v) for k, v in saved.get("phases", {}).items()}
        return cls(phases, path, float(saved.get("wall", 0.0)))

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] = round(self.phases.get(phase, 0.0) + seconds, 3)
        self.save()

    def save(self) -> None:
        if self.path is not None and self.path.parent.is_dir():
            wall = self.earlier_wall + time.monotonic() - self.started
            write_json(self.path, {"phases": self.phases, "wall": round(wall, 3)})


def _resolve_key(
    spec: IndexSpec, rows: int, dim: int, budget: int | None, cluster: ClusterInfo
) -> tuple[str, faiss.Index]:
    key = (
        default_index_key(rows, dim, budget, cluster.backend == "gpu", cluster.gpu_free, workers=cluster.workers)
        if spec.key == "auto"
        else spec.key
    )
    return key, make_index(key, dim, spec.metric or "cosine")


def _check_search(search: SearchSpec, index: faiss.Index, key: str, ntotal: int) -> None:
    """Refuse ``k`` or ``nprobe`` that the index cannot honour."""
    need = search.k + (1 if search.exclude_self else 0)
    if need > ntotal:
        extra = " (+1 for --exclude-self)" if search.exclude_self else ""
        raise ConfigError(
            f"--k {search.k}{extra} asks for more neighbours than the {ntotal} vectors indexed; lower --k"
        )
    nlist = nlist_of(index)
    if search.nprobe is not None:
        if nlist is None:
            log.warning("--nprobe %d ignored: index %r has no inverted lists", search.nprobe, key)
        elif search.nprobe > nlist:
            raise ConfigError(
                f"--nprobe {search.nprobe} is larger than the {nlist} lists of {key!r}; use at most {nlist}"
            )


def _plan_build(
    client: Any, cluster: ClusterInfo, config: Config, search: SearchSpec | None
) -> tuple[Dataset, int | None]:
    """The input's plan (from Parquet footers) and one worker's memory; everything that can be
    checked before reading (memory floor, index key, training rows, k and nprobe) is checked."""
    spec = config.index
    dataset = plan_dataset(config.data.paths, config.data.id_column, config.data.vector_column, config.partition_bytes)
    log.info("input: %d rows in %d file(s), %d piece(s)", dataset.total_rows, len(dataset.files), len(dataset.pieces))
    check_memory_floor(client, FAISS_WORKING + WORKING_COPIES * dataset.max_piece_bytes(config.partition_bytes))
    budget = worker_memory(client)
    if dataset.dim is not None:  # fixed-size vectors: settings can be checked before any reading
        key, empty = _resolve_key(spec, dataset.total_rows, dataset.dim, budget, cluster)
        check_training_rows(empty, key, training_rows(empty, dataset.total_rows, dataset.dim, spec.sample_size))
        if search is not None:
            _check_search(search, empty, key, dataset.total_rows)
    return dataset, budget


def build_index(
    client: Any,
    cluster: ClusterInfo,
    config: Config,
    index_dir: Path,
    *,
    timings: Timings,
    search: SearchSpec | None = None,
    incremental: bool = False,
) -> BuiltIndex:
    """Scan, train and fill the index in ``index_dir`` (resuming what a killed run finished).

    An index built from other input files (added, removed or rewritten; every setting the same) is
    updated in place (:func:`update_layout`): new pieces are scanned and encoded with the trained
    index, retired ones leave the lists, and surviving rows keep their global rows.
    ``incremental`` is kept for callers of the former append-only rule; any build now updates.
    """
    spec = config.index
    metric = spec.metric or "cosine"
    t0 = time.monotonic()
    dataset, budget = _plan_build(client, cluster, config, search)
    manifest = Manifest(index_dir)
    dataset, diff, laid_out = update_layout(manifest, dataset, overwrite=config.overwrite)
    identity = {
        "input": dataset.fingerprint(),
        "metric": metric,
        "index_key": spec.key,
        "sample_size": spec.sample_size,
        "seed": spec.seed,
        "partition_bytes": config.partition_bytes,
    }
    before = None if manifest.damaged else manifest.stage_record("index", IndexRecord)
    if manifest.open(identity, config.overwrite, "index", allow_append=incremental, allow_update=laid_out):
        if diff.changed:
            log.info("%s: %s: updating", shown(index_dir), diff.summary())
            pending = manifest.stage_info("update") or {}
            manifest.finish_stage(
                "update",
                {
                    "new": sorted(set(pending.get("new", ())) | set(diff.new_pieces)),
                    "imbalance": pending.get("imbalance", before.imbalance if before else None),
                },
            )
        for stage in ("scan", "fill", "index"):
            manifest.reopen_stage(stage)
    if spec.retrain and manifest.stage_info("retrained") != identity["input"]:
        log.info("%s: --retrain: training the index again on the current rows (the scan is kept)", shown(index_dir))
        for stage in ("train", "fill", "index", "update"):
            manifest.clear_stage(stage)
    manifest.finish_stage("layout", layout_of(dataset))
    store = RowStore(index_dir / "store", dataset.starts, dataset.row_space, dataset.live)
    retire_pieces(manifest, store, dataset.retired, index_dir)
    _verify_index_files(manifest)
    timings.add("plan", time.monotonic() - t0)

    t0 = time.monotonic()
    dim = scan_dataset(client, dataset, store=store, metric=metric, manifest=manifest)
    timings.add("scan", time.monotonic() - t0)
    trained = manifest.stage_record("train", TrainRecord)
    trained_key = trained.key if trained else None
    if trained_key:  # resuming: keep the key already trained, whatever the memory now
        key, empty = trained_key, make_index(trained_key, dim, metric)
    else:
        key, empty = _resolve_key(spec, dataset.total_rows, dim, budget, cluster)
    n_train = training_rows(empty, dataset.total_rows, dim, spec.sample_size)
    check_training_rows(empty, key, n_train)
    if search is not None:
        _check_search(search, empty, key, dataset.total_rows)

    trained_path = index_dir / "trained.faiss"
    if trained is None:
        t0 = time.monotonic()
        key = train_index(
            client,
            manifest,
            store=store,
            key=key,
            dim=dim,
            metric=metric,
            n_train=n_train,
            seed=spec.seed,
            path=trained_path,
            choose_first_level=spec.key == "auto",
        )
        empty = make_index(key, dim, metric)
        timings.add("train", time.monotonic() - t0)

    t0 = time.monotonic()
    mode = fill_mode(key, make_encoder(key, dim, metric))
    if mode == "serial" and dataset.retired:
        raise ConfigError(
            f"{shown(index_dir)}: index {key!r} keeps no row ids, so input files removed or rewritten "
            "cannot leave it in place; pass --overwrite to rebuild it, or use an IVF index (--index-key auto)"
        )
    routed = (search is not None and search.routed_join) or _outgrows_gpus(cluster, empty, store.rows)
    ordered = _orders_vectors(empty, store.rows * dim * 4, budget, routed=routed)
    ntotal = fill_index(
        client,
        trained_path,
        store,
        pieces=dataset.pieces,
        index_dir=index_dir,
        manifest=manifest,
        mode=mode,
        ordered=ordered,
    )
    timings.add("fill", time.monotonic() - t0)
    if spec.retrain:
        manifest.finish_stage("retrained", identity["input"])
    balance = (
        index_shape(client, str(index_dir), "fill").imbalance if nodes.present(index_dir / "index.faiss") else None
    )
    _check_drift(client, manifest, store, index_dir, balance, seed=spec.seed, limit=spec.drift_limit)
    if not nodes.present(index_dir / "config.yaml"):
        with atomic_path(index_dir / "config.yaml") as tmp:
            tmp.write_text(dump_config(config))
    done = manifest.stage_record("index", IndexRecord)
    if done is not None:  # resumed: report the reason recorded when this key was chosen
        why = done.why
    else:
        why = (
            explain_index_key(
                dataset.total_rows, dim, budget, cluster.backend == "gpu", cluster.gpu_free, workers=cluster.workers
            )
            if spec.key == "auto"
            else "given by index_key"
        )
    record = IndexRecord(
        key,
        dim,
        metric,
        ntotal,
        nlist_of(empty),
        default_rerank(empty),
        tuple(dataset.starts.tolist()),
        why,
        live=dataset.live if dataset.retired else None,
        row_space=dataset.row_space if dataset.retired else None,
        imbalance=balance,
    )
    manifest.finish_stage("index", record)
    log.info("index ready: %s, %d vectors of dimension %d, in %s", key, ntotal, dim, shown(index_dir))
    return BuiltIndex(
        index_dir,
        dataset,
        store,
        dim,
        metric,
        key,
        ntotal,
        record.nlist,
        record.rerank_default,
        manifest.data["identity"],
        why,
        trained=_trained(manifest),
    )


def update_layout(manifest: Manifest, dataset: Dataset, *, overwrite: bool) -> tuple[Dataset, InputDiff, bool]:
    """``dataset`` laid out over the one the index in ``manifest``'s directory was built from
    (:func:`pipeline.io.layout.relayout`): the pieces with the global rows they keep, what
    changed, and whether there was a layout to keep (an index from before layouts were recorded
    can only grow at its end). A fresh directory (or ``overwrite``) lays the input out as planned."""
    previous = None if overwrite or manifest.damaged else manifest.stage_record("layout", Layout)
    if previous is None:
        return dataset, InputDiff(), False
    return (*relayout(dataset, previous), True)


def _check_drift(
    client: Any, manifest: Manifest, store: RowStore, index_dir: Path, after: float | None, *, seed: int, limit: float
) -> None:
    """After an update's fill: measure how far its new rows drifted from the trained ones
    (:mod:`pipeline.index.drift`), warn past ``limit`` naming ``--retrain``, and record it
    (stage ``drift``); the pending ``update`` stage is then done."""
    update = manifest.stage_info("update")
    if update is None:
        return
    new = tuple(p for p in update["new"] if p in set(store.live))
    drift = measure_drift(
        client,
        trained=index_dir / "trained.faiss",
        store=store,
        new_pieces=new,
        seed=seed,
        limit=limit,
        imbalance_before=update.get("imbalance"),
        imbalance_after=after,
    )
    if drift is not None:
        if drift.drifted:
            log.warning(
                "%s: the input drifted: %s. The index was trained on rows unlike these, so their neighbours are "
                "found less well; pass --retrain to train it again on the current rows (the scan is kept; every "
                "list is rejoined)",
                shown(index_dir),
                drift.summary(),
            )
        else:
            log.info("%s: no drift: %s", shown(index_dir), drift.summary())
        manifest.finish_stage("drift", drift)
    manifest.clear_stage("update")


def retire_pieces(manifest: Manifest, store: RowStore, retired: Sequence[Piece], index_dir: Path) -> None:
    """Forget the retired pieces' scan and fill records and delete their files (the tool's own):
    their rows left the input, so nothing may read them again. Done on every build, so an update
    killed part way finishes it."""
    for piece in retired:
        manifest.data.get("dims", {}).pop(str(piece.index), None)
        for stage in ("scan", "fill"):
            manifest.forget_piece(stage, piece.index)
        for path in (
            store.vectors_path(piece.index),
            store.ids_path(piece.index),
            index_dir / "parts" / f"part-{piece.index:05d}.faiss",
        ):
            discard(path)


def _verify_index_files(manifest: Manifest) -> None:
    """Reopen what a resumed build finds damaged: lost store pieces are scanned again, a lost
    ``trained.faiss`` is trained again (and everything encoded with it redone), lost partial
    indexes or a lost ``index.faiss`` are encoded and merged again."""
    manifest.verify_stage("scan")
    if manifest.verify_stage("train"):
        for stage in ("fill", "index"):
            manifest.clear_stage(stage)
    if manifest.verify_stage("fill"):
        manifest.reopen_stage("index")


def open_index(index_dir: Path) -> BuiltIndex:
    """A finished index directory written by ``build`` or ``run``, its files checked."""
    manifest = Manifest(index_dir)
    manifest.check_readable(f"rebuild the index with `build --index-dir {shown(index_dir)} --overwrite`")
    info = manifest.stage_record("index", IndexRecord) if manifest.path.exists() else None
    if info is None:
        raise PipelineError(
            f"{shown(index_dir)}: no finished index here; run `build` (or `run`) with --index-dir {shown(index_dir)}"
        )
    fill = manifest.stage_record("fill", FillRecord)
    bad = manifest.first_lost_file("scan") or manifest.first_damaged(fill.files if fill else ())
    if bad is not None:
        raise PipelineError(
            f"{shown(index_dir / bad)}: this index file is missing, truncated or changed; run `build` "
            "again with the same --input and settings to repair the index (only the damaged parts are redone)"
        )
    ident = manifest.data["identity"]
    files = ident["input"]["files"]
    # the indexed dataset as recorded; its files are not re-read (only the row store is)
    dataset = Dataset(
        files=(),
        pieces=(),
        id_column=ident["input"]["id_column"],
        vector_column=ident["input"]["vector_column"],
        dim=info.dim,
        id_kind="",
        total_rows=info.ntotal,
    )
    store = info.store(index_dir)
    log.info("index: %s, %d vectors of dimension %d (%d input files)", info.key, info.ntotal, info.dim, len(files))
    return BuiltIndex(
        index_dir,
        dataset,
        store,
        info.dim,
        info.metric,
        info.key,
        info.ntotal,
        info.nlist,
        info.rerank_default,
        ident,
        info.why,
        trained=_trained(manifest),
    )


def _trained(manifest: Manifest) -> str:
    """The CRC of the index's ``trained.faiss`` ("" where none is recorded)."""
    record = manifest.stage_record("train", TrainRecord)
    return str(record.files[0][2]) if record is not None and record.files else ""


def check_query_ids(built: BuiltIndex, queries: Dataset, exclude_self: bool) -> None:
    """``--exclude-self`` compares query ids with indexed ids: refuse kinds that can never match."""
    if not exclude_self or not built.ntotal:
        return
    indexed = built.store.ids(built.store.live[0]).type
    kind = "int" if pa.types.is_integer(indexed) else "string"
    if queries.id_kind and queries.id_kind != kind:
        raise InputError(
            f"{shown(queries.files[0].path)}, column '{queries.id_column}': query ids are {queries.id_kind}s but the "
            f"index in {shown(built.dir)} holds {kind} ids, so --exclude-self could never match them; use the same "
            "id column as the indexed data, or drop --exclude-self"
        )


def search_plan(config: Config, built: BuiltIndex, self_join: bool) -> SearchPlan:
    s = config.search
    empty = make_index(built.key, built.dim, built.metric)
    _check_search(s, empty, built.key, built.ntotal)
    if built.key == "Flat":  # exact search over the row store: no settings to choose
        return SearchPlan(str(built.dir), built.metric, s.k, None, 0, s.exclude_self, self_join, strategy="exact")
    nprobe = s.nprobe if s.nprobe is not None else (default_nprobe(built.nlist) if built.nlist else None)
    rerank = s.rerank if s.rerank is not None else built.rerank_default
    return SearchPlan(str(built.dir), built.metric, s.k, nprobe, rerank, s.exclude_self, self_join)


def _scan_queries(
    client: Any, config: Config, built: BuiltIndex, *, queries: Dataset, output: Path, manifest: Manifest
) -> RowStore:
    """Scan a query dataset (not the indexed rows) into ``output/_queries``, its dimension checked."""
    if queries.dim is not None and queries.dim != built.dim:
        raise InputError(
            f"{queries.files[0].path}, column '{queries.vector_column}': query vectors have dimension "
            f"{queries.dim} but the index holds dimension {built.dim}; embed the queries with the same model"
        )
    check_memory_floor(client, FAISS_WORKING + WORKING_COPIES * queries.max_piece_bytes(config.partition_bytes))
    query_store = RowStore(output / "_queries", queries.starts, queries.row_space, queries.live)
    qdim = scan_dataset(
        client, queries, store=query_store, metric=built.metric, manifest=manifest, stage="scan_queries"
    )
    if qdim != built.dim:
        raise InputError(
            f"column '{queries.vector_column}': query vectors have dimension {qdim} but the index holds "
            f"dimension {built.dim}; embed the queries with the same model"
        )
    return query_store


def join_index(
    client: Any,
    cluster: ClusterInfo,
    config: Config,
    built: BuiltIndex,
    *,
    output: Path,
    timings: Timings,
    queries: Dataset | None = None,
    knn_dir: Path | None = None,
    command: str = "join",
    incremental: bool = False,
    laid_out_queries: bool = False,
) -> tuple[JoinResult, Manifest]:
    """Join ``queries`` (or the indexed rows themselves) against ``built``; write ``output``.

    ``knn_dir``: where a self-join also writes its lists as global rows (default ``output/knn``),
    which dedup and graph read and an update patches. A self-join over an index whose input
    changed since (:mod:`pipeline.io.layout`) is updated: the new pieces are joined, the lists of
    the others patched (:mod:`pipeline.search.update`), and the pieces of files gone dropped.
    ``laid_out_queries``: ``queries`` are an index's laid-out input (dedup's ``--against`` join of
    the input): new query pieces are joined and gone ones dropped; a changed index (reference)
    joins every piece again.
    """
    if config.index.metric and config.index.metric != built.metric:
        raise ConfigError(
            f"--metric {config.index.metric}: the index in {built.dir} was built with metric {built.metric}; "
            "drop --metric or rebuild the index"
        )
    s = config.search
    if s.target_recall is not None and not s.recall_queries:
        raise ConfigError(
            f"--recall-queries 0 turns off the recall measurement that --target-recall {s.target_recall} "
            "is checked with; give a sample size, or pass --target-recall off as well"
        )
    plan = search_plan(config, built, queries is None)
    if knn_dir is None and queries is None:
        knn_dir = output / "knn"
    if knn_dir is not None:
        plan = replace(plan, knn_dir=str(knn_dir))
    identity = {
        "command": command,
        "index": built.identity,
        "queries": "self" if queries is None else queries.fingerprint(),
        "k": s.k,
        "nprobe": s.nprobe,
        "rerank": s.rerank,
        "exclude_self": s.exclude_self,
        "target_recall": s.target_recall,
        "recall_queries": s.recall_queries,
    }
    keep = built.dir.name if built.dir.parent.resolve() == output.resolve() else None
    manifest = Manifest(output)
    earlier = None if manifest.damaged else manifest.stage_record("recall", RecallResult)
    before = None if manifest.damaged else manifest.data.get("identity")
    if manifest.open(
        identity,
        config.overwrite,
        "neighbour table",
        keep=keep,
        allow_append=incremental,
        allow_update=queries is None or laid_out_queries,
    ):
        manifest.reopen_stage("join")  # new rows are searched against all rows
        for stage in ("exact_diagonal", "exact_pairs"):  # partial lists of the smaller store: never reused
            manifest.clear_stage(stage)
        manifest.reopen_stage("scan_queries")  # a query set that grew: its new pieces are scanned
        if queries is None or laid_out_queries:
            index_changed = before is not None and before.get("index") != manifest.data["identity"].get("index")
            _start_update(
                manifest, built, queries, output=output, knn_dir=knn_dir, earlier=earlier, index_changed=index_changed
            )
    trained = manifest.stage_info("trained")
    if trained is not None and trained.get("crc") != built.trained:  # --retrain: no list is valid any more
        log.info("%s: the index was trained again: every piece is joined again", shown(output))
        for stage in ("join", "update", "patch", "recall", "changed"):
            manifest.clear_stage(stage)
        every = [p.index for p in built.dataset.pieces]
        manifest.finish_stage("changed", {"pieces": every, "new": every, "left": True})
    manifest.finish_stage("trained", {"crc": built.trained})
    manifest.verify_stage("scan_queries")
    (output / "_SUCCESS").unlink(missing_ok=True)
    if queries is None:
        query_store, pieces, n_queries = built.store, built.dataset.pieces, built.ntotal
    else:
        t0 = time.monotonic()
        query_store = _scan_queries(client, config, built, queries=queries, output=output, manifest=manifest)
        timings.add("scan_queries", time.monotonic() - t0)
        pieces, n_queries = queries.pieces, queries.total_rows
    if not s.routed_join and (_lists_outgrow_workers(client, built) or _lists_outgrow_gpus(cluster, built)):
        config = replace(config, search=replace(s, routed_join=True))
        s = config.search
    recall: RecallResult | None = None
    update = manifest.stage_info("update")
    if s.recall_queries:
        t0 = time.monotonic()
        before = from_dict(RecallResult, update["recall"]) if update and update.get("recall") else None
        recall = measure_recall(
            client,
            config,
            built,
            query_store,
            plan=plan,
            manifest=manifest,
            keep=before,
            new_pieces=tuple(update["new"]) if update else (),
        )
        plan = replace(plan, nprobe=recall.nprobe, rerank=recall.rerank, strategy=recall.strategy)
        timings.add("recall", time.monotonic() - t0)
        if before is not None and (before.nprobe, before.rerank, before.strategy) != (
            recall.nprobe,
            recall.rerank,
            recall.strategy,
        ):
            log.info("the plan changed with the input: every piece is joined again")
            for piece in manifest.done_pieces("join"):
                manifest.forget_piece("join", piece)
            manifest.clear_stage("update")
            update = None
    log.info(
        "join: %d queries, k=%d, %s, exclude_self=%s",
        n_queries,
        plan.k,
        "exact search" if plan.strategy == "exact" else f"nprobe={plan.nprobe}, rerank={plan.rerank}",
        plan.exclude_self,
    )
    if plan.knn_dir and plan.self_join:  # kept lists hold spare candidates for later updates
        plan = replace(plan, spare=spare_for(plan.k))
    # the exact self-join scores each pair of pieces once for both on CPUs; a GPU searches the
    # whole store resident in its memory instead
    by_pairs = all(d.backend == "cpu" for d in cluster.devices)
    # an updated self-join searches only its new pieces: the others are patched, whatever their join
    # record says (a run killed mid-patch may leave a piece rewritten before its record is saved)
    patching = update is not None and update.get("patch", True)
    to_join = [p for p in pieces if p.index in set(update["new"])] if update is not None and patching else pieces
    seconds = join_pieces(
        client,
        plan,
        built.store,
        query_store,
        pieces=to_join,
        out_dir=output / "neighbors",
        manifest=manifest,
        dim=built.dim,
        by_pairs=by_pairs,
        routed=config.search.routed_join,
        workers=max(1, len(cluster.devices)),
        group_bytes=_group_bytes(client),
        run_rows=list_major_rows(built.nlist or 1, plan.nprobe) if _list_major(built, plan) else 0,
    )
    if update is not None:
        t0 = time.monotonic()
        patch = bool(update.get("patch", True))
        recall = _finish_update(
            client, plan, built, manifest, output=output, new=update["new"], patch=patch, recall=recall
        )
        seconds += time.monotonic() - t0
    timings.add("join", seconds)
    result = JoinResult(
        index=IndexSummary(str(built.dir), built.key, built.ntotal, built.dim, built.metric, built.nlist, built.why),
        search=SearchSummary(
            plan.k,
            plan.nprobe,
            plan.rerank,
            plan.exclude_self,
            "+".join(sorted({d.backend for d in cluster.devices})) or "cpu",
            plan.strategy,
            recall.why if recall else "",
        ),
        devices=tuple(cluster.devices),
        queries=n_queries,
        neighbors=str(output / "neighbors"),
        recall=recall,
        memory=MemoryUse(peak_rss(), client.run(peak_rss), set(client.run(os.getpid).values()) == {os.getpid()}),
        lists_read=_lists_read(manifest),
    )
    return result, manifest


def _start_update(
    manifest: Manifest,
    built: BuiltIndex,
    queries: Dataset | None,
    *,
    output: Path,
    knn_dir: Path | None,
    earlier: RecallResult | None,
    index_changed: bool,
) -> None:
    """Record what an updated join must redo (stage ``update``): the pieces to join in full (new
    ones, and any whose lists were not kept), and the plan the kept lists were joined with. The
    lists and tables of query pieces whose files are gone are deleted now. A self-join patches
    its other pieces later; a join of other queries against a changed index joins them all again."""
    pending = manifest.stage_info("update") or {}
    query_set = built.dataset if queries is None else queries
    left = False
    for piece in query_set.retired:
        outputs = [output / "neighbors" / f"part-{piece.index:05d}.parquet"]
        outputs += [knn_path(knn_dir, piece.index)] if knn_dir is not None else []
        if queries is not None:
            store = RowStore(output / "_queries", query_set.starts, query_set.row_space)
            outputs += [store.vectors_path(piece.index), store.ids_path(piece.index)]
            manifest.forget_piece("scan_queries", piece.index)
        for path in outputs:
            if nodes.present(path):
                discard(path)
                left = True
        if str(piece.index) in manifest.data["stages"].get("join", {}).get("pieces", {}):
            manifest.forget_piece("join", piece.index)
            left = True
    done = manifest.done_pieces("join")
    for number in sorted(done):
        stale = queries is not None and index_changed  # searched in an index that changed
        if stale or (knn_dir is not None and not nodes.present(knn_path(knn_dir, number))):
            manifest.forget_piece("join", number)
    live = {p.index for p in query_set.pieces}
    new = sorted((live - manifest.done_pieces("join")) | set(pending.get("new", ())))
    recall = pending.get("recall") or (to_dict(earlier) if earlier is not None else None)
    manifest.clear_stage("recall")
    manifest.clear_stage("patch")
    manifest.clear_stage("patch_reverse")  # an earlier version's reverse neighbours, partitioned on disk
    discard(output / PATCH_NAME)
    manifest.finish_stage(
        "update",
        {
            "new": new,
            "recall": None if queries is not None and index_changed else recall,
            "left": left or bool(pending.get("left")),
            "patch": queries is None,
        },
    )
    log.info(
        "%s: updating the lists: %d new piece(s) joined, the other %d %s%s",
        shown(manifest.dir),
        len(new),
        len(live) - len(new),
        "patched" if queries is None else "kept",
        " (rows left: their queries are searched again)" if left and queries is None else "",
    )


def _finish_update(
    client: Any,
    plan: SearchPlan,
    built: BuiltIndex,
    manifest: Manifest,
    *,
    output: Path,
    new: Sequence[int],
    patch: bool,
    recall: RecallResult | None,
) -> RecallResult | None:
    """Patch a self-join's pieces joined before the update (:func:`pipeline.search.update.patch_pieces`)
    and record what changed (stage ``changed``, for dedup and graph) before the update is done.
    Returns ``recall`` measured again on the lists the patch wrote (:func:`check_lists`)."""
    fresh = set(new)
    rewritten: tuple[int, ...] = ()
    patched = Patched()
    if patch:
        patched, rewritten = patch_pieces(
            client,
            plan,
            built.store,
            pieces=[p for p in built.dataset.pieces if p.index not in fresh],
            new=[p for p in built.dataset.pieces if p.index in fresh],
            holes=built.dataset.holes,
            out_dir=output / "neighbors",
            manifest=manifest,
        )
    log.info(
        "update: %d queries lost neighbours (%d of them searched again, past their spare candidates), %d took in "
        "new rows; %d piece(s) rewritten",
        patched.dropped,
        patched.searched,
        patched.merged,
        len(rewritten),
    )
    before = manifest.stage_info("changed") or {}
    update = manifest.stage_info("update") or {}
    manifest.finish_stage(
        "changed",
        {
            "pieces": sorted(set(before.get("pieces", ())) | fresh | set(rewritten)),
            "new": sorted(set(before.get("new", ())) | fresh),
            "left": bool(before.get("left")) or bool(update.get("left")),
        },
    )
    if patch and recall is not None:
        recall = check_lists(client, built, plan, manifest, recall)
        manifest.finish_stage("recall", recall)
    manifest.clear_stage("patch")
    manifest.clear_stage("update")
    return recall


ROUTED_GROUP_SHARE = 8  # a routed join's list group takes at most this share of a worker's memory


def _list_major(built: BuiltIndex, plan: SearchPlan) -> bool:
    """Whether the join searches list-major (a plain IVF-Flat index, no re-ranking), so that its
    batches want :func:`list_major_rows` queries."""
    return plan.strategy == "index" and bool(built.nlist) and built.key.endswith(",Flat") and not plan.rerank


def _orders_vectors(empty: faiss.Index, vector_bytes: int, memory: int | None, *, routed: bool) -> bool:
    """Whether the fill writes the vectors in list order (:mod:`pipeline.index.ordered`): for an
    IVF index of lossy codes (re-ranked) whose join will be routed, asked for or because the
    vectors are over ``ROUTED_WHEN_LISTS_OVER`` of a worker's memory, where re-ranking from the row
    store would read a vector from disk for each candidate."""
    if not isinstance(faiss.downcast_index(empty), faiss.IndexIVF) or has_exact_codes(empty):
        return False  # no lists, a transform in front (the queries' codes differ), or exact codes
    return routed or bool(memory and vector_bytes > ROUTED_WHEN_LISTS_OVER * memory)


def _lists_outgrow_workers(client: Any, built: BuiltIndex) -> bool:
    """Whether an index's vectors are more than half of the smallest worker's memory, for an
    IVF-Flat index (its lists) or one of lossy codes whose fill wrote its vectors in list order:
    the batched join (and its recall check) map every list in every worker, and re-ranking gathers
    vectors at random, so such a join is routed instead, each list group read by one worker at a
    time (:mod:`pipeline.search.routed`)."""
    memory = worker_memory(client)
    lists = built.ntotal * built.dim * 4
    routable = built.key.endswith(",Flat") or has_ordered(built.dir)
    if not memory or not routable or not built.nlist or lists <= ROUTED_WHEN_LISTS_OVER * memory:
        return False
    log.info(
        "routed join: the index's vectors (%.2f GiB) are over %.0f%% of a worker's memory (%.2f GiB), so each "
        "list group is read by one worker at a time",
        lists / 2**30,
        100 * ROUTED_WHEN_LISTS_OVER,
        memory / 2**30,
    )
    return True


def _lists_outgrow_gpus(cluster: ClusterInfo, built: BuiltIndex) -> bool:
    """Whether an IVF index that can be routed (IVF-Flat, or lossy codes whose fill wrote their
    vectors in list order) is, on GPU workers, larger than the clone a GPU takes whole: the
    batched join would then search on the CPU, so it is routed instead, and each list group is
    copied to a GPU in turn (:meth:`GpuBackend.group_search`). An index of any size then needs
    nothing special on the GPU."""
    if cluster.backend != "gpu" or not built.nlist:
        return False
    if not (built.key.endswith(",Flat") or has_ordered(built.dir)):
        return False
    return _outgrows_gpus(cluster, make_index(built.key, built.dim, built.metric), built.ntotal, log_it=True)


def _outgrows_gpus(cluster: ClusterInfo, empty: faiss.Index, rows: int, *, log_it: bool = False) -> bool:
    """Whether the IVF index ``empty`` filled with ``rows`` needs more than ``INDEX_SHARE`` of the
    smallest free GPU memory (as :meth:`GpuBackend.search` counts a clone) on all-GPU workers: such
    a join is routed, and a lossy one's fill writes its vectors in list order for it."""
    ivf = ivf_of(empty)
    if cluster.backend != "gpu" or not cluster.gpu_free or ivf is None:
        return False
    need = gpu_index_bytes(rows, int(ivf.d), int(ivf.nlist), int(ivf.code_size))
    if need <= INDEX_SHARE * cluster.gpu_free:
        return False
    if log_it:
        log.info(
            "routed join: the index's lists (%.2f GiB on a GPU) are over %.0f%% of the smallest GPU's free memory "
            "(%.2f GiB), so each list group is copied to a GPU in turn",
            need / 2**30,
            100 * INDEX_SHARE,
            cluster.gpu_free / 2**30,
        )
    return True


def _group_bytes(client: Any) -> int | None:
    """List groups small enough for the smallest worker (the group is read into its memory)."""
    memory = worker_memory(client)
    return None if not memory else max(1 << 20, memory // ROUTED_GROUP_SHARE)


def _lists_read(manifest: Manifest) -> ListReads | None:
    """What the join recorded of the inverted lists it read (None where it walked none: exact
    search, codes searched query by query)."""
    info = manifest.stage_info("join") or {}
    reads = from_dict(ListReads, info["list_reads"]) if info.get("list_reads") else None
    return reads if reads is not None and reads.total else None
