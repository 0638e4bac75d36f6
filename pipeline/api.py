"""The Python API: the commands as functions, and the same jobs over data held in memory.

Jobs over files and URLs take the YAML keys as keyword arguments (or a :class:`~pipeline.config.Config`,
or a mapping of keys) and return their typed report::

    >>> import pipeline
    >>> report = pipeline.run(input="data/", output="out/", k=10, exclude_self=True)  # doctest: +SKIP
    >>> report.recall.recall >= report.recall.target                                 # doctest: +SKIP
    True

The in-memory functions take a 2-D NumPy array (row numbers are the ids), a pyarrow Table, or a
pandas or polars DataFrame with a vector column (lists or fixed-size lists) and an optional id
column, and run the very job the command line runs (the same planner, recall target and
verdict) on the embedded cluster or on a given Dask client::

    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((2_000, 32)).astype(np.float32)
    >>> found = pipeline.knn(x, k=5, metric="l2", exclude_self=True, verbose=False)
    >>> found.neighbor_ids.shape, found.scores.dtype
    ((2000, 5), dtype('float32'))
    >>> found.recall >= 0.95
    True

The data is written as Parquet under a temporary folder (``workdir``: give a folder every worker
can read, such as ``s3://bucket/tmp``, when the workers run on other machines), the job runs, and
its outputs are read back into memory; the folder is removed afterwards unless you gave it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Config, parse_config
from pipeline.errors import ConfigError, InputError
from pipeline.index.built import BuiltIndex
from pipeline.jobs import commands
from pipeline.results import JobReport, RecallSummary
from pipeline.runtime import progress

__all__ = [
    "run",
    "build",
    "join",
    "dedup",
    "graph",
    "evaluate",
    "knn",
    "find_duplicates",
    "knn_graph",
    "Neighbors",
    "Duplicates",
    "Graph",
]

log = logging.getLogger("pipeline")

ROW_GROUP_BYTES = 64 << 20  # row groups of the Parquet the in-memory API writes: the unit the planner splits


# jobs over files ----------------------------------------------------------------------------------
def _config(config: Config | Mapping[str, Any] | None, keys: Mapping[str, Any], source: str) -> Config:
    """One validated config from a ``Config``, a mapping of keys and/or keyword arguments."""
    if isinstance(config, Config):
        if keys:
            raise ConfigError(f"{source}: pass a Config or keyword arguments, not both ({', '.join(sorted(keys))})")
        return config
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(
            f"{source}: expected a Config, a mapping of keys or keyword arguments; got {type(config).__name__}"
        )
    merged = {**dict(config or {}), **keys}
    return parse_config({k: _plain(v) for k, v in merged.items()}, source=source)


def _plain(value: Any) -> Any:
    """Paths as strings, tuples as lists: what a YAML file would hold."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@contextlib.contextmanager
