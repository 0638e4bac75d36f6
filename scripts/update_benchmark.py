#!/usr/bin/env python3
"""Benchmark: a scheduled job rerun over changed input (an update) against a fresh run.

Makes ``--rows`` generated rows (``python -m pipeline sample-data``) in the scenario's shards, runs the
command once ("yesterday"), changes the input by ``--scenario``, then times, side by side, the same
command rerun in that output (the update, no ``--overwrite``) and the command into a new output (a
fresh run over the new input). Whole processes; the default plan (``--k 10 --exclude-self``).

Scenarios:

* ``touch5``: one of 20 shards re-embedded (every vector moved slightly): 5% of the rows leave and
  come back as new rows.
* ``remove-rewrite``: one of 8 shards removed and another rewritten with half its rows (the issue's
  done-test).

Agreement: ``run`` compares the two neighbour tables by tie-aware recall@10 against exact search on
1,000 sampled queries (big-ann-benchmarks' rule: a listed neighbour counts when it scores at least
the exact 10th score); ``dedup`` compares the pairs (Jaccard) and the rows dropped; ``graph`` the
edges (Jaccard, by ids) and each report's graph recall.

    python scripts/update_benchmark.py --rows 1000000 --dim 128 --scenario touch5
    python scripts/update_benchmark.py --rows 1000000 --dim 128 --scenario remove-rewrite --command dedup
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def command(name: str, data: Path, out: Path, extra: list[str]) -> list[str]:
    flags = ["--threshold", "0.95"] if name == "dedup" else ["--k", "10", "--exclude-self"]
    return [sys.executable, "-m", "pipeline", name, "--input", str(data), "--output", str(out), *flags, *extra, "-q"]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def change(data: Path, scenario: str, seed: int) -> str:
    """Change the input in place; return what changed, in words."""
    files = sorted(data.glob("*.parquet"))
    rng = np.random.default_rng(seed)
    if scenario == "touch5":
        target = files[len(files) // 2]
        t = pq.read_table(target)
        x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        x += 0.05 * x.std() * rng.standard_normal(x.shape).astype(np.float32)  # re-embedded: moved a little
        emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
        pq.write_table(t.set_column(t.schema.get_field_index("embedding"), "embedding", emb), target)
        return f"{target.name} re-embedded ({t.num_rows:,} rows, {t.num_rows / total_rows(data):.1%})"
    os.remove(files[3])
    t = pq.read_table(files[5])
    pq.write_table(t.slice(0, t.num_rows // 2), files[5])
    return f"{files[3].name} removed, {files[5].name} rewritten with half its rows"


def total_rows(data: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in data.glob("*.parquet"))


def recall_vs_exact(data: Path, outs: list[Path], queries: int = 1000, k: int = 10) -> list[float]:
    """Tie-aware recall@k of each output's neighbour table on the same sampled queries."""
    t = pq.read_table(data, columns=["id", "embedding"])
    ids = t.column("id").to_numpy()
    x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    pick = np.sort(np.random.default_rng(0).choice(len(x), size=queries, replace=False))
    scores, _ = faiss.knn(x[pick], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    kth = scores[:, k]  # the query itself first: the k-th other neighbour
    position = {int(v): i for i, v in enumerate(ids.tolist())}
    recalls = []
    for out in outs:
        table = pq.read_table(out / "neighbors")
        chosen = table.filter(pc.is_in(table.column("query_id"), pa.array(ids[pick])))
        by_id = dict(zip(chosen.column("query_id").to_pylist(), chosen.column("neighbor_id").to_pylist()))
        hits = 0
        for i, q in enumerate(ids[pick].tolist()):
            got = np.array([position[n] for n in by_id[q]], dtype=np.int64)
            hits += int((x[got] @ x[pick[i]] >= kth[i] - 1e-5).sum())
        recalls.append(hits / (queries * k))
    return recalls


def pairs(out: Path) -> set[tuple[int, int]]:
    t = pq.read_table(out / "pairs")
    a, b = t.column("id_a").to_numpy(), t.column("id_b").to_numpy()
    return set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))


def edges(out: Path) -> set[tuple[int, int]]:
    """The graph's edges as (source id, destination id)."""
    nodes = pq.read_table(out / "nodes")
    by_row = dict(zip(nodes.column("row").to_pylist(), nodes.column("id").to_pylist()))
    e = pq.read_table(out / "edges", columns=["src", "dst"])
    return {(by_row[a], by_row[b]) for a, b in zip(e.column("src").to_pylist(), e.column("dst").to_pylist())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--scenario", choices=["touch5", "remove-rewrite"], default="touch5")
    ap.add_argument("--command", choices=["run", "dedup", "graph"], default="run")
    ap.add_argument("--workdir", default="bench-update")
    ap.add_argument("extra", nargs="*", help="more flags for the command (after --)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    shards = 20 if args.scenario == "touch5" else 8
    subprocess.run(
        [sys.executable, "-m", "pipeline", "sample-data", str(data), "--rows", str(args.rows), "--dim", str(args.dim),
         "--shards", str(shards), "-q"],
        check=True,
        cwd=ROOT,
    )  # fmt: skip
    first = timed(command(args.command, data, work / "updated", args.extra))
    what = change(data, args.scenario, seed=1)
    update = timed(command(args.command, data, work / "updated", args.extra))
    fresh = timed(command(args.command, data, work / "fresh", args.extra))
    report = json.loads((work / "updated" / "report.json").read_text())
    print(f"{args.command}, {args.rows:,} x {args.dim} in {shards} shards; change: {what}")
    print("| run | wall s | vs fresh |")
    print("|---|---:|---:|")
    print(f"| first run (yesterday) | {first:.1f} | {first / fresh:.2f}x |")
    print(f"| update (same command, changed input) | {update:.1f} | {update / fresh:.2f}x |")
    print(f"| fresh run over the new input | {fresh:.1f} | 1.00x |")
    print("update phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items()))
    if args.command == "run":
        a, b = recall_vs_exact(data, [work / "updated", work / "fresh"])
        print(f"tie-aware recall@10 vs exact (1,000 sampled queries): update {a:.4f}, fresh {b:.4f}")
    elif args.command == "graph":
        ea, eb = edges(work / "updated"), edges(work / "fresh")
        ga, gb = (json.loads((work / o / "report.json").read_text())["graph"]["recall"] for o in ("updated", "fresh"))
        print(
            f"edges Jaccard {len(ea & eb) / max(1, len(ea | eb)):.4f} ({len(ea):,} vs {len(eb):,}; exact ties among "
            f"duplicates make the choice of equal neighbours arbitrary); graph recall (out-edges among the exact "
            f"{ga['k']} of {ga['queries']:,} sampled rows) {ga['graph_recall']:.4f} vs {gb['graph_recall']:.4f}"
        )
    elif args.command == "dedup":
        pa_, pb = pairs(work / "updated"), pairs(work / "fresh")
        fr = json.loads((work / "fresh" / "report.json").read_text())["dedup"]
        up = report["dedup"]
        print(
            f"pairs Jaccard {len(pa_ & pb) / max(1, len(pa_ | pb)):.4f} ({len(pa_):,} vs {len(pb):,}); rows dropped "
            f"{up['rows_dropped']:,} vs {fr['rows_dropped']:,} of {fr['rows_in']:,}"
        )


if __name__ == "__main__":
    main()
