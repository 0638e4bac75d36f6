"""``plan``: what a job would do and cost, before it runs.

From the input's Parquet metadata (and one row group read, to time decoding) and two rates
measured on this machine in under a second (float32 matrix products, and Parquet decoding), it
prints the index the job would choose and why, the search it starts its tuning from, and per
phase an estimate of time, bytes read and written; then peak memory per worker and the disk the
index and outputs take. The model counts the work each phase does (the same counts the tuning's
cost model uses: vectors scanned, list sizes, exact scores) and divides by the measured rates,
with the efficiencies of each kind of kernel relative to a large matrix product. docs/benchmarks.md
compares it with measured runs.

Only the CPU backend on the embedded cluster is modelled; for a GPU or a remote cluster the
counts are printed and the times are a CPU machine's.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import faiss
import numpy as np

from pipeline.backends.lists import coarse_centroids, two_level
from pipeline.cluster.clients import local_layout
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.index.choice import (
    default_index_key,
    default_nprobe,
    default_rerank,
    explain_index_key,
    make_index,
    nlist_of,
    training_rows,
)
from pipeline.io.parquet import Dataset, plan_dataset, read_piece
from pipeline.jobs.stages import FAISS_WORKING, WORKING_COPIES

__all__ = ["PlanEstimate", "PhaseEstimate", "estimate", "measure_rates", "Rates"]

# efficiencies against a large float32 matrix product (measured on 2 cores: docs/benchmarks.md)
LIST_MAJOR_EFFICIENCY = 0.35  # IVF-Flat searched list by list: one product per list for its queries
EXACT_EFFICIENCY = 0.6  # exact search in GEMM tiles (the exact plan, ground truth)
CODE_SCAN_EFFICIENCY = 0.04  # SQ8 / PQ codes scanned query by query (decode + distance per code)
ASSIGN_EFFICIENCY = 0.5  # assigning rows to centroids (k-means steps, the fill)
KMEANS_ITERATIONS = 25  # faiss's default
TUNING_SETTINGS = 8  # settings the tuning walk measures, typically
START_SECONDS = 2.0  # starting the embedded cluster, planning, the report
TASK_SECONDS = 0.02  # scheduling one task
BASE_WORKER_BYTES = 350 << 20  # a worker process with numpy, pyarrow and faiss loaded
DISK_BYTES_PER_S = 400e6  # writing the row store and the index


@dataclass(frozen=True)
class Rates:
    """This machine's measured rates: float32 matrix products (flop/s, all cores) and Parquet
    decoding of the input's vectors (bytes of float32 vectors per second)."""

    gemm_flops: float
    decode_bytes: float


@dataclass(frozen=True)
class PhaseEstimate:
    name: str
    seconds: float
    work: str  # what is counted, in words
    read_bytes: int
    written_bytes: int


