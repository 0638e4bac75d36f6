"""The deduplicated dataset: the input files again minus the dropped rows, ready to train on.

``deduplicated/`` mirrors the input files (same relative names, every input column, same row
order) without the rows dedup dropped; ``removed/`` holds the dropped rows with their
``representative_id`` and ``score_to_representative`` (and, with ``--against``, their closest
``reference_id`` and ``reference_score``; contaminated rows are dropped unless only flagged).
One task per input file streams it row group by row group, taking each row's fate from
``groups/``, so memory is one row group plus a few bytes a row of the file. A file is rewritten
only when the rows it drops changed (a digest kept in the manifest): an incremental run writes the
new files and leaves the old ones alone unless new rows changed which of their rows are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.duplicates.contamination import Matches, best_matches
from pipeline.errors import ConfigError, InputError
from pipeline.io import nodes
from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched
from pipeline.io.owned import discard
from pipeline.io.parquet import Dataset
from pipeline.io.storage import open_parquet
from pipeline.io.workdir import shown
from pipeline.results import DatasetWritten, to_dict
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import run_tasks

__all__ = ["ADDED_COLUMNS", "FileJob", "file_jobs", "write_dataset", "check_columns"]

log = logging.getLogger(__name__)

ADDED_COLUMNS = ("representative_id", "score_to_representative")  # what removed/ adds to the input's columns
AGAINST_COLUMNS = ("reference_id", "reference_score")  # and, with --against, the closest reference match
STAGE = "dedup_dataset"


@dataclass(frozen=True)
class FileJob:
    """One input file: its global rows ``[start, start + rows)`` and its name under the outputs."""

    index: int
    path: str
    name: str
    start: int
    rows: int
    pieces: tuple[tuple[int, int], ...] = ()  # (piece index, rows) in file order


def mirror_names(paths: Sequence[str]) -> list[str]:
    """Each file's path relative to the deepest folder holding them all (unique, like the input)."""
    if not paths:
        return []
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    return [os.path.relpath(os.path.abspath(p), root) for p in paths]


def file_jobs(dataset: Dataset) -> list[FileJob]:
    """The files of ``dataset`` in input order, with the global rows each holds."""
    names = mirror_names([f.path for f in dataset.files])
    pieces: dict[str, list[tuple[int, int]]] = {}
    for piece in dataset.pieces:
        pieces.setdefault(piece.path, []).append((piece.index, piece.rows))
    return [
        FileJob(i, f.path, name, int(start), f.rows if f.path in pieces else 0, tuple(pieces.get(f.path, ())))
        for i, (f, name, start) in enumerate(zip(dataset.files, names, dataset.file_starts, strict=True))
    ]


def check_columns(paths: Sequence[str]) -> None:
    """Refuse input whose columns clash with the two that ``removed/`` adds, before any work
    (the schemas of all files agree: planning checks that)."""
    if not paths:
        return
    names = set(open_parquet(paths[0]).schema_arrow.names)
    clash = [c for c in (*ADDED_COLUMNS, *AGAINST_COLUMNS) if c in names]
    if clash:
        raise ConfigError(
            f"{shown(paths[0])}: column {clash[0]!r} is also a column dedup adds to removed/; "
            "rename it in the input, or pass --no-write-dataset"
        )


def _fates(parts: Sequence[tuple[str, int, int]], job: FileJob, matches: Matches | None) -> pa.Table:
    """Per row of the file: ``is_kept`` and the columns ``removed/`` adds, from the ``groups/``
    partitions ``(path, first row, rows)`` and, with ``--against``, the reference matches of the
    file's pieces (a contaminated row is not kept when they are dropped)."""
    cols = ["is_kept", *ADDED_COLUMNS]
    tables = []
    for path, first, n in parts:
        lo, hi = max(job.start, first), min(job.start + job.rows, first + n)
        if lo < hi:
            tables.append(pq.read_table(fetched(path), columns=cols).slice(lo - first, hi - lo))
    fates = pa.concat_tables(tables) if tables else pa.table({c: [] for c in cols})
    if matches is None:
        return fates
    found = [best_matches(matches, i, n) for i, n in job.pieces]  # each piece's lists read once
    best = np.concatenate([b for b, _ in found] or [np.zeros(0, np.int64)])
    score = np.concatenate([s for _, s in found] or [np.zeros(0, np.float32)])
    hit = best >= 0
    ref_ids = matches.reference.gather_ids(np.where(hit, best, 0)) if len(best) else pa.array([], pa.int64())
    fates = fates.append_column(AGAINST_COLUMNS[0], pc.if_else(pa.array(hit), ref_ids, pa.scalar(None, ref_ids.type)))
    fates = fates.append_column(AGAINST_COLUMNS[1], pa.array(score, mask=~hit))
    if matches.drop:
        kept = pc.and_(fates.column("is_kept"), pa.array(~hit))
        fates = fates.set_column(0, "is_kept", kept)
    return fates


def _digest(dropped: np.ndarray, fates: pa.Table) -> str:
    """What the file's outputs depend on: which rows are dropped, and to which representative."""
    h = hashlib.sha1(dropped.astype(np.int64).tobytes())
    sink = pa.BufferOutputStream()
    table = fates.drop_columns(["is_kept"]).take(pa.array(dropped))
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


