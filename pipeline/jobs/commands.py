"""The commands: ``build``, ``join``, ``run``, ``dedup``, ``graph`` and ``evaluate``.

Each starts (or joins) the Dask cluster, runs the stages it needs from :mod:`pipeline.jobs.stages`
and its own module, and writes the report and ``_SUCCESS`` beside its outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.cluster.clients import dask_client
from pipeline.config import Config
from pipeline.dedup.columns import attach_examples
from pipeline.dedup.exactness import pair_recall
from pipeline.dedup.explore import explore
from pipeline.dedup.groups import dedup_stages
from pipeline.dedup.plan import DedupPlan, check_plan, default_thresholds
from pipeline.dedup.widen import tune_pair_nprobe
from pipeline.errors import ConfigError, PipelineError
from pipeline.graph.knn_graph import GraphPlan, graph_recall, graph_stages
from pipeline.graph.knn_graph import check_plan as check_graph_plan
from pipeline.io.atomic import atomic_path
from pipeline.io.parquet import plan_dataset, resolve_paths
from pipeline.io.store import RowStore
from pipeline.io.workdir import TIMINGS_NAME, check_locations, locked
from pipeline.jobs.stages import BuiltIndex, Timings, build_index, check_query_ids, join_index, open_index, search_plan
from pipeline.report import write_report
from pipeline.results import (
    DedupResult,
    ExploreRow,
    GraphRecall,
    GraphResult,
    JobReport,
    JoinResult,
    RecallResult,
    RecallSummary,
)
from pipeline.search.join import SearchPlan
from pipeline.search.recall import recall_summary
from pipeline.search.tuning import BelowTarget, draw_sample, search_sample
from pipeline.stages.manifest import LOG_DIR, Manifest
from pipeline.stages.progress import tasks_submitted

__all__ = ["build", "join", "run", "dedup", "graph", "evaluate"]

log = logging.getLogger(__name__)


def _index_dir(config: Config, output: Path) -> Path:
    """``--index-dir``, or ``OUTPUT/index`` for the commands that build their own index."""
    return Path(config.index_dir).resolve() if config.index_dir else output / "index"


def _logs(config: Config) -> str | None:
    """Where batch worker jobs write their logs: OUTPUT/logs."""
    return str(Path(config.output).resolve() / LOG_DIR) if config.output else None


def _cluster(config: Config) -> Any:
    """The job's Dask cluster (batch worker logs in OUTPUT/logs); each worker chooses its device."""
    return dask_client(config.cluster, _logs(config))


@dataclass(frozen=True)
class _Start:
    """Where a command started: its clock, whether its output was already complete, tasks so far."""

    clock: float
    complete: bool
    tasks: int


def _start(output: Path) -> _Start:
    return _Start(time.monotonic(), (output / "_SUCCESS").exists(), tasks_submitted())


def _finish(output: Path, config: Config, joined: JoinResult, timings: Timings, command: str, start: _Start,
            dedup: DedupResult | None = None, explored: tuple[ExploreRow, ...] | None = None,
            graph: GraphResult | None = None) -> JobReport:
    report_path = output / "report.json"
    if start.complete and tasks_submitted() == start.tasks and report_path.exists():
        # a rerun of a finished job: nothing was redone, so the report of the run that did the work stays
        report = JobReport.from_json(json.loads(report_path.read_text()))
        log.info("nothing to do: %s is complete; its report (from the run that did the work) is kept", output)
        log.info("%s", recall_verdict(report.join))
        with atomic_path(output / "_SUCCESS") as tmp:
            tmp.write_text("")
        return report
    wall = timings.earlier_wall + time.monotonic() - start.clock
    report = JobReport(command, joined, config.to_dict(), dict(timings.phases), round(wall, 3),
                       round(joined.queries / wall, 1) if wall > 0 else None, dedup, explored, graph)
    report = write_report(output, report, config.index.seed)
    where = {"dedup": output / "groups", "graph": output / "graph.npz"}.get(command, output / "neighbors")
    if explored is not None:
        where = output / "report.md"
    log.info("done in %.1f s: %s (%s)", wall, where, ", ".join(f"{k} {v:.1f}s" for k, v in timings.phases.items()))
    verdict = recall_verdict(joined)
    recall = joined.recall
    pairs = dedup.exactness if dedup is not None else None
    if (pairs is not None and pairs.pair_recall is not None and dedup is not None and dedup.target_pair_recall
            and pairs.pair_recall < dedup.target_pair_recall):
        below = f"dedup pair recall {pairs.pair_recall:.4f} on {pairs.queries} sampled rows, target " \
                f"{dedup.target_pair_recall}: MISSED"
        if not config.search.allow_below_target:
            raise BelowTarget(f"{below}; the outputs in {output} are complete but not marked _SUCCESS. Use a "
                              "richer --index-key (e.g. IVF...,Flat or Flat), or accept it with --allow-below-target")
        log.warning("%s (accepted: --allow-below-target)", below)
    if recall is not None and not recall.met and not config.search.allow_below_target:
        raise BelowTarget(f"{verdict}; the outputs in {output} are complete but not marked _SUCCESS. Raise the "
                          "target's reach (a richer --index-key, e.g. IVF...,Flat or Flat), or accept it with "
                          "--allow-below-target")
    (log.warning if recall is not None and not recall.met else log.info)("%s", verdict)
    with atomic_path(output / "_SUCCESS") as tmp:
        tmp.write_text("")
    (output / TIMINGS_NAME).unlink(missing_ok=True)  # the job is complete: a later one starts its own
    return report


