"""List-major search against ``index.search`` on one IVF-Flat index built by ``knn-pipeline build``:
all stored rows as queries, several nprobe and batch sizes, one process, side by side.

    knn-pipeline build --input DATA --index-dir IDX --metric cosine --index-key IVF256,Flat
    python scripts/list_major_benchmark.py IDX [--nprobe 8 16 32] [--batch 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from pipeline.backends.lists import list_major_search
from pipeline.index.fill import load_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("index_dir")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--batch", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    index = faiss.downcast_index(load_index(args.index_dir))
    if not isinstance(index, faiss.IndexIVFFlat):
        raise SystemExit(f"{args.index_dir}: not an IVF-Flat index ({type(index).__name__})")
    x = np.ascontiguousarray(
        np.vstack([np.load(f) for f in sorted(Path(args.index_dir, "store", "vectors").glob("*.npy"))])
    )
    print(
        f"{type(index).__name__} nlist {index.nlist}, {len(x):,} x {x.shape[1]} queries, k={args.k}, "
        f"{faiss.omp_get_max_threads()} threads"
    )
    print(f"{'nprobe':>6} {'batch':>6} {'index.search s':>15} {'list-major s':>13} {'speed-up':>9} {'same ids':>9}")
    for nprobe in args.nprobe:
        params = faiss.SearchParametersIVF()
        params.nprobe = nprobe
        for batch in args.batch:
            start = time.perf_counter()
            want = np.vstack(
                [index.search(x[lo : lo + batch], args.k, params=params)[1] for lo in range(0, len(x), batch)]
            )
            plain = time.perf_counter() - start
            start = time.perf_counter()
            got = np.vstack(
                [list_major_search(index, x[lo : lo + batch], args.k, nprobe)[1] for lo in range(0, len(x), batch)]
            )
            lists = time.perf_counter() - start
            same = float(np.mean(want == got))
            print(f"{nprobe:>6} {batch:>6} {plain:15.2f} {lists:13.2f} {plain / lists:8.1f}x {same:9.4f}")


if __name__ == "__main__":
    main()
