"""An update's patch merge (``pipeline.search.update._merge``) on one piece: new rows offered to
the lists of a piece's queries, each list kept to its best ``--width``.

    python scripts/patch_benchmark.py [--queries 50000] [--width 20] [--offers 120000] [--repeat 5]

Makes ``--queries`` sorted lists of ``--width`` (global rows, squared distances) and ``--offers``
offers (a query, a new row, its distance), as a patch task of the 5% update in
``update_benchmark.py`` meets them (50,000 queries a piece, 20 wide with the spare, about 120,000
offers that beat a list's last entry), and times the merge, best of ``--repeat``, each time on a
fresh copy of the lists. Prints the queries whose lists changed, so two versions of the code can be
checked to agree: run it from a worktree of older code by ``PYTHONPATH`` to compare side by side.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.search.update import _merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=50_000)
    parser.add_argument("--width", type=int, default=20)
    parser.add_argument("--offers", type=int, default=120_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = rng.integers(0, 1_000_000, (args.queries, args.width)).astype(np.int64)
    scores = np.sort(rng.random((args.queries, args.width)).astype(np.float32), axis=1)
    q = rng.integers(0, args.queries, args.offers)
    r = rng.integers(1_000_000, 1_050_000, args.offers)
    s = (rng.random(args.offers) * 0.5).astype(np.float32)
    best, changed = float("inf"), np.zeros(0, dtype=np.int64)
    for _ in range(args.repeat):
        lists, dists = rows.copy(), scores.copy()
        start = time.perf_counter()
        changed = _merge(lists, dists, q=q, r=r, s=s, higher_better=False)
        best = min(best, time.perf_counter() - start)
    print(
        f"{args.offers:,} offers into {args.queries:,} lists of {args.width}: {1000 * best:.1f} ms "
        f"(best of {args.repeat}); {changed.size:,} lists changed, checksum {int(lists.sum()) % 1_000_003}"
    )


if __name__ == "__main__":
    main()
