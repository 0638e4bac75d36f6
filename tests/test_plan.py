"""``plan``: the estimate of a job before it runs, from metadata and measured rates."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.io.sample_data import clustered_vectors, write_shards
from pipeline.jobs.plan import Rates, estimate


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    write_shards(str(d), clustered_vectors(40_000, 32, seed=3), shards=4)
    return d


def test_plan_counts_the_work_of_each_phase_and_scales_with_the_rates(small):
    config = parse_config({"input": str(small), "k": 10, "exclude_self": True})
    slow = estimate(config, "run", Rates(gemm_flops=1e10, decode_bytes=1e8))
    fast = estimate(config, "run", Rates(gemm_flops=1e11, decode_bytes=1e9))
    assert slow.index_key.startswith("IVF") and slow.nlist and slow.nprobe and 1 <= slow.nprobe <= slow.nlist
    assert [p.name for p in slow.phases] == ["scan", "train", "fill", "recall", "join"]
    assert all(a.seconds > b.seconds for a, b in zip(slow.phases, fast.phases, strict=True))
    assert slow.store_bytes == 40_000 * (32 * 4 + 8)
    assert slow.peak_worker_bytes > 0 and slow.output_bytes > 0
    dedup = estimate(parse_config({"input": str(small), "threshold": 0.9}), "dedup", slow.rates)
    assert dedup.phases[-1].name == "dedup"
    exact = estimate(parse_config({"input": str(small), "index_key": "Flat"}), "run", slow.rates)
    assert exact.nlist is None and [p.name for p in exact.phases] == ["scan", "recall", "join"]


def test_plan_command_prints_the_plan_and_writes_nothing(small, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["plan", "run", "--input", str(small), "--output", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "index: IVF" in text and "nprobe about" in text and "peak memory per worker" in text
    assert "join" in text and not out.exists()


def test_plan_prices_a_two_level_quantizer_by_the_centroids_it_scores(small):
    """Behind a two-level quantizer a row is scored against n1 + 8 nlist / n1 centroids (fill and
    join), and training is two-level k-means: far less than the same lists behind a flat one."""
    rates = Rates(gemm_flops=1e10, decode_bytes=1e8)
    flat = estimate(parse_config({"input": str(small), "index_key": "IVF512,Flat", "nprobe": 4}), "run", rates)
    nested = estimate(
        parse_config({"input": str(small), "index_key": "IVF512(IVF32,Flat),Flat", "nprobe": 4}), "run", rates
    )
    by_name = {p.name: p for p in nested.phases}
    assert "two-level k-means" in by_name["train"].work and "(160 centroids scored a row)" in by_name["fill"].work
    for phase in ("train", "fill", "join"):
        assert by_name[phase].seconds < {p.name: p for p in flat.phases}[phase].seconds
