#!/usr/bin/env python3
"""The k-NN graph as pynndescent builds it, for ``graph_benchmark.py``: load, build, save lists.

Loads every shard into memory (as a pynndescent user would), builds ``NNDescent`` with its
defaults and ``n_neighbors = k + 1`` (its lists include the point itself), and saves the lists
without self as ``.npy``. Prints JSON timings: the build after a small warm-up call (which pays
numba's compile), and the warm-up itself.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True, help=".npy file for the (n, k) neighbour rows")
    ap.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    ap.add_argument("--k", type=int, default=15)
    args = ap.parse_args()
    t0 = time.perf_counter()
    col = pq.read_table(args.input, columns=["embedding"]).column("embedding").combine_chunks()
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    t_load = time.perf_counter() - t0
    from pynndescent import NNDescent

    t0 = time.perf_counter()
    _ = NNDescent(x[:2000], n_neighbors=args.k + 1, metric=args.metric, random_state=0).neighbor_graph
    t_warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = NNDescent(x, n_neighbors=args.k + 1, metric=args.metric, random_state=0)
    rows, _ = index.neighbor_graph
    t_build = time.perf_counter() - t0
    own = np.arange(len(x))[:, None]
    out = np.array([[r for r in row if r != i][: args.k] for row, i in zip(rows, own[:, 0])], dtype=np.int64)
    np.save(args.output, out)
    print(json.dumps({"load": t_load, "warmup": t_warm, "build": t_build}))


if __name__ == "__main__":
    main()
