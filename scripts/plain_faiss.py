#!/usr/bin/env python3
"""The baseline a user would write by hand: load every shard, train, add, search, write.

Everything lives in one process (the dataset, the index, all results). With ``--index-key Flat``
it is exact search. Used by ``benchmark.py`` to compare against the pipeline on the same data
and settings; prints its phase timings as JSON on stdout.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--index-key", default="Flat")
    ap.add_argument("--metric", default="cosine", choices=["l2", "ip", "cosine"])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, default=None)
    ap.add_argument("--rerank", type=int, default=0)
    ap.add_argument("--sample-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--query-limit", type=int, default=None, help="search only the first N rows (timing sample)")
    ap.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch")
    ap.add_argument(
        "--tune-ef",
        metavar="TRUTH_NPZ",
        default=None,
        help="HNSW: before the timed search, raise efSearch from 16 until recall@k on the sample in this "
        "file (query_ids, truth_ids: (n, k) ids) reaches --target-recall; the tuning time is "
        "reported apart",
    )
    ap.add_argument("--target-recall", type=float, default=0.95)
    args = ap.parse_args()
    t: dict[str, float] = {}

    t0 = time.perf_counter()
    files = sorted(glob.glob(os.path.join(args.input, "*.parquet")))
    table = pa.concat_tables([pq.read_table(f, columns=["id", "embedding"]) for f in files])
    ids = table.column("id").to_numpy()
    x = np.ascontiguousarray(table.column("embedding").combine_chunks().flatten().to_numpy().astype(np.float32))
    x = x.reshape(len(ids), -1)
    del table
    if args.metric == "cosine":
        faiss.normalize_L2(x)
    t["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    metric = faiss.METRIC_L2 if args.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(x.shape[1], args.index_key, metric)
    for layer in (index, faiss.try_extract_index_ivf(index)):
        if layer is not None and hasattr(faiss.downcast_index(layer), "do_polysemous_training"):
            faiss.downcast_index(layer).do_polysemous_training = False
    if not index.is_trained:
        rng = np.random.default_rng(args.seed)
        n = min(args.sample_size or len(x), len(x))
        index.train(x[np.sort(rng.choice(len(x), n, replace=False))])
    t["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index.add(x)
    if args.nprobe:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", args.nprobe)
    t["add"] = time.perf_counter() - t0
    ef = args.ef_search
    if args.tune_ef:
        t0 = time.perf_counter()
        truth = np.load(args.tune_ef)
        order = np.argsort(ids)
        sample = order[np.searchsorted(ids, truth["query_ids"], sorter=order)]
        want = truth["truth_ids"]
        for ef in (16, 32, 64, 128, 256, 512, 1024, 2048):
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
            _, found = index.search(x[sample], args.k + 1)
            hits = [
                len(set(ids[f[(f != s) & (f >= 0)]][: args.k].tolist()) & set(w.tolist())) / args.k
                for f, s, w in zip(found, sample, want)
            ]
            if np.mean(hits) >= args.target_recall:
                break
        t["tune"] = time.perf_counter() - t0
    if ef:
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", ef)
        t["ef_search"] = ef

    t0 = time.perf_counter()
    nq = min(args.query_limit or len(x), len(x))
    q = x[:nq]
    width = args.k * max(args.rerank, 1) + 1
    scores, rows = index.search(q, width)
    if args.rerank:
        cand = x[np.maximum(rows, 0)]
        exact = np.einsum("nd,ncd->nc", q, cand)
        if args.metric == "l2":
            exact = -((cand * cand).sum(2) - 2 * exact + (q * q).sum(1)[:, None])
        exact[rows < 0] = -np.inf
        order = np.argsort(-exact, axis=1)
        rows = np.take_along_axis(rows, order, 1)
        scores = np.take_along_axis(exact, order, 1)
        if args.metric == "l2":
            scores = -scores
    keep = rows != np.arange(nq)[:, None]  # exclude self
    keep &= rows >= 0
    first = np.argsort(~keep, axis=1, kind="stable")[:, : args.k]
    rows = np.take_along_axis(rows, first, 1)
    scores = np.take_along_axis(scores, first, 1).astype(np.float32)
    t["search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    offsets = pa.array(np.arange(0, nq * args.k + 1, args.k, dtype=np.int32))
    pq.write_table(
        pa.table(
            {
                "query_id": pa.array(ids[:nq]),
                "neighbor_id": pa.ListArray.from_arrays(offsets, pa.array(ids[rows.ravel()])),
                "score": pa.ListArray.from_arrays(offsets, pa.array(scores.ravel())),
            }
        ),
        args.output,
    )
    t["write"] = time.perf_counter() - t0
    print(json.dumps({"rows": len(x), "queries": nq, "timings": t}))


if __name__ == "__main__":
    main()
