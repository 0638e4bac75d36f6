#!/usr/bin/env python3
"""Benchmark: the pipeline's self-join against exact search, a plain FAISS script, HNSW and an
earlier checkout of the pipeline, in one run.

For each method: wall time (whole process, start to exit), peak memory (RSS summed over the
process and all its children, sampled every 50 ms) and recall@k on a seeded query sample
against exact ground truth. Exact search of every row is extrapolated from a timed sample of
queries when the data is large (``--exact-queries``), and the table says so. ``--hnsw`` adds
faiss HNSW32 with efSearch raised until the same sample reaches the target (the tuning is
not timed); ``--baseline DIR`` runs the same command from another checkout (e.g. an older main:
``git worktree add /tmp/old <commit>``).

    python scripts/benchmark.py --data ../shared/data/pydocs-minilm --metric cosine --hnsw --baseline /tmp/old
    python scripts/benchmark.py --generate 1000000x128 --metric l2 --index-key IVF4096,PQ32x4fs --nprobe 32 --rerank 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import psutil
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from pipeline.io.parquet import plan_dataset, read_piece  # noqa: E402
from pipeline.io.sample_data import clustered_vectors, write_shards  # noqa: E402


def measure(cmd: list[str], cwd: str | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak summed RSS of its process tree, and its stdout."""
    start = time.perf_counter()
    env = None if cwd is None else {**os.environ, "PYTHONPATH": str(Path(cwd).resolve())}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total)
            except psutil.Error:
                pass
            stop.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall": wall, "peak_rss": peak[0], "stdout": out, "stderr": err}


