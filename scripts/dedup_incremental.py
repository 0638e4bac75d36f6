#!/usr/bin/env python3
"""Benchmark: an incremental dedup (new shards added to an earlier run) against a full run.

Re-shards the input into ``--shards`` files (rows in their original order), then in one go:
a full ``dedup`` over all shards; a ``dedup`` over all but the last ``--new`` shards; and the
same command again over all shards in that output directory (the incremental run). Prints
wall times (whole processes) and whether the groups (rows by representative) and the kept
sets agree.

    python scripts/dedup_incremental.py --data ../shared/data/pydocs-minilm --threshold 0.95
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchmark import measure  # noqa: E402


def partition(out: Path) -> tuple[set[frozenset], set]:
    g = pq.read_table(out / "groups", columns=["id", "representative_id", "is_kept"]).to_pydict()
    by: dict = {}
    for i, r in zip(g["id"], g["representative_id"]):
        by.setdefault(r, set()).add(i)
    return {frozenset(m) for m in by.values() if len(m) > 1}, {i for i, k in zip(g["id"], g["is_kept"]) if k}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--workdir", default="bench-dedup")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--new", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("extra", nargs="*", help="more dedup flags (after --)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    shards = work / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(args.data)
    paths = []
    for s, rows in enumerate(np.array_split(np.arange(table.num_rows), args.shards)):
        paths.append(str(shards / f"part-{s:05d}.parquet"))
        if not Path(paths[-1]).exists():
            pq.write_table(table.slice(int(rows[0]), len(rows)), paths[-1])
    base = [sys.executable, "-m", "pipeline", "dedup", "--threshold", str(args.threshold), "--overwrite", *args.extra]
    old = paths[: -args.new]
    print(f"full run over {len(paths)} shards ...", flush=True)
    full = measure(base + ["--output", str(work / "full"), "--input", *paths])
    print(f"first run over {len(old)} shards ...", flush=True)
    first = measure(base + ["--output", str(work / "inc"), "--input", *old])
    inc_cmd = [c for c in base if c != "--overwrite"] + ["--output", str(work / "inc"), "--input", *paths]
    print(f"incremental run adding {args.new} shards ...", flush=True)
    inc = measure(inc_cmd)
    ri = json.loads((work / "inc" / "report.json").read_text())
    print("the same incremental run again (a no-op) ...", flush=True)
    again = measure(inc_cmd)
    gf, kf = partition(work / "full")
    gi, ki = partition(work / "inc")
    rf = json.loads((work / "full" / "report.json").read_text())
    print()
    print(f"{'run':34s} {'wall s':>8s} {'rows dropped':>13s} {'groups':>7s}")
    print(f"{'full, all shards':34s} {full['wall']:8.1f} {rf['dedup']['rows_dropped']:13,} {rf['dedup']['groups']:7,}")
    print(f"{'first, old shards':34s} {first['wall']:8.1f}")
    print(
        f"{'incremental, +' + str(args.new) + ' shards':34s} {inc['wall']:8.1f} {ri['dedup']['rows_dropped']:13,} "
        f"{ri['dedup']['groups']:7,}"
    )
    print(f"{'incremental again (no-op)':34s} {again['wall']:8.1f}")
    print(
        f"incremental / full wall: {inc['wall'] / full['wall']:.2f}; groups identical: {gf == gi} "
        f"({len(gf ^ gi)} differ); kept sets identical: {kf == ki} ({len(kf ^ ki)} rows differ)"
    )
    print(f"phases: full {rf['timings_s']}; incremental {ri['timings_s']}")


if __name__ == "__main__":
    main()
