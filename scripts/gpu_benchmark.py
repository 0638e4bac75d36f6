#!/usr/bin/env python3
"""GPU against CPU: the same self-join on the same generated data and machine, phase by phase.

For each device: the whole job (``run``, Parquet in, Parquet out) as its own process, with wall
time, peak RSS, phase times from its report (plan, scan, train, fill, join, which includes
writing), join rows/s and recall@k measured by the job against exact search on a query sample.
On the GPU also: peak GPU memory and the share of the join the GPU was busy (NVML, sampled every
100 ms), and the join's time against the floor that the GPU's measured memory bandwidth sets
for reading the codes the probed lists hold.

The CPU path can be far slower at scale: ``--cpu-rows`` runs it on the first rows only (same
generator and seeds, so whole millions are the same rows) and the table says so; rows/s is the
comparable figure.

    python scripts/gpu_benchmark.py --generate 10000000x128 --devices gpu,cpu --cpu-rows 1000000
    python scripts/gpu_benchmark.py --generate 1000000x768 --devices gpu
    python scripts/gpu_benchmark.py --generate 50000x32 --devices cpu      # the harness itself, anywhere
    python scripts/gpu_benchmark.py --generate 2000000x128 --devices gpu --routed   # the routed join
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from benchmark import measure  # noqa: E402

from pipeline.io.sample_data import clustered_vectors, write_shards  # noqa: E402

GENERATE_CHUNK = 1_000_000  # rows generated and written at a time (bounded memory)


def generate(path: Path, rows: int, dim: int) -> Path:
    """Clustered float32 rows, one Parquet file per million (bounded memory, seeded per file)."""
    if (path / "_DONE").exists():
        return path
    print(f"generating {rows:,} x {dim} ...", flush=True)
    for lo in range(0, rows, GENERATE_CHUNK):
        hi = min(rows, lo + GENERATE_CHUNK)
        x = clustered_vectors(hi - lo, dim, clusters=max(100, (hi - lo) // 2000), seed=lo // GENERATE_CHUNK)
        tmp = path / f".chunk-{lo}"
        write_shards(tmp, x, shards=1, row_group_rows=65_536, first_id=lo)
        (tmp / "part-00000.parquet").rename(path / f"part-{lo // GENERATE_CHUNK:05d}.parquet")
        tmp.rmdir()
    (path / "_DONE").write_text("")
    return path


def code_size(index_dir: Path) -> int | None:
    """Bytes a vector's code takes in the lists the join scans."""
    from pipeline.backends.kernels import ivf_of
    from pipeline.index.fill import load_index

    ivf = ivf_of(load_index(index_dir))
    return int(ivf.code_size) if ivf is not None else None


class GpuSampler:
    """NVML samples of GPU 0 (memory used, utilisation) with their times, from a thread."""

    def __init__(self, every: float = 0.1) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.base = pynvml.nvmlDeviceGetMemoryInfo(self._h).used
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._h).used
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu
            self.samples.append((time.monotonic(), mem, util))
            self._stop.wait(self._every)

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak_bytes(self) -> int:
        return max((m for _, m, _ in self.samples), default=self.base) - self.base

    def busy_share(self, start: float, end: float) -> float | None:
        utils = [u for t, _, u in self.samples if start <= t <= end]
        return sum(utils) / (100 * len(utils)) if utils else None


def device_bandwidth() -> float:
    """Bytes/s one device-to-device copy moves, reads and writes counted (CuPy, 1 GiB, best of 10)."""
    import cupy

    a = cupy.empty(1 << 30, dtype=cupy.uint8)
    b = cupy.empty_like(a)
    best = float("inf")
    for _ in range(10):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        b[...] = a
        stop.record()
        stop.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * a.nbytes / best


