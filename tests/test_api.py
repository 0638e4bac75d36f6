"""The Python API: the commands as functions of keyword arguments, and the in-memory jobs over
NumPy arrays, pyarrow Tables and pandas/polars DataFrames, checked against brute force."""

from __future__ import annotations

import doctest

import numpy as np
import pyarrow as pa
import pytest

import pipeline
from pipeline import ConfigError, InputError, PipelineError

pytestmark = pytest.mark.slow  # every test here runs a whole job

ROWS, DIM = 1_500, 24


def _vectors(seed: int = 0, rows: int = ROWS, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim))
    return (centres[rng.integers(0, 12, rows)] + 0.4 * rng.standard_normal((rows, dim))).astype(np.float32)


def _brute_l2(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d, order, axis=1)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_knn_of_a_numpy_array_is_exact_search_in_row_order(dtype):
    x = _vectors().astype(dtype)
    found = pipeline.knn(x, k=6, metric="l2", exclude_self=True, verbose=False)
    truth, dist = _brute_l2(x.astype(np.float32), 6)
    assert found.neighbor_ids.shape == (ROWS, 6) and found.neighbor_ids.dtype == np.int64
    assert np.array_equal(found.query_ids, np.arange(ROWS))
    # the exact plan below 20k rows: the same neighbours up to ties, the same distances
    np.testing.assert_allclose(found.scores, dist, rtol=1e-3, atol=1e-3)
    assert (found.neighbor_ids == truth).mean() > 0.99
    assert found.recall is not None and found.recall >= 0.95
    assert "Flat" in found.plan
    table = found.to_arrow()
    assert table.column_names == ["query_id", "neighbor_id", "score"] and len(table) == ROWS


def test_knn_through_an_ivf_index_meets_its_recall_target():
    x = _vectors(1, rows=4_000)
    found = pipeline.knn(x, k=5, metric="cosine", index_key="IVF32,Flat", verbose=False)
    assert found.report.recall is not None and found.report.recall.target == 0.95
    assert found.recall is not None and found.recall >= 0.95
    assert not (found.neighbor_ids == np.arange(4_000)[:, None]).any()  # exclude_self by default
    assert found.plan.startswith("IVF32,Flat, nprobe ")


def test_knn_of_a_pyarrow_table_keeps_its_string_ids():
    x = _vectors(2)
    ids = [f"doc-{i:05d}" for i in range(ROWS)]
    table = pa.table({"doc_id": ids, "vec": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), DIM)})
    found = pipeline.knn(table, k=4, metric="l2", id_column="doc_id", verbose=False)
    truth, _ = _brute_l2(x, 4)
    assert list(found.query_ids[:3]) == ids[:3] and found.neighbor_ids.dtype == object
    expected = np.asarray(ids, dtype=object)[truth]
    assert (found.neighbor_ids == expected).mean() > 0.99


def test_knn_of_pandas_and_polars_frames():
    pd = pytest.importorskip("pandas")
    pl = pytest.importorskip("polars")
    x = _vectors(3)
    ids = np.arange(10_000, 10_000 + ROWS)
    frame = pd.DataFrame({"id": ids, "embedding": list(x)})
    got_pandas = pipeline.knn(frame, k=3, metric="l2", verbose=False)
    got_polars = pipeline.knn(pl.DataFrame({"key": ids, "emb": x.tolist()}), k=3, metric="l2", id_column="key")
    truth, _ = _brute_l2(x, 3)
    for got in (got_pandas, got_polars):
        assert np.array_equal(got.query_ids, ids)
        assert (got.neighbor_ids == ids[truth]).mean() > 0.99


def test_find_duplicates_and_knn_graph_in_memory():
    x = _vectors(4, rows=1_000)
    x[500:520] = x[:20]  # twenty exact copies
    dups = pipeline.find_duplicates(x, threshold=0.9999, verbose=False)
    assert dups.report.dedup is not None and dups.report.dedup.rows_dropped == 20
    assert len(dups.kept_ids) == 980 and not set(range(500, 520)) & set(dups.kept_ids.tolist())
    assert dups.groups.num_rows == 1_000 and dups.pairs.num_rows == 20
    graph = pipeline.knn_graph(x, k=4, metric="l2", graph_mode="directed", verbose=False)
    assert graph.matrix.shape == (1_000, 1_000) and (np.diff(graph.matrix.indptr) == 4).all()
    assert np.array_equal(graph.ids, np.arange(1_000))


def test_the_job_functions_take_keys_a_mapping_or_a_config(tmp_path):
    from pipeline.io.sample_data import clustered_vectors, write_shards

    write_shards(str(tmp_path / "data"), clustered_vectors(3_000, 16, seed=5), shards=2)
    keys = {"input": tmp_path / "data", "k": 4, "metric": "l2", "workers": 1}
    by_keys = pipeline.run(output=tmp_path / "a", verbose=False, **keys)
    by_mapping = pipeline.run({**keys, "output": str(tmp_path / "b")}, verbose=False)
    config = pipeline.parse_config(
        {**{k: str(v) if k == "input" else v for k, v in keys.items()}, "output": str(tmp_path / "c")}
    )
    by_config = pipeline.run(config, verbose=False)
    assert by_keys.recall is not None and by_keys.recall.recall == by_mapping.recall.recall == by_config.recall.recall
    with pytest.raises(ConfigError, match="pass a Config or keyword arguments, not both"):
        pipeline.run(config, k=5)


@pytest.mark.parametrize(
    "data, keys, error, message",
    [
        (np.zeros(10, np.float32), {}, InputError, r"expected a non-empty 2-D array .* shape \(10,\)"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), {}, InputError, "row 0 holds NaN or inf"),
        (np.array([["a", "b"]]), {}, InputError, "expected numbers, got dtype <U1"),
        ({"x": 1}, {}, InputError, "expected a 2-D NumPy array, a pyarrow Table or a pandas/polars DataFrame"),
        (pa.table({"a": [[1.0, 2.0], [1.0]]}), {}, InputError, "row 1 has 1 values, row 0 has 2"),
        (pa.table({"a": [1, 2]}), {}, InputError, "0 columns of lists"),
        (np.ones((5, 2), np.float32), {"input": "x/"}, ConfigError, "input: set by the in-memory API"),
        (np.ones((5, 2), np.float32), {"k": 0}, ConfigError, "k"),
    ],
)
def test_bad_input_is_a_pipeline_error_naming_the_fix(data, keys, error, message):
    with pytest.raises(error, match=message) as caught:
        pipeline.knn(data, verbose=False, **keys)
    assert isinstance(caught.value, PipelineError)
    assert len(str(caught.value)) < 300  # one line, never the whole array


def test_the_api_examples_run():
    """The docstrings' examples (doctest) run against the real jobs."""
    from pipeline import api

    failed, tried = doctest.testmod(api, extraglobs={"pipeline": pipeline, "np": np}, optionflags=doctest.ELLIPSIS)
    assert tried >= 8 and failed == 0
