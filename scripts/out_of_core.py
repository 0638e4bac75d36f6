"""A job inside a memory cgroup smaller than its index directory, against the same job unconstrained.

    sudo python scripts/out_of_core.py --input DATA --work /tmp/ooc [--share 0.333] [--arg=--metric --arg=l2]

Runs the default self-join (``run --k 10 --exclude-self``) once unconstrained, then again in a fresh
output inside a cgroup whose memory limit is ``--share`` of the first run's index directory (row
store, lists and the kept partial indexes). The constrained run sees its limit as a container does:
in a mount namespace of its own, the cgroup's folder is bind-mounted over the memory controller's
root, so Dask (and the plan) read the limit as the machine's memory. Needs root and a cgroup v1
memory controller at /sys/fs/cgroup/memory (v2: /sys/fs/cgroup with memory.max). Prints both runs'
plans, wall times and the ratio; the issue's bar is 1.15x at a third of the index directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from job_runs import ROOT, job_command, run_job

V1 = Path("/sys/fs/cgroup/memory")


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _report(report: dict[str, Any], wall: float) -> dict[str, object]:
    return {
        "plan": f"{report['index']['key']}, nprobe {report['search']['nprobe']}, rerank {report['search']['rerank']}",
        "recall": report["recall"]["recall"],
        "met": report["recall"]["met"],
        "join": report["search"].get("strategy"),
        "lists_read": report.get("lists_read"),
        "wall_s": round(wall, 1),
        "phases_s": report["timings_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--work", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--share", type=float, default=1 / 3, help="the limit as a share of the index directory")
    parser.add_argument("--arg", action="append", default=[], help="passed to run")
    args = parser.parse_args()
    if os.geteuid() != 0 or not V1.is_dir():
        raise SystemExit("needs root and a cgroup v1 memory controller at /sys/fs/cgroup/memory")
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work}: give a new or empty folder")
    free = args.work / "unconstrained"
    wall, report = run_job(args.input, free, args.arg)
    first = _report(report, wall)
    index_bytes = _size(free / "index")
    limit = int(args.share * index_bytes)
    group = V1 / f"knn-pipeline-ooc-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        boxed = args.work / "constrained"
        inner = shlex.join(job_command(args.input, boxed, args.arg))
        script = f"mount --bind {group} {V1} && echo $$ > {V1}/cgroup.procs && exec {inner}"
        start = time.perf_counter()
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], check=True, cwd=ROOT)
        second = _report(json.loads((boxed / "report.json").read_text()), time.perf_counter() - start)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        for _ in range(50):  # the group empties once its processes have exited
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.2)
    print(json.dumps({"unconstrained": first, "constrained": second}, indent=1))
    boxed_bytes = _size(boxed / "index")  # a routed lossy plan writes its vectors in list order too
    print(
        f"index directory {index_bytes / 2**30:.2f} GiB; cgroup limit {limit / 2**30:.2f} GiB "
        f"({args.share:.2f} of it; {limit / boxed_bytes:.2f} of the constrained run's own, "
        f"{boxed_bytes / 2**30:.2f} GiB), peak charged {peak / 2**30:.2f} GiB"
    )
    print(
        f"unconstrained {first['wall_s']} s ({first['plan']}); constrained {second['wall_s']} s ({second['plan']}): "
        f"{float(second['wall_s']) / float(first['wall_s']):.2f}x"  # type: ignore[arg-type]
    )


if __name__ == "__main__":
    main()
