"""What the driver needs to know of a filled index, read by a worker: the driver never loads it.

The join's routing (list groups by list sizes), the tuning's choice of computed recall (IVF-Flat)
and the build's imbalance line need an index's shape, not its vectors. On nodes that share no
filesystem (:mod:`pipeline.io.nodes`) reading the index on the driver would bring it whole onto
the driver; one small task reads it where the work is done instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from pipeline.backends.kernels import ivf_of
from pipeline.backends.lists import is_ivf_flat
from pipeline.index.fill import load_lists
from pipeline.runtime.runner import result_of, submit

__all__ = ["IndexShape", "ShapeTask", "index_shape"]


@dataclass(frozen=True)
class IndexShape:
    """A filled index's kind and inverted-list sizes (no lists: ``nlist`` 0, ``list_sizes`` empty)."""

    ivf_flat: bool
    ntotal: int
    nlist: int
    code_size: int
    list_sizes: np.ndarray
    imbalance: float | None

    @classmethod
    def of(cls, index: faiss.Index) -> IndexShape:
        ivf = ivf_of(index)
        if ivf is None or ivf.invlists is None:
            return cls(False, int(index.ntotal), 0, 0, np.zeros(0, dtype=np.int64), None)
        lists: Any = ivf.invlists
        sizes = np.array([lists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)
        return cls(
            is_ivf_flat(index),
            int(index.ntotal),
            int(ivf.nlist),
            int(ivf.code_size),
            sizes,
            round(float(lists.imbalance_factor()), 3),
        )


@dataclass(frozen=True, kw_only=True)
class ShapeTask:
    """Read the shape of the finished index in ``index_dir``."""

    index_dir: str

    def run(self) -> IndexShape:
        return IndexShape.of(load_lists(self.index_dir, 0, 0))  # the lists' sizes, none of their bytes


def index_shape(client: Any, index_dir: str, label: str) -> IndexShape:
    """The shape of the finished index in ``index_dir``, read on a worker by a task of phase ``label``."""
    return result_of(submit(client, ShapeTask(index_dir=str(index_dir)), label))
