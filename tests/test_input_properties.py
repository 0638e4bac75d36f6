"""Property: any small Parquet input either joins with every row exactly once, or exits 2 with one
error line naming the file; never a traceback, never a hang.

Hypothesis draws the inputs: schemas, vector types and layouts, id types, nulls, NaN/inf, huge
values, ragged lists, zero vectors, duplicate ids, empty files and row groups, files that are not
Parquet. The command line runs in this process, on the session's Dask cluster.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from pipeline.config import parse_config

CI = bool(os.environ.get("CI"))
ID_TYPES = [pa.int64(), pa.int32(), pa.uint64(), pa.string(), pa.large_string()]
ELEMENTS = [pa.float16(), pa.float32(), pa.float64(), pa.int32()]
FLAWS = ["none", "null_id", "null_vector", "null_element", "nan", "inf", "ragged", "huge", "zero", "duplicate_id"]


@dataclass(frozen=True)
class FileSpec:
    rows: int
    row_group: int
    id_type: pa.DataType
    element: pa.DataType
    layout: str  # fixed | list | large_list
    dim: int
    flaw: str
    flaw_row: int
    column: str  # the vector column's name (another name: the column is missing)
    garbage: bool  # not Parquet at all


@st.composite
def inputs(draw: Any) -> tuple[list[FileSpec], str, int]:
    shared_id = draw(st.sampled_from(ID_TYPES))
    shared_element = draw(st.sampled_from(ELEMENTS[:3]))
    shared_dim = draw(st.integers(1, 5))
    layout = draw(st.sampled_from(["fixed", "list", "large_list"]))
    files = []
    for _ in range(draw(st.integers(1, 3))):
        odd = draw(st.booleans()) and draw(st.booleans())  # a quarter of the files stray from the shared schema
        rows = draw(st.integers(0, 12))
        files.append(
            FileSpec(
                rows=rows,
                row_group=draw(st.integers(1, 6)),
                id_type=draw(st.sampled_from(ID_TYPES)) if odd else shared_id,
                element=draw(st.sampled_from(ELEMENTS)) if odd else shared_element,
                layout=draw(st.sampled_from(["fixed", "list", "large_list"])) if odd else layout,
                dim=draw(st.integers(0, 5)) if odd else shared_dim,
                flaw=draw(st.sampled_from(FLAWS)) if draw(st.booleans()) else "none",
                flaw_row=draw(st.integers(0, max(rows - 1, 0))),
                column="embedding" if not odd or draw(st.booleans()) else "vector",
                garbage=odd and draw(st.integers(0, 5)) == 0,
            )
        )
    return files, draw(st.sampled_from(["l2", "ip", "cosine"])), draw(st.integers(0, 2**16))


def write_file(path: Path, spec: FileSpec, first_id: int, rng: np.random.Generator) -> list[Any]:
    """Write one drawn file; return the ids it holds."""
    if spec.garbage:
        path.write_bytes(b"PAR1 but not really" * 3)
        return []
    n, d = spec.rows, spec.dim
    x = rng.standard_normal((n, d)).astype(np.float64)
    ids: list[Any] = list(range(first_id, first_id + n))
    vectors: list[Any] = [list(map(float, row)) for row in x]
    r = spec.flaw_row
    if n:
        if spec.flaw == "null_id":
            ids[r] = None
        elif spec.flaw == "null_vector":
            vectors[r] = None
        elif spec.flaw == "null_element" and d:
            vectors[r][0] = None
        elif spec.flaw in ("nan", "inf") and d:
            vectors[r][0] = float(spec.flaw)
        elif spec.flaw == "ragged" and spec.layout != "fixed":
            vectors[r] = vectors[r] + [1.0]
        elif spec.flaw == "huge" and d:
            vectors[r] = [1e20] * d
        elif spec.flaw == "zero":
            vectors[r] = [0.0] * d
        elif spec.flaw == "duplicate_id":
            ids[r] = first_id - 1 if first_id else first_id + (1 if n > 1 else 0)
    stringly = pa.types.is_string(spec.id_type) or pa.types.is_large_string(spec.id_type)
    id_values = [None if i is None else (f"id-{i}" if stringly else i) for i in ids]
    if pa.types.is_integer(spec.element):
        vectors = [
            None
            if v is None
            else [None if e is None else int(np.clip(e, -1e9, 1e9)) if np.isfinite(e) else 0 for e in v]
            for v in vectors
        ]
    list_type = {"fixed": lambda e: pa.list_(e, d), "list": pa.list_, "large_list": pa.large_list}[spec.layout]
    try:
        vec_array = pa.array(vectors, type=list_type(spec.element))
    except (pa.ArrowInvalid, OverflowError):  # e.g. a ragged row in a fixed-size list: write it as a plain list
        vec_array = pa.array(vectors, type=pa.list_(spec.element))
    table = pa.table({"id": pa.array(id_values, type=spec.id_type), spec.column: vec_array})
    pq.write_table(table, path, row_group_size=spec.row_group)
    return [v for v in id_values if v is not None]


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang("the run took over 90 s")


# CI runs one fixed set of examples (reproducible); elsewhere each run explores new ones
@settings(
    max_examples=80,
    deadline=None,
    derandomize=CI,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=inputs())
# found by this test: two float16 rows whose k-th scores tie, which broke the report's histogram
@example(drawn=([FileSpec(2, 1, pa.int64(), pa.float16(), "fixed", 2, "none", 0, "embedding", False)], "cosine", 0))
def test_any_input_joins_every_row_once_or_fails_in_one_line_naming_the_file(dask_address, drawn):
    files, metric, seed = drawn
    rng = np.random.default_rng(seed)
    # a failed job cancels its tasks, but one already running on the shared cluster may still finish
    # a (hidden, atomic) temp file after main() returns; the next run removes such files
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        data.mkdir()
        written: list[Any] = []
        names = []
        for i, spec in enumerate(files):
            name = f"shard-{i}.parquet"
            written += write_file(data / name, spec, 100 * i, rng)
            names.append(name)
        argv = [
            "run",
            "--input",
            str(data),
            "--output",
            str(out),
            "--metric",
            metric,
            "--k",
            "1",
            "--scheduler-address",
            dask_address,
            "--threads-per-worker",
            "1",
            "--recall-queries",
            "20",
            "-q",
        ]
        err = io.StringIO()
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(90)
        try:
            with contextlib.redirect_stderr(err):
                code = main(argv)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        lines = err.getvalue().splitlines()
        errors = [line for line in lines if " ERROR " in line]
        if code == 0:
            table = pq.read_table(out / "neighbors")
            assert sorted(table.column("query_id").to_pylist(), key=str) == sorted(written, key=str)
            assert not errors
        else:
            assert code == 2, err.getvalue()
            assert len(errors) == 1, err.getvalue()
            assert any(name in errors[0] for name in names) or str(data) in errors[0], errors[0]
        assert "Traceback" not in err.getvalue()


def test_config_values_never_raise_anything_but_a_config_error() -> None:
    """Every YAML-like value for every key is parsed or refused with ConfigError, never a traceback."""
    from hypothesis import given as given_

    from pipeline.config import KEYS, PROFILE_FIELDS
    from pipeline.errors import ConfigError

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=12),
        st.sampled_from(["auto", "off", "1e999", "-1", "0", "128MiB", "inf", "nan", "[x]"]),
    )
    values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=6,
    )

    @settings(max_examples=300, deadline=None, derandomize=CI)
    @given_(
        key=st.sampled_from(sorted(KEYS) + ["profiles"]), field=st.sampled_from(sorted(PROFILE_FIELDS)), value=values
    )
    def check(key: str, field: str, value: Any) -> None:
        raw = (
            {"profile": "x", "profiles": {"x": {"kind": "slurm", field: value}}} if key == "profiles" else {key: value}
        )
        try:
            parse_config(raw)
        except ConfigError as exc:
            assert "\n" not in str(exc) or "\\n" in repr(value) or "\n" in repr(value)

    check()
