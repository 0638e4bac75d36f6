"""Reading Parquet shards: resolve inputs, plan pieces from metadata, read one piece as float32.

A *piece* is a run of consecutive row groups of one file, bounded by ``partition_bytes`` of
float32 vectors (a single row group larger than that becomes one piece). Pieces are numbered in
file order and each knows its first *global row*; global rows are the internal FAISS ids.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError

__all__ = ["FileInfo", "Piece", "Dataset", "resolve_paths", "plan_dataset", "read_piece"]

log = logging.getLogger(__name__)

FLOAT_TYPES = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime_ns: int
    rows: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, start + rows)`` of the dataset: ``row_groups`` of ``path``."""

    index: int
    path: str
    row_groups: tuple[int, ...]
    file_row: int  # first row of the piece within its file
    start: int  # first global row
    rows: int

    def where(self, local_row: int | None = None) -> str:
        """Human-readable location, for error messages."""
        if local_row is None:
            return f"{self.path} (rows {self.file_row}-{self.file_row + self.rows - 1})"
        return f"{self.path} (row {self.file_row + local_row})"


@dataclass(frozen=True)
class Dataset:
    """The planned input: files, pieces and what the schema says about the columns."""

    files: tuple[FileInfo, ...]
    pieces: tuple[Piece, ...]
    id_column: str
    vector_column: str
    dim: int | None  # None until scanned when the vector column is a variable-length list
    id_kind: str  # "int" or "string"
    total_rows: int

    @property
    def starts(self) -> np.ndarray:
        """First global row of each piece, for mapping a global row to its piece."""
        return np.array([p.start for p in self.pieces], dtype=np.int64)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input: a change in any of it makes old results stale."""
        return {
            "files": [[f.path, f.size, f.mtime_ns] for f in self.files],
            "id_column": self.id_column,
            "vector_column": self.vector_column,
            "rows": self.total_rows,
        }


def resolve_paths(entries: Sequence[str]) -> list[str]:
    """Expand directories (``*.parquet`` below them) and globs into a sorted list of files."""
    if not entries:
        raise InputError("no input given; pass --input DIR|GLOB|FILE")
    found: list[str] = []
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            matches = sorted(
                str(f) for f in p.rglob("*.parquet")
                if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts)
            )
            if not matches:
                raise InputError(f"{entry}: directory holds no *.parquet files; point --input at the shards")
        elif any(ch in entry for ch in "*?["):
            matches = sorted(f for f in glob.glob(entry, recursive=True) if os.path.isfile(f))
            if not matches:
                raise InputError(f"{entry}: glob matches no files; check the pattern given to --input")
        elif p.is_file():
            matches = [str(p)]
        else:
            raise InputError(f"{entry}: no such file or directory; check --input")
        found.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(found))


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise InputError(
            f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]}); remove it from the input "
            "or rewrite it as Parquet"
        ) from None


def _id_kind(path: str, column: str, typ: pa.DataType) -> str:
    if pa.types.is_integer(typ):
        return "int"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "string"
    raise InputError(
        f"{path}, column '{column}': ids must be integers or strings, got {typ}; cast the column or pass "
        "--id-column with another column"
    )


def _vector_layout(path: str, column: str, typ: pa.DataType) -> tuple[int | None, str]:
    """(fixed dimension or None for variable lists, element type name)."""
    if pa.types.is_fixed_size_list(typ):
        dim: int | None = typ.list_size
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        dim = None
    else:
        raise InputError(
            f"{path}, column '{column}': expected a list of floats (one vector per row), got {typ}; "
            "store each vector as list<float32> or pass --vector-column with the right column"
        )
    elem = typ.value_type
    if elem not in FLOAT_TYPES:
        raise InputError(
            f"{path}, column '{column}': vector elements must be float16, float32 or float64, got {elem}; "
            "non-numeric or integer vectors are not converted silently: cast them to float32 first"
        )
    return dim, FLOAT_TYPES[elem]


def plan_dataset(
    entries: Sequence[str],
    id_column: str,
    vector_column: str,
    partition_bytes: int,
) -> Dataset:
    """Check every file's schema from its metadata and split the input into pieces.

    Raises :class:`InputError` naming the file and column for: unreadable or non-Parquet files,
    missing columns, non-float vectors, id types that differ between files, fixed dimensions that
    differ between files, and an empty dataset.
    """
    files: list[FileInfo] = []
    pieces: list[Piece] = []
    dim: int | None = None
    dim_file = ""
    id_kind = ""
    id_file = ""
    float64_files: list[str] = []
    total = 0
    for path in resolve_paths(entries):
        pf = _open(path)
        schema = pf.schema_arrow
        for col, flag in ((id_column, "--id-column"), (vector_column, "--vector-column")):
            if col not in schema.names:
                raise InputError(
                    f"{path}: column '{col}' not found (columns: {', '.join(schema.names)}); "
                    f"pass {flag} NAME"
                )
        kind = _id_kind(path, id_column, schema.field(id_column).type)
        if id_kind and kind != id_kind:
            raise InputError(
                f"{path}, column '{id_column}': ids are {kind}s here but {id_kind}s in {id_file}; "
                "use one id type across all shards"
            )
        id_kind, id_file = kind, id_file or path
        fixed, elem = _vector_layout(path, vector_column, schema.field(vector_column).type)
        if elem == "float64":
            float64_files.append(path)
        if fixed is not None:
            if dim is not None and fixed != dim:
                raise InputError(
                    f"{path}, column '{vector_column}': vectors have dimension {fixed} but {dim} in "
                    f"{dim_file}; all shards must hold vectors of one dimension"
                )
            dim, dim_file = fixed, path
        st = os.stat(path)
        meta = pf.metadata
        files.append(FileInfo(path, st.st_size, st.st_mtime_ns, meta.num_rows))
        if meta.num_rows == 0:
            log.warning("%s holds no rows; skipping it", path)
            continue
        est_dim = fixed or _estimate_dim(meta, vector_column)
        max_rows = max(1, partition_bytes // (4 * max(est_dim, 1)))
        group: list[int] = []
        group_rows = 0
        file_row = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n == 0:
                continue
            if group and group_rows + n > max_rows:
                pieces.append(Piece(len(pieces), path, tuple(group), file_row, total, group_rows))
                total += group_rows
                file_row += group_rows
                group, group_rows = [], 0
            group.append(rg)
            group_rows += n
        if group:
            pieces.append(Piece(len(pieces), path, tuple(group), file_row, total, group_rows))
            total += group_rows
    if total == 0:
        raise InputError(f"{', '.join(entries)}: the input holds no rows; check --input")
    if float64_files:
        log.info(
            "column '%s' is float64 in %d file(s) (first: %s); converting to float32 on read, "
            "which FAISS requires", vector_column, len(float64_files), float64_files[0],
        )
    return Dataset(tuple(files), tuple(pieces), id_column, vector_column, dim, id_kind, total)


def _estimate_dim(meta: pq.FileMetaData, column: str) -> int:
    """Values per row of a list column, from the row-group metadata (for sizing pieces only)."""
    rg = meta.row_group(0)
    for i in range(rg.num_columns):
        col = rg.column(i)
        if col.path_in_schema.split(".")[0] == column:
            return max(1, col.num_values // max(rg.num_rows, 1))
    return 1


def read_piece(piece: Piece, id_column: str, vector_column: str, dim: int | None) -> tuple[pa.Array, np.ndarray]:
    """Read one piece: its ids (Arrow array) and vectors (C-contiguous float32, rows x dim).

    Validates as it converts, raising :class:`InputError` with the file, row and column for
    null ids, null vectors or elements, wrong lengths and NaN/inf values. No per-row Python loops.
    """
    try:
        table = pq.ParquetFile(piece.path).read_row_groups(list(piece.row_groups), columns=[id_column, vector_column])
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise InputError(
            f"{piece.where()}: cannot be read ({str(exc).splitlines()[0]}); the file is corrupt, "
            "rewrite or remove it"
        ) from None
    ids = table.column(id_column).combine_chunks()
    if ids.null_count:
        bad = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{piece.where(bad)}, column '{id_column}': null id; every row needs an id")
    vecs = table.column(vector_column).combine_chunks()
    if vecs.null_count:
        bad = int(np.flatnonzero(vecs.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(
            f"{piece.where(bad)}, column '{vector_column}': null vector ({vecs.null_count} in this piece); "
            "drop or fill those rows"
        )
    if pa.types.is_fixed_size_list(vecs.type):
        row_dim = vecs.type.list_size
    else:
        lengths = np.diff(np.asarray(vecs.offsets))
        row_dim = int(lengths[0])
        wrong = np.flatnonzero(lengths != row_dim)
        if wrong.size:
            r = int(wrong[0])
            raise InputError(
                f"{piece.where(r)}, column '{vector_column}': vector of length {int(lengths[r])}, but "
                f"{row_dim} at row {piece.file_row}; all vectors must have one dimension"
            )
    if dim is not None and row_dim != dim:
        raise InputError(
            f"{piece.where()}, column '{vector_column}': vectors have dimension {row_dim}, expected {dim}; "
            "all shards (and queries) must match the index dimension"
        )
    values = vecs.flatten()
    if values.null_count:
        bad = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(row_dim, 1)
        raise InputError(
            f"{piece.where(bad)}, column '{vector_column}': vector with null elements; fill or drop it"
        )
    x = values.to_numpy(zero_copy_only=False)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(vecs), row_dim)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite)
        raise InputError(
            f"{piece.where(int(bad_rows[0]))}, column '{vector_column}': {bad_rows.size} vector(s) in this "
            "piece contain NaN or inf; clean or drop them"
            + (" (float16 overflows above 65504: store float32)" if values.type == pa.float16() else "")
        )
    return ids, x
