"""The run report: ``report.json`` (machine-readable), ``report.md`` with SVG charts beside it
(:mod:`pipeline.charts`), and ``report.html``, the same as one self-contained page (charts inlined).

Plots: recall against nprobe with throughput (from the tuning sweep, or the one setting
measured), the distribution of the k-th neighbour's score (a bounded sample read back from the
written tables), and wall time per phase.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.charts import bar_chart, histogram, line_chart
from pipeline.io.atomic import atomic_path, write_json
from pipeline.io.nodes import listed, source
from pipeline.results import (
    DedupExample,
    DedupResult,
    JobReport,
    RecallResult,
    TunePointRecord,
    dedup_verdict,
    recall_verdict,
)

__all__ = ["kth_scores", "write_report", "to_html"]

SCORE_SAMPLE = 200_000


def _verdict(report: JobReport) -> str:
    """The report's first line: a dedup's own result, or the recall the job reached against its target."""
    return dedup_verdict(report.dedup) if report.dedup is not None else recall_verdict(report.join)


def _hist_range(values: np.ndarray) -> tuple[float, float]:
    """The values' range, widened when it is too narrow for finite-sized bins (equal scores)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = 1e-3 * max(1.0, abs(lo), abs(hi))
    return (lo, hi) if hi - lo > pad else (lo - pad, hi + pad)


def kth_scores(table_dir: Path, seed: int = 0, limit: int = SCORE_SAMPLE) -> np.ndarray:
    """Score of each query's last (k-th) neighbour, sampled to at most ``limit``: from parts drawn
    at random (seeded) until they hold ``limit`` rows, so a table of 10^9 rows costs as much as
    one of a few parts; only the score column is read (on nodes of their own, from the object
    store, never the whole files)."""
    rng = np.random.default_rng(seed)
    parts = listed(table_dir, "part-*.parquet")
    chosen: list[pq.ParquetFile] = []
    rows = 0
    for i in rng.permutation(len(parts)).tolist() if len(parts) > 1 else range(len(parts)):
        if rows >= limit:
            break
        chosen.append(pq.ParquetFile(source(parts[i])))
        rows += chosen[-1].metadata.num_rows
    keep = min(1.0, limit / max(rows, 1))
    out = []
    for part in chosen:
        scores = part.read(columns=["score"]).column("score").combine_chunks()
        offsets = np.asarray(scores.offsets)
        values = scores.flatten().to_numpy()
        has = np.diff(offsets) > 0
        last = values[offsets[1:][has] - 1]
        out.append(last[rng.random(last.size) < keep] if keep < 1.0 else last)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _curve(recall: RecallResult | None) -> list[TunePointRecord]:
    """The tuning sweep, or the one setting measured when nothing was tuned."""
    if recall is None:
        return []
    if recall.curve:
        return list(recall.curve)
    return [
        TunePointRecord(
            recall.nprobe, recall.rerank, recall.recall, recall.recall_strict, 0.0, 0.0, recall.queries, 0.0
        )
    ]


def _chosen(recall: RecallResult, curve: list[TunePointRecord]) -> tuple[str, float, float] | None:
    """The chosen setting's point on the recall chart (its recall on the tuning sample)."""
    if recall.nprobe is None:
        return None
    at = [p for p in curve if p.nprobe == recall.nprobe and p.rerank == recall.rerank]
    y = at[0].recall if at else recall.recall
    return f"chosen: nprobe {recall.nprobe}, rerank {recall.rerank}", float(recall.nprobe), y


def _write_chart(output: Path, name: str, svg: str) -> None:
    with atomic_path(output / name) as tmp:
        tmp.write_text(svg)


