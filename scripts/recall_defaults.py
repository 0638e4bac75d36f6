"""Recall with default settings: run the pipeline with no recall flags on each input and tabulate
what it reached, against which target, with which plan, and what the tuning cost.

    python scripts/recall_defaults.py DATA_DIR [DATA_DIR ...] [--work bench-out/recall] [-- extra run flags]

Each input is self-joined (``run --exclude-self``) in a fresh output directory. The table comes
from each run's ``report.json``: tie-aware and strict recall@k on held-out queries, the target, the
index key, nprobe and re-rank factor chosen, the tuning phase (exact ground truth on the sample
plus the walk) beside the join it tunes, and the whole job's wall time.
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
    cmd = [sys.executable, "-m", "pipeline", "run", "--input", str(data), "--output", str(out), "--exclude-self",
           "-q", *extra]
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
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, default=Path("bench-out/recall"))
    args = parser.parse_args(argv)
    print("| data | rows x dim | recall@k tie-aware (strict) | target | plan | tuning s | join s | wall s | exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for data in args.inputs:
        r = run_one(data, args.work / data.name, extra)
        rep, rec = r["report"], (r["report"].get("recall") or {})
        index, t = rep.get("index", {}), rep.get("timings_s", {})
        recall = f"{rec.get('recall')} ({rec.get('recall_strict', rec.get('recall'))})" if rec else "-"
        plan = f"{index.get('key')}, nprobe={rec.get('nprobe')}, rerank={rec.get('rerank')}"
        print(f"| {data.name} | {index.get('ntotal', 0):,} x {index.get('dim')} | {recall} | {rec.get('target')} | "
              f"{plan} | {t.get('recall', 0):.1f} | {t.get('join', 0):.1f} | {r['wall']:.1f} | {r['exit']} |")
        if r["exit"]:
            print(f"  (exit {r['exit']}: {' '.join(r['stderr'])[:300]})")


if __name__ == "__main__":
    main()
