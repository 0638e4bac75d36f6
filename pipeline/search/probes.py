"""Recall against nprobe of an IVF-Flat index, read off where the true neighbours lie.

IVF-Flat stores the vectors themselves, so a search at ``nprobe`` returns the best ``k`` of the
rows in the query's ``nprobe`` nearest lists, scored exactly: a true neighbour is found exactly
when its list is among them. With the exact neighbours of a sample known (its ground truth), the
recall at every ``nprobe`` follows from two things, with no search at all: the list each true
neighbour was filled into (read from the index's own lists) and that list's rank in the query's
probe order (one quantizer search over all lists). The count is a lower bound of the tie-aware
recall: a row outside the sample's top ``k`` that ties with the k-th is not credited, though a
search finding it would count it (exact duplicates share a list, so those are credited alike).
"""

from __future__ import annotations

import faiss
import numpy as np

from pipeline.backends.lists import coarse_assign, row_list_map, two_level

__all__ = ["neighbour_lists", "list_ranks", "hits_at"]

RANK_BLOCK_BYTES = 32 << 20  # working memory for one block of queries' probe orders
RANK_DEPTH = 2048  # lists ranked per query through a two-level quantizer: past any nprobe tuned (probe_steps)


def neighbour_lists(ivf: faiss.IndexIVF, rows: np.ndarray, row_lists: np.ndarray | None = None) -> np.ndarray:
    """The list each of ``rows`` (ids stored in the index) was filled into; -1 where absent.

    ``row_lists``: the fill's map from id to list (saved beside the index), read at ``rows`` only;
    else made from the lists' ids (:func:`pipeline.backends.lists.row_list_map`). Assigning the
    rows again instead could place a near-tie elsewhere."""
    lists = row_list_map(ivf) if row_lists is None else row_lists
    flat = np.asarray(rows, dtype=np.int64).ravel()
    inside = (flat >= 0) & (flat < len(lists))
    out = np.full(flat.shape, -1, dtype=np.int64)
    wanted = np.unique(flat[inside])  # sorted: a memory-mapped map is read in order, once a row
    out[inside] = np.asarray(lists[wanted], dtype=np.int64)[np.searchsorted(wanted, flat[inside])]
    return out.reshape(np.shape(rows))


def list_ranks(ivf: faiss.IndexIVF, queries: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """``(queries, k)``: the position of ``lists[i, j]`` in query ``i``'s probe order (0: probed
    first, so found from nprobe 1 on); ``nlist`` where the list is -1 or never probed. The order
    is the coarse assignment a search makes (:func:`pipeline.backends.lists.coarse_assign`) over
    all lists, or over the first ``RANK_DEPTH`` a two-level quantizer ranks (its candidates are
    fixed by the first level, so every smaller ``nprobe`` is a prefix of that order)."""
    nlist = int(ivf.nlist)
    depth = nlist if two_level(ivf.quantizer) is None else min(nlist, RANK_DEPTH)
    nq = len(queries)
    out = np.full(lists.shape, nlist, dtype=np.int64)
    block = max(1, RANK_BLOCK_BYTES // (16 * nlist))
    for lo in range(0, nq, block):
        hi = min(nq, lo + block)
        order = coarse_assign(ivf.quantizer, queries[lo:hi], depth)
        rank = np.full((hi - lo, nlist + 1), nlist, dtype=np.int64)  # column nlist: the -1 (none) slots
        rank[np.arange(hi - lo)[:, None], np.where(order >= 0, order, nlist)] = np.arange(depth)[None, :]
        rank[:, nlist] = nlist
        got = lists[lo:hi]
        valid = got >= 0
        out[lo:hi][valid] = rank[np.nonzero(valid)[0], got[valid]]
    return out


def hits_at(ranks: np.ndarray, n_valid: np.ndarray, nprobe: int) -> np.ndarray:
    """Per query with any true neighbour, the share of them found at ``nprobe``: a lower bound of
    :func:`pipeline.search.recall.tie_aware_hits` for an IVF-Flat search at that setting."""
    has = n_valid > 0
    return ((ranks < nprobe).sum(axis=1) / np.maximum(n_valid, 1))[has]
