"""Config: YAML keys equal flag names, flags override the file, bad values are refused clearly."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import ConfigError, load_config, parse_config
from pipeline.cli import build_parser
from pipeline.config import KEYS, dump_config


def test_yaml_then_flags(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(
        "input: data/\nk: 7\nmetric: l2\nindex_key: IVF64,PQ8\nnprobe: 4\nexclude_self: true\npartition_size: 64MiB\n"
    )
    config = load_config(cfg, {"k": "12", "nprobe": None, "exclude_self": None})
    assert config.search.k == 12  # flag wins
    assert config.search.nprobe == 4 and config.search.exclude_self  # unset flags keep the file's
    assert config.index.metric == "l2" and config.index.key == "IVF64,PQ8"
    assert config.partition_bytes == 64 * 2**20
    assert config.data.paths == (str(tmp_path / "data"),)  # relative to the file


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


def test_each_command_lists_its_own_flags_grouped_with_defaults():
    run_help, dedup_help, submit_help = _help("run"), _help("dedup"), _help("submit")
    assert "--threshold" not in run_help and "--graph-mode" not in run_help and "--threshold" in dedup_help
    assert all("--" + key.replace("_", "-") in submit_help for key in KEYS)  # submit forwards every key
    for group in ("input:", "index:", "search:", "output:", "cluster:"):
        assert f"\n{group}\n" in run_help
    assert "(default: 0.95)" in run_help and "one of: l2, ip, cosine" in run_help
    assert "--index-key" not in _help("join") and "--input" not in _help("evaluate")
    assert "rows to generate (default: 50000)" in _help("sample-data")


def test_version():
    from pipeline import __version__

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert out.getvalue().strip().endswith(__version__)


def test_dumped_config_loads_back(tmp_path):
    inputs = [str(tmp_path / "a"), str(tmp_path / "b")]
    config = parse_config({"input": inputs, "k": 3, "rerank": 0, "memory_limit": "2GiB", "exclude_self": True})
    (tmp_path / "c.yaml").write_text(dump_config(config))
    assert load_config(tmp_path / "c.yaml", {}) == config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"kk": 3}, r"unknown key 'kk'; did you mean 'k'\?"),
        ({"k": 0}, r"k: must be >= 1, got 0"),
        ({"k": "ten"}, r"k: expected an integer, got 'ten'"),
        ({"k": 2.5}, r"k: expected an integer, got 2.5"),
        ({"metric": "dot"}, r"metric: expected one of l2, ip, cosine; got 'dot'"),
        ({"device": "tpu"}, r"device: expected one of auto, cpu, gpu"),
        ({"exclude_self": "maybe"}, r"exclude_self: expected true or false"),
        ({"partition_size": "lots"}, r"partition_size: expected a size such as '128MiB'"),
        ({"memory_limit": "-1"}, r"memory_limit"),
        ({"rerank": -1}, r"rerank: must be >= 0"),
    ],
)
def test_bad_values(values, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(values)


def test_auto_values():
    config = parse_config({"nprobe": "auto", "rerank": "auto", "workers": "auto", "index_key": "AUTO"})
    assert config.search.nprobe is None and config.search.rerank is None and config.cluster.workers is None
    assert config.index.key == "auto"


def test_yaml_must_be_a_mapping(tmp_path):
    (tmp_path / "c.yaml").write_text("- k\n- 3\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "c.yaml", {})


def test_yaml_is_loaded_safely(tmp_path):
    (tmp_path / "c.yaml").write_text("k: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml", {})


def test_cli_run_with_config_file_and_embedded_cluster(tmp_path, dataset_dir):
    """The user's path: a YAML file, a flag on top, the tool's own LocalCluster."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {dataset_dir}\noutput: {tmp_path / 'out'}\nk: 3\nexclude_self: true\nindex_key: Flat\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(cfg), "--k", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "local Dask cluster: " in proc.stderr and "dashboard http" in proc.stderr
    assert "join: 6,000/6,000 rows (100%)" in proc.stderr and "rows/s" in proc.stderr
    table = pq.read_table(tmp_path / "out" / "neighbors")
    assert len(table) == 6000 and all(len(n) == 4 for n in table.column("neighbor_id").to_pylist())


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_configs_load(path):
    config = load_config(path, {})
    assert config.output or config.index_dir  # the rest (input for join.yaml) may come as flags


