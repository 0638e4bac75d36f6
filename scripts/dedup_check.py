#!/usr/bin/env python3
"""Check a finished ``dedup`` output against brute force: every pair, exact, in one process.

Loads every vector, scores all pairs in blocks (NumPy), keeps those passing the threshold,
finds connected components (scipy), and compares with the run in ``--output``: pairs found and
missed, pairs below the threshold, rows dropped and the groups (components mode). Prints the
brute-force time beside the run's own wall time and peak memory from its report.

    knn-pipeline dedup --input ../shared/data/pydocs-minilm --output out --threshold 0.95
    python scripts/dedup_check.py --data ../shared/data/pydocs-minilm --output out
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchmark import load_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--output", required=True, help="a finished dedup output directory (cosine or ip)")
    ap.add_argument("--block", type=int, default=2000)
    args = ap.parse_args()
    out = Path(args.output)
    report = json.loads((out / "report.json").read_text())
    d = report["dedup"]
    t = float(d["threshold"])
    if d["metric"] == "l2":
        raise SystemExit("this check covers cosine and ip runs")
    start = time.perf_counter()
    ids, x = load_all(Path(args.data), d["metric"])
    a_parts, b_parts = [], []
    for lo in range(0, len(x), args.block):
        s = x[lo : lo + args.block] @ x.T
        i, j = np.nonzero(s >= t)
        i = i + lo
        keep = i < j
        a_parts.append(i[keep])
        b_parts.append(j[keep])
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    n = len(ids)
    _, labels = connected_components(sp.coo_matrix((np.ones(a.size), (a, b)), shape=(n, n)), directed=False)
    brute = time.perf_counter() - start

    exact = {frozenset(p) for p in zip(ids[a].tolist(), ids[b].tolist())}
    pairs = pq.read_table(out / "pairs")
    found = {frozenset(p) for p in zip(pairs.column("id_a").to_pylist(), pairs.column("id_b").to_pylist())}
    g = pq.read_table(out / "groups", columns=["id", "representative_id", "is_kept"]).to_pydict()
    ours: dict = {}
    for i, rep in zip(g["id"], g["representative_id"]):
        ours.setdefault(rep, set()).add(i)
    theirs: dict = {}
    for r, lab in enumerate(labels.tolist()):
        theirs.setdefault(lab, set()).add(int(ids[r]))
    same_groups = {frozenset(m) for m in ours.values() if len(m) > 1} == {
        frozenset(m) for m in theirs.values() if len(m) > 1
    }
    print(f"threshold {t} ({d['metric']}), {n:,} rows, mode {d['mode']}")
    print(
        f"pairs: exact {len(exact):,}; found {len(found):,}; recall {len(exact & found) / max(1, len(exact)):.4f}; "
        f"found but not exact (below the threshold) {len(found - exact):,}"
    )
    print(f"rows dropped: ours {d['rows_dropped']:,}; brute-force components {n - labels.max() - 1:,}")
    if d["mode"] == "components":
        print(f"groups identical to brute-force components: {same_groups}")
    print(
        f"time: brute force {brute:.1f} s (one process, all vectors in memory); our whole dedup run "
        f"{report['wall_s']:.1f} s, driver peak {report['memory']['driver_peak_rss'] / 2**20:,.0f} MiB"
    )


if __name__ == "__main__":
    main()
