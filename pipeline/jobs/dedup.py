"""``dedup``: self-join the input, then near-duplicate pairs, groups and the rows to keep."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from pipeline.cluster.clients import worker_memory
from pipeline.config import Config
from pipeline.duplicates.columns import attach_examples
from pipeline.duplicates.dataset import check_columns, write_dataset
from pipeline.duplicates.exactness import pair_recall
from pipeline.duplicates.explore import explore
from pipeline.duplicates.groups import dedup_stages, follow_update
from pipeline.duplicates.plan import DedupPlan, check_plan, default_thresholds
from pipeline.duplicates.widen import tune_pair_nprobe
from pipeline.errors import ConfigError
from pipeline.index.built import BuiltIndex
from pipeline.io.parquet import resolve_paths
from pipeline.io.workdir import TIMINGS_NAME
from pipeline.jobs.against import match_against
from pipeline.jobs.common import finish, guarded, index_dir_for, job_cluster, require, start, worker_busy
from pipeline.jobs.stages import Timings, build_index, join_index, search_plan
from pipeline.results import JobReport
from pipeline.runtime.manifest import Manifest
from pipeline.search.join import SearchPlan

__all__ = ["dedup"]

log = logging.getLogger("pipeline.jobs.commands")


def dedup(config: Config) -> JobReport:
    """``dedup``: self-join ``--input``, then near-duplicate pairs, groups and the rows to keep.

    With ``--explore``, stop after the join and report the pairs and rows dropped over a range of
    thresholds instead (the join is kept: the real run then only groups).
    """
    output = require(config.output, "--output", "dedup")
    started = start(output)
    d = config.dedup
    metric = config.index.metric or "cosine"
    if d.threshold is None and not d.explore:
        raise ConfigError(
            "dedup: --threshold is required (e.g. 0.95 for cosine); run with --explore first to see "
            "the pairs and rows dropped over a range of thresholds"
        )
    plan = DedupPlan(d.threshold if d.threshold is not None else 0.0, d.mode, metric, d.keep_by, d.keep_order)
    if d.threshold is not None:
        check_plan(plan)
    if metric == "ip":
        log.warning("dedup with --metric ip: scores grow with vector length; cosine is usual for duplicates")
    config = replace(config, search=replace(config.search, exclude_self=True))
    index_dir = index_dir_for(config, output)
    timings = Timings.resume(output / TIMINGS_NAME, fresh=started.complete or config.overwrite)
    inputs = replace(config, data=replace(config.data, paths=(*config.data.paths, *d.against)))
    with guarded(inputs, output, index_dir), job_cluster(config) as (client, cluster):
        if d.write_dataset and not d.explore:
            check_columns(resolve_paths(config.data.paths))
        built = build_index(client, cluster, config, index_dir, timings=timings, search=config.search, incremental=True)
        dataset = built.dataset
        joined, manifest = join_index(
            client,
            cluster,
            config,
            built,
            output=output,
            timings=timings,
            knn_dir=output / "knn",
            command="dedup",
            incremental=True,
        )
        follow_update(manifest, output, dataset)
        t0 = time.monotonic()
        if d.explore:
            table = explore(
                client,
                plan,
                dataset=dataset,
                output=output,
                thresholds=default_thresholds(metric, d.threshold),
                k=config.search.k,
                budget=2 * config.partition_bytes,
            )
            timings.add("explore", time.monotonic() - t0)
            return finish(
                output,
                config,
                joined,
                timings,
                command="dedup",
                started=started,
                explored=table,
                workers=worker_busy(client, cluster),
            )
        used = replace(
            search_plan(config, built, True),
            nprobe=joined.search.nprobe,
            rerank=joined.search.rerank,
            strategy=joined.search.strategy,
        )
        pair_nprobe = _pair_nprobe(client, config, plan=plan, used=used, built=built, manifest=manifest)
        timings.add("pair_tuning", time.monotonic() - t0)
        t0 = time.monotonic()
        result, adj_starts = dedup_stages(
            client,
            plan,
            dataset=dataset,
            store=built.store,
            output=output,
            manifest=manifest,
            seed=config.index.seed,
            k=config.search.k,
            budget=2 * config.partition_bytes,
            search=used,
            pair_nprobe=pair_nprobe,
            room_bytes=_shuffle_room(client),
        )
        result = replace(result, target_pair_recall=d.target_pair_recall)
        timings.add("dedup", time.monotonic() - t0)
        examples = attach_examples(
            result.examples, dataset, built.store, d.text_column, groups=(output / "groups", adj_starts)
        )
        result = replace(result, examples=examples)
        matches = None
        if d.against:
            contamination, matches = match_against(
                client, cluster, config=config, built=built, output=output, timings=timings, main_manifest=manifest
            )
            result = replace(
                result, contamination=contamination, outputs={**result.outputs, "contamination": contamination.output}
            )
        if d.write_dataset:
            t0 = time.monotonic()
            written = write_dataset(
                client, dataset, output=output, manifest=manifest, part_starts=adj_starts, matches=matches
            )
            outputs = {name: str(output / name) for name in ("deduplicated", "removed")}
            result = replace(result, dataset=written, outputs={**result.outputs, **outputs})
            timings.add("dataset", time.monotonic() - t0)
        if config.search.recall_queries:
            t0 = time.monotonic()
            ex = pair_recall(
                client,
                plan,
                store=built.store,
                output=output,
                queries=config.search.recall_queries,
                seed=config.index.seed,
                adj_starts=adj_starts,
            )
            result = replace(result, exactness=ex)
            timings.add("pair_recall", time.monotonic() - t0)
            log.info(
                "pair recall %s on %d sampled rows (%d exact pairs, %d found below the threshold)",
                ex.pair_recall,
                ex.queries,
                ex.exact_pairs,
                ex.below_threshold,
            )
        log.info(
            "dedup: %d rows, %d pairs, %d groups, %d rows dropped (%s, threshold %s)",
            result.rows_in,
            result.pairs,
            result.groups,
            result.rows_dropped,
            plan.mode,
            plan.threshold,
        )
        return finish(
            output,
            config,
            joined,
            timings,
            command="dedup",
            started=started,
            dedup=result,
            workers=worker_busy(client, cluster),
        )


SHUFFLE_COPIES = 6  # a map or reduce task holds its edges a few times over (both directions, sort, concatenation)


def _shuffle_room(client: Any) -> int | None:
    """Bytes of shuffled edges one dedup task may hold: a share of the smallest worker's memory
    limit, split between the tasks a worker runs at once (None without a limit: partition_size
    alone bounds it). Memory stays bounded by configuration: --memory-limit and the workers' threads."""
    limit = worker_memory(client)
    if not limit:
        return None
    threads = max((int(w.get("nthreads", 1)) for w in client.scheduler_info().get("workers", {}).values()), default=1)
    return int(limit) // (SHUFFLE_COPIES * max(1, threads))