def _reporting(verbose: bool) -> Iterator[None]:
    """Log lines and progress for a call from Python: where nothing handles the ``pipeline``
    logger (a notebook, a script), INFO lines go to stderr for the call, with a live progress line
    when stderr is a terminal or a notebook; a logging set-up of the caller's own is left alone."""
    logger = logging.getLogger("pipeline")
    if not verbose or logger.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    progress.configure(live=_interactive())
    try:
        yield
    finally:
        progress.configure(live=False)
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _interactive() -> bool:
    """A terminal, or a Jupyter kernel (whose stderr redraws a line on ``\\r``)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def run(config: Config | Mapping[str, Any] | None = None, /, *, verbose: bool = True, **keys: Any) -> JobReport:
    """Build an index over ``input`` and self-join it into ``output``/neighbors (the ``run`` command).

    Parameters
    ----------
    config
        A :class:`~pipeline.config.Config` or a mapping of YAML keys; or none, and the keys as
        keyword arguments.
    verbose
        Log progress to stderr when the caller has not set logging up.
    **keys
        YAML keys, e.g. ``input="data/"``, ``output="out/"``, ``k=10``, ``exclude_self=True``.

    Returns
    -------
    JobReport
        What ``report.json`` records: the plan, the recall measured against the target, timings.

    Examples
    --------
    >>> report = pipeline.run(input="data/", output="out/", metric="cosine", k=10)  # doctest: +SKIP
    >>> report.recall.recall, report.index.key                                        # doctest: +SKIP
    (0.957, 'IVF128,Flat')
    """
    with _reporting(verbose):
        return commands.run(_config(config, keys, "run"))


def build(config: Config | Mapping[str, Any] | None = None, /, *, verbose: bool = True, **keys: Any) -> BuiltIndex:
    """Build the index over ``input`` into ``index_dir`` only (the ``build`` command); see :func:`run`."""
    with _reporting(verbose):
        return commands.build(_config(config, keys, "build"))


def join(config: Config | Mapping[str, Any] | None = None, /, *, verbose: bool = True, **keys: Any) -> JobReport:
    """Search the ``input`` queries against the index in ``index_dir`` (the ``join`` command); see :func:`run`."""
    with _reporting(verbose):
        return commands.join(_config(config, keys, "join"))


def dedup(config: Config | Mapping[str, Any] | None = None, /, *, verbose: bool = True, **keys: Any) -> JobReport:
    """Near-duplicate groups of ``input`` above ``threshold`` into ``output`` (the ``dedup``
    command); ``report.dedup`` has the counts. See :func:`run`."""
    with _reporting(verbose):
        return commands.dedup(_config(config, keys, "dedup"))


def graph(config: Config | Mapping[str, Any] | None = None, /, *, verbose: bool = True, **keys: Any) -> JobReport:
    """The k-NN graph of ``input`` into ``output`` (the ``graph`` command); see :func:`run`."""
    with _reporting(verbose):
        return commands.graph(_config(config, keys, "graph"))


def evaluate(
    config: Config | Mapping[str, Any] | None = None, /, *, verbose: bool = True, **keys: Any
) -> RecallSummary:
    """Recall of a finished ``output`` against exact search (the ``evaluate`` command)."""
    with _reporting(verbose):
        return commands.evaluate(_config(config, keys, "evaluate"))


# in memory ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Neighbors:
    """The k nearest neighbours of every row, in the input's row order.

    ``neighbor_ids`` is ``(n, k)``: int64 ids (``-1`` where a row found fewer than k) when the
    ids are integers, else an object array (``None`` where missing); ``scores`` is float32
    ``(n, k)`` (NaN where missing): similarity for cosine and ip, squared distance for l2.
    ``recall`` is the tie-aware recall@k measured on held-out queries (None when turned off).
    """

    query_ids: np.ndarray
    neighbor_ids: np.ndarray
    scores: np.ndarray
    recall: float | None
    plan: str
    report: JobReport
    table: pa.Table = dataclasses.field(repr=False)

    def to_arrow(self) -> pa.Table:
        """The command line's table: ``query_id``, ``neighbor_id`` (list), ``score`` (list)."""
        return self.table


@dataclasses.dataclass(frozen=True)
class Duplicates:
    """Near-duplicate groups: ``kept_ids`` (one row kept per group, and every row in none), and
    ``groups``, one row per input row: ``id``, ``group_id``, ``representative_id``, ``is_kept``,
    ``score_to_representative``; ``pairs``: every pair above the threshold (``id_a``, ``id_b``, ``score``)."""

    kept_ids: np.ndarray
    groups: pa.Table
    pairs: pa.Table
    report: JobReport


@dataclasses.dataclass(frozen=True)
class Graph:
    """The k-NN graph: ``matrix`` is a scipy CSR array (rows and columns in the input's row
    order, weights as the graph's ``weight``), ``ids`` the input's ids in that order."""

    matrix: Any
    ids: np.ndarray
    report: JobReport


