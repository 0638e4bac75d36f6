"""Reading Parquet shards: resolve inputs, plan pieces from metadata, read one piece as float32.

Inputs are local paths or URLs of any filesystem pyarrow supports (:mod:`pipeline.io.storage`);
planning reads footers only, several at once, and a piece reads just its row groups.

A *piece* is a run of consecutive row groups of one file, bounded by ``partition_bytes`` of
float32 vectors (a single row group larger than that becomes one piece). Pieces are numbered in
file order and each knows its first *global row*; global rows are the internal FAISS ids.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError
from pipeline.io.storage import filesystem, is_remote, list_parquet, open_parquet, remote_info
from pipeline.io.workdir import shown

__all__ = [
    "FileInfo",
    "Piece",
    "PieceRun",
    "piece_runs",
    "Dataset",
    "resolve_paths",
    "plan_dataset",
    "read_piece",
    "unify_id_types",
]

log = logging.getLogger(__name__)

FLOAT_TYPES = {pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64"}


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime_ns: int
    rows: int
    footer: str = ""  # hash of the Parquet footer: a rewrite of the same size and mtime still shows


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
            return f"{shown(self.path)} (rows {self.file_row}-{self.file_row + self.rows - 1})"
        return f"{shown(self.path)} (row {self.file_row + local_row})"


@dataclass(frozen=True)
class PieceRun:
    """Consecutive query pieces taken by one task (a work item: numbered by its first piece)."""

    pieces: tuple[Piece, ...]

    @property
    def index(self) -> int:
        return self.pieces[0].index

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    def where(self) -> str:
        return ", ".join(p.where() for p in self.pieces)


def piece_runs(pieces: Sequence[Piece], run_rows: int, *, min_piece_rows: int = 1) -> list[PieceRun]:
    """Consecutive pieces taken by one task: as many as fit ``run_rows`` rows in all. The batched
    join takes runs so that a batch brings each list as many queries as the plan wants even where
    the input's files are smaller than that batch (at 16M x 64, 250,000-row files gave each list
    107 queries a batch where the plan wants 256; ``scripts/walk_benchmark.py``: 1.2x to 1.3x the
    time a query); the routed join's route and merge tasks, so that each reads a list group's files
    once for the run. Each piece keeps its own table and manifest record. Pieces under
    ``min_piece_rows`` rows, and every piece where ``run_rows`` is 0, are a run each."""
    runs: list[list[Piece]] = []
    for p in pieces:
        last = runs[-1] if runs else None
        if (
            last is not None
            and min(q.rows for q in (*last, p)) >= min_piece_rows
            and sum(q.rows for q in last) + p.rows <= run_rows
        ):
            last.append(p)
        else:
            runs.append([p])
    return [PieceRun(tuple(r)) for r in runs]


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
    id_type: pa.DataType | None = None  # every file's ids are read as this type (unified at plan time)
    retired: tuple[Piece, ...] = ()  # pieces of files since removed or rewritten: their rows are holes

    @property
    def starts(self) -> np.ndarray:
        """First global row of every piece number, live or retired (:mod:`pipeline.io.layout`), for
        mapping a global row to its piece."""
        every = sorted((*self.pieces, *self.retired), key=lambda p: p.index)
        return np.array([p.start for p in every], dtype=np.int64)

    @property
    def row_space(self) -> int:
        """Global rows ``[0, row_space)`` laid out so far: the live rows and the holes of retired pieces."""
        return max((p.start + p.rows for p in (*self.pieces, *self.retired)), default=0)

    @property
    def holes(self) -> tuple[tuple[int, int], ...]:
        """``(first row, rows)`` of each retired piece: global rows nothing reads any more."""
        return tuple((p.start, p.rows) for p in self.retired)

    @property
    def live(self) -> tuple[int, ...]:
        """The numbers of the live pieces (those with rows in the row store)."""
        return tuple(p.index for p in self.pieces)

    def piece_of(self, row: int) -> Piece:
        """The live piece holding global ``row``."""
        at = int(np.searchsorted([p.start for p in self.pieces], row, side="right")) - 1
        return self.pieces[max(at, 0)]

    @property
    def file_starts(self) -> np.ndarray:
        """First global row of each file (a file without rows: where the next one starts), for
        mapping a global row to its file."""
        first: dict[str, int] = {}
        for piece in self.pieces:
            first.setdefault(piece.path, piece.start - piece.file_row)
        starts, at = [], 0
        for f in self.files:
            at = first.get(f.path, at)
            starts.append(at)
            at += f.rows if f.path in first else 0
        return np.array(starts, dtype=np.int64)

    def max_piece_bytes(self, partition_bytes: int) -> int:
        """float32 bytes of the largest piece (``partition_bytes`` where the dimension is not yet known)."""
        if self.dim is None:
            return partition_bytes
        return 4 * self.dim * max((p.rows for p in self.pieces), default=0)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input: a change in any of it makes old results stale."""
        return {
            "files": [[f.path, f.size, f.mtime_ns, f.footer] for f in self.files],
            "id_column": self.id_column,
            "vector_column": self.vector_column,
            "rows": self.total_rows,
        }