def load_all(data: Path, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Every vector in one array: the harness's ground truth only (not a measured method)."""
    ds = plan_dataset([str(data)], "id", "embedding", 1 << 30)
    parts = [read_piece(p, "id", "embedding", ds.dim) for p in ds.pieces]
    ids = np.concatenate([p[0].to_numpy() for p in parts])
    x = np.ascontiguousarray(np.concatenate([p[1] for p in parts]))
    if metric == "cosine":
        faiss.normalize_L2(x)
    return ids, x


def recall(path: Path, sample_ids: np.ndarray, truth_ids: np.ndarray, k: int) -> float:
    t = pq.read_table(path, columns=["query_id", "neighbor_id"])
    found = dict(zip(t.column("query_id").to_pylist(), t.column("neighbor_id").to_pylist()))
    hits = [
        len(set(found[int(q)][:k]) & set(truth.tolist())) / k
        for q, truth in zip(sample_ids, truth_ids)
        if int(q) in found
    ]
    return float(np.mean(hits)) if hits else float("nan")


def sgemm_peak(n: int = 4096, repeats: int = 3) -> float:
    """This machine's float32 matrix-multiply throughput (GFLOP/s, best of ``repeats``), through
    the BLAS NumPy links (the same kind FAISS's exact search runs on), all cores."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up threads and caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a directory of Parquet shards with id and embedding columns")
    src.add_argument("--generate", metavar="ROWSxDIM", help="generate clustered float32 data, e.g. 1000000x128")
    ap.add_argument("--workdir", default="bench-out")
    ap.add_argument("--metric", default="cosine")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--index-key", default=None, help="default: the pipeline's auto choice")
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--rerank", type=int, default=None)
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--exact-queries", type=int, default=20_000, help="time exact search on at most this many queries")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--target-recall", type=float, default=0.95, help="the pipelines' target and HNSW's tuning target")
    ap.add_argument("--hnsw", action="store_true", help="also faiss HNSW32, efSearch tuned to --target-recall")
    ap.add_argument("--baseline", metavar="DIR", help="also the same pipeline command run from this checkout")
    ap.add_argument("--skip-exact-plan", action="store_true", help="leave out the pipeline's exact plan")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    if args.generate:
        rows, dim = (int(v) for v in args.generate.lower().split("x"))
        data = work / f"data-{rows}x{dim}"
        if not (data / "_DONE").exists():
            print(f"generating {rows} x {dim} ...", flush=True)
            write_shards(
                data,
                clustered_vectors(rows, dim, clusters=max(100, rows // 2000), seed=0),
                shards=8,
                row_group_rows=50_000,
            )
            (data / "_DONE").write_text("")
    else:
        data = Path(args.data).resolve()

    print("ground truth ...", flush=True)
    ids, x = load_all(data, args.metric)
    n_rows, dim = x.shape
    rng = np.random.default_rng(12345)
    sample = np.sort(rng.choice(n_rows, min(args.recall_queries, n_rows), replace=False))
    flat = faiss.IndexFlat(dim, faiss.METRIC_L2 if args.metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    flat.add(x)
    _, gt = flat.search(x[sample], args.k + 1)
    truth = np.array([[r for r in row if r != s][: args.k] for row, s in zip(gt, sample)])
    truth_ids, sample_ids = ids[truth], ids[sample]
    truth_file = work / "truth.npz"
    np.savez(truth_file, query_ids=sample_ids, truth_ids=truth_ids)
    del x, flat

    py = sys.executable
    rows_out: list[tuple[str, float, int, float, str]] = []

    def pipeline_cmd(out: Path, *extra: str) -> list[str]:
        return [
            py,
            "-m",
            "pipeline",
            "run",
            "--input",
            str(data),
            "--output",
            str(out),
            "--metric",
            args.metric,
            "--k",
            str(args.k),
            "--exclude-self",
            "--overwrite",
            "--target-recall",
            str(args.target_recall),
            *extra,
        ]

    pipe_out = work / "pipeline"
    extra: list[str] = []
    for flag, value in (("--index-key", args.index_key), ("--nprobe", args.nprobe), ("--rerank", args.rerank)):
        if value is not None:
            extra += [flag, str(value)]
    print("pipeline ...", flush=True)
    pipe = measure(pipeline_cmd(pipe_out, *extra))
    report = json.loads((pipe_out / "report.json").read_text())
    key, nprobe, rerank = report["index"]["key"], report["search"]["nprobe"], report["search"]["rerank"]
    manifest = json.loads((pipe_out / "index" / "manifest.json").read_text())
    train_done = manifest["stages"].get("train", {}).get("done") or {}
    n_train = int(train_done.get("rows") or n_rows)
    rows_out.append(
        (
            "pipeline (ours)",
            pipe["wall"],
            pipe["peak_rss"],
            recall(pipe_out / "neighbors", sample_ids, truth_ids, args.k),
            f"{key}, nprobe={nprobe}",
        )
    )

    if args.baseline:
        base_out = work / "baseline"
        print(f"pipeline at {args.baseline} ...", flush=True)
        base = measure(pipeline_cmd(base_out, *extra), cwd=args.baseline)
        base_report = json.loads((base_out / "report.json").read_text())
        rows_out.append(
            (
                "pipeline, baseline",
                base["wall"],
                base["peak_rss"],
                recall(base_out / "neighbors", sample_ids, truth_ids, args.k),
                f"{Path(args.baseline).name}: {base_report['index']['key']}, "
                f"nprobe={base_report['search']['nprobe']}, rerank={base_report['search']['rerank']}",
            )
        )

    plain_cmd = [py, str(HERE / "plain_faiss.py"), "--input", str(data), "--metric", args.metric, "--k", str(args.k)]
    if key != "Flat":
        print(f"plain FAISS script ({key}, nprobe={nprobe}, rerank={rerank}) ...", flush=True)
        plain = measure(
            plain_cmd
            + [
                "--rerank",
                str(rerank),
                "--sample-size",
                str(n_train),
                "--output",
                str(work / "plain.parquet"),
                "--index-key",
                key,
            ]
            + (["--nprobe", str(nprobe)] if nprobe else [])
        )
        rows_out.append(
            (
                "plain FAISS script",
                plain["wall"],
                plain["peak_rss"],
                recall(work / "plain.parquet", sample_ids, truth_ids, args.k),
                "same index and settings",
            )
        )

    exact_q = min(args.exact_queries, n_rows)
    print(f"exact search (IndexFlat, {exact_q} queries) ...", flush=True)
    exact = measure(
        plain_cmd + ["--output", str(work / "exact.parquet"), "--index-key", "Flat", "--query-limit", str(exact_q)]
    )
    et = json.loads(exact["stdout"])["timings"]
    exact_wall = exact["wall"] + et["search"] * (n_rows / exact_q - 1) + et["write"] * (n_rows / exact_q - 1)
    in_exact = np.flatnonzero(np.isin(sample_ids, ids[:exact_q]))
    rows_out.append(
        (
            "exact (IndexFlat)",
            exact_wall,
            exact["peak_rss"],
            recall(work / "exact.parquet", sample_ids[in_exact], truth_ids[in_exact], args.k),
            "" if exact_q == n_rows else f"extrapolated from {exact_q:,} queries",
        )
    )

    if args.hnsw:
        print("HNSW32 (efSearch tuned to the target on the sample) ...", flush=True)
        hnsw = measure(
            plain_cmd
            + [
                "--output",
                str(work / "hnsw.parquet"),
                "--index-key",
                "HNSW32",
                "--tune-ef",
                str(truth_file),
                "--target-recall",
                str(args.target_recall),
            ]
        )
        ht = json.loads(hnsw["stdout"])["timings"]
        rows_out.append(
            (
                "faiss HNSW32",
                hnsw["wall"] - ht.get("tune", 0.0),
                hnsw["peak_rss"],
                recall(work / "hnsw.parquet", sample_ids, truth_ids, args.k),
                f"efSearch {ht.get('ef_search')}, build {ht['add']:.1f} s; tuning "
                f"({ht.get('tune', 0.0):.1f} s) not counted",
            )
        )

    peak = sgemm_peak()
    if not args.skip_exact_plan:
        print("pipeline, exact plan (--index-key Flat) ...", flush=True)
        exact_out = work / "pipeline-exact"
        exact_plan = measure(pipeline_cmd(exact_out, "--index-key", "Flat"))
        exact_report = json.loads((exact_out / "report.json").read_text())
        join_s = exact_report["timings_s"]["join"]
        floor = 2 * n_rows * n_rows * dim / (peak * 1e9)
        print(
            f"sgemm peak {peak:,.0f} GFLOP/s; exact plan's join {join_s:.1f} s against a {floor:.1f} s floor "
            f"({join_s / floor:.2f}x the floor)",
            flush=True,
        )
        rows_out.append(
            (
                "pipeline, exact plan",
                exact_plan["wall"],
                exact_plan["peak_rss"],
                recall(exact_out / "neighbors", sample_ids, truth_ids, args.k),
                f"join {join_s:.1f} s = {join_s / floor:.2f}x the sgemm floor ({floor:.1f} s at {peak:,.0f} GFLOP/s)",
            )
        )
    else:
        join_s = floor = float("nan")
    print()
    print(
        f"data: {data.name}, {n_rows:,} rows x {dim}, metric {args.metric}, k={args.k}; "
        f"index {key}, nprobe={nprobe}, rerank={rerank}; {os.cpu_count()} CPU cores"
    )
    print(
        f"{'method':22s} {'wall s':>9s} {'vs ours':>8s} {'rows/s':>10s} {'recall@' + str(args.k):>10s} "
        f"{'peak RSS':>10s}  note"
    )
    results = []
    for name, wall, rss, rec, note in rows_out:
        print(
            f"{name:22s} {wall:9.1f} {wall / pipe['wall']:7.2f}x {n_rows / wall:10,.0f} {rec:10.3f} "
            f"{rss / 2**20:8.0f}MiB  {note}"
        )
        results.append({"method": name, "wall_s": wall, "peak_rss_bytes": rss, "recall": rec, "note": note})
    print(f"pipeline phases: {report['timings_s']}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "index": key,
                    "nprobe": nprobe,
                    "rerank": rerank,
                    "rows": n_rows,
                    "results": results,
                    "phases": report["timings_s"],
                    "sgemm_gflops": peak,
                    "exact_join_s": join_s,
                    "exact_floor_s": floor,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
