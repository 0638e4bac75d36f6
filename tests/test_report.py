"""The run report and the evaluate command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline import run
from pipeline.jobs.commands import evaluate


@pytest.fixture
def tuned_run(make_config, dataset_dir, tmp_path):
    run(
        make_config(
            input=str(dataset_dir),
            k=10,
            exclude_self=True,
            index_key="IVF64,PQ16",
            target_recall=0.9,
            recall_queries=150,
        )
    )
    return tmp_path / "out"


def test_report_files_are_written_and_parse(tuned_run):
    report = json.loads((tuned_run / "report.json").read_text())
    assert report["recall"]["target"] == 0.9 and report["recall"]["curve"]
    assert report["memory"]["driver_peak_rss"] > 0 and report["memory"]["workers_peak_rss"]
    assert set(report["timings_s"]) >= {"scan", "train", "fill", "recall", "join"}
    q = report["kth_score_quantiles"]
    assert -1.0 <= q["p1"] <= q["p50"] <= q["p99"] <= 1.0  # cosine similarities
    md = (tuned_run / "report.md").read_text()
    assert "IVF64,PQ16" in md and "held-out queries" in md and "## Sweep" in md
    rec = report["recall"]
    first = md.splitlines()[2]  # under the title: recall, target and plan
    assert first == (
        f"**recall@10 {rec['recall']:.3f} (tie-aware; strict {rec['recall_strict']:.3f}) on {rec['queries']:,} "
        "held-out queries, target 0.9: "
        f"met; plan: IVF64,PQ16, nprobe={rec['nprobe']}, rerank={rec['rerank']}**"
    )
    assert "| devices | 2 worker(s) on cpu (" in md
    # busy time per phase on each worker, named as the devices are, from Dask's task stream
    workers = report["workers"]
    assert {w["worker"] for w in workers} <= {d["worker"] for d in report["devices"]} and workers
    assert all(w["backend"] == "cpu" and w["host"] for w in workers)
    phases = {p for w in workers for p in w["phases"]}
    # named as the timing chart's phases (exact ground truth and the tuning walk are the recall phase)
    assert {"scan", "train", "fill", "join", "recall"} <= phases <= set(report["timings_s"])
    assert all(w["slots"] >= 1 for w in workers) and "slot(s))" in md
    assert sum(w["phases"]["join"] for w in workers if "join" in w["phases"]) > 0
    assert "## Workers" in md and "| worker | host | device |" in md
    curve = (tuned_run / "recall_curve.svg").read_text()
    assert f"chosen: nprobe {rec['nprobe']}, rerank {rec['rerank']}" in curve  # the chosen setting is ringed
    for svg in ("recall_curve.svg", "kth_score.svg", "timings.svg"):
        assert f"]({svg})" in md
        chart = (tuned_run / svg).read_text()
        assert chart.startswith("<svg ") and chart.rstrip().endswith("</svg>")


def test_evaluate_a_written_table_agrees_with_the_run(make_config, tuned_run):
    report = json.loads((tuned_run / "report.json").read_text())
    # no --index-dir: the run's own OUT/index is used
    result = evaluate(make_config(index_dir=None, output=str(tuned_run), recall_queries=300))
    assert result.queries == 300 and result.k == 10
    assert abs(result.strict[10] - report["recall"]["recall_strict"]) < 0.05
    # the run re-ranked, so the table's scores are exact: tie-aware recall is counted from them
    assert result.tie_aware is not None and abs(result.tie_aware - report["recall"]["recall"]) < 0.05
    assert result.tie_aware >= result.strict[10] - 1e-9 and result.misses >= 0


def test_evaluate_an_index_at_given_settings(make_config, tuned_run):
    # output=None: evaluate the index itself, not the table the run wrote
    low = evaluate(
        make_config(
            index_dir=str(tuned_run / "index"),
            output=None,
            k=10,
            exclude_self=True,
            nprobe=1,
            rerank=0,
            recall_queries=200,
        )
    )
    high = evaluate(
        make_config(
            index_dir=str(tuned_run / "index"),
            output=None,
            k=10,
            exclude_self=True,
            nprobe=64,
            rerank=8,
            recall_queries=200,
        )
    )
    assert low.source["index"] and low.source["nprobe"] == 1 and high.source["nprobe"] == 64
    assert low.strict[10] < high.strict[10] and high.strict[10] >= 0.97
    assert low.tie_aware is not None and high.tie_aware is not None
    assert low.tie_aware < high.tie_aware and high.tie_aware >= 0.97
    assert low.miss_score_gap is not None and low.miss_score_gap["median"] >= 0


def test_flat_index_evaluates_exactly(make_config, dataset_dir, tmp_path):
    run(make_config(input=str(dataset_dir), k=5, exclude_self=True, index_key="Flat", recall_queries=50))
    result = evaluate(
        make_config(index_dir=str(tmp_path / "out" / "index"), output=str(tmp_path / "out"), recall_queries=100)
    )
    assert result.strict[1] == result.strict[5] == 1.0 and result.misses == 0


def test_evaluate_cli_prints_json(tuned_run, dask_address):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "evaluate",
            "--index-dir",
            str(tuned_run / "index"),
            "--output",
            str(tuned_run),
            "--recall-queries",
            "50",
            "--scheduler-address",
            dask_address,
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["queries"] == 50


@pytest.mark.parametrize("in_process", [True, False])
def test_the_memory_line_says_one_figure_for_an_in_process_worker(in_process):
    from pipeline.report import _summary_lines
    from pipeline.results import IndexSummary, JobReport, JoinResult, MemoryUse, SearchSummary

    mem = MemoryUse(300 << 20, {"w0": 300 << 20} if in_process else {"w0": 500 << 20, "w1": 600 << 20}, in_process)
    join = JoinResult(
        IndexSummary("/i", "Flat", 10, 4, "l2", None, "auto"),
        SearchSummary(2, None, 0, True, "cpu"),
        (),
        10,
        "/o/neighbors",
        None,
        mem,
    )
    line = next(x for x in _summary_lines(JobReport("run", join, {}, {}, 1.0, 10.0)) if "peak memory" in x)
    expect = "300 MiB (the driver and its in-process worker)" if in_process else "driver 300 MiB; workers 500, 600 MiB"
    assert expect in line


def _chromium() -> str | None:
    import shutil

    return next(
        (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None
    )


@pytest.mark.browser
def test_report_html_opens_in_a_real_browser_with_every_plot_drawn(tuned_run, tmp_path):
    """report.html is one self-contained page: Chromium loads it without a script error and draws
    every inlined plot (the page's own check records drawn/total images on <html>)."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium here: install Debian's chromium package (.ci/run does where it can)")
    page = tuned_run / "report.html"
    assert "report.md" not in page.read_text() and 'src="data:image/svg+xml;base64,' in page.read_text()
    proc = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-sync",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-quic",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-images="3/3"' in proc.stdout  # recall curve, k-th score, time per phase
    assert "data-error" not in proc.stdout and "<h2>Sweep</h2>" in proc.stdout


def test_charts_are_well_formed_svg_with_one_mark_per_value():
    import xml.etree.ElementTree as ET

    import numpy as np

    from pipeline.charts import bar_chart, histogram, line_chart

    def marks(svg: str, tag: str) -> list[ET.Element]:
        return ET.fromstring(svg).findall(f"{{http://www.w3.org/2000/svg}}{tag}")

    line = line_chart(
        [("rerank 0", [1, 2, 4], [0.5, 0.7, 0.9]), ("rerank 2", [4, 8], [0.93, 0.97])],
        title="recall",
        xlabel="nprobe",
        ylabel="recall@10",
        x_log=2,
        hline=("target 0.95", 0.95),
    )
    # a marker per point, and one beside each series in the legend (a series of one point draws no line)
    assert len(marks(line, "circle")) == 5 + 2 and len(marks(line, "polyline")) == 2
    ringed = line_chart(
        [("rerank 0", [1, 2, 4], [0.5, 0.7, 0.96])],
        title="recall",
        xlabel="nprobe",
        ylabel="recall@10",
        x_log=2,
        mark=("chosen: nprobe 4, rerank 0", 4.0, 0.96),
    )
    assert len(marks(ringed, "circle")) == 3 + 1 + 2 and "chosen: nprobe 4, rerank 0" in ringed
    assert "target 0.95" in line and "&lt;" not in "".join(t.text or "" for t in marks(line, "text"))
    values = np.array([0.1, 0.1, 0.4, 0.9])
    hist = histogram(values, 4, (0.0, 1.0), title="k-th", xlabel="score", ylabel="queries")
    assert len(marks(hist, "rect")) == 2 + 3  # background, frame, and the three non-empty bins
    flat = histogram(
        np.full(7, 0.5), 10, (0.49, 0.51), title="equal", xlabel="score", ylabel="queries"
    )  # one bin, no division by zero
    assert len(marks(flat, "rect")) == 3
    bars = bar_chart(["scan", "join <x>"], [1.5, 0.0], title="time", xlabel="seconds", ylabel="", horizontal=True)
    assert "join &lt;x&gt;" in bars and len(marks(bars, "rect")) == 4
    counts = bar_chart(
        [str(i) for i in range(2, 60)],
        [float(10 ** (i % 4)) for i in range(58)],
        title="sizes",
        xlabel="size",
        ylabel="groups",
        y_log=True,
    )
    assert len(marks(counts, "rect")) == 2 + 58 and len([t for t in marks(counts, "text") if t.text == "2"]) >= 1
