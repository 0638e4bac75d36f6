"""``plan``'s estimates against measured runs: for each data set, the estimate (time, peak memory
per worker), then the job itself in a subprocess, and the ratios.

    python scripts/plan_check.py --work /tmp/plan-check [--json out.json]

Data sets: pydocs-minilm (real, 30k x 384) when ../shared/data has it, and generated sets of other
shapes (exact search, IVF-Flat, SQ8). Each job runs with the defaults (target recall 0.95).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import parse_config  # noqa: E402
from pipeline.io.sample_data import clustered_vectors, write_shards  # noqa: E402
from pipeline.jobs.plan import estimate  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "pydocs-minilm"
GENERATED = {  # name: (rows, dim, shards)
    "exact 15k x 96": (15_000, 96, 2),
    "sample 50k x 64 (SQ8)": (50_000, 64, 4),
    "clustered 200k x 128 (IVF-Flat)": (200_000, 128, 8),
    "clustered 400k x 48 (SQ8)": (400_000, 48, 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for generated data and outputs")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()
    sets: dict[str, Path] = {}
    if SHARED.exists():
        sets["pydocs-minilm 30k x 384"] = SHARED
    for name, (rows, dim, shards) in GENERATED.items():
        folder = args.work / "data" / name.split()[0].replace(" ", "") / f"{rows}x{dim}"
        if not folder.exists():
            write_shards(str(folder), clustered_vectors(rows, dim, seed=11), shards=shards)
        sets[name] = folder
    rows = []
    for name, folder in sets.items():
        out = args.work / "out" / name.split()[0] / folder.name
        keys = {"input": str(folder), "output": str(out), "k": 10, "exclude_self": True, "overwrite": True}
        plan = estimate(parse_config(keys), "run")
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pipeline", "run", "--input", str(folder), "--output", str(out)]
        subprocess.run([*cmd, "--k", "10", "--exclude-self", "--overwrite", "-q"], check=True, cwd=ROOT)
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
        mem = report["memory"]
        peak = max([mem["driver_peak_rss"], *mem["workers_peak_rss"].values()])
        rows.append(
            {
                "data": name,
                "plan": f"{plan.index_key}, nprobe~{plan.nprobe}",
                "chosen": f"{report['index']['key']}, nprobe {report['search']['nprobe']}",
                "estimated_s": round(plan.seconds, 1),
                "measured_s": round(wall, 1),
                "time_ratio": round(plan.seconds / wall, 2),
                "estimated_peak_gib": round(plan.peak_worker_bytes / 2**30, 2),
                "measured_peak_gib": round(peak / 2**30, 2),
                "memory_ratio": round(plan.peak_worker_bytes / peak, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    print("| data | plan (estimated) | chosen | time est. / measured | peak memory est. / measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['data']} | {r['plan']} | {r['chosen']} | {r['estimated_s']} s / {r['measured_s']} s "
            f"({r['time_ratio']}x) | {r['estimated_peak_gib']} / {r['measured_peak_gib']} GiB ({r['memory_ratio']}x) |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
