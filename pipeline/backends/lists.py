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
from dataclasses import dataclass
from typing import Any, Protocol, cast

import faiss
import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.backends.kernels import ivf_of

__all__ = [
    "coarse_assign",
    "coarse_centroids",
    "two_level",
    "list_centroids",
    "group_lists",
    "search_assigned",
    "packed",
    "pack_like",
    "GroupSearch",
    "add_with_assignments",
    "list_major_search",
    "blas_knn",
    "list_major_rows",
    "walk_lists",
    "walk_above",
    "search_above",
    "list_views",
    "ListView",
    "is_ivf_flat",
    "list_bytes_read",
    "LIST_MAJOR_MIN_QUERIES",
    "first_level_probes",
    "scored_centroids",
    "row_list_map",
]


class GroupSearch(Protocol):
    """A list group's search, held by a backend for a routed join's score task."""

    def __call__(
        self, x: np.ndarray, k: int, assign: np.ndarray, coarse: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of each query's ``k`` best among its lists ``assign`` (global list
        numbers, ``-1``: none), squared L2 or inner products as FAISS reports them: exact for
        IVF-Flat, by the codes for lossy codes, whose searches need ``coarse``, the queries'
        scores to those lists (residual PQ adds them to its tables)."""
        ...


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
        assign = coarse_assign(index.quantizer, x, nprobe)
    views = list_views(index, np.unique(assign[assign >= 0]))
    _reads.bytes = list_bytes_read() + sum(len(v.ids) for v in views.values()) * int(index.code_size)
    scores = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)

    def walk(share: np.ndarray) -> None:
        scores[share], ids[share] = walk_lists(index, x[share], assign[share], k, similarity, views=views)

    _in_shares(nq, threads, walk)
    if not similarity:  # the walk ranked by |y|^2 - 2 x.y: add |x|^2 for squared distances
        scores += np.einsum("ij,ij->i", x, x)[:, None]
    return scores, ids


def _in_shares(nq: int, threads: int, work: Any) -> None:
    """``work(share)`` for ``threads`` strided shares of ``nq`` queries (every share meets every
    list alike); several threads each get one-threaded BLAS (and keep heaps of their own), one
    thread keeps the caller's BLAS."""
    shares = [np.arange(t, nq, threads) for t in range(threads)]
    if threads == 1:
        work(shares[0])
        return
    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, shares))


TILE_QUERIES = 64  # queries one product of :func:`blas_knn` scores: a fixed tile, so results do not hang on threads
TILE_ROWS = 4096  # stored rows one product scores


