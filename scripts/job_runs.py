"""The self-join the benchmark scripts time: ``python -m pipeline run --k 10 --exclude-self`` on one
input, in a process of its own, and its ``report.json``. Imported by ``scale_benchmark.py``,
``plan_compare.py`` and ``out_of_core.py`` (run as ``python scripts/NAME.py``, so this folder is on
the path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def job_command(data: str, out: Path, extra: list[str]) -> list[str]:
    """The command line of the default self-join of ``data`` into ``out``, ``extra`` flags appended."""
    command = [sys.executable, "-m", "pipeline", "run", "--input", data, "--output", str(out)]
    return [*command, "--k", "10", "--exclude-self", *extra, "-q"]


def run_job(data: str, out: Path, extra: list[str]) -> tuple[float, dict[str, Any]]:
    """Run :func:`job_command` from the repository root; return its wall seconds and report."""
    start = time.perf_counter()
    subprocess.run(job_command(data, out, extra), check=True, cwd=ROOT)
    return time.perf_counter() - start, json.loads((out / "report.json").read_text())
