"""List-major search of an IVF-Flat index: the batch walks the inverted lists, not the queries.

``index.search`` scans each probed list once per query, so a batch of a thousand queries reads a
popular list a thousand times and scores it with vector-by-vector kernels. Here the batch is
assigned to its ``nprobe`` lists once; then list by list, the queries that probe it are scored
against the list's stored vectors with one matrix product (``faiss.knn``: BLAS), and each query
keeps its top ``k`` in a heap (``faiss.ResultHeap``). Lists are read in place (views of the
memory map), not copied. The same idea as FAISS's
``contrib.big_batch_search``, on the index's own (memory-mapped) lists, bounded by the batch.
Results equal ``index.search`` at the same ``nprobe`` up to ties.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["list_major_search", "list_major_rows", "is_ivf_flat", "LIST_MAJOR_MIN_QUERIES"]

LIST_MAJOR_MIN_QUERIES = 256  # below this, a list holds too few of the batch's queries to gain
QUERIES_PER_LIST = 256  # a batch's queries per probed list worth one matrix product (measured below)
MIN_BATCH_ROWS = 16_384


def list_major_rows(nlist: int, nprobe: int | None) -> int:
    """Queries per list-major batch: enough that each list meets ``QUERIES_PER_LIST`` of them on
    average (``rows * nprobe / nlist``). Few probes of many lists leave a 16k batch with ~32
    queries a list, and the per-list products (and calls) then cost more than their arithmetic:
    at 1M x 128, IVF2048 and nprobe 4, 16k batches ran 15.5k queries/s, 64k-128k ran 22k."""
    return max(MIN_BATCH_ROWS, QUERIES_PER_LIST * int(nlist) // max(1, int(nprobe or 1)))


def list_major_search(index: faiss.IndexIVFFlat, x: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the ``k`` best stored vectors for each row of ``x`` among its
    ``nprobe`` nearest lists (``-1`` ids where fewer were found), as ``index.search`` gives them."""
    nq = len(x)
    nprobe = max(1, min(int(nprobe), int(index.nlist)))
    similarity = index.metric_type == faiss.METRIC_INNER_PRODUCT
    _, assign = index.quantizer.search(x, nprobe)
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    lists = flat[order]
    queries = order // nprobe
    starts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]])
    ends = np.r_[starts[1:], len(lists)]
    heap = faiss.ResultHeap(nq, k, keep_max=similarity)
    invlists = index.invlists
    assert invlists is not None
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        number = int(lists[lo])
        size = invlists.list_size(number) if number >= 0 else 0
        if size == 0:
            continue
        # views of the list where it lies (memory map or RAM), not copies: plain and on-disk lists
        # hand out their own storage and release nothing
        ids = faiss.rev_swig_ptr(invlists.get_ids(number), size)
        stored = faiss.rev_swig_ptr(invlists.get_codes(number), size * index.code_size).view(np.float32)
        subset = queries[lo:hi]
        scores, local = faiss.knn(x[subset], stored.reshape(size, index.d), min(k, size), metric=index.metric_type)
        heap.add_result_subset(subset.astype(np.int64), scores, ids[local])
    heap.finalize()
    return heap.D, heap.I


def is_ivf_flat(index: faiss.Index) -> bool:
    """Whether ``index`` is a plain IVF-Flat index (no transform around it) list-major search takes."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat)
