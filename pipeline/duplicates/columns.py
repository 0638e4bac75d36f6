"""Input columns dedup reads besides the vectors: the ``--keep-by`` priority and the example texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io.atomic import atomic_path
from pipeline.io.nodes import fetched
from pipeline.io.parquet import Dataset, Piece
from pipeline.io.storage import open_parquet
from pipeline.io.store import RowStore
from pipeline.io.workdir import shown
from pipeline.results import DedupExample
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import Stage, run_stage
from pipeline.shuffle.components import label_path

__all__ = ["read_keep_column", "attach_examples", "read_texts"]


@dataclass(frozen=True, kw_only=True)
class KeepColumnTask:
    """Store one piece's ``--keep-by`` column as int64 or float64 (``out``, a .npy file), refusing
    nulls, NaNs and columns that are not numbers, dates or timestamps."""

    piece: Piece
    column: str
    out: str

    def run(self) -> None:
        piece, column, out = self.piece, self.column, self.out
        try:
            col = open_parquet(piece.path).read_row_groups(list(piece.row_groups), columns=[column]).column(column)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError, KeyError) as exc:
            raise InputError(f"{piece.where()}, column '{column}': cannot be read for --keep-by ({exc})") from None
        col = col.combine_chunks()
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(
                f"{piece.where(bad)}, column '{column}': null --keep-by value; fill it or choose another column"
            )
        t = col.type
        if pa.types.is_timestamp(t) or pa.types.is_date(t) or pa.types.is_duration(t) or pa.types.is_time(t):
            values = col.cast(pa.int64()).to_numpy()
        elif pa.types.is_integer(t) or pa.types.is_boolean(t):
            values = col.cast(pa.int64()).to_numpy()
        elif pa.types.is_floating(t):
            values = col.cast(pa.float64()).to_numpy()
            if np.isnan(values).any():
                bad = int(np.flatnonzero(np.isnan(values))[0])
                raise InputError(
                    f"{piece.where(bad)}, column '{column}': NaN --keep-by value; fill it or choose another column"
                )
        else:
            raise InputError(
                f"{shown(piece.path)}, column '{column}': --keep-by needs a numeric, date or timestamp column, "
                f"not {t}; choose another column"
            )
        with atomic_path(out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, values)


def read_keep_column(client: Any, dataset: Dataset, column: str, out_dir: Path, manifest: Manifest) -> None:
    """Store the ``keep_by`` column per piece (``out_dir/part-NNNNN.npy``), checked as it is read."""
    for f in dataset.files:
        names = open_parquet(f.path).schema_arrow.names
        if column not in names:
            raise InputError(f"{f.path}: no column '{column}' for --keep-by; columns are {', '.join(names)}")
    run_stage(
        client,
        manifest,
        Stage(
            name="dedup_keep",
            items=dataset.pieces,
            task=lambda p: KeepColumnTask(piece=p, column=column, out=str(label_path(out_dir, p.index))),
            files=lambda p: [label_path(out_dir, p.index)],
        ),
    )


def read_texts(dataset: Dataset, rows: np.ndarray, text_column: str, limit: int = 300) -> dict[int, Any]:
    """``text_column`` of global ``rows`` (cut to ``limit`` characters), read piece by piece."""
    texts: dict[int, Any] = {}
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    piece_of = np.searchsorted(dataset.starts, rows, side="right") - 1
    by_number = {p.index: p for p in dataset.pieces}
    for p in np.unique(piece_of):
        piece = by_number[int(p)]
        try:
            col = open_parquet(piece.path).read_row_groups(list(piece.row_groups), columns=[text_column]).column(0)
        except (pa.ArrowInvalid, KeyError) as exc:
            raise InputError(
                f"{shown(piece.path)}: cannot read --text-column '{text_column}' ({exc}); name an existing column"
            ) from None
        local = rows[piece_of == p] - piece.start
        for r, v in zip(rows[piece_of == p].tolist(), col.take(pa.array(local)).to_pylist(), strict=True):
            texts[r] = v if not isinstance(v, str) or len(v) <= limit else v[:limit] + "…"
    return texts


def attach_examples(
    examples: Sequence[DedupExample],
    dataset: Dataset,
    store: RowStore,
    text_column: str | None,
    *,
    groups: tuple[Path, np.ndarray] | None = None,
    limit: int = 300,
) -> tuple[DedupExample, ...]:
    """The example pairs with their ids, whether each row was kept (from ``groups``: the
    ``groups/`` folder and its partitions' first rows) and, with ``text_column``, their texts cut
    to ``limit`` characters."""
    rows = np.array(sorted({r for e in examples for r in (e.row_a, e.row_b)}), dtype=np.int64)
    if rows.size == 0:
        return tuple(examples)
    ids = dict(zip(rows.tolist(), store.gather_ids(rows).to_pylist(), strict=True))
    texts = read_texts(dataset, rows, text_column, limit) if text_column else {}
    kept = _kept(groups, rows) if groups is not None else {}
    return tuple(
        replace(
            e,
            id_a=ids[e.row_a],
            id_b=ids[e.row_b],
            text_a=texts.get(e.row_a) if text_column else None,
            text_b=texts.get(e.row_b) if text_column else None,
            kept_a=kept.get(e.row_a),
            kept_b=kept.get(e.row_b),
        )
        for e in examples
    )


def _kept(groups: tuple[Path, np.ndarray], rows: np.ndarray) -> dict[int, bool]:
    """``is_kept`` of global ``rows`` from ``groups/`` (one file per partition, rows in order)."""
    folder, starts = groups
    part_of = np.searchsorted(starts, rows, side="right") - 1
    out: dict[int, bool] = {}
    for p in np.unique(part_of).tolist():
        flags = pq.read_table(fetched(folder / f"part-{p:05d}.parquet"), columns=["is_kept"]).column(0)
        local = rows[part_of == p] - int(starts[p])
        out.update(zip(rows[part_of == p].tolist(), flags.take(pa.array(local)).to_pylist(), strict=True))
    return out
