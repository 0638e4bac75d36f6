"""The scan: the one pass over the Parquet input, before any heavy work.

Each piece is read, validated (nulls, lengths, NaN/inf, zero vectors under cosine) and written to
the row store as float32 (normalised for cosine), with its ids. Ids are then checked for
duplicates across the whole input, bucket by bucket. Later stages read only the row store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import InputError
from pipeline.io import nodes
from pipeline.io.ids import duplicate_rows, id_keys, n_buckets, write_key_buckets
from pipeline.io.owned import discard
from pipeline.io.parquet import Dataset, Piece, read_piece
from pipeline.io.store import RowStore
from pipeline.kinds import Metric
from pipeline.runtime.manifest import Manifest
from pipeline.runtime.runner import gather, run_tasks, say_resuming, submit

__all__ = ["scan_dataset", "prepare_vectors", "ScanRecord"]

log = logging.getLogger(__name__)


MAX_NORM = 1e15  # squared distances and products of vectors up to this norm stay far inside float32


def prepare_vectors(x: np.ndarray, metric: Metric, piece: Piece, column: str) -> np.ndarray:
    """Vectors as the index sees them: L2-normalised for ``cosine``, unchanged otherwise.

    Norms are taken in float64, so huge elements neither overflow the check nor the
    normalisation. Under ``l2`` and ``ip`` a vector whose norm would overflow float32 scores
    (FAISS aborts in k-means, or writes inf) is refused naming its row.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    if metric != "cosine":
        big = np.flatnonzero(norms > MAX_NORM)
        if big.size:
            r = int(big[0])
            raise InputError(
                f"{piece.where(r)}, column '{column}': vector norm {norms[r]:.3g} ({big.size} such vector(s) in this "
                f"piece) would overflow float32 {metric} scores (limit {MAX_NORM:.0e}); rescale the vectors or "
                "normalise them (--metric cosine)"
            )
        return x
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise InputError(
            f"{piece.where(int(zero[0]))}, column '{column}': {zero.size} all-zero vector(s) in this piece; "
            "cosine similarity is undefined for them: drop them or use --metric l2 or ip"
        )
    n32 = norms.astype(np.float32)
    out = x / n32[:, None]
    huge = ~np.isfinite(n32)  # norms past float32's range: divide those rows in float64
    if huge.any():
        out[huge] = (x[huge] / norms[huge, None]).astype(np.float32)
    return out


@dataclass(frozen=True)
class ScanRecord:
    """The manifest's ``scan`` (or ``scan_queries``) stage: the stored rows."""

    dim: int
    rows: int
    starts: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ScanTask:
    """Read one piece, check and prepare its vectors (normalised for cosine), store its ids and
    vectors, and bucket its id keys for the duplicate check; returns the vectors' dimension."""

    piece: Piece
    id_column: str
    vector_column: str
    dim: int | None
    id_type: pa.DataType | None
    metric: Metric
    store: RowStore
    key_dir: str
    nbuckets: int

    def run(self) -> int:
        piece, id_column, vector_column, dim, id_type, metric, store, key_dir, nbuckets = (
            self.piece,
            self.id_column,
            self.vector_column,
            self.dim,
            self.id_type,
            self.metric,
            self.store,
            self.key_dir,
            self.nbuckets,
        )
        ids, x = read_piece(piece, id_column, vector_column, dim, id_type)
        x = prepare_vectors(x, metric, piece, vector_column)
        store.write_piece(piece.index, ids, x)
        write_key_buckets(id_keys(ids), piece.start, nbuckets, key_dir, piece.index)
        return int(x.shape[1])


@dataclass(frozen=True, kw_only=True)
class StoreKeysTask:
    """Bucket the id keys of a piece stored by an earlier run (for the duplicate check)."""

    store: RowStore
    piece: int
    first_row: int
    key_dir: str
    nbuckets: int

    def run(self) -> None:
        store, piece, first_row, key_dir, nbuckets = self.store, self.piece, self.first_row, self.key_dir, self.nbuckets
        write_key_buckets(id_keys(store.ids(piece)), first_row, nbuckets, key_dir, piece)