def _is_parquet(name: str) -> bool:
    return name.lower().endswith(".parquet")


def _walk(root: Path) -> Iterator[Path]:
    """``*.parquet`` files below ``root``, following directory symlinks once each (loop-safe).

    Files skipped on the way are logged with the reason: hidden or ``_``-prefixed names (the
    convention of Spark, Dask and this tool for metadata and temporary files), broken links,
    and entries that are not regular files.
    """
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            log.warning(
                "%s: directory already visited through another link; skipping it (symlink loop)", shown(dirpath)
            )
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        hidden = [d for d in dirnames if d.startswith((".", "_"))]
        for d in hidden:
            if any(_is_parquet(f) for _, _, fs in os.walk(os.path.join(dirpath, d), followlinks=False) for f in fs):
                log.warning(
                    "%s: skipping this directory's Parquet files (names starting with '.' or '_' are "
                    "metadata or temporary files)",
                    shown(os.path.join(dirpath, d)),
                )
        dirnames[:] = sorted(d for d in dirnames if d not in hidden)
        for name in sorted(filenames):
            if not _is_parquet(name):
                continue
            path = Path(dirpath) / name
            if name.startswith((".", "_")):
                log.warning("%s: skipped (names starting with '.' or '_' are metadata or temporary files)", shown(path))
            elif not path.exists():
                log.warning(
                    "%s: skipped, a broken symbolic link (its target %s does not exist)",
                    shown(path),
                    shown(os.readlink(path)),
                )
            elif not path.is_file():
                log.warning("%s: skipped, not a regular file", shown(path))
            else:
                yield path


def resolve_paths(entries: Sequence[str]) -> list[str]:
    """Expand directories (``*.parquet`` below them, any case) and globs into a sorted list of files."""
    if not entries:
        raise InputError("no input given; pass --input DIR|GLOB|FILE")
    found: list[str] = []
    for entry in entries:
        p = Path(entry)
        if is_remote(entry):
            try:
                remote = list_parquet(entry)
            except OSError as exc:
                raise InputError(
                    f"{shown(entry)}: cannot be listed ({_first_line(exc)}); check the URL and the "
                    "credentials (AWS_ACCESS_KEY_ID, a profile, or storage_options)"
                ) from None
            if not remote:
                raise InputError(f"{shown(entry)}: no *.parquet files there; point --input at the shards")
            found.extend(f.url for f in remote)
            continue
        if p.is_dir():
            matches = sorted(str(f) for f in _walk(p))
            if not matches:
                raise InputError(f"{shown(entry)}: directory holds no *.parquet files; point --input at the shards")
        elif any(ch in entry for ch in "*?["):
            matches = []
            for f in sorted(glob.glob(entry, recursive=True)):
                if os.path.isfile(f):
                    matches.append(f)
                elif os.path.islink(f) and not os.path.exists(f):
                    log.warning("%s: skipped, a broken symbolic link", shown(f))
            if not matches:
                raise InputError(f"{shown(entry)}: glob matches no files; check the pattern given to --input")
        elif p.is_file():
            matches = [str(p)]
        elif p.is_symlink():
            raise InputError(
                f"{shown(entry)}: a broken symbolic link (its target {shown(os.readlink(p))} does not "
                "exist); fix the link or remove it from --input"
            )
        else:
            raise InputError(f"{shown(entry)}: no such file or directory; check --input")
        found.extend(os.path.abspath(m) for m in matches)
    return sorted(dict.fromkeys(found))


@dataclass(frozen=True)
class _Opened:
    """One input file as planning needs it: its reader, size, time and footer hash."""

    file: pq.ParquetFile
    size: int
    mtime_ns: int
    footer: str


