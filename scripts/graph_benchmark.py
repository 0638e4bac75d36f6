#!/usr/bin/env python3
"""Benchmark: the pipeline's k-NN graph against pynndescent's, on the same data, in one run.

For each: wall time of the whole process, peak RSS of its process tree, and graph recall (share
of each sampled row's exact k nearest neighbours present in its list) on one seeded sample of
rows against exact search. For the pipeline, recall is given for the directed lists (what
pynndescent builds) and for the symmetric graph it writes (a superset of them). pynndescent's
build time after numba's compile is shown too, so the comparison is fair either way.

    python scripts/graph_benchmark.py --data ../shared/data/pydocs-minilm --k 15
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from benchmark import load_all, measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a directory of Parquet shards with id and embedding columns")
    ap.add_argument("--workdir", default="bench-graph")
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--recall-queries", type=int, default=2000)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("pipeline_args", nargs="*", help="extra flags for the pipeline (after --)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve()
    py = sys.executable

    print("pipeline graph ...", flush=True)
    ours = measure(
        [
            py,
            "-m",
            "pipeline",
            "graph",
            "--input",
            str(data),
            "--output",
            str(work / "pipeline"),
            "--k",
            str(args.k),
            "--overwrite",
            "--recall-queries",
            "0",
            "--target-recall",
            "off",
            *args.pipeline_args,
        ]
    )
    report = json.loads((work / "pipeline" / "report.json").read_text())
    print("pynndescent ...", flush=True)
    nnd = measure(
        [
            py,
            str(HERE / "pynndescent_graph.py"),
            "--input",
            str(data),
            "--output",
            str(work / "nnd.npy"),
            "--k",
            str(args.k),
        ]
    )
    nnd_t = json.loads(nnd["stdout"].strip().splitlines()[-1])

    print("ground truth ...", flush=True)
    ids, x = load_all(data, "cosine")
    n = len(ids)
    rng = np.random.default_rng(12345)
    sample = np.sort(rng.choice(n, min(args.recall_queries, n), replace=False))
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    _, gt = flat.search(x[sample], args.k + 1)
    truth = [set([r for r in row if r != s][: args.k]) for row, s in zip(gt.tolist(), sample.tolist())]

    def recall(lists: list[set[int]]) -> float:
        return float(np.mean([len(f & t) / args.k for f, t in zip(lists, truth)]))

    row_of = {int(i): r for r, i in enumerate(ids.tolist())}
    nb = pq.read_table(work / "pipeline" / "neighbors", columns=["query_id", "neighbor_id"])
    lists = dict(zip(nb.column("query_id").to_pylist(), nb.column("neighbor_id").to_pylist()))
    ours_directed = recall([{row_of[i] for i in lists[int(ids[s])]} for s in sample])
    e = pq.read_table(work / "pipeline" / "edges", columns=["src", "dst"], filters=[("src", "in", sample.tolist())])
    graph_lists: dict[int, set[int]] = {int(s): set() for s in sample}
    for s, d in zip(e.column("src").to_pylist(), e.column("dst").to_pylist()):
        graph_lists[s].add(d)
    ours_graph = recall([graph_lists[int(s)] for s in sample])  # nodes are rows in input order here
    nnd_lists = np.load(work / "nnd.npy")
    nnd_recall = recall([set(nnd_lists[s].tolist()) for s in sample])

    print()
    print(
        f"data: {data.name}, {n:,} rows x {x.shape[1]}, cosine, k={args.k}; {os.cpu_count()} CPU cores; "
        f"pipeline index {report['index']['key']}, nprobe={report['search']['nprobe']}, "
        f"rerank={report['search']['rerank']}"
    )
    print(f"{'method':34s} {'wall s':>8s} {'vs ours':>8s} {'graph recall':>13s} {'peak RSS':>10s}")
    rows = [
        ("pipeline graph (ours), lists", ours["wall"], ours_directed, ours["peak_rss"]),
        ("pipeline graph (ours), symmetric", ours["wall"], ours_graph, ours["peak_rss"]),
        ("pynndescent (process)", nnd["wall"], nnd_recall, nnd["peak_rss"]),
        ("pynndescent (build after JIT)", nnd_t["build"], nnd_recall, None),
    ]
    for name, wall, rec, peak in rows:
        mem = f"{peak / 2**20:8.0f}MiB" if peak else f"{'':>10s}"
        print(f"{name:34s} {wall:8.1f} {wall / ours['wall']:7.2f}x {rec:13.4f} {mem}")
    print(f"pipeline phases: {report['timings_s']}; pynndescent: {nnd_t}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": [dict(zip(("method", "wall_s", "recall", "peak_rss"), r)) for r in rows],
                    "pipeline_phases": report["timings_s"],
                    "pynndescent": nnd_t,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
