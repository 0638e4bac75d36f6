"""Values at rows other partitions hold, by request and answer: no task reads another's file whole.

A task that needs a value (a component label, say) at rows that other partitions own *asks*: it
writes the distinct rows, partitioned by the partition that owns each (:func:`ask`). One
:class:`AnswerTask` per partition reads the asks addressed to it, looks the rows up in its own
values, and writes the answers back, partitioned by asker. The asker then reads its answers
(:func:`read_answers`). What crosses between machines is the distinct rows asked (8 bytes) and
their answers (17 bytes), instead of every asker fetching every file its rows touch (on nodes that
share no filesystem, each node would fetch every partition's file once per round).

Each answer also says whether the value is *settled*: the answered row's value is a row of the
answering partition whose own value is itself (a root, for pointer jumping). An asker then knows
which answers need no further question.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.io.nodes import fetched
from pipeline.shuffle.edges import read_partition, write_partitioned

__all__ = ["ask", "AnswerTask", "Answers", "read_answers"]


def ask(out_dir: str | os.PathLike[str], rows: np.ndarray, *, starts: np.ndarray, own: int) -> np.ndarray:
    """Ask for the values at the distinct ``rows`` that partitions other than ``own`` hold
    (first rows ``starts``). Returns the rows asked, sorted: the order :func:`read_answers`
    gives their answers in."""
    rows = pc.unique(pa.array(np.asarray(rows, dtype=np.int64))).to_numpy()  # hashed: no sort of every edge
    part = np.searchsorted(starts, rows, side="right") - 1
    away = part != own
    order = np.argsort(rows[away])
    write_partitioned(out_dir, part[away][order], len(starts), {"row": rows[away][order]})
    return rows[away][order]


def _asked(ask_dir: str | os.PathLike[str], part: int) -> np.ndarray:
    """The rows one asker asked of partition ``part`` (a ranged read of its map output)."""
    return read_partition([ask_dir], part, ("row",))["row"].astype(np.int64)


@dataclass(frozen=True, kw_only=True)
class AnswerTask:
    """Answer every asker in ``ask_dirs`` (one per partition, in partition order) with the values of
    partition ``part`` (``values``, over its rows from ``first_row``), under ``out``."""

    ask_dirs: tuple[str, ...]
    values: str
    first_row: int
    part: int
    out: str

    def run(self) -> int:
        asked = [_asked(d, self.part) for d in self.ask_dirs]
        asker = np.repeat(np.arange(len(asked)), [a.size for a in asked])
        rows = np.concatenate(asked) if asked else np.zeros(0, np.int64)
        own = np.load(fetched(self.values))
        value = own[rows - self.first_row] if rows.size else np.zeros(0, own.dtype)
        local = (value >= self.first_row) & (value < self.first_row + own.size)
        settled = local & (own[np.where(local, value - self.first_row, 0)] == value) if rows.size else local
        write_partitioned(self.out, asker, len(self.ask_dirs), {"row": rows, "value": value, "settled": settled})
        return int(rows.size)


@dataclass(frozen=True)
class Answers:
    """The answers one asker got: :meth:`at` looks rows up."""

    rows: np.ndarray
    values: np.ndarray
    settled: np.ndarray

    def at(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(values, settled)`` at ``rows``, every one of which was asked (a hash lookup: the rows
        of a partition's edges are many, the rows asked far fewer)."""
        where = pc.index_in(pa.array(np.asarray(rows, dtype=np.int64)), value_set=pa.array(self.rows))
        if where.null_count:
            raise RuntimeError("a row was looked up that was never asked, or its answer is missing")
        at = where.to_numpy()
        return self.values[at], self.settled[at]


def read_answers(answer_dirs: Sequence[str | os.PathLike[str]], part: int) -> Answers:
    """Every answer to partition ``part``'s asks, from the answer tasks' outputs ``answer_dirs``
    (one per partition, in partition order), in the order the rows were asked."""
    got = read_partition(answer_dirs, part, ("row", "value", "settled"))
    return Answers(got["row"].astype(np.int64), got["value"].astype(np.int64), got["settled"].astype(bool))