def job(data: Path, out: Path, device: str, args: argparse.Namespace, *, routed: bool = False) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        str(data),
        "--output",
        str(out),
        "--device",
        device,
        "--metric",
        args.metric,
        "--k",
        str(args.k),
        "--exclude-self",
        "--overwrite",
    ]
    if routed:  # each list group read once, on the GPU one group at a time (pipeline.search.routed)
        cmd.append("--routed-join")
    for flag, value in (
        ("--index-key", args.index_key),
        ("--nprobe", args.nprobe),
        ("--target-recall", args.target_recall),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    print(f"{device}: {' '.join(cmd[3:])}", flush=True)
    if device == "gpu":
        with GpuSampler() as gpu:
            proc = measure(cmd)
            ended = time.monotonic()
    else:
        proc = measure(cmd)
    report = json.loads((out / "report.json").read_text())
    phases = report["timings_s"]
    rows = report["index"]["ntotal"]
    result = {
        "device": device + (" routed" if routed else ""),
        "rows": rows,
        "dim": report["index"]["dim"],
        "key": report["index"]["key"],
        "nprobe": report["search"]["nprobe"],
        "rerank": report["search"]["rerank"],
        "wall_s": round(proc["wall"], 2),
        "peak_rss_gib": round(proc["peak_rss"] / 2**30, 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "join_rows_per_s": round(rows / phases["join"]) if phases.get("join") else None,
        "recall": (report.get("recall") or {}).get("recall"),
    }
    if device == "gpu":
        # the join is the job's last phase: its window ends where the process ended (less the report)
        join_start = ended - phases.get("join", 0.0) - 1.0
        result["gpu_peak_gib"] = round(gpu.peak_bytes() / 2**30, 2)
        result["gpu_busy_share_in_join"] = gpu.busy_share(join_start, ended)
        bw = device_bandwidth()
        nlist = report["index"].get("nlist") or 1
        size = code_size(out / "index")
        if size and result["nprobe"]:
            scanned = rows * result["nprobe"] / nlist * rows * size  # every query reads its probed lists
            floor = scanned / bw
            result["bandwidth_gb_s"] = round(bw / 1e9)
            result["codes_scanned_gb"] = round(scanned / 1e9, 1)
            result["join_floor_s"] = round(floor, 2)
            result["join_over_floor"] = round(phases["join"] / floor, 1) if floor else None
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generate", metavar="ROWSxDIM", required=True)
    ap.add_argument("--devices", default="gpu,cpu")
    ap.add_argument("--cpu-rows", type=int, default=None, help="run the CPU job on the first rows only")
    ap.add_argument("--workdir", default="gpu-bench-out")
    ap.add_argument("--metric", default="l2")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index-key", default=None)
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--target-recall", type=float, default=0.9)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--routed", action="store_true", help="each job with --routed-join (list groups, each read once)")
    args = ap.parse_args()
    rows, dim = (int(v) for v in args.generate.lower().split("x"))
    work = Path(args.workdir).resolve()
    results = []
    for device in args.devices.split(","):
        n = min(rows, args.cpu_rows) if device == "cpu" and args.cpu_rows else rows
        data = generate(work / f"data-{n}x{dim}", n, dim)  # made once per work folder
        name = f"out-{device}{'-routed' if args.routed else ''}-{n}"
        results.append(job(data, work / name, device, args, routed=args.routed))
        if args.json:  # after every device: a timeout during the next one keeps this one's numbers
            Path(args.json).write_text(json.dumps(results, indent=2))
    print(
        "\n| device | rows | key | nprobe | wall | scan | train | fill | tune + recall | join | join rows/s | "
        "recall@k | peak RSS | "
        "GPU peak | GPU busy in join | join / bandwidth floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        p = r["phases_s"]
        print(
            f"| {r['device']} | {r['rows']:,} | {r['key']} | {r['nprobe']} | {r['wall_s']} s | {p.get('scan')} | "
            f"{p.get('train')} | {p.get('fill')} | {p.get('recall')} | {p.get('join')} | "
            f"{r['join_rows_per_s']:,} | {r['recall']} | "
            f"{r['peak_rss_gib']} GiB | {r.get('gpu_peak_gib', '')} | {r.get('gpu_busy_share_in_join', '')} | "
            f"{r.get('join_over_floor', '')} |"
        )
    by = {r["device"]: r for r in results}
    if "gpu" in by and "cpu" in by:
        print(
            f"\nGPU join rows/s over CPU join rows/s: "
            f"{by['gpu']['join_rows_per_s'] / by['cpu']['join_rows_per_s']:.1f}x"
        )


if __name__ == "__main__":
    main()