@dataclass(frozen=True)
class FileWritten:
    """One input file's outcome: its digest (what its outputs depend on), the rows it dropped, and
    whether its copies were written (False: unchanged since the last run)."""

    digest: str
    dropped: int
    written: bool
    name: str = ""  # the file's name under the outputs


@dataclass(frozen=True, kw_only=True)
class FileTask:
    """Write one file's ``deduplicated/`` and ``removed/`` copies (unless the digest is unchanged)."""

    job: FileJob
    parts: tuple[tuple[str, int, int], ...]
    matches: Matches | None
    kept_out: str
    removed_out: str
    previous: str | None

    def run(self) -> FileWritten:
        job, parts, matches, kept_out, removed_out, previous = (
            self.job,
            self.parts,
            self.matches,
            self.kept_out,
            self.removed_out,
            self.previous,
        )
        fates = _fates(parts, job, matches)
        kept = fates.column("is_kept").to_numpy(zero_copy_only=False).astype(bool)
        dropped = np.flatnonzero(~kept)
        digest = _digest(dropped, fates)
        if digest == previous and nodes.present(kept_out) and nodes.present(removed_out):
            return FileWritten(digest=digest, dropped=int(dropped.size), written=False, name=job.name)
        source = open_parquet(job.path)
        schema = source.schema_arrow
        extra = fates.schema.remove(0)  # the added columns, typed as in groups/
        removed_schema = pa.schema(list(schema) + list(extra), metadata=schema.metadata)
        with (
            atomic_path(kept_out) as tmp_kept,
            atomic_path(removed_out) as tmp_removed,
            pq.ParquetWriter(str(tmp_kept), schema) as keep_w,
            pq.ParquetWriter(str(tmp_removed), removed_schema) as rm_w,
        ):
            at = 0
            for g in range(source.num_row_groups):
                batch = source.read_row_group(g)
                n = batch.num_rows
                if not n:
                    continue
                mask = pa.array(kept[at : at + n])
                keep_w.write_table(batch.filter(mask))
                gone = pc.invert(mask)
                if not pc.any(gone).as_py():
                    at += n
                    continue
                removed = batch.filter(gone)
                for col in extra.names:
                    removed = removed.append_column(col, fates.column(col).slice(at, n).filter(gone))
                rm_w.write_table(removed)
                at += n
            if at != job.rows:
                raise InputError(
                    f"{job.path}: holds {at} rows now, {job.rows} when the job started; "
                    "the input changed during the run: run again"
                )
        return FileWritten(digest=digest, dropped=int(dropped.size), written=True, name=job.name)


def write_dataset(
    client: Any,
    dataset: Dataset,
    *,
    output: Path,
    manifest: Manifest,
    part_starts: np.ndarray,
    matches: Matches | None = None,
) -> DatasetWritten:
    """Write ``deduplicated/`` and ``removed/`` from ``groups/``, whose partitions begin at global
    rows ``part_starts``, and the ``--against`` ``matches`` (see the module doc). A file's copies
    are compared by name with the last run's (files before it may have been removed); the copies
    of files no longer in the input are deleted."""
    ends = [*part_starts[1:].tolist(), dataset.row_space]
    groups = [
        (str(output / "groups" / f"part-{i:05d}.parquet"), int(s), int(e) - int(s))
        for i, (s, e) in enumerate(zip(part_starts.tolist(), ends, strict=True))
    ]
    jobs = file_jobs(dataset)
    earlier = manifest.piece_results(STAGE)
    previous = {r.get("name"): r for r in earlier.values()}
    kept_dir, removed_dir = output / "deduplicated", output / "removed"
    names = {j.name for j in jobs}
    for index, result in earlier.items():
        gone = result.get("name")
        if gone and gone not in names:
            for folder in (kept_dir, removed_dir):
                if nodes.present(folder / gone):
                    discard(folder / gone)
        if index >= len(jobs):
            manifest.forget_piece(STAGE, index)

    def outputs(job: FileJob) -> tuple[Path, Path]:
        return kept_dir / job.name, removed_dir / job.name

    results: dict[int, FileWritten] = {}

    def done(job: FileJob, result: FileWritten) -> None:
        results[job.index] = result
        manifest.mark_piece(STAGE, job.index, outputs(job), to_dict(result))

    run_tasks(
        client,
        label="dedup_dataset",
        items=jobs,
        task=lambda j: FileTask(
            job=j,
            parts=tuple(g for g in groups if g[1] < j.start + j.rows and j.start < g[1] + g[2]),
            matches=matches,
            kept_out=str(outputs(j)[0]),
            removed_out=str(outputs(j)[1]),
            previous=previous.get(j.name, {}).get("digest"),
        ),
        on_done=done,
    )
    manifest.finish_stage(STAGE, {})
    written = sum(1 for r in results.values() if r.written)
    summary = DatasetWritten(written, len(results) - written, int(sum(r.dropped for r in results.values())))
    log.info(
        "deduplicated/: %d file(s) written, %d unchanged; removed/: %d row(s)",
        summary.files_written,
        summary.files_unchanged,
        summary.rows_removed,
    )
    return summary