def recall_verdict(joined: JoinResult) -> str:
    """The job's last word: recall reached against its target, and the plan that reached it."""
    recall, plan = joined.recall, joined.plan
    if recall is None:
        return f"recall not measured (--recall-queries 0); plan: {plan}"
    got = f"recall@{recall.k} {recall.recall:.3f} (tie-aware; strict {recall.recall_strict:.3f}) on " \
          f"{recall.queries} held-out queries"
    if recall.target is None:
        return f"{got}, no target; plan: {plan}"
    return f"{got}, target {recall.target}: {'met' if recall.met else 'MISSED'}; plan: {plan}"


def _require(value: str | None, flag: str, command: str) -> Path:
    if not value:
        raise ConfigError(f"{command}: {flag} is required")
    return Path(value).resolve()


def _guarded(config: Config, output: Path | None, index_dir: Path | None, index_read_only: bool = False,
             output_read_only: bool = False) -> contextlib.ExitStack:
    """Check that the job's directories overlap no input and each other, then lock them for the
    job's duration: exclusively where it writes, shared where it only reads. Nothing is written
    before this."""
    files = resolve_paths(config.data.paths) if config.data.paths else []
    check_locations(config.data.paths, files, output, index_dir)
    stack = contextlib.ExitStack()
    try:
        for d, read_only in ((output, output_read_only), (index_dir, index_read_only)):
            if d is not None:
                stack.enter_context(locked(d, shared=read_only))
    except BaseException:
        stack.close()
        raise
    return stack


def build(config: Config) -> BuiltIndex:
    """``build``: the index only, in ``--index-dir``."""
    index_dir = _require(config.index_dir, "--index-dir", "build")
    with _guarded(config, None, index_dir), _cluster(config) as (client, cluster):
        return build_index(client, cluster, config, index_dir, Timings())


def join(config: Config) -> JobReport:
    """``join``: an existing index (``--index-dir``) against the query dataset ``--input``."""
    index_dir = _require(config.index_dir, "--index-dir", "join")
    output = _require(config.output, "--output", "join")
    started = _start(output)
    with _guarded(config, output, index_dir, index_read_only=True):
        built = open_index(index_dir)
        queries = plan_dataset(config.data.paths, config.data.id_column, config.data.vector_column,
                               config.partition_bytes)
        check_query_ids(built, queries, config.search.exclude_self)
        timings = Timings.resume(output / TIMINGS_NAME, fresh=started.complete or config.overwrite)
        with _cluster(config) as (client, cluster):
            joined, _ = join_index(client, cluster, config, built, output, timings, queries)
        return _finish(output, config, joined, timings, "join", started)


def run(config: Config) -> JobReport:
    """``run``: build the index over ``--input`` and self-join it; write ``OUTPUT/neighbors``."""
    output = _require(config.output, "--output", "run")
    started = _start(output)
    index_dir = _index_dir(config, output)
    timings = Timings.resume(output / TIMINGS_NAME, fresh=started.complete or config.overwrite)
    with _guarded(config, output, index_dir), _cluster(config) as (client, cluster):
        built = build_index(client, cluster, config, index_dir, timings, search=config.search)
        joined, _ = join_index(client, cluster, config, built, output, timings, command="run")
        return _finish(output, config, joined, timings, "run", started)


