"""Typed outcomes: what each stage and each job produced, as frozen dataclasses.

Stages return these; ``report.py`` renders them; ``report.json`` is :meth:`JobReport.to_json`.
Records stored in the manifest are the same classes, read back with :func:`from_dict`, so a
resumed run gets the types a fresh one does.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.kinds import Metric, Strategy

__all__ = [
    "recall_verdict",
    "dedup_verdict",
    "from_dict",
    "to_dict",
    "IndexSummary",
    "SearchSummary",
    "TunePointRecord",
    "RecallResult",
    "MemoryUse",
    "WorkerDevice",
    "WorkerBusy",
    "JoinResult",
    "ListReads",
    "PairRecall",
    "DedupExample",
    "DatasetWritten",
    "Contamination",
    "ContaminationExample",
    "ReferenceFileMatches",
    "DedupResult",
    "ExploreRow",
    "DegreeStats",
    "GraphRecall",
    "GraphResult",
    "RecallSummary",
    "JobReport",
    "Files",
]

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """A dataclass as plain JSON-ready values (nested dataclasses, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def _convert(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _convert(arg, value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return from_dict(tp, value)
    if origin is tuple:
        (arg, *_) = typing.get_args(tp)
        return tuple(_convert(arg, v) for v in value)
    if origin is dict:
        _, arg = typing.get_args(tp)
        return {k: _convert(arg, v) for k, v in value.items()}
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """``cls`` rebuilt from :func:`to_dict`'s output (unknown keys ignored, missing ones defaulted)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: _convert(hints[k], v) for k, v in data.items() if k in known})


# build -------------------------------------------------------------------------------------------
Files = tuple[tuple[Any, ...], ...]  # (path relative to the directory, size) per file


# join ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexSummary:
    dir: str
    key: str
    ntotal: int
    dim: int
    metric: Metric
    nlist: int | None
    why: str


@dataclass(frozen=True)
class SearchSummary:
    k: int
    nprobe: int | None
    rerank: int
    exclude_self: bool
    backend: str
    strategy: Strategy = "index"  # index: the FAISS index; exact: GEMM over the row store
    why: str = ""


@dataclass(frozen=True)
class TunePointRecord:
    """One setting the tuner measured."""

    nprobe: int | None
    rerank: int
    recall: float
    strict: float
    stderr: float
    seconds: float
    queries: int
    qps: float
    computed: bool = False  # recall read off the true neighbours' list ranks (IVF-Flat), not searched
    cost: float = 0.0  # modelled work per query that settings are chosen by (pipeline.search.tuning.query_cost)
    bound: float = 0.0  # lower confidence bound of recall (pipeline.search.tuning.CONFIDENCE), cluster-robust


@dataclass(frozen=True)
class RecallResult:
    """The recall a join reached on sampled queries (held out from tuning when it tuned), the setting
    and the target (manifest ``recall``)."""

    k: int
    recall: float  # tie-aware
    recall_strict: float
    queries: int
    nprobe: int | None
    rerank: int
    target: float | None
    met: bool
    tuning_s: float = 0.0
    curve: tuple[TunePointRecord, ...] = ()
    strategy: Strategy = "index"  # index | exact
    why: str = ""  # why this plan: tuned, given, or exact search (and why)
    bound: float | None = None  # the chosen setting's lower confidence bound of recall on the tuning half
    confidence: float | None = None  # the one-sided confidence level of ``bound``
    step_ups: tuple[TunePointRecord, ...] = ()  # settings measured held out after the tuned one fell short

    @property
    def measured_on(self) -> str:
        """The queries the recall was measured on: held out from tuning, or just sampled."""
        return f"{self.queries:,} {'held-out' if self.curve else 'sampled'} queries"


@dataclass(frozen=True)
class MemoryUse:
    driver_peak_rss: int
    workers_peak_rss: dict[str, int]
    in_process: bool = False  # the one worker runs inside the driver's process: one figure, not two


@dataclass(frozen=True)
class WorkerDevice:
    """What one worker runs on, and why (recorded in report.json)."""

    worker: str
    host: str
    backend: str  # cpu | gpu
    reason: str
    faiss_threads: int
    gpus: int  # GPUs this worker's faiss sees
    gpu_name: str = ""  # the GPU this worker uses ("" on the CPU backend or without CuPy)
    gpu_memory_bytes: int = 0
    gpu_free_bytes: int = 0  # at setup: the default plan sizes the index to the smallest


@dataclass(frozen=True)
class WorkerBusy:
    """Seconds one worker spent computing tasks, per phase, in this run of the job."""

    worker: str
    host: str
    backend: str
    phases: dict[str, float]
    slots: int = 1  # tasks the worker runs at once (its Dask threads): busy time is shared out over them
    moved: dict[str, int] | None = None  # staged per node: bytes fetched whole, read by range, uploaded

    @property
    def total(self) -> float:
        return sum(self.phases.values())


@dataclass(frozen=True)
class ListReads:
    """Bytes of inverted lists the join read, by phase and by worker (IVF-Flat plans): a batched
    join reads the lists its batches probe once per batch, a routed join each list group once."""

    by_phase: dict[str, int]
    by_worker: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())


@dataclass(frozen=True)
class JoinResult:
    index: IndexSummary
    search: SearchSummary
    devices: tuple[WorkerDevice, ...]
    queries: int
    neighbors: str
    recall: RecallResult | None
    memory: MemoryUse
    lists_read: ListReads | None = None

    @property
    def plan(self) -> str:
        """The plan in a few words, as the last log line and the report's first line give it."""
        if self.search.strategy == "exact":
            return "exact search over the row store"
        return f"{self.index.key}, nprobe={self.search.nprobe}, rerank={self.search.rerank}"


# dedup --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairRecall:
    """Share of the exact above-threshold pairs of sampled rows that the dedup found."""

    queries: int
    exact_pairs: int
    found_pairs: int
    pair_recall: float | None
    below_threshold: int


@dataclass(frozen=True)
class DedupExample:
    band: int
    row_a: int
    row_b: int
    score: float
    band_low: float = 0.0
    id_a: Any = None
    id_b: Any = None
    text_a: str | None = None
    text_b: str | None = None
    kept_a: bool | None = None  # whether the dedup kept each row of the pair (None: not known)
    kept_b: bool | None = None


@dataclass(frozen=True)
class ReferenceFileMatches:
    """Input rows whose closest reference match lies in one reference file."""

    file: str
    rows: int  # the file's rows
    input_rows_matched: int


@dataclass(frozen=True)
class ContaminationExample:
    input_id: Any
    reference_id: Any
    reference_file: str
    score: float
    input_text: Any = None
    reference_text: Any = None


@dataclass(frozen=True)
class Contamination:
    """``dedup --against``: input rows within the threshold of a reference row."""

    reference_rows: int
    threshold: float
    action: str  # drop | flag
    rows_contaminated: int
    per_file: tuple[ReferenceFileMatches, ...]
    examples: tuple[ContaminationExample, ...]
    recall: RecallResult | None  # of the input-against-reference join
    plan: str  # the join's index and setting
    output: str  # contamination/


@dataclass(frozen=True)
class DatasetWritten:
    """What ``deduplicated/`` and ``removed/`` got this run (files are rewritten only when changed)."""

    files_written: int
    files_unchanged: int
    rows_removed: int


@dataclass(frozen=True)
class DedupResult:
    threshold: float
    mode: str
    metric: Metric
    keep_by: str | None
    keep_order: str | None
    rows_in: int
    pairs: int
    groups: int
    rows_in_groups: int
    rows_dropped: int
    rows_kept: int
    group_sizes: dict[str, int]
    saturated_rows: int
    searched_again: int
    examples: tuple[DedupExample, ...]
    outputs: dict[str, str]
    exactness: PairRecall | None = None
    target_pair_recall: float | None = None
    pair_nprobe: int | None = None  # lists linked rows were searched again with (None: the join's)
    dataset: DatasetWritten | None = None  # deduplicated/ and removed/ (None: not written)
    contamination: Contamination | None = None  # --against


@dataclass(frozen=True)
class ExploreRow:
    threshold: float
    pairs: int
    rows_dropped: int
    rows_in: int


# graph --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DegreeStats:
    mean: float
    max: int
    isolated: int
    histogram: dict[str, int]


@dataclass(frozen=True)
class GraphRecall:
    k: int
    queries: int
    graph_recall: float


@dataclass(frozen=True)
class GraphResult:
    mode: str
    k: int
    min_score: float | None
    weight: str
    kernel_width: float | None
    nodes: int
    edges: int
    mutual_share: float | None
    degree: DegreeStats
    components: int
    largest_component: int
    outputs: dict[str, str | None]
    recall: GraphRecall | None = None


# evaluate -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecallSummary:
    """``evaluate``'s answer: strict recall@1/@10/@k, tie-aware recall@k when the scores are exact,
    and how far inside the true top-k the misses were."""

    queries: int
    k: int
    strict: dict[int, float]  # r -> recall@r
    tie_aware: float | None
    misses: int
    miss_score_gap: dict[str, float] | None
    source: dict[str, Any] = field(default_factory=dict)  # the table or index (and settings) evaluated

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.source, "queries": self.queries, "k": self.k}
        out.update({f"recall@{r}": v for r, v in sorted(self.strict.items())})
        if self.tie_aware is not None:
            out[f"tie_aware_recall@{self.k}"] = self.tie_aware
        out["misses"] = self.misses
        if self.miss_score_gap is not None:
            out["miss_score_gap"] = self.miss_score_gap
        return out


# the job ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobReport:
    """A finished job, as ``report.json`` records it (the join's fields at the top level)."""

    command: str
    join: JoinResult
    config: dict[str, Any]
    timings_s: dict[str, float]
    wall_s: float
    queries_per_s: float | None
    dedup: DedupResult | None = None
    dedup_explore: tuple[ExploreRow, ...] | None = None
    graph: GraphResult | None = None
    kth_score_quantiles: dict[str, float] | None = None
    workers: tuple[WorkerBusy, ...] = ()  # busy time per phase on each worker (this run)

    # the join's fields, read through
    @property
    def index(self) -> IndexSummary:
        return self.join.index

    @property
    def search(self) -> SearchSummary:
        return self.join.search

    @property
    def recall(self) -> RecallResult | None:
        return self.join.recall

    @property
    def queries(self) -> int:
        return self.join.queries

    @property
    def neighbors(self) -> str:
        return self.join.neighbors

    @property
    def devices(self) -> tuple[WorkerDevice, ...]:
        return self.join.devices

    def to_json(self) -> dict[str, Any]:
        out = {"command": self.command, **to_dict(self.join)}
        for f in dataclasses.fields(self):
            if f.name not in ("command", "join"):
                value = getattr(self, f.name)
                if value is not None or f.name in ("config", "timings_s"):
                    out[f.name] = to_dict(value)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobReport:
        join = from_dict(JoinResult, data)
        rest = {k: v for k, v in data.items() if k not in {f.name for f in dataclasses.fields(JoinResult)}}
        return from_dict(cls, {**rest, "join": to_dict(join)})


# the last word ------------------------------------------------------------------------------------
def recall_verdict(joined: JoinResult) -> str:
    """A job's recall against its target, and the plan that reached it (the join's last log line)."""
    recall, plan = joined.recall, joined.plan
    if recall is None:
        return f"recall not measured (--recall-queries 0); plan: {plan}"
    got = (
        f"recall@{recall.k} {recall.recall:.3f} (tie-aware; strict {recall.recall_strict:.3f}) on {recall.measured_on}"
    )
    if recall.target is None:
        return f"{got}, no target; plan: {plan}"
    return f"{got}, target {recall.target}: {'met' if recall.met else 'MISSED'}; plan: {plan}"


def dedup_verdict(d: DedupResult) -> str:
    """A dedup's own result: rows dropped, groups, pairs, what ``removed/`` holds (duplicates and,
    with ``--against``, contaminated rows), and its pair recall against the target."""
    op = "<=" if d.metric == "l2" else ">="
    line = (
        f"dedup: {d.rows_dropped:,} of {d.rows_in:,} rows dropped as duplicates "
        f"({d.rows_dropped / max(1, d.rows_in):.2%}) in {d.groups:,} groups, "
        f"{d.pairs:,} pairs at {d.metric} {op} {d.threshold}"
    )
    c = d.contamination
    if c is not None:
        fate = "dropped" if c.action == "drop" else "flagged"
        line += f"; {c.rows_contaminated:,} rows within {c.threshold} of the reference ({fate})"
    if d.dataset is not None:
        line += f"; removed/ holds {d.dataset.rows_removed:,} rows"
    ex = d.exactness
    if ex is not None and ex.pair_recall is not None:
        line += f"; pair recall {ex.pair_recall:.4f} on {ex.queries:,} sampled rows"
        if d.target_pair_recall:
            line += f", target {d.target_pair_recall}: {'met' if ex.pair_recall >= d.target_pair_recall else 'MISSED'}"
    return line