@dataclass(frozen=True)
class PlanEstimate:
    """What the job would do and cost (see the module docstring)."""

    command: str
    rows: int
    dim: int
    files: int
    pieces: int
    index_key: str
    why: str
    nlist: int | None
    nprobe: int | None
    rerank: int
    workers: int
    threads: int
    phases: tuple[PhaseEstimate, ...]
    peak_worker_bytes: int
    index_bytes: int
    store_bytes: int
    output_bytes: int
    rates: Rates

    @property
    def seconds(self) -> float:
        return START_SECONDS + sum(p.seconds for p in self.phases)

    def lines(self) -> list[str]:
        gib = 2**30
        out = [
            f"{self.command}: {self.rows:,} rows x {self.dim} dims in {self.files} file(s), {self.pieces} piece(s)",
            f"index: {self.index_key} ({self.why})",
            "search: "
            + (
                "exact"
                if self.nlist is None
                else f"nprobe about {self.nprobe} (a replica of the data at the same list size reached the target "
                f"there), rerank {self.rerank}"
            ),
            f"cluster: {self.workers} worker(s) x {self.threads} thread(s) on this machine "
            f"(measured: {self.rates.gemm_flops / 1e9:,.0f} GFLOP/s float32 products, "
            f"{self.rates.decode_bytes / 2**20:,.0f} MiB/s Parquet decoding)",
            "",
            f"{'phase':<10} {'time':>9} {'read':>10} {'written':>10}  work",
        ]
        for p in self.phases:
            out.append(
                f"{p.name:<10} {_duration(p.seconds):>9} {p.read_bytes / gib:>9.2f}G {p.written_bytes / gib:>9.2f}G  "
                f"{p.work}"
            )
        out += [
            f"{'total':<10} {_duration(self.seconds):>9}  (with {START_SECONDS:.0f} s to start and report)",
            "",
            f"peak memory per worker: {self.peak_worker_bytes / gib:.2f} GiB",
            f"disk: index {self.index_bytes / gib:.2f} GiB, row store {self.store_bytes / gib:.2f} GiB, "
            f"outputs {self.output_bytes / gib:.2f} GiB",
            "estimates from the input's metadata and this machine's rates; the recall target may move "
            "nprobe and re-ranking, and with them the join's time",
        ]
        return out


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def measure_rates(dataset: Dataset) -> Rates:
    """The two rates the model needs, measured here in well under a second."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 256), dtype=np.float32)
    b = rng.standard_normal((256, 2048), dtype=np.float32)
    a @ b  # warm up the BLAS threads
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        repeats += 1
    gemm = 2 * 2048 * 256 * 2048 * repeats / (time.perf_counter() - start)
    piece = min(dataset.pieces, key=lambda p: p.rows)
    read_piece(piece, dataset.id_column, dataset.vector_column, dataset.dim, dataset.id_type)  # cold: imports, cache
    start = time.perf_counter()
    _, x = read_piece(piece, dataset.id_column, dataset.vector_column, dataset.dim, dataset.id_type)
    decode = x.nbytes / max(time.perf_counter() - start, 1e-6)
    return Rates(gemm_flops=gemm, decode_bytes=decode)


REPLICA_ROWS = 20_000  # rows of the small replica that estimates the tuned nprobe
REPLICA_QUERIES = 300
REPLICA_MARGIN = 0.02  # the walk holds a confidence bound, not the mean, to the target: aim above it


def replica_nprobe(dataset: Dataset, *, nlist: int, metric: str, k: int, target: float, seed: int = 0) -> int:
    """The nprobe the tuning walk is likely to choose: the smallest that reaches ``target`` (plus
    ``REPLICA_MARGIN``, as the walk holds a lower confidence bound to it) on a
    replica of the data, ``REPLICA_ROWS`` rows drawn from pieces spread over the input, indexed
    with lists of the same size as the job's (``nlist * rows / n`` lists). Lists of equal size
    cover about as much of a row's neighbourhood at any scale, so the replica's nprobe carries over."""
    import faiss

    n = dataset.total_rows
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(dataset.pieces))
    parts, held = [], 0
    for i in order:
        _, x = read_piece(dataset.pieces[i], dataset.id_column, dataset.vector_column, dataset.dim, dataset.id_type)
        parts.append(x)
        held += len(x)
        if held >= 2 * REPLICA_ROWS:
            break
    x = np.concatenate(parts)
    x = x[rng.permutation(len(x))[:REPLICA_ROWS]]
    if metric == "cosine":
        faiss.normalize_L2(x)
    m = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    lists = max(1, min(len(x) // 39, round(nlist * len(x) / n)))
    quantizer = faiss.IndexFlat(x.shape[1], m)
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], lists, m)
    index.cp.seed = seed
    index.train(x)
    index.add(x)
    q_rows = rng.choice(len(x), size=min(REPLICA_QUERIES, len(x)), replace=False)
    flat = faiss.IndexFlat(x.shape[1], m)
    flat.add(x)
    _, truth = flat.search(x[q_rows], k + 1)
    truth = [set(t[t != r][:k].tolist()) for t, r in zip(truth, q_rows, strict=True)]

    def passes(nprobe: int) -> bool:
        index.nprobe = nprobe
        _, found = index.search(x[q_rows], k + 1)
        got = np.mean([len(t & set(f[f != r][:k].tolist())) / max(1, len(t)) for t, f, r in zip(truth, found, q_rows)])
        return bool(got >= min(0.999, target + REPLICA_MARGIN))

    low, high = 0, 1  # powers of two up, then bisection down, as the walk does
    while high < lists and not passes(high):
        low, high = high, min(lists, 2 * high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if passes(mid) else (mid, high)
    return min(high, nlist)


def estimate(config: Config, command: str, rates: Rates | None = None) -> PlanEstimate:
    """The plan and cost of ``command`` under ``config`` (see the module docstring)."""
    if not config.data.paths:
        raise ConfigError(f"plan {command}: --input is required")
    dataset = plan_dataset(config.data.paths, config.data.id_column, config.data.vector_column, config.partition_bytes)
    rates = rates or measure_rates(dataset)
    n = dataset.total_rows
    d = dataset.dim or _first_dim(dataset)
    workers, threads = local_layout(config.cluster)
    memory = _worker_memory(config, workers)
    spec, search = config.index, config.search
    k = search.k
    key = default_index_key(n, d, memory, workers=workers) if spec.key == "auto" else spec.key
    why = explain_index_key(n, d, memory, workers=workers) if spec.key == "auto" else "given by index_key"
    index = make_index(key, d, spec.metric or "cosine")
    nlist = nlist_of(index)
    n_train = training_rows(index, n, d, spec.sample_size)
    target = search.target_recall
    if search.nprobe or not nlist:
        nprobe = search.nprobe
    elif target:
        nprobe = replica_nprobe(
            dataset, nlist=nlist, metric=spec.metric or "cosine", k=k, target=target, seed=spec.seed
        )
    else:
        nprobe = default_nprobe(nlist)
    rerank = search.rerank if search.rerank is not None else default_rerank(index)
    flops = rates.gemm_flops
    vectors = 4 * n * d
    input_bytes = sum(os.path.getsize(f.path) for f in dataset.files if os.path.exists(f.path))
    queries = search.recall_queries
    phases = [
        PhaseEstimate(
            "scan",
            vectors / (rates.decode_bytes * max(1, workers))
            + vectors / DISK_BYTES_PER_S
            + TASK_SECONDS * len(dataset.pieces),
            f"decode {n:,} vectors, write the row store",
            input_bytes,
            vectors + 8 * n,
        )
    ]
    exact = nlist is None and key.startswith("Flat")
    code_bytes = _code_bytes(key, d)
    coarse = coarse_centroids(faiss.extract_index_ivf(index)) if nlist else 0.0
    if nlist:
        nested = two_level(faiss.extract_index_ivf(index).quantizer)
        # k-means scores each sample row against every list; two-level k-means against its n1
        # first-level centroids, then the lists of its own first-level cluster
        per_row = nlist if nested is None else int(nested.nlist) + nlist / max(1, int(nested.nlist))
        phases.append(
            PhaseEstimate(
                "train",
                2 * n_train * per_row * d * KMEANS_ITERATIONS / (flops * ASSIGN_EFFICIENCY),
                f"{'two-level ' if nested is not None else ''}k-means into {nlist:,} lists on {n_train:,} rows, "
                f"{KMEANS_ITERATIONS} iterations",
                4 * n_train * d,
                4 * nlist * d,
            )
        )
        phases.append(
            PhaseEstimate(
                "fill",
                2 * n * coarse * d / (flops * ASSIGN_EFFICIENCY)
                + n * (code_bytes + 8) * 2 / DISK_BYTES_PER_S
                + TASK_SECONDS * len(dataset.pieces),
                f"assign {n:,} rows to {nlist:,} lists ({coarse:,.0f} centroids scored a row), encode, merge",
                vectors,
                n * (code_bytes + 8) * 2,
            )
        )
    per_query = _query_flops(key, n=n, d=d, nlist=nlist, nprobe=nprobe, k=k, rerank=rerank, coarse=coarse)
    efficiency = _query_efficiency(key, exact)
    if queries:
        truth = 2 * 2 * queries * n * d / (flops * EXACT_EFFICIENCY)  # the tuning half and the held-out half
        # IVF-Flat's walk is computed from list ranks (no searches); other codes search each setting
        searched = nlist and not key.endswith(",Flat")
        tuning = TUNING_SETTINGS * queries * per_query / (flops * efficiency) if searched else 0.0
        phases.append(
            PhaseEstimate(
                "recall",
                truth + tuning,
                f"exact neighbours of {2 * queries:,} sampled queries"
                + (f", about {TUNING_SETTINGS} settings searched" if searched else ""),
                vectors,
                0,
            )
        )
    if command in ("run", "dedup", "graph", "join"):
        join_flops = n * n * d if exact else n * per_query  # the exact self-join scores each pair once
        phases.append(
            PhaseEstimate(
                "join",
                join_flops / (flops * efficiency) + TASK_SECONDS * len(dataset.pieces),
                f"{n:,} queries" + ("" if exact else f", {per_query / (2 * d):,.0f} vectors scored each"),
                vectors if exact else n * (code_bytes + 8) + (vectors if rerank else 0),
                n * k * 12 + 8 * n,
            )
        )
    if command in ("dedup", "graph"):
        edges = n * k
        phases.append(
            PhaseEstimate(
                command,
                edges * 2e-7 * 8 / max(1, workers * threads) + TASK_SECONDS * 6 * len(dataset.pieces),
                f"shuffle {2 * edges:,} list entries by row, components, groups",
                2 * edges * 20,
                2 * edges * 20,
            )
        )
    piece_bytes = dataset.max_piece_bytes(config.partition_bytes)
    peak = BASE_WORKER_BYTES + FAISS_WORKING + WORKING_COPIES * piece_bytes
    index_bytes = n * (code_bytes + 8) + (4 * nlist * d if nlist else 0) if not exact else 0
    return PlanEstimate(
        command=command,
        rows=n,
        dim=d,
        files=len(dataset.files),
        pieces=len(dataset.pieces),
        index_key=key,
        why=why,
        nlist=nlist,
        nprobe=nprobe,
        rerank=rerank,
        workers=workers,
        threads=threads,
        phases=tuple(phases),
        peak_worker_bytes=int(peak),
        index_bytes=int(index_bytes),
        store_bytes=int(vectors + 8 * n),
        output_bytes=int(n * k * 12 + 8 * n) if command != "build" else 0,
        rates=rates,
    )


def _first_dim(dataset: Dataset) -> int:
    _, x = read_piece(dataset.pieces[0], dataset.id_column, dataset.vector_column, None, dataset.id_type)
    return int(x.shape[1])


def _worker_memory(config: Config, workers: int) -> int | None:
    """One embedded worker's memory, as the cluster would give it: the given limit, else Dask's
    "auto", this machine's memory (within its cgroup and rlimit) shared out over the workers."""
    from dask.utils import parse_bytes
    from distributed.system import MEMORY_LIMIT

    limit = config.cluster.memory_limit
    if limit and limit != "auto":
        return int(parse_bytes(limit))
    return int(MEMORY_LIMIT // max(1, workers))


def _code_bytes(key: str, d: int) -> int:
    """Bytes a vector takes in the index's lists."""
    codes = key.split(",")[-1]
    if codes.startswith("Flat"):
        return 4 * d
    if codes.startswith("SQfp16"):
        return 2 * d
    if codes.startswith("SQ8"):
        return d
    if codes.startswith("SQ4"):
        return max(1, d // 2)
    if codes.startswith("PQ"):
        m = int("".join(ch for ch in codes[2:] if ch.isdigit()) or 1)
        return max(1, m // 2) if "x4" in codes else m
    return 4 * d


def _query_flops(
    key: str, *, n: int, d: int, nlist: int | None, nprobe: int | None, k: int, rerank: int, coarse: float = 0.0
) -> float:
    """Work one query does, in float32 multiply-adds x 2: the coarse assignment (``coarse``
    centroids: all ``nlist``, or fewer through a two-level quantizer), the scanned lists (a code
    counts as a vector), and the exact re-ranking of k x rerank candidates."""
    if not nlist:
        return 2 * n * d
    scanned = min(n, (nprobe or 1) * math.ceil(n / nlist))
    return 2 * d * ((coarse or nlist) + scanned + k * max(rerank, 0))


def _query_efficiency(key: str, exact: bool) -> float:
    if exact:
        return EXACT_EFFICIENCY
    return LIST_MAJOR_EFFICIENCY if key.endswith(",Flat") else CODE_SCAN_EFFICIENCY
