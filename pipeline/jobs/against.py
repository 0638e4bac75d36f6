"""``dedup --against REF``: index the reference, join the input against it, write the matches.

The reference (evaluation sets, say) gets its own index in ``OUT/against/index``, and the input is
joined against it as queries (``OUT/against``: that join's manifest, lists and recall, tuned to
the recall target like any join), so a grown input joins only its new rows. The reference files
are only read.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.cluster.clients import ClusterInfo
from pipeline.config import Config
from pipeline.duplicates.contamination import Matches, examples, write_matches
from pipeline.duplicates.groups import output_id_column
from pipeline.errors import InputError
from pipeline.index.built import BuiltIndex
from pipeline.io.owned import discard
from pipeline.io.workdir import shown
from pipeline.jobs.stages import Timings, build_index, join_index
from pipeline.results import Contamination, ReferenceFileMatches
from pipeline.runtime.manifest import Manifest

__all__ = ["match_against"]

log = logging.getLogger("pipeline.jobs.commands")


def match_against(
    client: Any,
    cluster: ClusterInfo,
    *,
    config: Config,
    built: BuiltIndex,
    output: Path,
    timings: Timings,
    main_manifest: Manifest,
) -> tuple[Contamination, Matches]:
    """Index the reference, join the input against it, write ``contamination/`` (see module doc);
    ``main_manifest`` (the dedup output's) records the pieces written."""
    d = config.dedup
    threshold = float(d.threshold if d.threshold is not None else 0.0)
    sub = output / "against"
    # the index settings given are the input's: the reference (usually small) gets the default
    # choice, exact search up to 20,000 rows, and its search is tuned to the recall target
    ref_config = replace(
        config,
        data=replace(config.data, paths=d.against),
        index=replace(config.index, key="auto", metric=built.metric, sample_size=None),
        search=replace(config.search, exclude_self=False, nprobe=None, rerank=None),
    )
    sub_timings = Timings()  # this run's phases, added to the job's as one "against" phase
    ref = build_index(client, cluster, ref_config, sub / "index", timings=sub_timings, search=ref_config.search)
    if ref.dim != built.dim:
        raise InputError(
            f"{shown(ref.dataset.files[0].path)}, column '{ref.dataset.vector_column}': --against vectors "
            f"have dimension {ref.dim} but the input's have {built.dim}; embed the reference with the "
            "input's model"
        )
    if ref.ntotal < ref_config.search.k:  # a reference smaller than k: every reference row is a neighbour
        ref_config = replace(ref_config, search=replace(ref_config.search, k=max(1, ref.ntotal)))
    log.info(
        "against: %d reference rows in %d file(s); joining the %d input rows against them",
        ref.ntotal,
        len(ref.dataset.files),
        built.ntotal,
    )
    joined, against_manifest = join_index(
        client,
        cluster,
        ref_config,
        ref,
        output=sub,
        timings=sub_timings,
        queries=built.dataset,
        knn_dir=sub / "knn",
        command="against",
        incremental=True,
        laid_out_queries=True,
    )
    timings.add("against", sum(sub_timings.phases.values()))
    _follow_update(against_manifest, main_manifest, built, output / "contamination")
    matches = Matches(str(sub / "knn"), ref.store, threshold, built.metric, d.against_action == "drop")
    contamination = write_matches(
        client,
        matches,
        dataset=built.dataset,
        store=built.store,
        reference=ref.dataset,
        output=output,
        manifest=main_manifest,
        id_column=output_id_column(built.dataset.id_column),
    )
    closest = examples(
        contamination["examples"],
        dataset=built.dataset,
        store=built.store,
        ref_dataset=ref.dataset,
        ref_store=ref.store,
        text_column=d.text_column,
    )
    names = [f.path for f in ref.dataset.files]
    per_file = tuple(
        ReferenceFileMatches(names[i], ref.dataset.files[i].rows, contamination["per_file"].get(i, 0))
        for i in range(len(names))
    )
    total = sum(m.input_rows_matched for m in per_file)
    log.info(
        "against: %d input row(s) within %s of a reference row (%s); per reference file: %s",
        total,
        threshold,
        "dropped from deduplicated/" if matches.drop else "flagged in contamination/ only",
        ", ".join(f"{Path(m.file).name} {m.input_rows_matched}" for m in per_file),
    )
    result = Contamination(
        ref.ntotal,
        threshold,
        d.against_action,
        total,
        per_file,
        closest,
        joined.recall,
        joined.plan,
        str(output / "contamination"),
    )
    return result, matches


def _follow_update(against: Manifest, main: Manifest, built: BuiltIndex, out_dir: Path) -> None:
    """Take in what an update changed (the against join's ``changed`` stage, consumed here): the
    pieces joined again are matched again, and the matches of input pieces gone are deleted."""
    changes = against.stage_info("changed")
    if not changes:
        return
    for piece in sorted(set(changes["pieces"]) | {p.index for p in built.dataset.retired}):
        main.forget_piece("contamination", piece)
    for retired in built.dataset.retired:
        discard(out_dir / f"part-{retired.index:05d}.parquet")
    against.clear_stage("changed")