def _pair_nprobe(
    client: Any, config: Config, *, plan: DedupPlan, used: SearchPlan, built: BuiltIndex, manifest: Manifest
) -> int | None:
    """The inverted lists linked rows are searched again with to reach the pair-recall target
    (None: the join's suffice); tuned once per threshold and kept in the manifest for resumes."""
    target = config.dedup.target_pair_recall
    key = {"threshold": plan.threshold, "target": target, "nprobe": used.nprobe, "strategy": used.strategy}
    done = manifest.stage_info("dedup_pair_tuning")
    if done is not None and done.get("key") == key:
        return done["nprobe"]
    nprobe, curve = (
        (None, [])
        if target is None
        else tune_pair_nprobe(
            client, plan, used, store=built.store, nlist=built.nlist, seed=config.index.seed, target=target
        )
    )
    for probe, reached in curve:
        log.info("  dedup pairs: nprobe=%s finds %.4f of the sampled rows' exact pairs", probe, reached)
    if nprobe is not None:
        log.info(
            "dedup: rows with a pair are searched again with nprobe=%d (the join used %s) to find %.2f of the pairs",
            nprobe,
            used.nprobe,
            target,
        )
    manifest.finish_stage("dedup_pair_tuning", {"key": key, "nprobe": nprobe, "curve": curve})
    return nprobe