def _open_all(paths: Sequence[str]) -> Iterator[_Opened]:
    """Open every file and read its footer, several at once (remote footers are one round trip
    each); yielded in order, an unreadable file raising where it comes."""

    def one(path: str) -> _Opened:
        pf = _open(path)
        if is_remote(path):
            info = remote_info(path)
            size, mtime = (info.size, info.mtime_ns) if info else (0, 0)
        else:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
        return _Opened(pf, size, mtime, _footer_hash(path, size))

    with ThreadPoolExecutor(max_workers=FOOTER_READERS) as pool:
        futures = [pool.submit(one, p) for p in paths]
        for f in futures:
            yield f.result()


FOOTER_READERS = 16


def _open(path: str) -> pq.ParquetFile:
    try:
        return open_parquet(path)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise InputError(
            f"{shown(path)}: not a readable Parquet file ({_first_line(exc)}); remove it from the input "
            "or rewrite it as Parquet"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _footer_hash(path: str, size: int) -> str:
    """A hash of the file's Parquet footer (schema, row groups, statistics): cheap, and it changes
    when the data is rewritten even where size and mtime do not."""
    with _raw(path) as fh:
        fh.seek(max(0, size - 8))
        tail = fh.read(8)
        length = int.from_bytes(tail[:4], "little") if len(tail) == 8 else 0
        fh.seek(max(0, size - 8 - length))
        return hashlib.blake2b(fh.read(length + 8), digest_size=12).hexdigest()


def _raw(path: str) -> Any:
    """A seekable binary reader of a local or remote file."""
    if is_remote(path):
        fs, inner = filesystem(path)
        return fs.open_input_file(inner)
    return open(path, "rb")


def unify_id_types(types: dict[str, pa.DataType], column: str) -> pa.DataType:
    """One Arrow type for ids of ``types`` (file -> type): the widest integer or large_string.

    Refused: integers with strings, and unsigned integers as wide as the widest signed ones
    (their values may not fit).
    """
    kinds = {path: ("int" if pa.types.is_integer(t) else "string") for path, t in types.items()}
    if len(set(kinds.values())) > 1:
        a = next(p for p, k in kinds.items() if k == "int")
        b = next(p for p, k in kinds.items() if k == "string")
        raise InputError(
            f"{shown(b)}, column '{column}': ids are strings here but integers ({types[a]}) in {shown(a)}; "
            "use one id type across all shards"
        )
    distinct = set(types.values())
    if len(distinct) == 1:
        return distinct.pop()
    if "string" in kinds.values():
        return pa.large_string()
    signed = [t.bit_width for t in distinct if pa.types.is_signed_integer(t)]
    unsigned = [t.bit_width for t in distinct if pa.types.is_unsigned_integer(t)]
    if not signed:
        return pa.from_numpy_dtype(np.dtype(f"uint{max(unsigned)}"))
    if not unsigned or max(unsigned) < max(signed):
        return pa.from_numpy_dtype(np.dtype(f"int{max(signed)}"))
    u = next(p for p, t in types.items() if pa.types.is_unsigned_integer(t) and t.bit_width == max(unsigned))
    s_ = next(p for p, t in types.items() if pa.types.is_signed_integer(t) and t.bit_width == max(signed))
    raise InputError(
        f"{shown(u)}, column '{column}': ids are {types[u]} here but {types[s_]} in {shown(s_)}, and not every "
        f"{types[u]} fits {types[s_]}; cast the ids to one integer type in every shard"
    )


def _id_kind(path: str, column: str, typ: pa.DataType) -> str:
    if pa.types.is_integer(typ):
        return "int"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "string"
    raise InputError(
        f"{shown(path)}, column '{column}': ids must be integers or strings, got {typ}; cast the column or pass "
        "--id-column with another column"
    )


def _vector_layout(path: str, column: str, typ: pa.DataType) -> tuple[int | None, str]:
    """(fixed dimension or None for variable lists, element type name)."""
    if pa.types.is_fixed_size_list(typ):
        dim: int | None = typ.list_size
        if dim == 0:
            raise InputError(
                f"{shown(path)}, column '{column}': vectors have dimension 0 (fixed_size_list of size 0); "
                "store the embeddings themselves, or pass --vector-column with the right column"
            )
    elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
        dim = None
    else:
        raise InputError(
            f"{shown(path)}, column '{column}': expected a list of floats (one vector per row), got {typ}; "
            "store each vector as list<float32> or pass --vector-column with the right column"
        )
    elem = typ.value_type
    if elem not in FLOAT_TYPES:
        raise InputError(
            f"{shown(path)}, column '{column}': vector elements must be float16, float32 or float64, got {elem}; "
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
    id_types: dict[str, pa.DataType] = {}
    float64_files: list[str] = []
    total = 0
    paths = resolve_paths(entries)
    for path, opened in zip(paths, _open_all(paths), strict=True):
        pf = opened.file
        schema = pf.schema_arrow
        for col, flag in ((id_column, "--id-column"), (vector_column, "--vector-column")):
            if col not in schema.names:
                raise InputError(
                    f"{shown(path)}: column '{col}' not found (columns: {', '.join(schema.names)}); pass {flag} NAME"
                )
        id_type = schema.field(id_column).type
        _id_kind(path, id_column, id_type)
        id_types[path] = id_type
        unify_id_types(id_types, id_column)  # refuse a clash at the first file that shows it
        fixed, elem = _vector_layout(path, vector_column, schema.field(vector_column).type)
        if elem == "float64":
            float64_files.append(path)
        if fixed is not None:
            if dim is not None and fixed != dim:
                raise InputError(
                    f"{shown(path)}, column '{vector_column}': vectors have dimension {fixed} but {dim} in "
                    f"{shown(dim_file)}; all shards must hold vectors of one dimension"
                )
            dim, dim_file = fixed, path
        meta = pf.metadata
        files.append(FileInfo(path, opened.size, opened.mtime_ns, meta.num_rows, opened.footer))
        if meta.num_rows == 0:
            log.warning("%s holds no rows; skipping it", shown(path))
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
        raise InputError(f"{', '.join(shown(e) for e in entries)}: the input holds no rows; check --input")
    if float64_files:
        log.info(
            "column '%s' is float64 in %d file(s) (first: %s); converting to float32 on read, which FAISS requires",
            vector_column,
            len(float64_files),
            shown(float64_files[0]),
        )
    id_type = unify_id_types(id_types, id_column)
    if len(set(id_types.values())) > 1:
        log.info(
            "column '%s' has types %s across files; reading every file's ids as %s",
            id_column,
            ", ".join(sorted({str(t) for t in id_types.values()})),
            id_type,
        )
    kind = "int" if pa.types.is_integer(id_type) else "string"
    return Dataset(tuple(files), tuple(pieces), id_column, vector_column, dim, kind, total, id_type)


def _leaves(t: pa.DataType) -> int:
    """Parquet leaf columns an Arrow type is stored as."""
    if pa.types.is_struct(t):
        return sum(_leaves(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return _leaves(t.key_type) + _leaves(t.item_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _leaves(t.value_type)
    return 1


def _estimate_dim(meta: pq.FileMetaData, column: str) -> int:
    """Values per row of a list column, from the row-group metadata (for sizing pieces only).

    The column's leaf is found by position (the leaves of the fields before it), not by name: a
    name may hold dots, which Parquet also uses to join path segments."""
    schema = meta.schema.to_arrow_schema()
    leaf = sum(_leaves(schema.field(i).type) for i in range(schema.get_field_index(column)))
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        if rg.num_rows:
            return max(1, rg.column(leaf).num_values // rg.num_rows)
    return 1


def read_piece(
    piece: Piece, id_column: str, vector_column: str, dim: int | None, id_type: pa.DataType | None = None
) -> tuple[pa.Array, np.ndarray]:
    """Read one piece: its ids (Arrow array) and vectors (C-contiguous float32, rows x dim).

    Validates as it converts, raising :class:`InputError` with the file, row and column for
    null ids, null vectors or elements, wrong lengths and NaN/inf values. No per-row Python loops.
    """
    try:
        table = open_parquet(piece.path).read_row_groups(list(piece.row_groups), columns=[id_column, vector_column])
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
        raise InputError(
            f"{piece.where()}: cannot be read ({str(exc).splitlines()[0]}); the file is corrupt, rewrite or remove it"
        ) from None
    ids = table.column(id_column).combine_chunks()
    if id_type is not None and ids.type != id_type:
        ids = ids.cast(id_type)  # unified at plan time: a widening cast, never a lossy one
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
    if row_dim == 0:
        raise InputError(
            f"{piece.where(0)}, column '{vector_column}': empty vector (dimension 0); store the embeddings "
            "themselves, or pass --vector-column with the right column"
        )
    if dim is not None and row_dim != dim:
        raise InputError(
            f"{piece.where()}, column '{vector_column}': vectors have dimension {row_dim}, expected {dim}; "
            "all shards (and queries) must match the index dimension"
        )
    values = vecs.flatten()
    if values.null_count:
        bad = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // max(row_dim, 1)
        raise InputError(f"{piece.where(bad)}, column '{vector_column}': vector with null elements; fill or drop it")
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
