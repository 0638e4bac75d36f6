"""A finished index directory as the stages after the build see it (the join, the recall stage,
dedup and graph): where it is, what it indexes and how it was built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.io.parquet import Dataset
from pipeline.io.store import RowStore
from pipeline.kinds import Metric

__all__ = ["BuiltIndex"]


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
