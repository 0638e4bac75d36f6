"""Cost per row as the data grows: the same ``run`` on inputs of several sizes, side by side.

    python scripts/scale_benchmark.py --input 1M=/data/m1 --input 4M=/data/m4 --work /tmp/scale [--json out.json]

Each input runs the default job (``run --k 10 --exclude-self``, the default recall target, any extra
``--arg`` passed through) in its own process; the table gives the plan chosen, the held-out
tie-aware recall, the wall time, the CPU seconds of the whole process tree (``getrusage`` of the
waited-for children: driver, scheduler and workers) and the CPU microseconds per row, with each
size's ratio to the first input's. Generate inputs with ``python -m pipeline sample-data DIR --rows
N --dim D --shards S`` (clustered data: the first 4 of 16 shards of a 4M set are a 1M set).
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

from job_runs import run_job


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _row(name: str, data: str, out: Path, extra: list[str]) -> dict[str, object]:
    before = _cpu()
    wall, report = run_job(data, out, extra)
    cpu = _cpu() - before
    rows = int(report["index"]["ntotal"])
    return {
        "input": name,
        "rows": rows,
        "dim": report["index"]["dim"],
        "plan": f"{report['index']['key']}, nprobe {report['search']['nprobe']}",
        "recall": report["recall"]["recall"],
        "target": report["recall"]["target"],
        "met": report["recall"]["met"],
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "cpu_us_per_row": round(1e6 * cpu / rows, 1),
        "phases_s": report["timings_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", action="append", required=True, metavar="NAME=DIR", help="smallest first")
    parser.add_argument("--work", type=Path, required=True, help="a new or empty folder for the outputs")
    parser.add_argument("--arg", action="append", default=[], help="passed to run, e.g. --arg=--metric --arg=l2")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work}: give a new or empty folder")
    rows: list[dict[str, object]] = []
    for spec in args.input:
        name, _, data = spec.partition("=")
        rows.append(_row(name, data, args.work / name, args.arg))
        first = rows[0]
        rows[-1]["per_row_ratio"] = round(float(rows[-1]["cpu_us_per_row"]) / float(first["cpu_us_per_row"]), 2)  # type: ignore[arg-type]
        print(json.dumps(rows[-1]), flush=True)
    print("\n| input | rows | plan | recall (target) | wall s | CPU s | CPU us/row | ratio to first |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['input']} | {r['rows']:,} | {r['plan']} | {r['recall']} ({r['target']}) | {r['wall_s']} | "
            f"{r['cpu_s']} | {r['cpu_us_per_row']} | {r['per_row_ratio']}x |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