def knn(
    data: Any,
    *,
    k: int = 10,
    metric: str = "cosine",
    exclude_self: bool = True,
    target_recall: float | str | None = 0.95,
    id_column: str | None = None,
    vector_column: str | None = None,
    client: Any = None,
    workdir: str | os.PathLike[str] | None = None,
    verbose: bool = True,
    **keys: Any,
) -> Neighbors:
    """The k nearest neighbours of every row of ``data`` among the rows themselves.

    Parameters
    ----------
    data
        A 2-D NumPy array (float16, float32 or float64; row numbers are the ids), a pyarrow
        Table, or a pandas or polars DataFrame with a vector column (lists or fixed-size lists of
        numbers) and an optional id column (integers or strings).
    k, metric, exclude_self, target_recall
        As the command line's ``--k``, ``--metric`` (cosine, ip or l2), ``--exclude-self`` and
        ``--target-recall`` (``"off"`` or None: no recall check).
    id_column, vector_column
        The columns of a table; by default ``id`` (row numbers when absent) and the one column
        of lists.
    client
        A ``distributed.Client`` to run on; by default an embedded local cluster.
    workdir
        Where the data and outputs go while the job runs (default: a temporary folder, removed
        afterwards). Workers must be able to read it.
    **keys
        Any other YAML key (``index_key``, ``nprobe``, ``device``, ...).

    Returns
    -------
    Neighbors

    Examples
    --------
    >>> x = np.random.default_rng(1).standard_normal((1_000, 16)).astype(np.float32)
    >>> nn = pipeline.knn(x, k=3, metric="l2", verbose=False)
    >>> int(nn.neighbor_ids[0, 0]) != 0   # a row is not its own neighbour
    True
    >>> nn.to_arrow().column_names
    ['query_id', 'neighbor_id', 'score']
    """
    with _job_folder(workdir) as folder:
        _write_input(folder, data, id_column=id_column, vector_column=vector_column)
        report = run(
            _in_memory_keys(folder, client, keys),
            k=k,
            metric=metric,
            exclude_self=exclude_self,
            target_recall="off" if target_recall is None else target_recall,
            verbose=verbose,
        )
        result = _read_parts(folder / "output" / "neighbors")
    return _neighbors(result, k, report)


def find_duplicates(
    data: Any,
    *,
    threshold: float,
    metric: str = "cosine",
    id_column: str | None = None,
    vector_column: str | None = None,
    client: Any = None,
    workdir: str | os.PathLike[str] | None = None,
    verbose: bool = True,
    **keys: Any,
) -> Duplicates:
    """Near-duplicate groups of the rows of ``data`` whose score passes ``threshold`` (the
    ``dedup`` command in memory; ``data`` and the other parameters as in :func:`knn`; keys such as
    ``dedup_mode``, ``keep_by`` or ``target_pair_recall`` pass through).

    Examples
    --------
    >>> x = np.random.default_rng(2).standard_normal((1_000, 16)).astype(np.float32)
    >>> x[500:510] = x[:10]                      # ten exact copies
    >>> dups = pipeline.find_duplicates(x, threshold=0.999, verbose=False)
    >>> len(dups.kept_ids), dups.report.dedup.rows_dropped
    (990, 10)
    """
    with _job_folder(workdir) as folder:
        _write_input(folder, data, id_column=id_column, vector_column=vector_column)
        report = dedup(_in_memory_keys(folder, client, keys), threshold=threshold, metric=metric, verbose=verbose)
        groups = _read_parts(folder / "output" / "groups")
        pairs = _read_parts(folder / "output" / "pairs")
    kept = groups.filter(groups.column("is_kept")).column("id")
    return Duplicates(kept_ids=_ids(kept), groups=groups, pairs=pairs, report=report)


def knn_graph(
    data: Any,
    *,
    k: int = 10,
    metric: str = "cosine",
    id_column: str | None = None,
    vector_column: str | None = None,
    client: Any = None,
    workdir: str | os.PathLike[str] | None = None,
    verbose: bool = True,
    **keys: Any,
) -> Graph:
    """The k-NN graph of the rows of ``data`` as a scipy CSR array (the ``graph`` command in
    memory; keys such as ``graph_mode``, ``min_score`` and ``weight`` pass through).

    Examples
    --------
    >>> x = np.random.default_rng(3).standard_normal((1_000, 16)).astype(np.float32)
    >>> g = pipeline.knn_graph(x, k=4, metric="l2", graph_mode="directed", verbose=False)
    >>> g.matrix.shape, int(np.diff(g.matrix.indptr).max())
    ((1000, 1000), 4)
    """
    import scipy.sparse

    with _job_folder(workdir) as folder:
        _write_input(folder, data, id_column=id_column, vector_column=vector_column)
        report = graph(_in_memory_keys(folder, client, keys), k=k, metric=metric, verbose=verbose)
        matrix = scipy.sparse.csr_array(scipy.sparse.load_npz(folder / "output" / "graph.npz"))
        nodes = _read_parts(folder / "output" / "nodes")
    return Graph(matrix=matrix, ids=_ids(nodes.column("id")), report=report)


