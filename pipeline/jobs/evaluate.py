"""``evaluate``: recall of a written neighbour table, or of an index at given settings, against
exact search on a seeded sample of queries."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.store import RowStore
from pipeline.io.workdir import shown
from pipeline.jobs.common import guarded, job_cluster, require
from pipeline.jobs.stages import open_index, search_plan
from pipeline.results import RecallResult, RecallSummary
from pipeline.runtime.manifest import Manifest
from pipeline.search.recall import recall_summary
from pipeline.search.tuning import draw_sample, search_sample

__all__ = ["evaluate"]

log = logging.getLogger("pipeline.jobs.commands")


def evaluate(config: Config) -> RecallSummary:
    """``evaluate``: recall@1/@10/@k against exact search on a seeded sample of queries.

    With ``--output`` pointing at a finished ``run`` or ``join``, the neighbour table written there
    is evaluated against the index it was joined with (``--index-dir``, by default the ``index``
    folder inside ``--output`` that ``run`` writes); otherwise the index in ``--index-dir`` is
    searched (its own rows as queries) with the given ``--k``, ``--nprobe``, ``--rerank`` and
    ``--exclude-self``.
    """
    table = Path(config.output).resolve() / "neighbors" if config.output else None
    given = config.index_dir
    if given is None and table is not None and (table.parent / "index" / "manifest.json").exists():
        given = str(table.parent / "index")  # where `run` and `dedup` put it by default
    index_dir = require(given, "--index-dir", "evaluate")
    guard = guarded(config, table.parent if table else None, index_dir, index_read_only=True, output_read_only=True)
    with guard:
        return _evaluate(config, index_dir, table)


def _evaluate(config: Config, index_dir: Path, table: Path | None) -> RecallSummary:
    built = open_index(index_dir)
    n = config.search.recall_queries or 1000
    with job_cluster(config) as (client, cluster):
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
            sample = draw_sample(
                client,
                built.store,
                query_store,
                n=n,
                k=k,
                metric=built.metric,
                exclude_self=exclude_self,
                self_join=self_join,
                seed=config.index.seed,
            )
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
                raise PipelineError(
                    f"{table}: {len(missing)} sampled queries have no row (e.g. {missing[0]!r}); "
                    "the table is incomplete: re-run the job that wrote it"
                )
            found = [by_id[q] for q in wanted]
            found_scores = [np.asarray(score_of[q], dtype=np.float64) for q in wanted] if exact_scores else None
            what: dict[str, Any] = {"table": shown(table)}
        else:
            plan = search_plan(config, built, True)
            k = plan.k
            sample = draw_sample(
                client,
                built.store,
                built.store,
                n=n,
                k=k,
                metric=built.metric,
                exclude_self=plan.exclude_self,
                self_join=True,
                seed=config.index.seed,
            )
            found, found_scores = search_sample(client, plan, built.store, sample)
            what = {"index": shown(index_dir), "nprobe": plan.nprobe, "rerank": plan.rerank}
    summary = replace(
        recall_summary(found, sample.truth, sample.truth_scores, k=k, found_scores=found_scores, metric=built.metric),
        source=what,
    )
    log.info("evaluate: %s", ", ".join(f"{key} {v}" for key, v in summary.to_json().items() if "recall@" in key))
    return summary
