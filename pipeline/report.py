"""The run report: ``report.json`` (machine-readable) and ``report.md`` with PNG plots beside it.

Plots: recall against nprobe with throughput (from the tuning sweep, or the one setting
measured), the distribution of the k-th neighbour's score (a bounded sample read back from the
written tables), and wall time per phase.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .atomic import atomic_path, write_json

__all__ = ["peak_rss", "kth_scores", "write_report"]

SCORE_SAMPLE = 200_000


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def kth_scores(table_dir: Path, seed: int = 0, limit: int = SCORE_SAMPLE) -> np.ndarray:
    """Score of each query's last (k-th) neighbour, sampled to at most ``limit`` across all parts."""
    parts = sorted(table_dir.glob("part-*.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    keep = min(1.0, limit / max(rows, 1))
    rng = np.random.default_rng(seed)
    out = []
    for part in parts:
        scores = pq.read_table(part, columns=["score"]).column("score").combine_chunks()
        offsets = np.asarray(scores.offsets)
        values = scores.flatten().to_numpy()
        has = np.diff(offsets) > 0
        last = values[offsets[1:][has] - 1]
        out.append(last[rng.random(last.size) < keep] if keep < 1.0 else last)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _plots(output: Path, report: dict[str, Any], kth: np.ndarray) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    recall = report.get("recall") or {}
    curve = recall.get("curve") or ([{"nprobe": recall.get("nprobe"), "rerank": recall.get("rerank"),
                                      "recall": recall.get("recall"), "qps": None}] if recall else [])
    if curve and any(p["nprobe"] is not None for p in curve):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        for rerank in sorted({p["rerank"] for p in curve}):
            pts = sorted((p for p in curve if p["rerank"] == rerank), key=lambda p: p["nprobe"])
            ax.plot([p["nprobe"] for p in pts], [p["recall"] for p in pts], marker="o", label=f"rerank {rerank}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("nprobe")
        ax.set_ylabel(f"recall@{recall.get('k')}")
        if recall.get("target"):
            ax.axhline(recall["target"], color="grey", linestyle="--", label=f"target {recall['target']}")
        qps = [p for p in curve if p.get("qps")]
        if qps:
            ax2 = ax.twinx()
            best = {}
            for p in qps:
                best[p["nprobe"]] = max(best.get(p["nprobe"], 0), p["qps"])
            xs = sorted(best)
            ax2.plot(xs, [best[x] for x in xs], color="black", linestyle=":", label="queries/s (best rerank)")
            ax2.set_ylabel("queries/s on one worker")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title("recall against nprobe")
        fig.tight_layout()
        fig.savefig(output / "recall_curve.png", dpi=100)
        plt.close(fig)
        made.append(("Recall against nprobe, with throughput", "recall_curve.png"))
    if kth.size:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        ax.hist(kth, bins=60)
        ax.set_xlabel(f"score of the k-th neighbour ({report['index']['metric']})")
        ax.set_ylabel("queries")
        ax.set_title(f"k-th neighbour score ({kth.size:,} queries sampled)")
        fig.tight_layout()
        fig.savefig(output / "kth_score.png", dpi=100)
        plt.close(fig)
        made.append(("Score of the k-th neighbour", "kth_score.png"))
    timings = report.get("timings_s") or {}
    if timings:
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        ax.barh(list(timings), list(timings.values()))
        ax.set_xlabel("seconds")
        ax.set_title("wall time per phase")
        fig.tight_layout()
        fig.savefig(output / "timings.png", dpi=100)
        plt.close(fig)
        made.append(("Time per phase", "timings.png"))
    return made


def write_report(output: Path, report: dict[str, Any], seed: int = 0) -> None:
    """Write ``report.json`` and ``report.md`` (+ PNGs) into ``output``."""
    kth = kth_scores(output / "neighbors", seed)
    if kth.size:
        q = np.quantile(kth, [0.01, 0.1, 0.5, 0.9, 0.99])
        report["kth_score_quantiles"] = {k: round(float(v), 5) for k, v in zip(("p1", "p10", "p50", "p90", "p99"), q)}
    write_json(output / "report.json", report)
    plots = _plots(output, report, kth)
    idx, search, rec = report["index"], report["search"], report.get("recall") or {}
    lines = [
        f"# {report['command']} report",
        "",
        "| | |",
        "|---|---|",
        f"| index | `{idx['key']}` ({idx['ntotal']:,} vectors × {idx['dim']}, {idx['metric']}) |",
        f"| why this index | {idx.get('why', 'given by index_key')} |",
        f"| search | k={search['k']}, nprobe={search['nprobe']}, rerank={search['rerank']}, exclude_self={search['exclude_self']} |",
        f"| queries | {report['queries']:,} |",
        f"| wall time | {report['wall_s']:.1f} s ({report['queries_per_s']:,.0f} queries/s) |",
        f"| peak memory | driver {report['memory']['driver_peak_rss'] / 2**20:,.0f} MiB; workers "
        + ", ".join(f"{v / 2**20:,.0f}" for v in report["memory"]["workers_peak_rss"].values()) + " MiB |",
    ]
    if rec:
        lines.append(f"| recall@{rec['k']} | {rec['recall']:.3f} on {rec['queries']:,} "
                     f"{'held-out ' if rec.get('target') else ''}queries against exact search"
                     + (f" (target {rec['target']})" if rec.get("target") else "") + " |")
    lines.append("")
    for title, png in plots:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    if rec.get("curve"):
        lines += ["## Sweep", "", "| nprobe | rerank | recall | queries/s |", "|---|---|---|---|"]
        lines += [f"| {p['nprobe']} | {p['rerank']} | {p['recall']:.3f} | {p['qps']:,.0f} |" for p in rec["curve"]]
        lines.append("")
    lines += ["## Settings", "", "```json", json.dumps(report["config"], indent=2, default=str), "```", ""]
    with atomic_path(output / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
