"""The commands: ``build``, ``join`` and ``run`` here; ``dedup``, ``graph`` and ``evaluate`` in
their own modules, re-exported so the CLI finds every command in one place.

Each starts (or joins) the Dask cluster, runs the stages it needs from :mod:`pipeline.jobs.stages`
and its own module, and writes the report and ``_SUCCESS`` beside its outputs
(:mod:`pipeline.jobs.common`). Every command takes URLs for its directories too: they are staged
locally (:func:`pipeline.jobs.common.staged_command`).
"""

from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.index.built import BuiltIndex
from pipeline.io.parquet import plan_dataset
from pipeline.io.workdir import TIMINGS_NAME
from pipeline.jobs.common import (
    finish,
    guarded,
    index_dir_for,
    job_cluster,
    require,
    staged_command,
    start,
    worker_busy,
)
from pipeline.jobs.dedup import dedup as _dedup
from pipeline.jobs.evaluate import evaluate as _evaluate
from pipeline.jobs.graph import graph as _graph
from pipeline.jobs.stages import Timings, build_index, check_query_ids, join_index, open_index
from pipeline.results import JobReport, recall_verdict

__all__ = ["build", "join", "run", "dedup", "graph", "evaluate", "recall_verdict"]

log = logging.getLogger(__name__)


@staged_command
def build(config: Config) -> BuiltIndex:
    """``build``: the index only, in ``--index-dir``."""
    index_dir = require(config.index_dir, "--index-dir", "build")
    with guarded(config, None, index_dir), job_cluster(config) as (client, cluster):
        return build_index(client, cluster, config, index_dir, timings=Timings())


def _join(config: Config) -> JobReport:
    """``join``: an existing index (``--index-dir``) against the query dataset ``--input``."""
    index_dir = require(config.index_dir, "--index-dir", "join")
    output = require(config.output, "--output", "join")
    started = start(output)
    with guarded(config, output, index_dir, index_read_only=True):
        built = open_index(index_dir)
        queries = plan_dataset(
            config.data.paths, config.data.id_column, config.data.vector_column, config.partition_bytes
        )
        check_query_ids(built, queries, config.search.exclude_self)
        timings = Timings.resume(output / TIMINGS_NAME, fresh=started.complete or config.overwrite)
        with job_cluster(config) as (client, cluster):
            joined, _ = join_index(client, cluster, config, built, output=output, timings=timings, queries=queries)
            workers = worker_busy(client, cluster)
        return finish(output, config, joined, timings, command="join", started=started, workers=workers)


@staged_command
def run(config: Config) -> JobReport:
    """``run``: build the index over ``--input`` and self-join it; write ``OUTPUT/neighbors``."""
    output = require(config.output, "--output", "run")
    started = start(output)
    index_dir = index_dir_for(config, output)
    timings = Timings.resume(output / TIMINGS_NAME, fresh=started.complete or config.overwrite)
    with guarded(config, output, index_dir), job_cluster(config) as (client, cluster):
        built = build_index(client, cluster, config, index_dir, timings=timings, search=config.search)
        joined, _ = join_index(client, cluster, config, built, output=output, timings=timings, command="run")
        return finish(
            output, config, joined, timings, command="run", started=started, workers=worker_busy(client, cluster)
        )


# every command stages a remote --output or --index-dir the same way
dedup = staged_command(_dedup)
graph = staged_command(_graph)
evaluate = staged_command(_evaluate, reads=("output", "index_dir"))
join = staged_command(_join, reads=("index_dir",))