def _plots(output: Path, report: JobReport, kth: np.ndarray) -> list[tuple[str, str]]:
    """The recall sweep, the k-th neighbour's score and the time per phase, as SVG charts."""
    made = []
    recall = report.recall
    curve = [p for p in _curve(recall) if p.nprobe is not None]
    if recall is not None and curve:
        series = []
        for rerank in sorted({p.rerank for p in curve}):
            pts = sorted((p for p in curve if p.rerank == rerank), key=lambda p: p.nprobe or 0)
            series.append((f"rerank {rerank}", [float(p.nprobe or 0) for p in pts], [p.recall for p in pts]))
        _write_chart(
            output,
            "recall_curve.svg",
            line_chart(
                series,
                title="recall against nprobe",
                xlabel="nprobe",
                ylabel=f"recall@{recall.k}",
                x_log=2,
                hline=(f"target {recall.target}", recall.target) if recall.target else None,
                mark=_chosen(recall, curve),
            ),
        )
        made.append(("Recall against nprobe (throughput in the sweep below)", "recall_curve.svg"))
    if kth.size:
        _write_chart(
            output,
            "kth_score.svg",
            histogram(
                kth,
                60,
                _hist_range(kth),
                title=f"k-th neighbour score ({kth.size:,} queries sampled)",
                xlabel=f"score of the k-th neighbour ({report.index.metric})",
                ylabel="queries",
            ),
        )
        made.append(("Score of the k-th neighbour", "kth_score.svg"))
    timings = report.timings_s
    if timings:
        _write_chart(
            output,
            "timings.svg",
            bar_chart(
                list(timings),
                list(timings.values()),
                title="wall time per phase",
                xlabel="seconds",
                ylabel="",
                horizontal=True,
            ),
        )
        made.append(("Time per phase", "timings.svg"))
    return made


def _count_plot(output: Path, name: str, counts: dict[str, int], *, xlabel: str, ylabel: str, title: str) -> None:
    """A bar chart of ``{value: count}`` (log-scaled counts), as dedup group sizes and graph degrees are."""
    keys = sorted(counts, key=int)  # JSON keys: "2", "10", ...
    chart = bar_chart(keys, [float(counts[x]) for x in keys], title=title, xlabel=xlabel, ylabel=ylabel, y_log=True)
    _write_chart(output, name, chart)


