"""The same job on local files and on S3, side by side: whole processes, wall time and rows/s.

S3 here is moto's server on loopback (what the tests use), so the figure measures our overhead
(listing, footers, ranged reads, staging and uploads through the S3 API), not a cloud's network.

    python scripts/storage_benchmark.py --rows 200000 --dim 64 [--command run|dedup]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from job_runs import moto_s3, sample_on_s3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--command", choices=("run", "dedup"), default="run")
    args = parser.parse_args()

    with moto_s3() as (fs, env), tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        sample_on_s3(fs, data, "bench/data", rows=args.rows, dim=args.dim, shards=args.shards)
        extra = ["--k", "10", "--exclude-self"] if args.command == "run" else ["--threshold", "0.95"]
        rows = []
        for where, src, out in (
            ("local", str(data), str(root / "out")),
            ("s3 (moto, loopback)", "s3://bench/data", "s3://bench/out"),
        ):
            cmd = [
                sys.executable,
                "-m",
                "pipeline",
                args.command,
                "--input",
                src,
                "--output",
                out,
                "--scratch-dir",
                str(root / "scratch"),
                "--metric",
                "cosine",
                *extra,
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
            rows.append((where, wall))
    print(f"{args.command}, {args.rows:,} x {args.dim}, {args.shards} shards")
    print(f"{'where':<22} {'wall s':>8} {'rows/s':>10} {'vs local':>9}")
    for where, wall in rows:
        print(f"{where:<22} {wall:8.1f} {args.rows / wall:10,.0f} {wall / rows[0][1]:8.2f}x")


if __name__ == "__main__":
    main()
