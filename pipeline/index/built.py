"""A finished index directory as the stages after the build see it (the join, the recall stage,
dedup and graph): where it is, what it indexes and how it was built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
