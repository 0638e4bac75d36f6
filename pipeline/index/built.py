"""A finished index directory as the stages after the build see it (the join, the recall stage,
dedup and graph): where it is, what it indexes and how it was built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.parquet import Dataset
from pipeline.io.store import RowStore
from pipeline.kinds import Metric

__all__ = ["BuiltIndex", "IndexRecord"]


@dataclass(frozen=True)
class IndexRecord:
    """The manifest's ``index`` stage: the finished index as later commands open it."""

    key: str
    dim: int
    metric: Metric
    ntotal: int
    nlist: int | None
    rerank_default: int
    starts: tuple[int, ...]
    why: str = "given by index_key"
    live: tuple[int, ...] | None = None  # the pieces in the store (None: all); the others are retired
    row_space: int | None = None  # global rows laid out, holes included (None: ntotal)
    imbalance: float | None = None  # list-size imbalance of the filled lists (None: no inverted lists)

    def store(self, index_dir: Path) -> RowStore:
        """The row store of the index in ``index_dir``, retired pieces' rows as holes."""
        space = self.ntotal if self.row_space is None else self.row_space
        return RowStore(index_dir / "store", np.array(self.starts, dtype=np.int64), space, self.live)


@dataclass(frozen=True)
class BuiltIndex:
    """A finished index directory, as later stages need it."""

    dir: Path
    dataset: Dataset
    store: RowStore
    dim: int
    metric: Metric
    key: str
    ntotal: int
    nlist: int | None
    rerank_default: int
    identity: dict[str, Any]
    why: str = "given by index_key"
    trained: str = ""  # the CRC of trained.faiss: lists joined with another training are stale
