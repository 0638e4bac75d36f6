#!/usr/bin/env python3
"""Benchmark: the graph build's shuffle reduce and connected components, on a finished graph.

Takes the output of a ``graph`` run (its ``edges/`` partitions and ``knn/`` lists) and times, on a
local Dask cluster of ``--workers`` one-thread workers:

* the edge map and reduce of every partition (``MapEdgesTask``, ``reduce_edges``), one after the
  other in this process, checking the reduced edges equal the graph's;
* connected components over the graph's edges, twice each way: labels learnt from the other
  partitions' label files, and by request and answer (``components.by_answers`` picks between
  them on machines of their own; here both are forced), with the rounds each took. Both must
  give the same labels.

    python -m pipeline graph --input DATA --output OUT --k 10
    python scripts/components_benchmark.py --graph OUT
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.shuffle.components import connected_components  # noqa: E402
from pipeline.shuffle.edges import MapEdgesTask, read_knn, reduce_edges  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graph", required=True, help="the output folder of a finished graph run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    out = Path(args.graph)
    edges = sorted(str(p) for p in (out / "edges").glob("part-*.parquet"))
    starts = np.array([int(pq.read_table(e, columns=["src"]).column(0)[0].as_py()) for e in edges])
    starts[0] = 0
    knn = sorted((out / "knn").glob("part-*.npz"))
    piece_starts = np.r_[0, np.cumsum([read_knn(p)[0].shape[0] for p in knn])]
    total = int(piece_starts[-1])
    print(f"{total:,} rows, {len(edges)} edge partitions, {sum(pq.read_metadata(e).num_rows for e in edges):,} edges")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        for i, lo in enumerate(starts.tolist()):
            hi = int(starts[i + 1]) if i + 1 < len(starts) else total
            pieces = [p for p, a in zip(knn, piece_starts[:-1].tolist(), strict=True) if lo <= a < hi]
            MapEdgesTask(
                knn_paths=tuple(str(p) for p in pieces),
                first_row=lo,
                starts=starts,
                out_dir=str(work / "map" / f"from-{i}"),
                metric="l2",
                min_score=None,
            ).run()
        mapped = time.perf_counter() - t
        maps = [str(work / "map" / f"from-{i}") for i in range(len(starts))]
        t = time.perf_counter()
        for i, path in enumerate(edges):
            src, dst, _, _ = reduce_edges(maps, i, "l2", "symmetric")
            graph = pq.read_table(path, columns=["src", "dst"])
            same = np.array_equal(src, graph.column("src").to_numpy()) and np.array_equal(
                dst, graph.column("dst").to_numpy()
            )
            if not same:
                sys.exit(f"partition {i}: the reduced edges differ from the graph's")
        print(f"edge map {mapped:.2f} s, reduce {time.perf_counter() - t:.2f} s (all partitions, one process)")
        shutil.rmtree(work / "map")
        logging.basicConfig(level=logging.WARNING)
        rounds: list[str] = []

        class Rounds(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                rounds.append(record.getMessage())

        logger = logging.getLogger("pipeline.shuffle.components")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(Rounds())
        labels = {}
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, silence_logs=logging.ERROR) as cluster:
            with Client(cluster) as client:
                for _ in range(args.repeat):
                    for answers in (False, True):
                        shutil.rmtree(work / "cc", ignore_errors=True)
                        t = time.perf_counter()
                        done = connected_components(
                            client, edges, starts=starts, total=total, work_dir=work / "cc", answers=answers
                        )
                        took = time.perf_counter() - t
                        got = np.concatenate([np.load(done / f"part-{p:05d}.npy") for p in range(len(starts))])
                        labels[answers] = got
                        how = "request and answer" if answers else "label files"
                        print(f"components by {how}: {took:.2f} s, {len(np.unique(got)):,} components; {rounds[-1]}")
        if not np.array_equal(labels[False], labels[True]):
            sys.exit("the two ways gave different labels")


if __name__ == "__main__":
    main()
