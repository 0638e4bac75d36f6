"""The routed join against the batched join, side by side on one index: join time, recall, and
the lists' bytes each reads.

    python scripts/routed_benchmark.py --input DATA --work /tmp/routed-bench [--json out.json]

The index is built once (``run`` with an ``--index-dir`` outside the outputs), then the same
self-join runs batched and routed against it. Bytes read by the join's list scans: the batched
join reads every list its batch probes once per batch (a batch of b queries with nprobe lists each
touches nearly every list when b x nprobe >> nlist), the routed join each list once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "run", *args, "-q"], check=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work}: give a new or empty folder")
    index = args.work / "index"
    common = ["--input", args.input, "--index-dir", str(index), "--k", str(args.k), "--exclude-self"]
    rows = []
    for name, extra in (("batched", []), ("routed", ["--routed-join"]), ("batched again", [])):
        out = args.work / name.replace(" ", "-")
        wall = _run([*common, "--output", str(out), *extra])  # the index is built by the first run only
        report = json.loads((out / "report.json").read_text())
        manifest = json.loads((index / "manifest.json").read_text())
        ntotal = report["index"]["ntotal"]
        index_bytes = sum(f[1] for f in manifest["stages"]["fill"]["done"]["files"])
        rows.append(
            {
                "join": name,
                "plan": f"{report['index']['key']}, nprobe {report['search']['nprobe']}",
                "join_s": report["timings_s"]["join"],
                "wall_s": round(wall, 1),
                "recall": report["recall"]["recall"],
                "rows": ntotal,
                "index_gib": round(index_bytes / 2**30, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print("| join | plan | join phase | whole run | recall |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['join']} | {r['plan']} | {r['join_s']:.1f} s | {r['wall_s']:.1f} s | {r['recall']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
