"""List-major search of an IVF-Flat index: the batch walks the inverted lists, not the queries.

``index.search`` scans each probed list once per query, so a batch of a thousand queries reads a
popular list a thousand times and scores it with vector-by-vector kernels. Here the batch is
assigned to its ``nprobe`` lists once; then list by list, the queries that probe it are scored
against the list's stored vectors with one matrix product (BLAS), and each query keeps its top
``k`` in a heap (``faiss.ResultHeap``). Lists are read in place (views of the memory map), not
copied. The same idea as FAISS's ``contrib.big_batch_search``, on the index's own
(memory-mapped) lists, bounded by the batch.
Results equal ``index.search`` at the same ``nprobe`` up to ties.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

__all__ = [
    "list_major_search",
    "list_major_rows",
    "walk_lists",
    "is_ivf_flat",
    "list_bytes_read",
    "LIST_MAJOR_MIN_QUERIES",
]

_reads = threading.local()  # bytes of inverted lists this thread's searches walked


def list_bytes_read() -> int:
    """Bytes of inverted lists the list-major searches of this thread have walked so far: each
    call counts every list it visits once (a batch streams its probed lists through memory once).
    A task reads it before and after its work to know what it read."""
    return int(getattr(_reads, "bytes", 0))


LIST_MAJOR_MIN_QUERIES = 256  # below this, a list holds too few of the batch's queries to gain
QUERIES_PER_LIST = 256  # a batch's queries per probed list worth one matrix product (measured below)
MIN_BATCH_ROWS = 16_384


def list_major_rows(nlist: int, nprobe: int | None) -> int:
    """Queries per list-major batch: enough that each list meets ``QUERIES_PER_LIST`` of them on
    average (``rows * nprobe / nlist``). Few probes of many lists leave a 16k batch with ~32
    queries a list, and the per-list products (and calls) then cost more than their arithmetic:
    at 1M x 128, IVF2048 and nprobe 4, 16k batches ran 15.5k queries/s, 64k-128k ran 22k."""
    return max(MIN_BATCH_ROWS, QUERIES_PER_LIST * int(nlist) // max(1, int(nprobe or 1)))


def list_major_search(
    index: faiss.IndexIVFFlat,
    x: np.ndarray,
    k: int,
    nprobe: int,
    threads: int | None = None,
    *,
    assign: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the ``k`` best stored vectors for each row of ``x`` among its
    ``nprobe`` nearest lists (``-1`` ids where fewer were found), as ``index.search`` gives them.

    The batch is assigned to its lists once (FAISS, all threads); then ``threads`` (FAISS's own
    count by default) Python threads each walk every list for their share of the queries, with
    one-threaded BLAS and a heap of their own, so nothing is shared and both the products and the
    k-selection run on every core, instead of one walk calling ``faiss.knn`` per list (whose
    multi-threaded BLAS and OpenMP selection spin idle threads against each other; measured in
    docs/benchmarks.md, ``scripts/list_major_benchmark.py``).
    """
    nq = len(x)
    nprobe = max(1, min(int(nprobe), int(index.nlist)))
    threads = max(1, min(int(threads or faiss.omp_get_max_threads()), nq))
    similarity = index.metric_type == faiss.METRIC_INNER_PRODUCT
    if assign is None:  # given: the lists each query walks (-1: none), e.g. only a routed join's group
        _, assign = index.quantizer.search(x, nprobe)
    visited = np.unique(assign[assign >= 0])
    invlists: Any = index.invlists
    walked = sum(invlists.list_size(int(i)) for i in visited.tolist()) * int(index.code_size)
    _reads.bytes = list_bytes_read() + walked
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    shares = [np.arange(t, nq, threads) for t in range(threads)]  # strided: every share meets every list alike

    def walk(share: np.ndarray) -> None:
        scores[share], ids[share] = walk_lists(index, x[share], assign[share], k, similarity)

    if threads == 1:
        walk(shares[0])
    else:
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
            list(pool.map(walk, shares))
    if not similarity:  # the walk ranked by |y|^2 - 2 x.y: add |x|^2 for squared distances
        scores += np.einsum("ij,ij->i", x, x)[:, None]
    return scores, ids


HEAP_CHUNK = 100_000  # scores a heap call takes at once: FAISS runs larger calls on OpenMP threads


def walk_lists(
    index: faiss.IndexIVFFlat, x: np.ndarray, assign: np.ndarray, k: int, similarity: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One thread's list-major walk: the queries ``x``, each with its ``nprobe`` lists ``assign``.
    Squared L2 is ranked without each query's own norm (added by the caller)."""
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    lists = flat[order]
    queries = (order // assign.shape[1]).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]])
    ends = np.r_[starts[1:], len(lists)]
    heap = faiss.ResultHeap(len(x), k, keep_max=similarity)
    heaps = heap.heaps
    scaled = x if similarity else x * np.float32(-2.0)
    invlists = index.invlists
    assert invlists is not None
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        number = int(lists[lo])
        size = invlists.list_size(number) if number >= 0 else 0
        if size == 0:
            continue
        # views of the list where it lies (memory map or RAM), not copies: plain and on-disk lists
        # hand out their own storage and release nothing
        list_ids = faiss.rev_swig_ptr(invlists.get_ids(number), size)
        stored = faiss.rev_swig_ptr(invlists.get_codes(number), size * index.code_size).view(np.float32)
        stored = stored.reshape(size, index.d)
        subset = queries[lo:hi]
        block = scaled[subset] @ stored.T
        if not similarity:
            block += np.einsum("ij,ij->i", stored, stored)[None, :]
        step = max(1, HEAP_CHUNK // size)
        for a in range(0, len(subset), step):  # one id line for every row (stride 0)
            rows = np.ascontiguousarray(subset[a : a + step])
            part = np.ascontiguousarray(block[a : a + step])
            heaps.addn_query_subset_with_ids(
                len(rows), faiss.swig_ptr(rows), size, faiss.swig_ptr(part), faiss.swig_ptr(list_ids), 0
            )
    heap.finalize()
    return heap.D, heap.I


def is_ivf_flat(index: faiss.Index) -> bool:
    """Whether ``index`` is a plain IVF-Flat index (no transform around it) list-major search takes."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat)
