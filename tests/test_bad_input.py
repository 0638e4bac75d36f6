"""Every kind of bad input gets one clear error naming the file, the column and the fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import ConfigError, DeviceError, InputError, build, join, run
from pipeline.io.sample_data import clustered_vectors

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
    with pytest.raises(
        InputError, match=r"b\.parquet, column 'embedding': vectors have dimension 4 but 8 in .*a\.parquet"
    ):
        run(make_config(input=str(data)))


def test_mixed_lengths_in_a_list_column(make_config, data):
    ids, vecs = good_rows(50)
    vecs[7] = vecs[7][:5]
    write(data / "a.parquet", ids, vecs, pa.list_(pa.float32()))
    with pytest.raises(InputError, match=r"a\.parquet \(row 7\), column 'embedding': vector of length 5"):
        run(make_config(input=str(data)))


def test_non_numeric_vectors(make_config, data):
    write(data / "a.parquet", [1, 2], [["a", "b"], ["c", "d"]], pa.list_(pa.string()))
    with pytest.raises(
        InputError,
        match=r"a\.parquet, column 'embedding': vector elements must be float16, float32 or float64, got string",
    ):
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
    with pytest.raises(
        InputError, match=r"column 'id': duplicate ids, e\.g\. 3\d at a\.parquet row 3\d and b\.parquet row \d"
    ):
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
    assert report.queries == 30 and "a.parquet holds no rows" in caplog.text


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
    with pytest.raises(
        ConfigError, match=r"--k 20 \(\+1 for --exclude-self\) asks for more neighbours than the 20 vectors"
    ):
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
    with pytest.raises(
        InputError,
        match=r"q\.parquet, column 'embedding': query vectors have dimension 8 but the index holds dimension 32",
    ):
        join(make_config(input=str(tmp_path / "q"), index_dir=str(tmp_path / "idx")))


def test_join_without_index(make_config, dataset_dir, tmp_path):
    with pytest.raises(Exception, match=r"no finished index here; run `build`"):
        join(make_config(input=str(dataset_dir), index_dir=str(tmp_path / "none")))


def test_gpu_requested_without_gpu(make_config, dataset_dir):
    from pipeline.backends import gpu_count

    if gpu_count():
        pytest.skip("a GPU is present")
    with pytest.raises(
        DeviceError,
        match=r"--device gpu: Dask worker \S+ on \S+ has no usable GPU \(this faiss "
        r"(is a CPU-only build|build has GPU support but sees no CUDA device).*\), "
        r"nor do 1 other worker\(s\); .*--device auto or cpu",
    ):
        run(make_config(input=str(dataset_dir), device="gpu"))


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    write(tmp_path / "d" / "a.parquet", *good_rows(20))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "--input",
            str(tmp_path / "d"),
            "--output",
            str(tmp_path / "o"),
            "--vector-column",
            "vec",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "column 'vec' not found" in errors[0]


# ---- issue 12: overflow, id types, skipped files, zero dimensions, forged names, footers -------------
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_vectors_whose_scores_would_overflow_are_refused(make_config, data, metric):
    ids, vecs = good_rows(60)
    vecs[17] = [1e20] * DIM
    write(data / "a.parquet", ids, vecs)
    with pytest.raises(
        InputError,
        match=rf"a\.parquet \(row 17\), column 'embedding': vector norm 2\.83e\+20 .*"
        rf"overflow float32 {metric} scores .*rescale the vectors",
    ):
        run(make_config(input=str(data), metric=metric))


def test_huge_vectors_are_fine_under_cosine(make_config, data):
    ids, vecs = good_rows(60)
    vecs[17] = [v * 1e30 for v in vecs[3]]  # the same direction as row 3, at 1e30 scale
    write(data / "a.parquet", ids, vecs)
    run(make_config(input=str(data), metric="cosine", k=2, index_key="Flat", exclude_self=True))
    table = pq.read_table(data.parent / "out" / "neighbors").to_pylist()
    row = next(r for r in table if r["query_id"] == 17)
    assert row["neighbor_id"][0] == 3 and row["score"][0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "types, unified",
    [
        ((pa.int32(), pa.int64()), pa.int64()),
        ((pa.int16(), pa.uint8()), pa.int16()),
        ((pa.string(), pa.large_string()), pa.large_string()),
    ],
)
def test_compatible_id_types_across_shards_are_unified(make_config, data, types, unified):
    data.mkdir()
    for i, typ in enumerate(types):
        ids, vecs = good_rows(40, start=40 * i, seed=i)
        id_array = pa.array(
            [str(x) for x in ids] if pa.types.is_string(typ) or pa.types.is_large_string(typ) else ids, type=typ
        )
        pq.write_table(
            pa.table({"id": id_array, "embedding": pa.array(vecs, type=pa.list_(pa.float32(), DIM))}),
            data / f"p{i}.parquet",
        )
    report = run(make_config(input=str(data), k=2, index_key="Flat"))
    table = pq.read_table(data.parent / "out" / "neighbors")
    assert report.queries == 80 and table.schema.field("query_id").type == unified


@pytest.mark.parametrize(
    "types, message",
    [
        ((pa.int64(), pa.uint64()), r"ids are uint64 here but int64 in .*, and not every uint64 fits int64"),
        ((pa.int64(), pa.string()), r"ids are strings here but integers \(int64\) in "),
    ],
)
def test_incompatible_id_types_are_refused_at_plan_time(data, types, message):
    from pipeline.io.parquet import plan_dataset

    data.mkdir()
    for i, typ in enumerate(types):
        ids, vecs = good_rows(10, start=10 * i)
        id_array = pa.array([str(x) for x in ids] if pa.types.is_string(typ) else ids, type=typ)
        pq.write_table(
            pa.table({"id": id_array, "embedding": pa.array(vecs, type=pa.list_(pa.float32(), DIM))}),
            data / f"p{i}.parquet",
        )
    with pytest.raises(InputError, match=rf"p1\.parquet, column 'id': {message}"):
        plan_dataset([str(data)], "id", "embedding", 1 << 20)


def test_symlinked_dirs_and_upper_case_names_are_read_and_skips_are_named(data, tmp_path, caplog):
    from pipeline.io.parquet import resolve_paths

    write(data / "a.parquet", *good_rows(10))
    write(data / "B.PARQUET", *good_rows(10, start=10))
    other = write(tmp_path / "elsewhere" / "c.parquet", *good_rows(10, start=20)).parent
    (data / "linked").symlink_to(other, target_is_directory=True)
    (data / "loop").symlink_to(data, target_is_directory=True)  # a cycle: visited once
    (data / "broken.parquet").symlink_to(tmp_path / "gone.parquet")
    write(data / "_old.parquet", *good_rows(10, start=30))
    with caplog.at_level("WARNING", logger="pipeline"):
        found = resolve_paths([str(data)])
    assert [Path(f).name for f in found] == ["B.PARQUET", "a.parquet", "c.parquet"]
    assert "broken.parquet: skipped, a broken symbolic link" in caplog.text
    assert "_old.parquet: skipped (names starting with '.' or '_'" in caplog.text
    assert "symlink loop" in caplog.text


def test_zero_dimension_vectors_are_refused_for_every_metric(data):
    from pipeline.io.parquet import plan_dataset, read_piece

    write(data / "a.parquet", [1, 2], [[], []], pa.list_(pa.float32(), 0))
    with pytest.raises(InputError, match=r"a\.parquet, column 'embedding': vectors have dimension 0"):
        plan_dataset([str(data)], "id", "embedding", 1 << 20)
    write(data / "a.parquet", [1, 2], [[], []], pa.list_(pa.float32()))
    ds = plan_dataset([str(data)], "id", "embedding", 1 << 20)
    with pytest.raises(InputError, match=r"a\.parquet \(row 0\), column 'embedding': empty vector \(dimension 0\)"):
        read_piece(ds.pieces[0], "id", "embedding", ds.dim)


def test_a_file_name_with_a_newline_cannot_forge_a_log_line(tmp_path):
    d = tmp_path / "d"
    write(d / "x.parquet\n12:00:00 INFO done: all good.parquet", *good_rows(20))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            "--input",
            str(d),
            "--output",
            str(tmp_path / "o"),
            "--vector-column",
            "vec",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert not any(line.startswith("12:00:00 INFO done") for line in proc.stderr.splitlines())
    assert "x.parquet\\n12:00:00 INFO done: all good.parquet: column 'vec' not found" in proc.stderr


def test_rewritten_input_with_the_same_size_and_mtime_is_noticed(make_config, data, caplog):
    def plain(vecs) -> None:  # uncompressed, no dictionary: a changed value keeps the file size
        table = pa.table({"id": pa.array(range(50)), "embedding": pa.array(vecs, type=pa.list_(pa.float32(), DIM))})
        pq.write_table(table, path, compression="none", use_dictionary=False)

    _, vecs = good_rows(50)
    data.mkdir()
    path = data / "a.parquet"
    plain(vecs)
    run(make_config(input=str(data), k=2, index_key="Flat"))
    st = path.stat()
    vecs[7][0] = 99.0  # one element edited in place: the statistics in the footer change
    plain(vecs)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level("INFO", logger="pipeline"):
        run(make_config(input=str(data), k=2, index_key="Flat"))  # an update: the rewritten file is read again
    assert "1 file rewritten (50 rows)" in caplog.text and "a.parquet" in caplog.text
    vectors = list((Path(make_config().output) / "index" / "store" / "vectors").glob("*.npy"))
    assert len(vectors) == 1 and np.load(vectors[0])[7, 0] > 0.9  # the old piece gone; the edited row (normalised)


def test_join_string_queries_against_integer_index_with_exclude_self(make_config, dataset_dir, tmp_path):
    build(make_config(input=str(dataset_dir), index_dir=str(tmp_path / "idx"), index_key="Flat"))
    x = clustered_vectors(10, 32, clusters=2, seed=5)
    q = tmp_path / "q"
    q.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": [f"q{i}" for i in range(10)],
                "embedding": pa.array(list(map(list, x)), type=pa.list_(pa.float32(), 32)),
            }
        ),
        q / "q.parquet",
    )
    with pytest.raises(
        InputError,
        match=r"q\.parquet, column 'id': query ids are strings but the index .* holds int "
        r"ids, so --exclude-self could never match",
    ):
        join(make_config(input=str(q), index_dir=str(tmp_path / "idx"), exclude_self=True))


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_the_rerun_recovers(tmp_path):
    import resource
    import signal

    d = tmp_path / "d"
    write(d / "a.parquet", *good_rows(3000))

    def small_files() -> None:  # writes past 20 kB fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        str(d),
        "--output",
        str(tmp_path / "o"),
        "--k",
        "2",
        "--index-key",
        "Flat",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Compute Failed" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and re.search(
        r"o/index/store/vectors/part-00000\.npy: cannot be written .*file-size "
        r"limit .*run the same command again to resume",
        errors[0],
    )
    assert subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    assert pq.read_table(tmp_path / "o" / "neighbors").num_rows == 3000
