"""Recall with default settings: run the pipeline with no recall flags on each input and tabulate
what it reached, against which target, with which plan, and what the tuning cost.

    python scripts/recall_defaults.py DATA_DIR [DATA_DIR ...] [--work bench-out/recall] [-- extra run flags]
    python scripts/recall_defaults.py --duplicate-heavy 100000 500000 --dim 64 --seeds 0 1 2

``--duplicate-heavy ROWS``: generated inputs (``pipeline.io.sample_data.duplicate_heavy_vectors``:
groups of identical vectors of 2 to 400 rows, and near-duplicates), one per size and seed, written
under ``--work`` once and reused.

Each input is self-joined (``run --exclude-self``) in a fresh output directory. The table comes
from each run's ``report.json``: tie-aware and strict recall@k on held-out queries, the target, the
index key, nprobe and re-rank factor chosen, the tuning phase (exact ground truth on the sample
plus the walk, the held-out measurement and any step-up) beside the join it tunes, its share of the
whole job's wall time, the lower confidence bound the setting was chosen by, and any step-ups.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run_one(data: Path, out: Path, extra: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        str(data),
        "--output",
        str(out),
        "--exclude-self",
        "-q",
        *extra,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return {"report": report, "wall": wall, "exit": proc.returncode, "stderr": proc.stderr.strip().splitlines()[-1:]}


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="*", type=Path)
    parser.add_argument("--work", type=Path, default=Path("bench-out/recall"))
    parser.add_argument("--duplicate-heavy", nargs="*", type=int, default=[], metavar="ROWS")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    args = parser.parse_args(argv)
    inputs = list(args.inputs)
    for rows in args.duplicate_heavy:
        for seed in args.seeds:
            d = args.work / "data" / f"dup-{rows}x{args.dim}-s{seed}"
            if not d.exists():
                from pipeline.io.sample_data import duplicate_heavy_vectors, write_shards

                write_shards(d, duplicate_heavy_vectors(rows, args.dim, seed=seed), shards=8)
            inputs.append(d)
    print(
        "| data | rows x dim | recall@k tie-aware (strict) | target | plan | bound (confidence) | step-ups | "
        "tuning s | join s | wall s | tuning share | exit |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for data in inputs:
        r = run_one(data, args.work / data.name, extra)
        rep, rec = r["report"], (r["report"].get("recall") or {})
        index, t = rep.get("index", {}), rep.get("timings_s", {})
        recall = f"{rec.get('recall')} ({rec.get('recall_strict', rec.get('recall'))})" if rec else "-"
        plan = f"{index.get('key')}, nprobe={rec.get('nprobe')}, rerank={rec.get('rerank')}"
        bound = f"{rec.get('bound')} ({rec.get('confidence')})" if rec.get("bound") is not None else "-"
        steps = (
            ", ".join(f"nprobe={p['nprobe']} rerank={p['rerank']}: {p['recall']:.3f}" for p in rec.get("step_ups", []))
            or "-"
        )
        share = t.get("recall", 0) / r["wall"] if r["wall"] else 0
        print(
            f"| {data.name} | {index.get('ntotal', 0):,} x {index.get('dim')} | {recall} | {rec.get('target')} | "
            f"{plan} | {bound} | {steps} | {t.get('recall', 0):.1f} | {t.get('join', 0):.1f} | {r['wall']:.1f} | "
            f"{share:.1%} | {r['exit']} |",
            flush=True,
        )
        if r["exit"]:
            print(f"  (exit {r['exit']}: {' '.join(r['stderr'])[:300]})")


if __name__ == "__main__":
    main()
