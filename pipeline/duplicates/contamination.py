"""Decontamination (``dedup --against REF``): input rows within the threshold of a reference row.

The job (:mod:`pipeline.jobs.against`) indexes the reference and joins the input against it; here
the lists become matches. A row is contaminated when
any of its ``k`` reference neighbours passes the threshold; its closest such match is kept. Each
input piece's matches go to ``contamination/`` (``id``, ``reference_id``, ``reference_file``,
``score``). The reference files are only read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.duplicates.columns import read_texts
from pipeline.errors import InputError
from pipeline.io.atomic import atomic_path
from pipeline.io.parquet import Dataset, Piece
from pipeline.io.store import RowStore
from pipeline.io.workdir import shown
from pipeline.kinds import Metric
from pipeline.results import ContaminationExample
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import Stage, run_stage
from pipeline.search.join import knn_path
from pipeline.shuffle.edges import passes, read_knn

__all__ = ["Matches", "best_matches", "write_matches", "examples"]

log = logging.getLogger(__name__)

EXAMPLES = 10  # closest matches shown in the report


@dataclass(frozen=True)
class Matches:
    """Where the input's reference lists are, and how to read them: for the dataset writer."""

    knn_dir: str
    reference: RowStore
    threshold: float
    metric: Metric
    drop: bool


def best_matches(matches: Matches, piece: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of one input piece: its closest passing reference row (``-1``: none) and the score."""
    ref_rows, scores = read_knn(knn_path(matches.knn_dir, piece))
    ok = passes(scores, matches.threshold, matches.metric) & (ref_rows >= 0)
    first = np.argmax(ok, axis=1)  # lists are best first: the first passing entry is the closest
    line = np.arange(len(ok))
    hit = ok[line, first]
    best = np.where(hit, ref_rows[line, first], -1)
    score = np.where(hit, scores[line, first], np.nan)
    assert len(best) == rows, (len(best), rows)
    return best.astype(np.int64), score.astype(np.float32)


@dataclass(frozen=True)
class PieceMatches:
    """One input piece's contamination: matched rows per reference file (by file number) and its
    closest matches as (input row, reference row, score)."""

    per_file: dict[str, int]
    examples: tuple[tuple[int, int, float], ...]


@dataclass(frozen=True, kw_only=True)
class MatchesTask:
    """``contamination/`` for one input piece; counts per reference file and the closest matches."""

    matches: Matches
    piece: Piece
    input_store: RowStore
    file_starts: np.ndarray
    names: tuple[str, ...]
    out: str
    id_column: str = "id"  # named as the input's id column

    def run(self) -> PieceMatches:
        matches, piece, input_store, file_starts, names, out = (
            self.matches,
            self.piece,
            self.input_store,
            self.file_starts,
            self.names,
            self.out,
        )
        best, score = best_matches(matches, piece.index, piece.rows)
        hit = np.flatnonzero(best >= 0)
        files = np.searchsorted(file_starts, best[hit], side="right") - 1
        ids = input_store.ids(piece.index)
        table = pa.table(
            {
                self.id_column: ids.take(pa.array(hit)),
                "reference_id": matches.reference.gather_ids(best[hit]),
                "reference_file": pa.array([names[f] for f in files.tolist()], pa.string()),
                "score": pa.array(score[hit]),
            }
        )
        order = np.argsort(-score[hit] if matches.metric != "l2" else score[hit], kind="stable")[:EXAMPLES]
        with atomic_path(out) as tmp:
            pq.write_table(table, str(tmp))
        return PieceMatches(
            per_file={str(int(f)): int(c) for f, c in zip(*np.unique(files, return_counts=True), strict=True)},
            examples=tuple((int(piece.start + hit[i]), int(best[hit[i]]), float(score[hit[i]])) for i in order),
        )


def write_matches(
    client: Any,
    matches: Matches,
    *,
    dataset: Dataset,
    store: RowStore,
    reference: Dataset,
    output: Path,
    manifest: Manifest,
    id_column: str = "id",
) -> dict[str, Any]:
    """``contamination/`` piece by piece (resumable: recorded in ``manifest``, the dedup output's),
    its id column named ``id_column``."""
    out_dir = output / "contamination"
    ref_starts = reference.file_starts
    names = [shown(f.path) for f in reference.files]
    done = manifest.stage_info("contamination")
    if done is not None and done.get("threshold") != matches.threshold:
        manifest.clear_stage("contamination")  # a new threshold: every piece again
    paths = {p.index: out_dir / f"part-{p.index:05d}.parquet" for p in dataset.pieces}
    results = run_stage(
        client,
        manifest,
        Stage(
            name="contamination",
            items=dataset.pieces,
            result=PieceMatches,
            task=lambda p: MatchesTask(
                matches=matches,
                piece=p,
                input_store=store,
                id_column=id_column,
                file_starts=ref_starts,
                names=tuple(names),
                out=str(paths[p.index]),
            ),
            files=lambda p: [paths[p.index]],
        ),
    )
    manifest.finish_stage("contamination", {"threshold": matches.threshold})
    per_file: dict[int, int] = {}
    found: list[list[Any]] = []
    for r in results.values():
        for f, c in r.per_file.items():
            per_file[int(f)] = per_file.get(int(f), 0) + c
        found.extend(list(e) for e in r.examples)
    closest = sorted(found, key=lambda e: e[2] if matches.metric == "l2" else -e[2])[:EXAMPLES]
    return {"per_file": per_file, "examples": closest}


def examples(
    found: list[list[Any]],
    *,
    dataset: Dataset,
    store: RowStore,
    ref_dataset: Dataset,
    ref_store: RowStore,
    text_column: str | None,
) -> tuple[ContaminationExample, ...]:
    """The closest matches ``[input row, reference row, score]`` with ids, files and texts."""
    if not found:
        return ()
    rows = np.array([e[0] for e in found], dtype=np.int64)
    ref_rows = np.array([e[1] for e in found], dtype=np.int64)
    ids = store.gather_ids(rows).to_pylist()
    ref_ids = ref_store.gather_ids(ref_rows).to_pylist()
    texts = read_texts(dataset, rows, text_column) if text_column else {}
    try:
        ref_texts = read_texts(ref_dataset, ref_rows, text_column) if text_column else {}
    except InputError:  # the reference need not have the input's text column
        ref_texts = {}
    return tuple(
        ContaminationExample(
            ids[i],
            ref_ids[i],
            ref_dataset.piece_of(int(ref_rows[i])).path,
            float(e[2]),
            texts.get(int(rows[i])),
            ref_texts.get(int(ref_rows[i])),
        )
        for i, e in enumerate(found)
    )
