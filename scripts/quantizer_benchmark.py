"""Two-level coarse quantizers side by side: the centroids each row scores, its speed, and how often it
finds what a flat quantizer over all the centroids finds.

    python scripts/quantizer_benchmark.py --input DATA [--nlist 4096] [--first-level 64 128 256]

Trains ``IVF{nlist}`` the way the tool does (two-level k-means on a seeded sample of ``DATA``'s
rows, ``pipeline.index.train.train_two_level``), then puts its centroids behind first-level indexes
of each size and, for each number of first-level lists probed, assigns ``--rows`` other rows to their
nearest list (the fill) and to their ``--nprobe`` nearest (a query), on all of FAISS's threads. The
agreement columns compare with one exact product against every centroid.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from pipeline.backends.lists import coarse_assign
from pipeline.index.train import fill_first_level, train_two_level


def _rows(files: list[Path], count: int, skip: int) -> np.ndarray:
    """``count`` rows after the first ``skip`` of the shards' ``embedding`` column, as float32."""
    out: list[np.ndarray] = []
    seen = 0
    for f in files:
        column = pq.read_table(f, columns=["embedding"]).column("embedding").combine_chunks()
        values = np.asarray(column.values.to_numpy(zero_copy_only=False), dtype=np.float32)
        block = values.reshape(len(column), -1)
        take = block[max(0, skip - seen) :]
        seen += len(block)
        if len(take):
            out.append(take[: count - sum(len(o) for o in out)])
        if sum(len(o) for o in out) >= count:
            break
    return np.ascontiguousarray(np.vstack(out))


def _best_of(runs: int, quantizer: faiss.Index, x: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """The best of ``runs`` timings of :func:`coarse_assign`, and its result."""
    times, out = [], np.zeros(0)
    for _ in range(runs):
        t0 = time.perf_counter()
        out = coarse_assign(quantizer, x, k)
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="a folder of Parquet shards with an embedding column")
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--first-level", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--probes", type=int, nargs="+", default=[2, 3, 4, 8])
    parser.add_argument("--nprobe", type=int, default=6, help="lists a query is assigned to")
    parser.add_argument("--train-rows", type=int, default=262_144)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    files = sorted(args.input.glob("*.parquet"))
    sample = _rows(files, args.train_rows, 0)
    x = _rows(files, args.rows, args.train_rows)
    d = x.shape[1]
    trained = faiss.index_factory(d, f"IVF{args.nlist}(IVF64,Flat),Flat")
    ivf = faiss.extract_index_ivf(trained)
    train_two_level(ivf, sample, seed=1234)
    nested = faiss.downcast_index(ivf.quantizer)
    nested.make_direct_map()
    centroids = nested.reconstruct_n(0, nested.ntotal)
    truth = faiss.knn(x[:20_000], centroids, args.nprobe)[1]
    print(
        f"{args.nlist} lists of {len(sample):,} training rows x {d}; {len(x):,} rows assigned, "
        f"{faiss.omp_get_max_threads()} threads"
    )
    print(
        f"{'first level':>11} {'probed':>6} {'scored':>7} {'fill rows/s':>12} {'nearest':>8} "
        f"{'query rows/s':>13} {'top':>7}"
    )
    for n1 in args.first_level:
        first = faiss.IndexIVFFlat(faiss.IndexFlat(d, ivf.metric_type), d, n1, ivf.metric_type)
        fill_first_level(first, centroids, sample, seed=1234)  # as training does, its probes counted
        sizes = np.array([first.invlists.list_size(i) for i in range(n1)])
        print(f"{n1} first-level lists: training would probe {first.nprobe}")
        for probes in args.probes:
            first.nprobe = probes
            scored = n1 + sizes[first.quantizer.search(x[:20_000], probes)[1]].sum(axis=1).mean()
            fill_s, near = _best_of(2, first, x, 1)
            query_s, top = _best_of(2, first, x, args.nprobe)
            nearest = float((near[:20_000, 0] == truth[:, 0]).mean())
            shared = np.mean([len(set(a) & set(b)) for a, b in zip(top[:20_000], truth, strict=True)]) / args.nprobe
            print(
                f"{n1:>11} {probes:>6} {scored:>7.0f} {len(x) / fill_s:>12,.0f} {nearest:>8.4f} "
                f"{len(x) / query_s:>13,.0f} {shared:>7.4f}"
            )


if __name__ == "__main__":
    main()