def blas_knn(x: np.ndarray, y: np.ndarray, k: int, metric: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """``faiss.knn(x, y, k, metric)`` by matrix products for any number of queries: FAISS scores
    fewer than ``distance_compute_blas_threshold / d`` queries (1,000 at d = 128) one at a time,
    several times slower per query (``scripts/exact_paths.py``). Tiles of ``TILE_QUERIES``
    consecutive queries are scored against ``TILE_ROWS`` stored rows at a time, each tile on one
    thread with its own heap, as the list walk does; squared L2 is ranked without the query's
    norm, then clamped at 0 as FAISS does.

    A product's bits depend on the rows scored with it, so a query's scores hang on the batch it
    came in (not on ``threads``): for batches always scored whole, such as a seeded recall
    sample, never for lists that a part redone alone must reproduce."""
    nq, n = len(x), len(y)
    similarity = metric == faiss.METRIC_INNER_PRODUCT
    out_scores = np.empty((nq, k), dtype=np.float32)
    out_ids = np.empty((nq, k), dtype=np.int64)
    numbers = np.arange(n, dtype=np.int64)
    scaled = x if similarity else x * np.float32(-2.0)
    norms = [np.einsum("ij,ij->i", y[lo : lo + TILE_ROWS], y[lo : lo + TILE_ROWS]) for lo in range(0, n, TILE_ROWS)]
    rows_per_add = max(1, HEAP_CHUNK // TILE_ROWS)  # heap calls under FAISS's OpenMP threshold
    tiles = np.arange(0, nq, TILE_QUERIES)

    def scan(mine: np.ndarray) -> None:
        for start in tiles[mine].tolist():
            q = scaled[start : start + TILE_QUERIES]
            heap = faiss.ResultHeap(len(q), k, keep_max=similarity)
            for b, lo in enumerate(range(0, n, TILE_ROWS)):
                block = y[lo : lo + TILE_ROWS]
                part = q @ block.T
                if not similarity:
                    part += norms[b][None, :]
                for a in range(0, len(q), rows_per_add):
                    chunk = part[a : a + rows_per_add]
                    heap.heaps.addn_with_ids(
                        len(block), faiss.swig_ptr(chunk), faiss.swig_ptr(numbers[lo:]), 0, a, len(chunk)
                    )
            heap.finalize()
            out_scores[start : start + len(q)], out_ids[start : start + len(q)] = heap.D, heap.I

    with threadpool_limits(1, user_api="blas"):  # one thread a product: bits that do not hang on threads
        _in_shares(len(tiles), max(1, min(int(threads), len(tiles))), scan)
    if not similarity:
        out_scores += np.einsum("ij,ij->i", x, x)[:, None]
        np.maximum(out_scores, 0, out=out_scores, where=out_ids >= 0)
    return out_scores, out_ids


def two_level(quantizer: faiss.Index) -> faiss.IndexIVFFlat | None:
    """The quantizer as an IVF-Flat index over the centroids (a two-level quantizer, key
    ``IVF{nlist}(IVF{n1},Flat),...``), else None (a flat one)."""
    inner = faiss.downcast_index(quantizer)
    return inner if isinstance(inner, faiss.IndexIVFFlat) else None


def list_centroids(quantizer: faiss.Index, first: int, last: int, dim: int) -> np.ndarray:
    """The centroids of lists ``[first, last)``: a flat quantizer's rows, or a two-level
    quantizer's, found in its own lists by their ids (the centroid numbers)."""
    nested = two_level(quantizer)
    if nested is None:
        return np.asarray(quantizer.reconstruct_n(first, last - first), dtype=np.float32).reshape(-1, dim)
    out = np.zeros((last - first, dim), dtype=np.float32)
    for view in list_views(nested, np.arange(nested.nlist)).values():
        inside = (view.ids >= first) & (view.ids < last)
        out[view.ids[inside] - first] = view.stored[inside]
    return out


def group_lists(ivf: faiss.IndexIVF, first: int, last: int) -> faiss.IndexIVF:
    """Lists ``[first, last)`` of ``ivf`` as an IVF index of their own, numbered from 0: the same
    storage (FAISS's ``SliceInvertedLists``, nothing copied) behind a flat quantizer of their
    centroids, with ``ivf``'s codec (the vectors, or its trained PQ or SQ). What a device copies to
    hold one list group of a routed join instead of all of ``ivf``'s lists; it lives no longer than
    ``ivf``, whose lists it reads. Raises ``TypeError`` for other IVF types (fast-scan codes)."""
    inner: Any = faiss.downcast_index(ivf)
    d, metric, n = int(inner.d), int(inner.metric_type), last - first
    quantizer = faiss.IndexFlat(d, metric)
    quantizer.add(list_centroids(inner.quantizer, first, last, d))
    out: Any
    if isinstance(inner, faiss.IndexIVFFlat):
        out = faiss.IndexIVFFlat(quantizer, d, n, metric)
    elif isinstance(inner, faiss.IndexIVFPQ) and not isinstance(inner, faiss.IndexIVFPQR):
        out = faiss.IndexIVFPQ(quantizer, d, n, int(inner.pq.M), int(inner.pq.nbits), metric)
        out.pq = inner.pq  # a copy of the trained codebooks
        out.by_residual = inner.by_residual
        if out.by_residual and metric == faiss.METRIC_L2:
            out.precompute_table()  # term tables of the group's centroids, as the whole index has them
    elif isinstance(inner, faiss.IndexIVFScalarQuantizer):
        out = faiss.IndexIVFScalarQuantizer(quantizer, d, n, inner.sq.qtype, metric, bool(inner.by_residual))
        out.sq = inner.sq  # a copy of the trained ranges
    else:
        raise TypeError(f"no list group of a {type(inner).__name__}")
    # the codes are the whole index's: the same code size, and trained as it is
    assert int(out.code_size) == int(inner.code_size), (out.code_size, inner.code_size)
    out.is_trained = True
    sliced = faiss.SliceInvertedLists(inner.invlists, first, last)  # type: ignore[attr-defined]  # not in the stubs
    out.replace_invlists(sliced, False)  # not owned: the slice and ivf are kept referenced below
    out.ntotal = sum(int(sliced.list_size(i)) for i in range(n))
    out.referenced_objects += [sliced, ivf, inner]
    return out


def packed(keys: np.ndarray) -> np.ndarray:
    """Each row's lists in this group first (in their order), ``-1`` after, as few columns as the
    row with the most needs: FAISS computes a query's code tables for every column it is given,
    and an index of the group's lists alone reads no more columns than it has lists."""
    return pack_like(keys, keys)


def pack_like(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` (one per entry of ``keys``, e.g. the coarse scores) in the columns
    :func:`packed` gives ``keys``."""
    order = np.argsort(keys < 0, axis=1, kind="stable")
    width = max(1, int((keys >= 0).sum(axis=1).max(initial=0)))
    return np.ascontiguousarray(np.take_along_axis(values, order, axis=1)[:, :width])


def search_assigned(
    ivf: Any, q: np.ndarray, k: int, keys: np.ndarray, dis: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best stored rows by their codes among each query's lists ``keys`` (``-1``
    skipped): (code scores, global rows; ``-1`` where fewer)."""
    n = len(q)
    params = faiss.SearchParametersIVF()
    params.nprobe = int(keys.shape[1])
    distances = np.empty((n, k), dtype=np.float32)
    labels = np.empty((n, k), dtype=np.int64)
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    ivf.search_preassigned_c(
        n,
        faiss.swig_ptr(q),
        k,
        faiss.swig_ptr(keys),
        faiss.swig_ptr(dis),
        faiss.swig_ptr(distances),
        faiss.swig_ptr(labels),
        False,
        params,
    )
    return distances, labels


def coarse_centroids(ivf: faiss.IndexIVF) -> float:
    """Centroids :func:`coarse_assign` scores a row against to find its lists: all ``nlist``, or
    through a two-level quantizer its ``n1`` first-level centroids and the lists of the ``nprobe1``
    of them it probes."""
    nested = two_level(ivf.quantizer)
    if nested is None:
        return float(ivf.nlist)
    n1 = max(1, int(nested.nlist))
    return float(n1 + min(int(nested.nprobe), n1) * ivf.nlist / n1)


def coarse_assign(quantizer: faiss.Index, x: np.ndarray, nprobe: int) -> np.ndarray:
    """``(len(x), nprobe)``: each row's ``nprobe`` nearest lists, nearest first (-1 past the
    candidates a two-level quantizer has).

    A flat quantizer is FAISS's own search (one product). A two-level one (the centroids in an
    IVF-Flat index of about ``sqrt(nlist)`` lists, probed at its own ``nprobe``) scores each row
    against the centroids of its probed first-level lists only (``n1 + nprobe1 * nlist / n1``
    instead of ``nlist``), list by list with BLAS like any IVF-Flat batch: what ``quantizer.search``
    gives, ties aside. The candidates are fixed by the first level, so a
    smaller ``nprobe`` gives a prefix of a larger one's order, as with a flat quantizer."""
    nested = two_level(quantizer)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if nested is None or len(x) < LIST_MAJOR_MIN_QUERIES:
        return quantizer.search(x, nprobe)[1]
    before = list_bytes_read()  # centroids, not the index's lists: not counted as lists read
    _, lists = list_major_search(nested, x, nprobe, int(nested.nprobe))
    _reads.bytes = before
    return lists


# a two-level quantizer probes the fewest first-level lists with which rows find this share of
# their CHECKED_LISTS nearest lists (those one product against every centroid finds)
FIRST_LEVEL_TARGET = 0.995
CHECKED_LISTS = 32


def first_level_probes(nested: faiss.IndexIVFFlat, centroids: np.ndarray, x: np.ndarray) -> int:
    """The first-level lists a two-level quantizer (``nested``: the ``centroids`` in an IVF-Flat
    index of their own) must probe for rows ``x`` to find :data:`FIRST_LEVEL_TARGET` of their
    :data:`CHECKED_LISTS` nearest lists: 1, 2, 3, 4, 6, 8, ... until they do (all of them at
    worst). How many it takes depends on the data: where the first-level lists span several
    clusters their centroids fall between them, and a row's nearest list can sit in its 9th
    nearest first-level list; elsewhere 2 or 4 do. The same rows give the same count."""
    depth = min(CHECKED_LISTS, len(centroids))
    x = np.ascontiguousarray(x, dtype=np.float32)
    truth = faiss.knn(x, np.ascontiguousarray(centroids, dtype=np.float32), depth, metric=nested.metric_type)[1]
    n1 = int(nested.nlist)
    probes = 1
    while probes < n1:
        before = list_bytes_read()
        _, found = list_major_search(nested, x, depth, probes)
        _reads.bytes = before  # centroids, not an index's lists
        if (found[:, :, None] == truth[:, None, :]).any(axis=2).mean() >= FIRST_LEVEL_TARGET:
            return probes
        probes = max(probes + 1, probes * 3 // 2)
    return n1


def scored_centroids(nested: faiss.IndexIVFFlat, x: np.ndarray) -> float:
    """Centroids a two-level quantizer (``nested``, at its ``nprobe``) scores a row of ``x`` on
    average: its first-level centroids, then those in the lists each row probes. Counted: the lists
    rows probe are larger than the average (rows fall where centroids are dense)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    invlists: Any = nested.invlists
    sizes = np.array([invlists.list_size(i) for i in range(int(nested.nlist))], dtype=np.int64)
    probed = nested.quantizer.search(x, int(nested.nprobe))[1]
    return float(nested.nlist + sizes[probed[probed >= 0]].sum() / max(1, len(x)))


def add_with_assignments(
    index: faiss.Index, x: np.ndarray, ids: np.ndarray | None, assign: Any, rows_per_batch: int
) -> None:
    """Add ``x`` (with ``ids``, else sequential) to a trained IVF index, coarse lists chosen by ``assign``.

    ``assign(quantizer, xb) -> (n,) int64 lists`` runs on the GPU in the GPU backend, and walks a
    two-level quantizer list by list on the CPU (:func:`coarse_assign`); encoding and list appends
    stay on the CPU index (``add_core``).
    """
    outer: Any = faiss.downcast_index(index)
    ivf: Any = faiss.downcast_index(cast(Any, ivf_of(index)))
    if ids is None:
        ids = np.arange(outer.ntotal, outer.ntotal + len(x), dtype=np.int64)
    transforms: Any = outer.chain if isinstance(outer, faiss.IndexPreTransform) else None  # a SWIG vector
    chain = (
        [faiss.downcast_VectorTransform(transforms.at(i)) for i in range(transforms.size())]
        if transforms is not None
        else []
    )
    for lo in range(0, len(x), rows_per_batch):
        xb = np.ascontiguousarray(x[lo : lo + rows_per_batch], dtype=np.float32)
        for vt in chain:
            xb = np.ascontiguousarray(vt.apply(xb))
        idb = np.ascontiguousarray(ids[lo : lo + rows_per_batch], dtype=np.int64)
        lists = np.ascontiguousarray(assign(ivf.quantizer, xb), dtype=np.int64)
        ivf.add_core(len(xb), faiss.swig_ptr(xb), faiss.swig_ptr(idb), faiss.swig_ptr(lists))
    if outer is not ivf:
        outer.ntotal = ivf.ntotal


HEAP_CHUNK = 100_000  # scores a heap call takes at once: FAISS runs larger calls on OpenMP threads
# scores one product of a list's queries makes at once (4 MiB): the gathered rows and products stay in
# cache, and the many queries of a short list (a two-level quantizer's 64 centroids) are not one huge
# product (at 1M x 128: the walk 2.65 -> 2.18 s, a two-level assignment 1.83 -> 1.07 s per 200k queries)
CHUNK_SCORES = 1 << 20


@dataclass
class ListView:
    """One inverted list where it lies (memory map or RAM, not copied): its ids, its stored
    vectors and the ids' pointer for the heap."""

    ids: np.ndarray
    stored: np.ndarray
    ids_ptr: Any
    _norms: np.ndarray | None = None

    def norms(self) -> np.ndarray:
        """``(1, size)`` squared norms of the stored vectors, computed by the first thread that walks
        the list, while its pages are in cache for the walk (the same values if two threads race),
        and kept for the batch: a ``d``-th of the list's bytes."""
        if self._norms is None:
            self._norms = np.einsum("ij,ij->i", self.stored, self.stored)[None, :]
        return self._norms


def list_views(index: faiss.IndexIVFFlat, numbers: np.ndarray) -> dict[int, ListView]:
    """Views of the non-empty lists ``numbers`` of ``index`` (no page of them is read here), made
    once per batch by the thread that hands it out, for every walking thread: each FAISS call from
    Python lets go of the GIL and takes it back, and made per list per thread (five calls a list)
    the walking threads queued for the GIL between their products (at 1M x 128 two processes walked
    1.2x to 1.3x as fast as two threads)."""
    invlists: Any = index.invlists
    out: dict[int, ListView] = {}
    for number in numbers.tolist():
        size = int(invlists.list_size(number)) if number >= 0 else 0
        if size == 0:
            continue
        # plain and on-disk lists hand out their own storage and release nothing
        ids = faiss.rev_swig_ptr(invlists.get_ids(number), size)
        stored = faiss.rev_swig_ptr(invlists.get_codes(number), size * index.code_size).view(np.float32)
        out[number] = ListView(ids, stored.reshape(size, index.d), faiss.swig_ptr(ids))
    return out


def _list_runs(assign: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``(query, list)`` pairs of ``assign`` (each row's lists) grouped by list: ``(queries,
    lists, starts, ends)``, the pairs' queries and lists in list order (queries in order within a
    list) and each list's run ``[start, end)`` of them."""
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    lists = flat[order]
    queries = (order // max(1, assign.shape[1])).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1]]) if lists.size else np.zeros(0, np.int64)
    return queries, lists, starts, np.r_[starts[1:], len(lists)].astype(np.int64)


def walk_lists(
    index: faiss.IndexIVFFlat,
    x: np.ndarray,
    assign: np.ndarray,
    k: int,
    similarity: bool,
    *,
    views: dict[int, ListView] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One thread's list-major walk: the queries ``x``, each with its ``nprobe`` lists ``assign``,
    over the lists' ``views`` (made here when not given). Squared L2 is ranked without each
    query's own norm (added by the caller)."""
    queries, lists, starts, ends = _list_runs(assign)
    if views is None:
        views = list_views(index, lists[starts])
    heap = faiss.ResultHeap(len(x), k, keep_max=similarity)
    add = heap.heaps.addn_query_subset_with_ids
    scaled = x if similarity else x * np.float32(-2.0)
    for lo, hi, number in zip(starts.tolist(), ends.tolist(), lists[starts].tolist(), strict=True):
        view = views.get(number)
        if view is None:  # an empty list, or -1: no list
            continue
        size = len(view.ids)
        norms = None if similarity else view.norms()
        step = max(1, CHUNK_SCORES // size)
        heap_rows = max(1, HEAP_CHUNK // size)
        for a in range(lo, hi, step):  # a chunk at a time: its rows and products stay in cache
            rows = queries[a : min(hi, a + step)]
            part = scaled[rows] @ view.stored.T
            if norms is not None:
                part += norms
            for b in range(0, len(rows), heap_rows):  # one id line for every row (stride 0)
                some = rows[b : b + heap_rows]
                add(len(some), faiss.swig_ptr(some), size, faiss.swig_ptr(part[b : b + heap_rows]), view.ids_ptr, 0)
    heap.finalize()
    return heap.D, heap.I


def search_above(
    index: faiss.IndexIVFFlat, x: np.ndarray, assign: np.ndarray, floor: np.ndarray, threads: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(query, id, score)`` of every stored vector in each query's lists ``assign`` that scores
    at or above the query's ``floor`` (at or below, for squared L2): a threshold join, list by
    list, one matrix product per list, no heap; ``threads`` walk a share of the queries each
    (:func:`walk_above`). Scores are what :func:`list_major_search` gives."""
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    threads = max(1, min(int(threads), len(x)))

    def walk(share: np.ndarray) -> None:
        q, ids, scores = walk_above(index, x[share], assign[share], floor[share])
        found.append((share[q], ids, scores))  # list.append is atomic

    _in_shares(len(x), threads, walk)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (
        np.concatenate([f[0] for f in found]),
        np.concatenate([f[1] for f in found]),
        np.concatenate([f[2] for f in found]),
    )


def walk_above(
    index: faiss.IndexIVFFlat, x: np.ndarray, assign: np.ndarray, floor: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One thread's :func:`search_above`: the queries ``x``, each with its lists ``assign``."""
    similarity = index.metric_type == faiss.METRIC_INNER_PRODUCT
    queries, lists, starts, ends = _list_runs(assign)
    views = list_views(index, lists[starts])
    # squared L2 is compared without the query's norm: |y|^2 - 2 x.y <= floor - |x|^2
    norms = np.einsum("ij,ij->i", x, x)
    bound = floor if similarity else floor - norms
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for lo, hi, number in zip(starts.tolist(), ends.tolist(), lists[starts].tolist(), strict=True):
        view = views.get(number)
        if view is None:
            continue
        # each list gathers its own queries, a few hundred rows that stay in cache: all of them
        # gathered at once took 100 MB for a piece of 50k queries (nprobe 4), mapped afresh and
        # faulted in each time (0.16 to 0.71 s a piece against 0.11 to 0.14 s, one thread)
        rows = queries[lo:hi]
        walked = x[rows]
        if not similarity:
            walked *= np.float32(-2.0)
        part = walked @ view.stored.T
        if not similarity:
            part += view.norms()
        limit = bound[rows][:, None]
        hit = np.flatnonzero(part >= limit if similarity else part <= limit)
        if hit.size:
            at, col = np.divmod(hit, part.shape[1])
            found.append((lo + at, view.ids[col], part.ravel()[hit]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    q = queries[np.concatenate([f[0] for f in found])]
    scores = np.concatenate([f[2] for f in found]).astype(np.float32)
    if not similarity:
        scores += norms[q]
    return q, np.concatenate([f[1] for f in found]).astype(np.int64), scores


def row_list_map(ivf: faiss.IndexIVF) -> np.ndarray:
    """``int32`` by id: the list each id stored in ``ivf`` was filled into, ``-1`` for ids it does
    not hold (up to its largest id). One pass over the lists' ids, a list at a time (views of the
    memory map), never the codes: the index keeps no map from id to list of its own."""
    invlists = ivf.invlists
    assert invlists is not None
    sizes = [int(invlists.list_size(i)) for i in range(int(ivf.nlist))]

    def ids(number: int) -> np.ndarray:
        return faiss.rev_swig_ptr(invlists.get_ids(number), sizes[number])

    top = max((int(ids(i).max()) for i, size in enumerate(sizes) if size), default=-1)
    out = np.full(top + 1, -1, dtype=np.int32)
    for number, size in enumerate(sizes):
        if size:
            out[ids(number)] = number
    return out


def is_ivf_flat(index: faiss.Index) -> bool:
    """Whether ``index`` is a plain IVF-Flat index (no transform around it) list-major search takes."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat)