@contextlib.contextmanager
def _job_folder(workdir: str | os.PathLike[str] | None) -> Iterator[Path]:
    """The folder a call writes its input and outputs in: a new temporary one (removed after,
    made by this call), or a new subfolder of ``workdir`` (kept, for a look at the report)."""
    if workdir is None:
        folder = Path(tempfile.mkdtemp(prefix="knn-pipeline-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    base = Path(workdir)
    base.mkdir(parents=True, exist_ok=True)
    yield Path(tempfile.mkdtemp(prefix="knn-pipeline-", dir=base))


def _in_memory_keys(folder: Path, client: Any, keys: Mapping[str, Any]) -> dict[str, Any]:
    for fixed in ("input", "output", "id_column", "vector_column"):
        if fixed in keys:
            raise ConfigError(f"{fixed}: set by the in-memory API (give data, id_column and vector_column instead)")
    out = {**keys, "input": str(folder / "input"), "output": str(folder / "output")}
    out["id_column"], out["vector_column"] = "id", "embedding"
    if client is not None:
        address = getattr(getattr(client, "scheduler", None), "address", None)
        if not address:
            raise ConfigError("client: expected a distributed.Client connected to a scheduler")
        out["scheduler_address"] = address
    return out


def _write_input(folder: Path, data: Any, *, id_column: str | None, vector_column: str | None) -> None:
    """``data`` as ``folder/input/part-00000.parquet``: ``id`` and ``embedding`` (fixed-size lists)."""
    ids, vectors = _columns(data, id_column=id_column, vector_column=vector_column)
    table = pa.table({"id": ids, "embedding": vectors})
    out = folder / "input"
    out.mkdir(parents=True, exist_ok=True)
    row_bytes = max(1, vectors.type.list_size * vectors.type.value_type.bit_width // 8 + 16)
    pq.write_table(table, out / "part-00000.parquet", row_group_size=max(1, ROW_GROUP_BYTES // row_bytes))


def _columns(data: Any, *, id_column: str | None, vector_column: str | None) -> tuple[pa.Array, pa.Array]:
    """(ids, vectors as a fixed-size list array of float32 or float16) from any accepted input."""
    if isinstance(data, np.ndarray):
        if id_column is not None or vector_column is not None:
            raise InputError("data: a NumPy array has no columns; drop id_column and vector_column")
        return pa.array(np.arange(len(data), dtype=np.int64)), _vectors_of_array(data)
    table = _as_arrow(data)
    if vector_column is None:
        lists = [f.name for f in table.schema if _is_lists(f.type)]
        if len(lists) != 1:
            raise InputError(
                f"data: {len(lists)} columns of lists ({', '.join(lists) or 'none'}); "
                "name the vectors with vector_column"
            )
        vector_column = lists[0]
    if vector_column not in table.column_names:
        raise InputError(f"data: no column '{vector_column}'; columns are {', '.join(table.column_names)}")
    matrix = _matrix(table.column(vector_column).combine_chunks(), f"data, column '{vector_column}'")
    if id_column is None:
        id_column = "id" if "id" in table.column_names else None
    if id_column is None:
        ids: pa.Array = pa.array(np.arange(len(table), dtype=np.int64))
    elif id_column not in table.column_names:
        raise InputError(f"data: no column '{id_column}' (id_column); columns are {', '.join(table.column_names)}")
    else:
        ids = table.column(id_column).combine_chunks()
        if not (pa.types.is_integer(ids.type) or pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)):
            raise InputError(f"data, column '{id_column}': ids must be integers or strings, got {ids.type}")
    return ids, _vectors_of_array(matrix, where=f"data, column '{vector_column}'")


def _is_lists(typ: pa.DataType) -> bool:
    return bool(pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ))


def _matrix(vecs: pa.Array, where: str) -> np.ndarray:
    """Lists (or fixed-size lists) of numbers, all of one length, as a 2-D array."""
    if pa.types.is_fixed_size_list(vecs.type):
        dim = vecs.type.list_size
    elif pa.types.is_list(vecs.type) or pa.types.is_large_list(vecs.type):
        lengths = np.diff(np.asarray(vecs.offsets))
        dim = int(lengths[0]) if len(lengths) else 0
        if (lengths != dim).any():
            row = int(np.flatnonzero(lengths != dim)[0])
            raise InputError(
                f"{where}: row {row} has {int(lengths[row])} values, row 0 has {dim}; one dimension for all"
            )
    else:
        raise InputError(f"{where}: expected lists of numbers, got {vecs.type}")
    if vecs.null_count:
        row = int(np.flatnonzero(vecs.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{where}: row {row} has no vector (null); drop or fill it")
    values = vecs.flatten()
    if values.null_count:
        raise InputError(f"{where}: a vector holds null values; fill or drop it")
    return values.to_numpy(zero_copy_only=False).reshape(len(vecs), dim)


def _as_arrow(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if hasattr(data, "to_arrow") and type(data).__module__.startswith("polars"):
        return data.to_arrow()
    if type(data).__module__.startswith("pandas"):
        return pa.Table.from_pandas(data, preserve_index=False)
    raise InputError(
        f"data: expected a 2-D NumPy array, a pyarrow Table or a pandas/polars DataFrame, got {type(data).__name__}"
    )


def _vectors_of_array(x: Any, where: str = "data") -> pa.FixedSizeListArray:
    """A 2-D array of numbers as fixed-size lists: float16 kept, other floats and integers as float32."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{where}: expected a non-empty 2-D array (rows x dimensions), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise InputError(f"{where}: expected numbers, got dtype {x.dtype}")
    dtype = np.float16 if x.dtype == np.float16 else np.float32
    flat = np.ascontiguousarray(x, dtype=dtype).reshape(-1)
    bad = ~np.isfinite(flat.reshape(x.shape)).all(axis=1)
    if bad.any():
        raise InputError(f"{where}: row {int(np.flatnonzero(bad)[0])} holds NaN or inf; clean or drop it")
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), x.shape[1])


def _read_parts(directory: Path) -> pa.Table:
    parts = sorted(directory.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts]) if parts else pa.table({})


def _ids(column: Any) -> np.ndarray:
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_integer(array.type):
        return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.asarray(array.to_pylist(), dtype=object)


def _neighbors(table: pa.Table, k: int, report: JobReport) -> Neighbors:
    """The neighbour table as padded (n, k) arrays, in the input's row order."""
    query = table.column("query_id").combine_chunks()
    ids_lists = table.column("neighbor_id").combine_chunks()
    score_lists = table.column("score").combine_chunks()
    offsets = np.asarray(ids_lists.offsets)
    counts = np.diff(offsets)
    n = len(table)
    line = np.repeat(np.arange(n), counts)
    slot = np.arange(offsets[-1] - offsets[0]) - np.repeat(offsets[:-1] - offsets[0], counts)
    values = ids_lists.flatten()
    if pa.types.is_integer(values.type):
        nbr: np.ndarray = np.full((n, k), -1, dtype=np.int64)
        nbr[line, slot] = values.to_numpy(zero_copy_only=False)
    else:
        nbr = np.full((n, k), None, dtype=object)
        nbr[line, slot] = np.asarray(values.to_pylist(), dtype=object)
    scores = np.full((n, k), np.nan, dtype=np.float32)
    scores[line, slot] = score_lists.flatten().to_numpy(zero_copy_only=False)
    recall = report.recall.recall if report.recall is not None else None
    return Neighbors(
        query_ids=_ids(query),
        neighbor_ids=nbr,
        scores=scores,
        recall=recall,
        plan=f"{report.index.key}, nprobe {report.search.nprobe}, rerank {report.search.rerank}: {report.index.why}",
        report=report,
        table=table,
    )
