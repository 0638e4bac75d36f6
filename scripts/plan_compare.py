"""The default plan against the other plans the tool could have chosen, side by side on one input.

    python scripts/plan_compare.py --input DATA --work /tmp/plans [--metric l2] [--json out.json]

Runs the same self-join (``run --k 10 --exclude-self``, default recall target) once with the
default plan and once per alternative index key: IVF-Flat with sqrt(n) lists (searched list by
list), IVF-SQ8 and 4-bit fast-scan PQ with 2 sqrt(n) lists (tuned nprobe and re-rank), and exact
search (``Flat``, only up to ``--exact-max-rows``). Each run tunes its own nprobe and re-rank to the
target, so every row meets the same held-out recall target, and the table gives each plan's wall
time as a ratio to the fastest. The issue's bar: the default within 1.2x of the best.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
from job_runs import run_job

from pipeline.index.choice import nlist_for


def _shape(data: str) -> tuple[int, int]:
    files = sorted(Path(data).glob("*.parquet"))
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    first = pq.ParquetFile(files[0]).read_row_group(0, columns=["embedding"]).column(0)
    return rows, len(first[0])


def _alternatives(n: int, d: int, exact_max: int) -> dict[str, str]:
    fine = nlist_for(n, 2.0)  # the PQ and SQ rule's lists (pipeline/index/choice.py)
    keys = {"IVF-Flat sqrt(n)": f"IVF{nlist_for(n, 1.0)},Flat", "IVF-SQ8 2sqrt(n)": f"IVF{fine},SQ8"}
    if d % 2 == 0:
        keys["IVF-PQ4fs 2sqrt(n) + re-rank"] = f"IVF{fine},PQ{d // 2}x4fs"
    if n <= exact_max:
        keys["exact"] = "Flat"
    return keys


def _run(data: str, out: Path, extra: list[str]) -> dict[str, object]:
    wall, report = run_job(data, out, extra)
    return {
        "key": report["index"]["key"],
        "nprobe": report["search"]["nprobe"],
        "rerank": report["search"]["rerank"],
        "recall": report["recall"]["recall"],
        "met": report["recall"]["met"],
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--work", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--metric", default="cosine")
    parser.add_argument("--exact-max-rows", type=int, default=200_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work}: give a new or empty folder")
    n, d = _shape(args.input)
    runs = {"default": _run(args.input, args.work / "default", ["--metric", args.metric])}
    print(json.dumps({"plan": "default", **runs["default"]}), flush=True)
    for name, key in _alternatives(n, d, args.exact_max_rows).items():
        if key == runs["default"]["key"]:
            continue
        out = args.work / name.split()[0]
        runs[name] = _run(args.input, out, ["--metric", args.metric, "--index-key", key])
        print(json.dumps({"plan": name, **runs[name]}), flush=True)
    best = min(float(r["wall_s"]) for r in runs.values() if r["met"])  # type: ignore[arg-type]
    print(f"\n{args.input}: {n:,} x {d}, {args.metric}")
    print("| plan | key | nprobe | re-rank | recall | wall s | vs best |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        ratio = float(r["wall_s"]) / best  # type: ignore[arg-type]
        print(
            f"| {name} | {r['key']} | {r['nprobe']} | {r['rerank']} | {r['recall']}{'' if r['met'] else ' (missed)'} | "
            f"{r['wall_s']} | {ratio:.2f}x |"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": n, "dim": d, "metric": args.metric, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
