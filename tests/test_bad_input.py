"""Every kind of bad input gets one clear error naming the file, the column and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ConfigError, DeviceError, InputError, build, join, run
from pipeline.sample_data import clustered_vectors

DIM = 8


def write(path: Path, ids, vectors, vector_type=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    typ = vector_type or pa.list_(pa.float32(), DIM)
    id_array = pa.array(ids) if len(ids) else pa.array([], type=pa.int64())
    pq.write_table(pa.table({"id": id_array, "embedding": pa.array(vectors, type=typ)}), path)
    return path


def good_rows(n: int, start: int = 0, seed: int = 0) -> tuple[list[int], list[list[float]]]:
    x = clustered_vectors(n, DIM, clusters=4, seed=seed)
    return list(range(start, start + n)), [list(map(float, r)) for r in x]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path / "data"


def test_missing_column(make_config, data):
    write(data / "a.parquet", *good_rows(50))
    with pytest.raises(InputError, match=r"a\.parquet: column 'vec' not found .*--vector-column"):
        run(make_config(input=str(data), vector_column="vec"))


def test_mixed_fixed_dimensions_across_files(make_config, data):
    write(data / "a.parquet", *good_rows(50))
    ids, vecs = good_rows(50, start=50)
    write(data / "b.parquet", ids, [v[:4] for v in vecs], pa.list_(pa.float32(), 4))
    with pytest.raises(InputError, match=r"b\.parquet, column 'embedding': vectors have dimension 4 but 8 in .*a\.parquet"):
        run(make_config(input=str(data)))


def test_mixed_lengths_in_a_list_column(make_config, data):
    ids, vecs = good_rows(50)
    vecs[7] = vecs[7][:5]
    write(data / "a.parquet", ids, vecs, pa.list_(pa.float32()))
    with pytest.raises(InputError, match=r"a\.parquet \(row 7\), column 'embedding': vector of length 5"):
        run(make_config(input=str(data)))


def test_non_numeric_vectors(make_config, data):
    write(data / "a.parquet", [1, 2], [["a", "b"], ["c", "d"]], pa.list_(pa.string()))
    with pytest.raises(InputError, match=r"a\.parquet, column 'embedding': vector elements must be float16, float32 or float64, got string"):
        run(make_config(input=str(data)))


def test_integer_vectors_are_not_cast_silently(make_config, data):
    write(data / "a.parquet", [1, 2], [[1] * DIM, [2] * DIM], pa.list_(pa.int32(), DIM))
    with pytest.raises(InputError, match="cast them to float32 first"):
        run(make_config(input=str(data)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf(make_config, data, bad):
    ids, vecs = good_rows(60)
    vecs[42][3] = bad
    write(data / "a.parquet", ids, vecs)
    with pytest.raises(InputError, match=r"a\.parquet \(row 42\), column 'embedding': 1 vector\(s\) .* NaN or inf"):
        run(make_config(input=str(data)))


@pytest.mark.parametrize("column, row, message", [("embedding", 5, "null vector"), ("id", 9, "null id")])
def test_null_vector_or_id(make_config, data, column, row, message):
    ids, vecs = good_rows(20)
    (vecs if column == "embedding" else ids)[row] = None
    write(data / "a.parquet", ids, vecs)
    with pytest.raises(InputError, match=rf"a\.parquet \(row {row}\), column '{column}': {message}"):
        run(make_config(input=str(data)))


def test_duplicate_ids_across_files(make_config, data, tmp_path):
    write(data / "a.parquet", *good_rows(40))
    write(data / "b.parquet", *good_rows(40, start=30, seed=1))  # ids 30..39 repeat
    with pytest.raises(InputError, match=r"column 'id': duplicate ids, e\.g\. 3\d at a\.parquet row 3\d and b\.parquet row \d"):
        run(make_config(input=str(data)))
    assert not (tmp_path / "out" / "index" / "index.faiss").exists()


def test_duplicate_string_ids(make_config, data):
    ids, vecs = good_rows(30)
    sids = [f"doc-{i}" for i in ids]
    sids[20] = "doc-3"
    write(data / "a.parquet", sids, vecs)
    with pytest.raises(InputError, match=r"duplicate ids, e\.g\. 'doc-3' at a\.parquet row 3 and a\.parquet row 20"):
        run(make_config(input=str(data)))


def test_zero_vector_under_cosine(make_config, data):
    ids, vecs = good_rows(20)
    vecs[4] = [0.0] * DIM
    write(data / "a.parquet", ids, vecs)
    with pytest.raises(InputError, match=r"a\.parquet .*all-zero vector.*--metric l2 or ip"):
        run(make_config(input=str(data)))


def test_empty_dataset(make_config, data):
    write(data / "a.parquet", [], [])
    with pytest.raises(InputError, match="the input holds no rows"):
        run(make_config(input=str(data)))


def test_empty_shard_is_skipped(make_config, data, caplog):
    write(data / "a.parquet", [], [])
    write(data / "b.parquet", *good_rows(30))
    with caplog.at_level("WARNING", logger="pipeline"):
        report = run(make_config(input=str(data), k=2, index_key="Flat"))
    assert report["queries"] == 30 and "a.parquet holds no rows" in caplog.text


def test_not_a_parquet_file(make_config, data):
    write(data / "a.parquet", *good_rows(20))
    (data / "b.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(InputError, match=r"b\.parquet: not a readable Parquet file"):
        run(make_config(input=str(data)))


def test_truncated_parquet_file(make_config, data):
    path = write(data / "a.parquet", *good_rows(200))
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(InputError, match=r"a\.parquet: not a readable Parquet file"):
        run(make_config(input=str(data)))


def test_missing_input(make_config, tmp_path):
    with pytest.raises(InputError, match="no such file or directory; check --input"):
        run(make_config(input=str(tmp_path / "nowhere")))


def test_k_larger_than_index(make_config, data, tmp_path):
    write(data / "a.parquet", *good_rows(20))
    with pytest.raises(ConfigError, match=r"--k 20 \(\+1 for --exclude-self\) asks for more neighbours than the 20 vectors"):
        run(make_config(input=str(data), k=20, exclude_self=True))
    assert not (tmp_path / "out" / "index" / "store").exists()  # refused before the scan


def test_nprobe_larger_than_nlist(make_config, dataset_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"--nprobe 64 is larger than the 32 lists of 'IVF32,Flat'; use at most 32"):
        run(make_config(input=str(dataset_dir), index_key="IVF32,Flat", nprobe=64))
    assert not (tmp_path / "out" / "index" / "store").exists()


def test_sample_too_small_to_train(make_config, dataset_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"training sample has 6000 rows, too few to train 'IVF1024,Flat' .*IVF128"):
        run(make_config(input=str(dataset_dir), index_key="IVF1024,Flat"))
    with pytest.raises(ConfigError, match=r"training sample has 500 rows.*raise --sample-size"):
        run(make_config(input=str(dataset_dir), index_key="IVF64,Flat", sample_size=500))
    assert not (tmp_path / "out" / "index" / "store").exists()


def test_bad_index_key(make_config, dataset_dir):
    with pytest.raises(ConfigError, match=r"index_key 'IVF,Nonsense' is not a FAISS index_factory string"):
        run(make_config(input=str(dataset_dir), index_key="IVF,Nonsense"))


def test_query_dimension_differs_from_index(make_config, dataset_dir, tmp_path):
    build(make_config(input=str(dataset_dir), index_dir=str(tmp_path / "idx"), index_key="Flat"))
    write(tmp_path / "q" / "q.parquet", *good_rows(10))
    with pytest.raises(InputError, match=r"q\.parquet, column 'embedding': query vectors have dimension 8 but the index holds dimension 32"):
        join(make_config(input=str(tmp_path / "q"), index_dir=str(tmp_path / "idx")))


def test_join_without_index(make_config, dataset_dir, tmp_path):
    with pytest.raises(Exception, match=r"no finished index here; run `build`"):
        join(make_config(input=str(dataset_dir), index_dir=str(tmp_path / "none")))


def test_gpu_requested_without_gpu(make_config, dataset_dir):
    from pipeline.backends import gpu_count

    if gpu_count():
        pytest.skip("a GPU is present")
    with pytest.raises(DeviceError, match=r"--device gpu: this faiss (is a CPU-only build|build has GPU support but "
                                          r"sees no CUDA device).*--device cpu"):
        run(make_config(input=str(dataset_dir), device="gpu"))


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    write(tmp_path / "d" / "a.parquet", *good_rows(20))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--input", str(tmp_path / "d"), "--output", str(tmp_path / "o"),
         "--vector-column", "vec"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "column 'vec' not found" in errors[0]