def _esc(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _explore_lines(report: JobReport) -> list[str]:
    if not report.dedup_explore:
        return []
    lines = [
        "## Dedup thresholds (explore)",
        "",
        "Counted from each row's k nearest neighbours only; a real run also searches rows with more than k "
        "duplicates again (and rows with a pair over more lists), so it can find more pairs.",
        "",
        "| threshold | pairs | rows dropped (components) | share |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r.threshold} | {r.pairs:,} | {r.rows_dropped:,} | {r.rows_dropped / max(1, r.rows_in):.2%} |"
        for r in report.dedup_explore
    ]
    return lines + [""]


def _dedup_lines(output: Path, report: JobReport) -> list[str]:
    d = report.dedup
    if d is None:
        return []
    op = "<=" if d.metric == "l2" else ">="
    keep = f"max/min of `{d.keep_by}` ({d.keep_order}), then the smallest id" if d.keep_by else "the smallest id"
    lines = [
        "## Dedup",
        "",
        "| | |",
        "|---|---|",
        f"| rule | {d.metric} score {op} {d.threshold}, {d.mode} mode; keep {keep} |",
        f"| rows in | {d.rows_in:,} |",
        f"| pairs | {d.pairs:,} |",
        f"| groups (2+ rows) | {d.groups:,} holding {d.rows_in_groups:,} rows |",
        f"| rows dropped | {d.rows_dropped:,} ({d.rows_dropped / max(1, d.rows_in):.2%}); kept {d.rows_kept:,} |",
    ]
    if d.dataset is not None:
        lines.append(
            f"| deduplicated dataset | `deduplicated/` (the input files minus the dropped rows) and "
            f"`removed/`: {d.dataset.files_written:,} file(s) written this run, "
            f"{d.dataset.files_unchanged:,} unchanged; `removed/` holds {d.dataset.rows_removed:,} rows"
            + (" (duplicates and contaminated rows)" if d.contamination is not None else "")
            + " |"
        )
    ex = d.exactness
    if ex is not None:
        pr = "n/a (no exact pairs in the sample)" if ex.pair_recall is None else f"{ex.pair_recall:.4f}"
        target = f" (target {d.target_pair_recall})" if d.target_pair_recall else ""
        lines.append(
            f"| pair recall | {pr}{target}: {ex.exact_pairs:,} exact pairs among {ex.queries:,} sampled rows; "
            f"{ex.below_threshold} found pairs fail the threshold |"
        )
    if d.searched_again:
        wider = (
            f"; rows with a pair over nprobe={d.pair_nprobe} to reach the pair-recall target" if d.pair_nprobe else ""
        )
        lines.append(
            f"| rows searched again | {d.searched_again:,}: rows whose k neighbours all passed the threshold, "
            f"with longer lists{wider} |"
        )
    if d.saturated_rows:
        lines.append(
            f"| rows at the limit | {d.saturated_rows:,} rows still had every neighbour above the threshold "
            "at the longest list (1,024, or what partition_size lets the shuffle hold): their groups "
            "can be incomplete |"
        )
    lines.append("")
    if d.group_sizes:
        _count_plot(
            output,
            "group_sizes.svg",
            d.group_sizes,
            xlabel="group size (rows)",
            ylabel="groups",
            title="dedup group sizes",
        )
        lines += ["### Group sizes", "", "![group sizes](group_sizes.svg)", ""]
    if d.examples:
        lines += ["### Example pairs by score", ""]
        lines += _examples_table(
            ["score", "id a", "id b", "kept"],
            ["text a", "text b"],
            [([f"{e.score:.4f}", _esc(e.id_a), _esc(e.id_b), _kept_of(e)], (e.text_a, e.text_b)) for e in d.examples],
        )
    return lines + _contamination_lines(d)


def _kept_of(e: DedupExample) -> str:
    """Which row of an example pair the dedup kept."""
    if e.kept_a is None or e.kept_b is None:
        return ""
    return {(True, False): "a", (False, True): "b", (True, True): "both", (False, False): "neither"}[
        (bool(e.kept_a), bool(e.kept_b))
    ]


def _examples_table(head: list[str], text_head: list[str], rows: list[tuple[list[str], tuple[Any, Any]]]) -> list[str]:
    """A Markdown table of example rows (cells already formatted), with the two text columns only
    when some row has a text."""
    has_text = any(a is not None or b is not None for _, (a, b) in rows)
    columns = head + (text_head if has_text else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for cells, (a, b) in rows:
        lines.append("| " + " | ".join(cells + ([_esc(a), _esc(b)] if has_text else [])) + " |")
    return [*lines, ""]


def _contamination_lines(d: DedupResult) -> list[str]:
    """``--against``: matches per reference file, the join's recall and the closest examples."""
    c = d.contamination
    if c is None:
        return []
    op = "<=" if d.metric == "l2" else ">="
    fate = (
        "dropped from `deduplicated/` (listed in `removed/`)"
        if c.action == "drop"
        else "kept in `deduplicated/`, flagged in `contamination/`"
    )
    recall = (
        f"recall@{c.recall.k} {c.recall.recall:.3f} (tie-aware) on {c.recall.measured_on}"
        if c.recall
        else "recall not measured"
    )
    lines = [
        "### Contamination against the reference",
        "",
        f"{c.rows_contaminated:,} input rows have a reference row with score {op} {c.threshold}: {fate}. "
        f"Reference: {c.reference_rows:,} rows; the input was joined against it with {c.plan} ({recall}).",
        "",
        "| reference file | its rows | input rows matched |",
        "|---|---|---|",
    ]
    lines += [f"| {_esc(m.file)} | {m.rows:,} | {m.input_rows_matched:,} |" for m in c.per_file]
    lines.append("")
    if c.examples:
        lines += _examples_table(
            ["score", "input id", "reference id", "reference file"],
            ["input text", "reference text"],
            [
                (
                    [f"{e.score:.4f}", _esc(e.input_id), _esc(e.reference_id), _esc(e.reference_file)],
                    (e.input_text, e.reference_text),
                )
                for e in c.examples
            ],
        )
    return lines


def _graph_lines(output: Path, report: JobReport) -> list[str]:
    g = report.graph
    if g is None:
        return []
    rec = g.recall
    width = f" (width {g.kernel_width:.4g})" if g.weight == "gaussian" and g.kernel_width else ""
    lines = [
        "## Graph",
        "",
        "| | |",
        "|---|---|",
        f"| edges | {g.mode}, k={g.k}"
        + (f", min score {g.min_score}" if g.min_score is not None else "")
        + f", weight {g.weight}{width} |",
        f"| size | {g.nodes:,} nodes, {g.edges:,} edges (directed entries) |",
        f"| degree | mean {g.degree.mean}, max {g.degree.max}, {g.degree.isolated:,} isolated |",
        f"| components | {g.components:,}; the largest holds {g.largest_component:,} nodes |",
        f"| mutual edges | {g.mutual_share:.1%} of edges are in both rows' lists |"
        if g.mutual_share is not None
        else "| mutual edges | n/a (no edges) |",
    ]
    if rec is not None:
        lines.append(
            f"| graph recall | {rec.graph_recall:.4f}: share of the exact {rec.k} nearest neighbours "
            f"among a row's edges, {rec.queries:,} sampled rows |"
        )
    lines.append("")
    if g.degree.histogram:
        _count_plot(
            output,
            "degrees.svg",
            g.degree.histogram,
            xlabel="degree (edges out of a node)",
            ylabel="nodes",
            title="degree distribution",
        )
        lines += ["### Degree distribution", "", "![degrees](degrees.svg)", ""]
    return lines


def _summary_lines(report: JobReport) -> list[str]:
    idx, search, rec, mem = report.index, report.search, report.recall, report.join.memory
    qps = f" ({report.queries_per_s:,.0f} queries/s)" if report.queries_per_s else ""
    lines = [
        "| | |",
        "|---|---|",
        f"| index | `{idx.key}` ({idx.ntotal:,} vectors × {idx.dim}, {idx.metric}) |",
        f"| why this index | {idx.why} |",
        f"| search | k={search.k}, {report.join.plan}, exclude_self={search.exclude_self} |",
        f"| why this plan | {search.why or 'settings given'} |",
        f"| queries | {report.queries:,} |",
        f"| wall time | {report.wall_s:.1f} s{qps} |",
        f"| peak memory | {mem.driver_peak_rss / 2**20:,.0f} MiB (the driver and its in-process worker) |"
        if mem.in_process
        else f"| peak memory | driver {mem.driver_peak_rss / 2**20:,.0f} MiB; workers "
        + ", ".join(f"{v / 2**20:,.0f}" for v in mem.workers_peak_rss.values())
        + " MiB |",
    ]
    if rec is not None:
        lines.append(
            f"| recall@{rec.k} | {rec.recall:.3f} tie-aware (strict {rec.recall_strict:.3f}) "
            f"on {rec.measured_on} against exact search" + (f" (target {rec.target})" if rec.target else "") + " |"
        )
        if rec.bound is not None and rec.confidence is not None:
            lines.append(
                f"| tuning bound | the chosen setting's recall on the tuning half is at least {rec.bound:.3f} "
                f"with {rec.confidence:.1%} confidence (cluster-robust over identical queries) |"
            )
        for p in rec.step_ups:
            lines.append(f"| step-up | nprobe={p.nprobe}, rerank={p.rerank}: {p.recall:.3f} held out |")
    reads = report.join.lists_read
    if reads is not None:
        lists = idx.ntotal * idx.dim * 4 if idx.key.endswith(",Flat") else 0
        times = f" ({reads.total / lists:.1f}x the index's {lists / 2**30:.2f} GiB of lists)" if lists else ""
        phases = ", ".join(f"{p} {b / 2**30:.2f} GiB" for p, b in reads.by_phase.items())
        workers = ", ".join(f"{_esc(w)} {b / 2**30:.2f}" for w, b in sorted(reads.by_worker.items()))
        lines.append(f"| lists read | {phases}{times}; by worker: {workers} GiB |")
    devices = report.join.devices
    for kind in sorted({d.backend for d in devices}):
        group = [d for d in devices if d.backend == kind]
        hosts = sorted({d.host for d in group})
        gpus = sorted({f"{d.gpu_name}, {d.gpu_memory_bytes / 2**30:.0f} GiB" for d in group if d.gpu_name})
        lines.append(
            f"| devices | {len(group)} worker(s) on {kind} ({group[0].reason})"
            + (f" [{'; '.join(gpus)}]" if gpus else "")
            + ", hosts "
            f"{', '.join(hosts[:5])}{' ...' if len(hosts) > 5 else ''} |"
        )
    return lines


def _worker_lines(report: JobReport) -> list[str]:
    """Busy seconds per phase on each worker (this run), and the busy share of the wall time."""
    if not report.workers:
        return []
    phases = sorted({p for w in report.workers for p in w.phases})
    staged = any(w.moved for w in report.workers)
    moved = ["fetched", "ranged", "sent"] if staged else []
    lines = [
        "## Workers",
        "",
        "Seconds each worker spent computing tasks of each phase in this run (Dask's task "
        "stream), by the phases of the timing chart; busy is their sum as a share of what the "
        "worker could have run: the job's wall time times its task slots (Dask threads)."
        + (
            " Staged per node (machines that share no filesystem): the MiB each worker fetched "
            "whole, read by range (list groups, slices of routes and partial lists) and uploaded, "
            "and its reads by range (requests)."
            if staged
            else ""
        ),
        "",
        "| worker | host | device | "
        + " | ".join(phases)
        + " | busy |"
        + "".join(f" {m} MiB |" for m in moved)
        + (" reads by range |" if staged else ""),
        "|---|---|---|" + "---|" * len(phases) + "---|" + "---|" * (len(moved) + staged),
    ]
    for w in report.workers:
        share = (
            f"{w.total:.1f} s ({w.total / (report.wall_s * w.slots):.0%} of {w.slots} slot(s))"
            if report.wall_s
            else f"{w.total:.1f} s"
        )
        lines.append(
            f"| {_esc(w.worker)} | {_esc(w.host)} | {w.backend} | "
            + " | ".join(f"{w.phases.get(p, 0.0):.1f}" for p in phases)
            + f" | {share} |"
            + "".join(f" {(w.moved or {}).get(m, 0) / 2**20:.1f} |" for m in moved)
            + (f" {(w.moved or {}).get('reads', 0):,} |" if staged else "")
        )
    return [*lines, ""]


def write_report(output: Path, report: JobReport, seed: int = 0) -> JobReport:
    """Write ``report.json`` and ``report.md`` (+ PNGs) into ``output``; return the report with the
    k-th neighbour's score quantiles (read back from the written table) filled in."""
    kth = kth_scores(output / "neighbors", seed)
    if kth.size:
        q = np.quantile(kth, [0.01, 0.1, 0.5, 0.9, 0.99])
        report = replace(
            report, kth_score_quantiles={k: round(float(v), 5) for k, v in zip(("p1", "p10", "p50", "p90", "p99"), q)}
        )
    write_json(output / "report.json", report.to_json())
    plots = _plots(output, report, kth)
    lines = [f"# {report.command} report", "", f"**{_verdict(report)}**", ""] + _summary_lines(report) + [""]
    for title, png in plots:
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    lines += _explore_lines(report) + _dedup_lines(output, report) + _graph_lines(output, report)
    lines += _worker_lines(report)
    curve = report.recall.curve if report.recall else ()
    if curve:
        lines += ["## Sweep", "", "| nprobe | rerank | recall | lower bound | queries/s |", "|---|---|---|---|---|"]
        lines += [
            f"| {p.nprobe} | {p.rerank} | {p.recall:.3f} | {p.bound:.3f} | "
            f"{'computed, not searched' if p.computed else f'{p.qps:,.0f}'} |"
            for p in curve
        ]
        lines.append("")
    lines += ["## Settings", "", "```json", json.dumps(report.config, indent=2, default=str), "```", ""]
    with atomic_path(output / "report.md") as tmp:
        tmp.write_text("\n".join(lines))
    with atomic_path(output / "report.html") as tmp:
        tmp.write_text(to_html(lines, output, f"{report.command} report"))
    return report


_CHECK = """<script>
window.addEventListener("error", e => { document.documentElement.dataset.error = String(e.message); });
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const drawn = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.documentElement.dataset.images = drawn + "/" + images.length;
});
</script>"""
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
    "text-align:left}img{max-width:100%}pre{background:#f4f4f4;padding:1rem;overflow:auto}"
    ".scroll{overflow-x:auto;max-width:100%}"
)


def _inline(text: str) -> str:
    """Escaped text with the report's inline markdown: **bold** and `code`."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def to_html(lines: list[str], output: Path, title: str) -> str:
    """report.md's lines as one self-contained page: tables, headings, the plots inlined as data
    URIs (the page opens anywhere, alone), and a check that every plot was drawn."""
    body: list[str] = []
    table: list[list[str]] = []
    code: list[str] | None = None

    def flush() -> None:
        if table:
            head, *rows = table
            body.append(
                '<div class="scroll"><table><tr>'
                + "".join(f"<th>{_inline(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table></div>"
            )
            table.clear()

    for line in lines:
        if code is not None:
            if line.startswith("```"):
                body.append("<pre>" + html.escape("\n".join(code)) + "</pre>")
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-"} for c in cells):
                table.append(cells)
            continue
        flush()
        if line.startswith("```"):
            code = []
        elif image := re.fullmatch(r"!\[(.*)\]\((.+\.svg)\)", line):
            data = base64.b64encode((output / image.group(2)).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(image.group(1))}" src="data:image/svg+xml;base64,{data}"></p>')
        elif heading := re.match(r"(#{1,3}) (.*)", line):
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush()
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style>{_CHECK}</head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