def test_dump_and_parse_round_trip_keeps_a_target_turned_off():
    from pipeline.config import dump_config, parse_config

    for extra in ({"target_recall": "off", "recall_queries": 0}, {"target_recall": 0.9}, {}):
        config = parse_config({"input": "data/", "output": "out", **extra})
        assert parse_config(yaml.safe_load(dump_config(config))) == config


def test_sample_data_refuses_a_non_empty_directory(tmp_path, capsys):
    """Old shards would mix with the new ones (the next run then fails on dimensions): refused,
    nothing there touched; a new directory works."""
    from pipeline.cli import main

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part-00000.parquet").write_bytes(b"old")
    assert main(["sample-data", str(tmp_path / "d"), "--rows", "100", "--dim", "8"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "d" / "part-00000.parquet").read_bytes() == b"old"
    assert main(["sample-data", str(tmp_path / "e"), "--rows", "100", "--dim", "8", "-q"]) == 0
    assert len(list((tmp_path / "e").glob("part-*.parquet"))) == 4
    # the README's first command, run twice: the same sample is already there
    assert main(["sample-data", str(tmp_path / "e"), "--rows", "100", "--dim", "8", "-q"]) == 0
    assert main(["sample-data", str(tmp_path / "e"), "--rows", "200", "--dim", "8", "-q"]) == 2


def test_the_docs_configuration_table_is_generated_from_the_schema():
    """docs/configuration.md's reference equals what scripts/config_reference.py generates from KEYS:
    a key added, renamed or re-defaulted without regenerating it fails here."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("config_reference", root / "scripts" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (root / "docs" / "configuration.md").read_text()
    assert module.render(readme) == readme, "docs/configuration.md is stale: run python scripts/config_reference.py"
    from pipeline.config import KEYS

    assert all(f"`--{key.replace('_', '-')}`" in readme for key in KEYS)


def test_verbose_logs_every_task_and_quiet_does_not(dataset_dir, dask_address, tmp_path, capsys):
    """-v shows debug lines (every task as it ends); the default and -q do not."""
    import logging

    from pipeline.cli import main

    base = [
        "run",
        "--input",
        str(dataset_dir),
        "--index-key",
        "Flat",
        "--k",
        "3",
        "--recall-queries",
        "50",
        "--scheduler-address",
        dask_address,
    ]
    dask_log = logging.getLogger("distributed")
    saved = (dask_log.handlers[:], dask_log.level, dask_log.propagate)
    try:
        assert main([*base, "--output", str(tmp_path / "v"), "-v"]) == 0
    finally:  # -v points Dask's log at this test's captured stderr, which closes with the test
        dask_log.handlers[:], dask_log.level, dask_log.propagate = saved
    verbose = capsys.readouterr().err
    assert " DEBUG scan: piece 0 done" in verbose and " DEBUG join: piece " in verbose
    assert main([*base, "--output", str(tmp_path / "plain")]) == 0
    assert " DEBUG " not in capsys.readouterr().err


def test_the_command_line_refuses_abbreviations_and_suggests_the_flag(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "--input", "d", "--output", "o", "--vector-colum", "emb"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "run: error: unrecognized arguments: --vector-colum (did you mean --vector-column?)" in err
    assert err.startswith("usage:") and " run [-h]" in err  # the subcommand's usage, not the top level's


def test_help_shows_required_flags_defaults_and_examples(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["dedup", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "required, here or in --config" in text and "examples: knn-pipeline dedup" in text
    for flag, default in [("--nprobe", "auto (tuned to --target-recall)"), ("--threshold", "required, unless")]:
        assert flag in text and default in text


def test_yaml_paths_are_relative_to_the_file_and_its_errors_name_it(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.config import load_config

    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "job.yaml").write_text("input: ../data\noutput: out\nk: 0\nthreshold: 0.9\n")
    with pytest.raises(ConfigError, match=r"^.*conf/job.yaml: k: "):
        load_config(folder / "job.yaml", {})
    config = load_config(folder / "job.yaml", {"k": "5", "output": "elsewhere"})
    assert config.data.paths == (str(tmp_path / "data"),)  # beside the file
    assert config.output == "elsewhere"  # a flag is relative to the working directory
    assert main(["run", "--config", str(folder / "job.yaml"), "--k", "5"]) != 0  # fails later: no data there
    assert "job.yaml: threshold is not read by run (it is for dedup); ignored" in capsys.readouterr().err


def test_version_names_the_program(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == "knn-pipeline 0.1.0"
