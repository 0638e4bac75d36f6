"""``graph``: self-join the input (``--k``), then the k-NN graph as edges, CSR and umap arrays."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.graphs.knn_graph import GraphPlan, graph_recall, graph_stages
from pipeline.graphs.knn_graph import check_plan as check_graph_plan
from pipeline.index.built import BuiltIndex
from pipeline.io.workdir import TIMINGS_NAME
from pipeline.jobs.common import finish, guarded, index_dir_for, job_cluster, require, start, worker_busy
from pipeline.jobs.stages import Timings, build_index, join_index
from pipeline.kinds import Metric
from pipeline.results import GraphRecall, JobReport
from pipeline.runtime.manifest import Manifest
from pipeline.search.truth import kept_truth
from pipeline.search.tuning import RecallSample, draw_sample, sample_of

__all__ = ["graph"]

log = logging.getLogger("pipeline.jobs.commands")


def graph(config: Config) -> JobReport:
    """``graph``: self-join ``--input`` (``--k``), then the k-NN graph as edges, CSR and umap arrays."""
    output = require(config.output, "--output", "graph")
    started = start(output)
    g = config.graph
    metric = config.index.metric or "cosine"
    plan = GraphPlan(g.mode, metric, config.search.k, g.min_score, g.weight, g.kernel_width)
    check_graph_plan(plan)
    config = replace(config, search=replace(config.search, exclude_self=True))
    index_dir = index_dir_for(config, output)
    timings = Timings.resume(output / TIMINGS_NAME, fresh=started.complete or config.overwrite)
    with guarded(config, output, index_dir), job_cluster(config) as (client, cluster):
        built = build_index(client, cluster, config, index_dir, timings=timings, search=config.search)
        joined, manifest = join_index(
            client, cluster, config, built, output=output, timings=timings, knn_dir=output / "knn", command="graph"
        )
        t0 = time.monotonic()
        result, edge_starts = graph_stages(
            client,
            plan,
            pieces=built.dataset.pieces,
            store=built.store,
            output=output,
            manifest=manifest,
            seed=config.index.seed,
            budget=2 * config.partition_bytes,
        )
        timings.add("graph", time.monotonic() - t0)
        if config.search.recall_queries:
            t0 = time.monotonic()
            sample = _graph_sample(client, config, built, manifest, k=plan.k, metric=metric)
            got = GraphRecall(
                plan.k, len(sample.truth), round(graph_recall(sample, built.store, output, plan.k, edge_starts), 4)
            )
            result = replace(result, recall=got)
            timings.add("graph_recall", time.monotonic() - t0)
            log.info(
                "graph recall %.4f: share of the exact %d nearest neighbours among each sampled row's edges",
                got.graph_recall,
                plan.k,
            )
        log.info(
            "graph (%s): %d nodes, %d edges, %d components (largest %d), mutual share %s",
            plan.mode,
            result.nodes,
            result.edges,
            result.components,
            result.largest_component,
            result.mutual_share,
        )
        return finish(
            output,
            config,
            joined,
            timings,
            command="graph",
            started=started,
            graph=result,
            workers=worker_busy(client, cluster),
        )


def _graph_sample(
    client: Any, config: Config, built: BuiltIndex, manifest: Manifest, *, k: int, metric: Metric
) -> RecallSample:
    """Sampled rows and their exact ``k`` neighbours to score the graph with: the self-join's kept
    recall truth (:mod:`pipeline.search.truth`) where it is exact over today's rows, so no exact
    pass is made again (one over every row: 2 to 3 s of a 1M x 128 graph); else a seeded draw."""
    kept = kept_truth(manifest, k=k, metric=built.metric, exclude_self=True)
    if kept is not None and kept.live == frozenset(built.store.live):
        full = kept.known >= k
        if full.any():
            return sample_of(
                client,
                built.store,
                np.zeros((int(full.sum()), 0), np.float32),  # the graph is scored by rows: no vectors
                None,
                kept.queries[full],
                deep_rows=kept.rows[full],
                deep_scores=kept.scores[full],
                known=kept.known[full],
                k=k,
            )
    return draw_sample(
        client,
        built.store,
        built.store,
        n=config.search.recall_queries,
        k=k,
        metric=metric,
        exclude_self=True,
        self_join=True,
        seed=config.index.seed,
    )