def dedup(config: Config) -> JobReport:
    """``dedup``: self-join ``--input``, then near-duplicate pairs, groups and the rows to keep.

    With ``--explore``, stop after the join and report the pairs and rows dropped over a range of
    thresholds instead (the join is kept: the real run then only groups).
    """
    output = _require(config.output, "--output", "dedup")
    started = _start(output)
    d = config.dedup
    metric = config.index.metric or "cosine"
    if d.threshold is None and not d.explore:
        raise ConfigError("dedup: --threshold is required (e.g. 0.95 for cosine); run with --explore first to see "
                          "the pairs and rows dropped over a range of thresholds")
    plan = DedupPlan(d.threshold if d.threshold is not None else 0.0, d.mode, metric, d.keep_by, d.keep_order)
    if d.threshold is not None:
        check_plan(plan)
    if metric == "ip":
        log.warning("dedup with --metric ip: scores grow with vector length; cosine is usual for duplicates")
    config = replace(config, search=replace(config.search, exclude_self=True))
    index_dir = _index_dir(config, output)
    timings = Timings.resume(output / TIMINGS_NAME, fresh=started.complete or config.overwrite)
    with _guarded(config, output, index_dir), _cluster(config) as (client, cluster):
        built = build_index(client, cluster, config, index_dir, timings, search=config.search,
                            incremental=True)
        dataset = built.dataset
        joined, manifest = join_index(client, cluster, config, built, output, timings,
                                      knn_dir=output / "knn", command="dedup", incremental=True)
        t0 = time.monotonic()
        if d.explore:
            table = explore(client, plan, dataset, output, default_thresholds(metric, d.threshold), config.search.k,
                            2 * config.partition_bytes)
            timings.add("explore", time.monotonic() - t0)
            return _finish(output, config, joined, timings, "dedup", started, explored=table)
        used = replace(search_plan(config, built, True), nprobe=joined.search.nprobe, rerank=joined.search.rerank,
                       strategy=joined.search.strategy)
        pair_nprobe = _pair_nprobe(client, config, plan, used, built, manifest)
        timings.add("pair_tuning", time.monotonic() - t0)
        t0 = time.monotonic()
        result, adj_starts = dedup_stages(client, plan, dataset, built.store, output, manifest, config.index.seed,
                                          config.search.k, 2 * config.partition_bytes, used, pair_nprobe)
        result = replace(result, target_pair_recall=d.target_pair_recall)
        timings.add("dedup", time.monotonic() - t0)
        result = replace(result, examples=attach_examples(result.examples, dataset, built.store, d.text_column))
        if config.search.recall_queries:
            t0 = time.monotonic()
            ex = pair_recall(client, plan, built.store, output, config.search.recall_queries, config.index.seed,
                             adj_starts)
            result = replace(result, exactness=ex)
            timings.add("pair_recall", time.monotonic() - t0)
            log.info("pair recall %s on %d sampled rows (%d exact pairs, %d found below the threshold)",
                     ex.pair_recall, ex.queries, ex.exact_pairs, ex.below_threshold)
        log.info("dedup: %d rows, %d pairs, %d groups, %d rows dropped (%s, threshold %s)", result.rows_in,
                 result.pairs, result.groups, result.rows_dropped, plan.mode, plan.threshold)
        return _finish(output, config, joined, timings, "dedup", started, dedup=result)


def _pair_nprobe(client: Any, config: Config, plan: DedupPlan, used: SearchPlan, built: BuiltIndex,
                 manifest: Manifest) -> int | None:
    """The inverted lists linked rows are searched again with to reach the pair-recall target
    (None: the join's suffice); tuned once per threshold and kept in the manifest for resumes."""
    target = config.dedup.target_pair_recall
    key = {"threshold": plan.threshold, "target": target, "nprobe": used.nprobe, "strategy": used.strategy}
    done = manifest.stage_info("dedup_pair_tuning")
    if done is not None and done.get("key") == key:
        return done["nprobe"]
    nprobe, curve = (None, []) if target is None else tune_pair_nprobe(
        client, plan, used, built.store, built.nlist, config.index.seed, target)
    for probe, reached in curve:
        log.info("  dedup pairs: nprobe=%s finds %.4f of the sampled rows' exact pairs", probe, reached)
    if nprobe is not None:
        log.info("dedup: rows with a pair are searched again with nprobe=%d (the join used %s) to find %.2f of "
                 "the pairs", nprobe, used.nprobe, target)
    manifest.finish_stage("dedup_pair_tuning", {"key": key, "nprobe": nprobe, "curve": curve})
    return nprobe