@dataclass(frozen=True, kw_only=True)
class DuplicateRows:
    """Groups of global rows that share an id key in one bucket (a few, for the error message)."""

    bucket: str

    def run(self) -> list[np.ndarray]:
        return duplicate_rows(self.bucket)


def _key_files(key_dir: Path, piece: int, nbuckets: int) -> list[Path]:
    return [key_dir / f"b{b:04d}" / f"p{piece:05d}.npy" for b in range(nbuckets)]


def scan_dataset(
    client: Any, dataset: Dataset, *, store: RowStore, metric: Metric, manifest: Manifest, stage: str = "scan"
) -> int:
    """Scan every piece not yet scanned; check ids; return the vector dimension."""
    info = manifest.stage_record(stage, ScanRecord)
    if info is not None:
        return info.dim
    key_dir = store.root / "_idkeys"
    nbuckets = n_buckets(dataset.total_rows)
    done = manifest.done_pieces(stage)
    todo = [p for p in dataset.pieces if p.index not in done]
    say_resuming(stage, dataset.pieces, todo)
    dims: dict[int, int] = {int(k): int(v) for k, v in manifest.data.get("dims", {}).items()}

    def finished(piece: Piece, dim: int) -> None:
        dims[piece.index] = dim
        manifest.data.setdefault("dims", {})[str(piece.index)] = dim
        manifest.mark_piece(stage, piece.index, [store.vectors_path(piece.index), store.ids_path(piece.index)])

    run_tasks(
        client,
        label=stage,
        items=todo,
        task=lambda p: ScanTask(
            piece=p,
            id_column=dataset.id_column,
            vector_column=dataset.vector_column,
            dim=dataset.dim,
            id_type=dataset.id_type,
            metric=metric,
            store=store,
            key_dir=str(key_dir),
            nbuckets=nbuckets,
        ),
        on_done=finished,
    )
    # the id keys of pieces scanned by an earlier run (resumed, or an input that grew) are
    # rebuilt from the stored ids: the duplicate check always covers every piece
    stale = [p for p in dataset.pieces if not all(nodes.present(f) for f in _key_files(key_dir, p.index, nbuckets))]
    if stale:
        keys = [
            StoreKeysTask(store=store, piece=p.index, first_row=p.start, key_dir=str(key_dir), nbuckets=nbuckets)
            for p in stale
        ]
        gather(client, [submit(client, task, "scan") for task in keys])
    distinct = sorted(set(dims.values()))
    if len(distinct) > 1:
        first = {d: next(p for p in dataset.pieces if dims[p.index] == d) for d in distinct}
        a, b = (first[d] for d in distinct[:2])
        raise InputError(
            f"{b.where()}, column '{dataset.vector_column}': vectors have dimension {distinct[1]} but "
            f"{distinct[0]} in {a.where()}; all shards must hold vectors of one dimension"
        )
    _check_duplicates(client, dataset, store, key_dir, nbuckets)
    discard(key_dir)
    manifest.finish_stage(stage, ScanRecord(distinct[0], dataset.total_rows, tuple(dataset.starts.tolist())))
    return distinct[0]


def _check_duplicates(client: Any, dataset: Dataset, store: RowStore, key_dir: Path, nbuckets: int) -> None:
    futures = [submit(client, DuplicateRows(bucket=str(key_dir / f"b{b:04d}")), "scan") for b in range(nbuckets)]
    examples: list[str] = []
    for groups in gather(client, futures):
        for rows in groups:
            ids = store.gather_ids(rows)
            # string ids are hashed: confirm the collision is a real repeat
            values = ids.to_pylist()
            seen: dict[object, int] = {}
            for row, value in zip(rows.tolist(), values):
                if value in seen:
                    examples.append(f"{value!r} at {_locate(dataset, seen[value])} and {_locate(dataset, row)}")
                    break
                seen[value] = row
    if examples:
        raise InputError(
            f"column '{dataset.id_column}': duplicate ids, e.g. {examples[0]}"
            + (f" ({len(examples)} examples found)" if len(examples) > 1 else "")
            + "; ids must be unique: deduplicate the input or pass another --id-column"
        )


def _locate(dataset: Dataset, row: int) -> str:
    piece = dataset.piece_of(row)
    return f"{Path(piece.path).name} row {piece.file_row + row - piece.start}"
