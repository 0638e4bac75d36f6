"""Where exact search stops paying: whole-process wall time of a self-join with ``--index-key Flat``
(exact search over the row store) against the default plan (an IVF index tuned to the recall
target), on generated data of several sizes and dimensions, side by side on this machine.

    python scripts/exact_crossover.py [--rows 10000,20000,40000,80000] [--dims 64,384] [--work bench-out/crossover]

Prints one table row per (rows, dim): both wall times, the recall each reached, and ``n^2 d`` (the
exact plan's multiply-adds), from which ``index_key: auto``'s rule is set (see README, "Choosing
the index").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io.sample_data import clustered_vectors, write_shards  # noqa: E402


def run(data: Path, out: Path, extra: list[str]) -> tuple[float, dict]:
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
        "--metric",
        "l2",
        "-q",
        *extra,
    ]
    started = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.monotonic() - started
    return wall, json.loads((out / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,20000,40000,80000")
    parser.add_argument("--dims", default="64,384")
    parser.add_argument("--work", type=Path, default=Path("bench-out/crossover"))
    args = parser.parse_args()
    print("| rows | dim | n^2 d | exact wall s | default wall s | default plan | exact / default |")
    print("|---|---|---|---|---|---|---|")
    for dim in (int(d) for d in args.dims.split(",")):
        for n in (int(r) for r in args.rows.split(",")):
            data = args.work / f"data-{n}x{dim}"
            if not data.exists():
                write_shards(
                    data, clustered_vectors(n, dim, clusters=max(10, n // 200), seed=n + dim, latent=16), shards=4
                )
            exact, _ = run(data, args.work / "exact", ["--index-key", "Flat"])
            default, rep = run(data, args.work / "default", [])
            plan = f"{rep['index']['key']} nprobe={rep['search']['nprobe']} rerank={rep['search']['rerank']}"
            if rep["search"].get("strategy") == "exact":
                plan = f"exact ({rep['index']['key']})"
            print(
                f"| {n:,} | {dim} | {n * n * dim:.2e} | {exact:.1f} | {default:.1f} | {plan} | {exact / default:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