def graph(config: Config) -> JobReport:
    """``graph``: self-join ``--input`` (``--k``), then the k-NN graph as edges, CSR and umap arrays."""
    output = _require(config.output, "--output", "graph")
    started = _start(output)
    g = config.graph
    metric = config.index.metric or "cosine"
    plan = GraphPlan(g.mode, metric, config.search.k, g.min_score, g.weight, g.kernel_width)
    check_graph_plan(plan)
    config = replace(config, search=replace(config.search, exclude_self=True))
    index_dir = _index_dir(config, output)
    timings = Timings.resume(output / TIMINGS_NAME, fresh=started.complete or config.overwrite)
    with _guarded(config, output, index_dir), _cluster(config) as (client, cluster):
        built = build_index(client, cluster, config, index_dir, timings, search=config.search)
        joined, manifest = join_index(client, cluster, config, built, output, timings,
                                      knn_dir=output / "knn", command="graph")
        t0 = time.monotonic()
        result, edge_starts = graph_stages(client, plan, built.dataset.pieces, built.store, output, manifest,
                                           config.index.seed, 2 * config.partition_bytes)
        timings.add("graph", time.monotonic() - t0)
        if config.search.recall_queries:
            t0 = time.monotonic()
            sample = draw_sample(client, built.store, built.store, config.search.recall_queries, plan.k, metric,
                                 True, True, config.index.seed)
            got = GraphRecall(plan.k, len(sample.truth),
                              round(graph_recall(sample, built.store, output, plan.k, edge_starts), 4))
            result = replace(result, recall=got)
            timings.add("graph_recall", time.monotonic() - t0)
            log.info("graph recall %.4f: share of the exact %d nearest neighbours among each sampled row's edges",
                     got.graph_recall, plan.k)
        log.info("graph (%s): %d nodes, %d edges, %d components (largest %d), mutual share %s", plan.mode,
                 result.nodes, result.edges, result.components, result.largest_component, result.mutual_share)
        return _finish(output, config, joined, timings, "graph", started, graph=result)


def evaluate(config: Config) -> RecallSummary:
    """``evaluate``: recall@1/@10/@k against exact search on a seeded sample of queries.

    With ``--output`` pointing at a finished ``run`` or ``join``, the neighbour table written there
    is evaluated; otherwise the index in ``--index-dir`` is searched (its own rows as queries) with
    the given ``--k``, ``--nprobe``, ``--rerank`` and ``--exclude-self``.
    """
    index_dir = _require(config.index_dir, "--index-dir", "evaluate")
    table = Path(config.output).resolve() / "neighbors" if config.output else None
    guard = _guarded(config, table.parent if table else None, index_dir, index_read_only=True, output_read_only=True)
    with guard:
        return _evaluate(config, index_dir, table)


def _evaluate(config: Config, index_dir: Path, table: Path | None) -> RecallSummary:
    built = open_index(index_dir)
    n = config.search.recall_queries or 1000
    with _cluster(config) as (client, cluster):
        if table is not None:
            manifest = Manifest(table.parent)
            manifest.check_readable("run the job that wrote it again")
            if manifest.stage_info("join") is None:
                raise PipelineError(f"{table.parent}: no finished neighbour table here (run `run` or `join` first)")
            ident = manifest.data["identity"]
            k, exclude_self = int(ident["k"]), bool(ident["exclude_self"])
            self_join = ident["queries"] == "self"
            if self_join:
                query_store = built.store
            else:
                info = manifest.stage_info("scan_queries")
                if info is None:
                    raise PipelineError(f"{table.parent}: the query scan never finished; run the `join` again")
                query_store = RowStore(table.parent / "_queries", np.array(info["starts"]), info["rows"])
            sample = draw_sample(client, built.store, query_store, n, k, built.metric, exclude_self, self_join,
                                 config.index.seed)
            wanted = sample.ids.to_pylist()
            found_table = pq.read_table(
                table, columns=["query_id", "neighbor_id", "score"], filters=[("query_id", "in", wanted)]
            )
            by_id = dict(zip(found_table.column("query_id").to_pylist(), found_table.column("neighbor_id").to_pylist()))
            score_of = dict(zip(found_table.column("query_id").to_pylist(), found_table.column("score").to_pylist()))
            used = manifest.stage_record("recall", RecallResult)
            # the table's scores are exact when the join re-ranked or the codes are exact
            exact_scores = bool(used and (used.rerank or used.strategy == "exact")) or built.rerank_default == 0
            missing = [q for q in wanted if q not in by_id]
            if missing:
                raise PipelineError(f"{table}: {len(missing)} sampled queries have no row (e.g. {missing[0]!r}); "
                                    "the table is incomplete: re-run the job that wrote it")
            found = [by_id[q] for q in wanted]
            found_scores = [np.asarray(score_of[q], dtype=np.float64) for q in wanted] if exact_scores else None
            what: dict[str, Any] = {"table": str(table)}
        else:
            plan = search_plan(config, built, True)
            k = plan.k
            sample = draw_sample(client, built.store, built.store, n, k, built.metric, plan.exclude_self, True,
                                 config.index.seed)
            found, found_scores = search_sample(client, plan, built.store, sample)
            what = {"index": str(index_dir), "nprobe": plan.nprobe, "rerank": plan.rerank}
    summary = replace(recall_summary(found, sample.truth, sample.truth_scores, k, found_scores, built.metric),
                      source=what)
    log.info("evaluate: %s", ", ".join(f"{key} {v}" for key, v in summary.to_json().items() if "recall@" in key))
    return summary
