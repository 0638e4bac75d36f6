"""The job configuration: YAML and CLI flags, parsed once into frozen dataclasses.

Every CLI flag is also a top-level YAML key of the same name (``--index-key`` is ``index_key``).
Precedence: built-in defaults < YAML file < flags. Values such as ``"auto"`` and ``"128MiB"`` are
parsed here and nowhere else; stages receive the typed section they need.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from dask.utils import parse_bytes

from pipeline.errors import ConfigError
from pipeline.kinds import DEDUP_MODES, GRAPH_MODES, METRICS, PROFILE_KINDS, DedupMode, GraphMode, Metric, ProfileKind

__all__ = [
    "DataSpec",
    "IndexSpec",
    "SearchSpec",
    "ClusterSpec",
    "JobQueueSpec",
    "DedupSpec",
    "GraphSpec",
    "Config",
    "KEYS",
    "load_config",
    "parse_config",
]

DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class DataSpec:
    """Where the vectors are and which columns hold them."""

    paths: tuple[str, ...] = ()
    id_column: str = "id"
    vector_column: str = "embedding"


@dataclass(frozen=True)
class IndexSpec:
    """How the index is built. ``key`` is a FAISS index_factory string or ``"auto"``."""

    key: str = "auto"
    metric: Metric | None = None  # None: cosine when building, the index's metric when joining
    sample_size: int | None = None
    seed: int = 0
    drift_limit: float = 1.3  # an update whose new rows sit this much farther from their centroids warns
    retrain: bool = False  # train the index again on the current rows (an update that drifted)


@dataclass(frozen=True)
class SearchSpec:
    """How queries are searched. ``None`` means: chosen for the index and the recall target
    (:mod:`pipeline.index.choice` for the defaults, :mod:`pipeline.search.tuning` for the walk)."""

    k: int = 10
    nprobe: int | None = None
    rerank: int | None = None
    exclude_self: bool = False
    routed_join: bool = False  # join by list groups, each read once (pipeline.search.routed)
    target_recall: float | None = 0.95  # tie-aware recall@k every job must reach on held-out queries; None: off
    allow_below_target: bool = False  # finish with exit 0 (and a warning) when the target is missed
    recall_queries: int = 1000  # sample size for measuring (and tuning) recall; 0 = off


@dataclass(frozen=True)
class JobQueueSpec:
    """A batch-queue profile (``kind`` slurm or pbs): what each worker job asks for, and how many.

    Values end up in job scripts, so they are checked here: names are plain words, and no value
    can hold a line break (one directive or set-up line stays one line).
    """

    kind: str  # slurm | pbs
    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    cores: int = 4  # per worker job
    memory: str = "16GiB"  # per worker job
    processes: int = 1  # Dask worker processes per job (with gpus: one per GPU)
    gpus: int = 0  # per worker job; the driver job asks for none
    jobs: int = 1  # worker jobs (fixed scaling)
    adaptive_min: int | None = None  # with adaptive_max: adaptive scaling between these
    adaptive_max: int | None = None
    directives: tuple[str, ...] = ()  # extra #SBATCH / #PBS lines, e.g. "--constraint=a100"
    setup: tuple[str, ...] = ()  # shell lines run first in every job (module load, activate a venv)
    python: str | None = None  # interpreter on the nodes (default: this one)
    interface: str | None = None  # network interface the workers use, e.g. ib0
    driver_memory: str = "8GiB"  # the submitted driver job (``submit``)


@dataclass(frozen=True)
class ClusterSpec:
    """Where the work runs: the ``profile`` (local, address, slurm, pbs, local-cuda or a named one)."""

    device: str = "auto"
    workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str = "auto"
    scheduler_address: str | None = None
    profile: str = "local"
    kind: ProfileKind = "local"
    jobqueue: JobQueueSpec | None = None


@dataclass(frozen=True)
class DedupSpec:
    """The ``dedup`` command: which pairs count as duplicates and which row of a group is kept."""

    threshold: float | None = None  # similarity >= (cosine, ip) or squared distance <= (l2)
    mode: DedupMode = "components"
    keep_by: str | None = None  # a numeric/timestamp column of the input; None: the smallest id
    keep_order: str = "max"  # keep the row with the max (or min) keep_by value
    text_column: str | None = None  # shown beside the example pairs in the report
    explore: bool = False  # print pairs/rows dropped over a range of thresholds; write no groups
    target_pair_recall: float | None = 0.99  # share of the exact above-threshold pairs to find (None: off)
    write_dataset: bool = True  # deduplicated/ (the input files minus dropped rows) and removed/
    against: tuple[str, ...] = ()  # reference datasets (e.g. benchmarks): input rows near one are contaminated
    against_action: str = "drop"  # drop contaminated rows from deduplicated/, or only flag them


@dataclass(frozen=True)
class GraphSpec:
    """The ``graph`` command: which edges of the k-NN lists make the graph, and their weights."""

    mode: GraphMode = "symmetric"
    min_score: float | None = None  # drop edges less close than this (similarity, or l2 squared distance)
    weight: str = "score"  # score | gaussian (exp(-d^2 / (2 width^2)) of the distance)
    kernel_width: float | None = None  # None: the median distance to the k-th neighbour


@dataclass(frozen=True)
class Config:
    """The whole job, validated. Built by :func:`parse_config` or :func:`load_config`."""

    data: DataSpec = field(default_factory=DataSpec)
    index: IndexSpec = field(default_factory=IndexSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    dedup: DedupSpec = field(default_factory=DedupSpec)
    graph: GraphSpec = field(default_factory=GraphSpec)
    output: str | None = None
    index_dir: str | None = None
    partition_bytes: int = parse_bytes("128MiB")
    overwrite: bool = False
    scratch_dir: str | None = None  # where remote outputs and indexes are staged (default: the temp folder)
    storage_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the remote filesystem

    def to_dict(self) -> dict[str, Any]:
        """Everything but the values of ``storage_options`` (they may hold credentials): reports show
        which options were given, never their values."""
        out = asdict(self)
        out["storage_options"] = {k: "(given)" for k in self.storage_options}
        return out


# ---------------------------------------------------------------------------------------------
# value parsers: each takes (key, raw value) and returns the typed value or raises ConfigError


def _auto(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() == "auto")


def _integer(minimum: int, auto: bool = False) -> Callable[[str, Any], Any]:
    """A parser of integers >= ``minimum`` (and of ``auto``/null as None when ``auto``)."""

    def parse(key: str, value: Any) -> int | None:
        if auto and _auto(value):
            return None
        hint = " or 'auto'" if auto else ""
        try:
            out = int(value)
        except (TypeError, ValueError, OverflowError):
            out = None
        if out is None or isinstance(value, bool) or (out != value and not isinstance(value, str)):
            raise ConfigError(f"{key}: expected an integer{hint}, got {value!r}")
        if out < minimum:
            raise ConfigError(f"{key}: must be >= {minimum}, got {out}")
        return out

    return parse


DEFAULT_TARGET = 0.95


def _fraction(key: str, v: Any) -> float | None:
    if isinstance(v, str) and v.strip().lower() in ("off", "none"):
        return None
    if _auto(v):
        return DEFAULT_TARGET
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a recall between 0 and 1 (e.g. 0.95), got {v!r}") from None
    if not 0.0 < out <= 1.0 or isinstance(v, bool):
        raise ConfigError(f"{key}: expected a recall between 0 and 1 (e.g. 0.95), got {v!r}")
    return out


DEFAULT_PAIR_TARGET = 0.99


def _pair_fraction(key: str, v: Any) -> float | None:
    return DEFAULT_PAIR_TARGET if _auto(v) else _fraction(key, v)


def _drift_limit(key: str, v: Any) -> float:
    out = _float(positive=True)(key, v)
    if out is None or out < 1:
        raise ConfigError(f"{key}: expected a ratio of at least 1 (e.g. 1.3), got {v!r}")
    return out


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
        return v.strip().lower() in ("true", "yes", "1", "on")
    raise ConfigError(f"{key}: expected true or false, got {v!r}")


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ConfigError(f"{key}: expected a non-empty string, got {v!r}")
    return v.strip()


def _opt_str(key: str, v: Any) -> str | None:
    return None if v is None or v == "" else _str(key, v)


def _no_secret(key: str, location: str) -> str:
    """Refuse a URL carrying credentials (``s3://KEY:SECRET@bucket/...``) without showing them:
    they would reach logs, reports and job scripts."""
    parts = urlsplit(location)
    if len(parts.scheme) > 1 and "@" in parts.netloc:
        raise ConfigError(
            f"{key}: a {parts.scheme}:// URL with credentials in it is refused (they would be shown in "
            "logs and reports); give them through the environment (AWS_ACCESS_KEY_ID, ...) or "
            "storage_options, and drop the 'user:secret@' part"
        )
    return location


def _location(key: str, v: Any) -> str | None:
    """An output, index or scratch directory: a path or a URL without credentials."""
    s = _opt_str(key, v)
    return None if s is None else _no_secret(key, s)


def _choice(*choices: str) -> Callable[[str, Any], str]:
    def parse(key: str, v: Any) -> str:
        s = _str(key, v).lower()
        if s not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}; got {v!r}")
        return s

    return parse


def _paths(key: str, v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, (str, os.PathLike)) else v
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, (str, os.PathLike)) for p in items):
        raise ConfigError(f"{key}: expected a path, a glob or a list of them; got {v!r}")
    return tuple(_no_secret(key, _str(key, os.fspath(p))) for p in items)


def _opt_paths(key: str, v: Any) -> tuple[str, ...]:
    """Like :func:`_paths`, but none is a valid answer (an empty list, or null)."""
    return () if v is None or (isinstance(v, (list, tuple)) and not v) else _paths(key, v)


MAX_BYTES = 1 << 60  # an exbibyte: any larger size is a typo


def _bytes(key: str, v: Any) -> int:
    try:
        if isinstance(v, bool):
            raise TypeError
        out = parse_bytes(v) if isinstance(v, str) else int(v)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{key}: expected a size such as '128MiB', got {v!r}") from None
    if out <= 0:
        raise ConfigError(f"{key}: must be positive, got {v!r}")
    if out > MAX_BYTES:
        raise ConfigError(f"{key}: {v!r} is larger than any machine's memory or disk; give a size such as '128MiB'")
    return out


def _memory(key: str, v: Any) -> str:
    if _auto(v):
        return "auto"
    _bytes(key, v)
    return str(v)


def _float(positive: bool = False) -> Callable[[str, Any], float | None]:
    def parse(key: str, v: Any) -> float | None:
        if _auto(v):
            return None
        try:
            out = float(v)
        except (TypeError, ValueError):
            out = float("nan")
        if isinstance(v, bool) or out != out or out in (float("inf"), float("-inf")) or (positive and out <= 0):
            raise ConfigError(f"{key}: expected a {'positive ' if positive else ''}number, got {v!r}")
        return out

    return parse


def _index_key(key: str, v: Any) -> str:
    """``auto`` or a FAISS factory string the planner can run: not an ``IDMap`` wrapper (the tool
    gives every vector its global row as id itself) and no inverted file of zero lists."""
    s = _str(key, v)
    if s.lower() == "auto":
        return "auto"
    if re.search(r"(^|,)IDMap2?(,|$)", s):
        raise ConfigError(
            f"{key}: {s!r} wraps the index in an IDMap, which the tool does itself (every vector's id is "
            "its global row); drop the 'IDMap,' part"
        )
    if re.search(r"(^|,)IVF0+(?!\d)", s):
        raise ConfigError(
            f"{key}: {s!r} asks for an inverted file of 0 lists; give at least one list (IVF1024,...), or auto"
        )
    return s


# flat key -> (section or "" for top level, field name, parser, help)
KEYS: dict[str, tuple[str, str, Callable[[str, Any], Any], str]] = {
    "input": ("data", "paths", _paths, "Parquet directory, glob or file (repeatable)"),
    "id_column": ("data", "id_column", _str, "column holding the row ids (int64 or string)"),
    "vector_column": ("data", "vector_column", _str, "column holding the vectors (list of float)"),
    "metric": ("index", "metric", _choice(*METRICS), "distance (default: cosine to build, the index's to join)"),
    "index_key": ("index", "key", _index_key, "FAISS index_factory string, or auto"),
    "sample_size": ("index", "sample_size", _integer(1, auto=True), "training sample rows, or auto"),
    "seed": ("index", "seed", _integer(0), "seed for sampling and training"),
    "drift_limit": (
        "index",
        "drift_limit",
        _drift_limit,
        "warn when an update's new rows sit this many times farther from their centroids than the old rows",
    ),
    "retrain": (
        "index",
        "retrain",
        _bool,
        "train the index again on the current rows (after an update drifted); every list is rejoined",
    ),
    "k": ("search", "k", _integer(1), "neighbours per query"),
    "nprobe": ("search", "nprobe", _integer(1, auto=True), "inverted lists probed per query, or auto"),
    "rerank": ("search", "rerank", _integer(0, auto=True), "re-rank k*FACTOR candidates exactly (0 = off)"),
    "exclude_self": ("search", "exclude_self", _bool, "drop the query's own id from its neighbours"),
    "routed_join": (
        "search",
        "routed_join",
        _bool,
        "join an IVF index by groups of lists, each read once per join (routed queries); lossy codes are "
        "re-ranked from the group's vectors in list order, which the fill then writes",
    ),
    "target_recall": ("search", "target_recall", _fraction, "tie-aware recall@k to reach on held-out queries, or off"),
    "allow_below_target": (
        "search",
        "allow_below_target",
        _bool,
        "finish with exit 0 (and a warning) when the recall target is missed",
    ),
    "recall_queries": ("search", "recall_queries", _integer(0), "queries sampled to measure recall (0 = off)"),
    "device": ("cluster", "device", _choice(*DEVICES), "device requirement each worker checks"),
    "workers": ("cluster", "workers", _integer(1, auto=True), "Dask worker processes, or auto"),
    "threads_per_worker": ("cluster", "threads_per_worker", _integer(1, auto=True), "FAISS threads per worker"),
    "memory_limit": ("cluster", "memory_limit", _memory, "memory limit per worker, e.g. 4GiB"),
    "scheduler_address": ("cluster", "scheduler_address", _opt_str, "join this Dask scheduler"),
    "profile": (
        "cluster",
        "profile",
        _str,
        "cluster profile: local, address, slurm, pbs, local-cuda or one in profiles",
    ),
    "threshold": (
        "dedup",
        "threshold",
        _float(),
        "dedup: pair score that makes a duplicate (cosine/ip >=, l2 squared distance <=)",
    ),
    "dedup_mode": ("dedup", "mode", _choice(*DEDUP_MODES), "dedup grouping: components or greedy"),
    "keep_by": (
        "dedup",
        "keep_by",
        _opt_str,
        "dedup: keep the row with the max/min of this column (default: smallest id)",
    ),
    "keep_order": ("dedup", "keep_order", _choice("max", "min"), "dedup: keep the max or min of --keep-by"),
    "text_column": ("dedup", "text_column", _opt_str, "dedup: column shown beside the example pairs in the report"),
    "explore": (
        "dedup",
        "explore",
        _bool,
        "dedup: print pairs and rows dropped over a range of thresholds, write no groups",
    ),
    "target_pair_recall": (
        "dedup",
        "target_pair_recall",
        _pair_fraction,
        "dedup: share of the exact above-threshold pairs to find, or off",
    ),
    "against": (
        "dedup",
        "against",
        _opt_paths,
        "dedup: reference Parquet (e.g. evaluation sets); input rows within --threshold of one are "
        "contaminated (the reference is only read)",
    ),
    "against_action": (
        "dedup",
        "against_action",
        _choice("drop", "flag"),
        "dedup: drop contaminated rows from deduplicated/, or only flag them in contamination/",
    ),
    "write_dataset": (
        "dedup",
        "write_dataset",
        _bool,
        "dedup: write deduplicated/ (the input files minus the dropped rows) and removed/",
    ),
    "graph_mode": (
        "graph",
        "mode",
        _choice(*GRAPH_MODES),
        "graph edges: directed, symmetric or mutual",
    ),
    "min_score": (
        "graph",
        "min_score",
        _float(),
        "graph: drop edges less close than this (cosine/ip <, l2 squared distance >)",
    ),
    "weight": (
        "graph",
        "weight",
        _choice("score", "gaussian"),
        "graph edge weight: the score or a Gaussian kernel of the distance",
    ),
    "kernel_width": (
        "graph",
        "kernel_width",
        _float(positive=True),
        "graph: Gaussian kernel width, or auto (median k-th distance)",
    ),
    "output": ("", "output", _location, "output directory"),
    "index_dir": ("", "index_dir", _location, "index directory (default: OUTPUT/index)"),
    "partition_size": ("", "partition_bytes", _bytes, "vector bytes per Dask partition"),
    "overwrite": ("", "overwrite", _bool, "discard an existing run that does not match"),
    "scratch_dir": (
        "",
        "scratch_dir",
        _location,
        "local folder where an --output or --index-dir on object storage is staged (default: temp)",
    ),
}


_SAFE_WORD = re.compile(r"^[A-Za-z0-9_.:@/+=,%-]+$")


def _word(key: str, v: Any) -> str:
    s = _str(key, v)
    if not _SAFE_WORD.match(s):
        raise ConfigError(f"{key}: {s!r} may hold only letters, digits and _ . : @ / + = , % -")
    return s


def _line(key: str, v: Any) -> str:
    s = _str(key, v)
    if "\n" in s or "\r" in s or "\0" in s:
        raise ConfigError(f"{key}: one line per entry, without line breaks; got {s!r}")
    return s


def _lines(key: str, v: Any) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"{key}: expected a list of lines, got {v!r}")
    return tuple(_line(key, i) for i in items)


def _walltime(key: str, v: Any) -> str:
    s = _str(key, v)
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d{2}){0,2}", s):
        raise ConfigError(f"{key}: expected a walltime such as 04:00:00 or 1-00:00:00, got {v!r}")
    return s


_SHELL_SPECIAL = set("$`\\\"';&|<>(){}*?[]!#~\n\r\0")


def _interpreter(key: str, v: Any) -> str:
    """A Python interpreter for the job scripts: a plain path (spaces allowed, quoted in the
    scripts), never shell syntax, since it is pasted into dask-jobqueue's worker command."""
    s = _str(key, v)
    bad = sorted(set(s) & _SHELL_SPECIAL)
    if bad:
        raise ConfigError(
            f"{key}: {s!r} must be a plain interpreter path, without shell characters "
            f"({' '.join(repr(c) for c in bad)}); put set-up commands under setup:"
        )
    return s


PROFILE_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "kind": _choice("slurm", "pbs"),
    "queue": _word,
    "account": _word,
    "walltime": _walltime,
    "cores": _integer(1),
    "memory": _memory,
    "processes": _integer(1),
    "gpus": _integer(0),
    "jobs": _integer(1),
    "adaptive_min": _integer(0),
    "adaptive_max": _integer(1),
    "directives": _lines,
    "setup": _lines,
    "python": _interpreter,
    "interface": _word,
    "driver_memory": _memory,
}


def _unknown(what: str, raw: Any, key: str, valid: Mapping[str, Any]) -> ConfigError:
    """An unknown key, with the nearest valid one (or all of them)."""
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{what} {raw!r}{hint}")


def _profile(name: str, profiles: Any) -> tuple[str, JobQueueSpec | None]:
    """(kind, job-queue settings) of the profile ``name``: a built-in kind or an entry of ``profiles``."""
    if profiles is not None and not isinstance(profiles, Mapping):
        raise ConfigError(f"profiles: expected a mapping of profile names to settings, got {type(profiles).__name__}")
    entry = (profiles or {}).get(name)
    if entry is None:
        if name not in PROFILE_KINDS:
            known = sorted(set(PROFILE_KINDS) | set(profiles or {}))
            raise ConfigError(f"profile: no profile {name!r}; choose one of {', '.join(known)}")
        entry = {"kind": name} if name in ("slurm", "pbs") else {}
    if not isinstance(entry, Mapping):
        raise ConfigError(f"profiles.{name}: expected a mapping of settings, got {entry!r}")
    kind = str(entry.get("kind", name if name in PROFILE_KINDS else "")).lower()
    if kind not in PROFILE_KINDS:
        raise ConfigError(f"profiles.{name}.kind: expected one of {', '.join(PROFILE_KINDS)}, got {kind!r}")
    if kind not in ("slurm", "pbs"):
        if set(entry) - {"kind"}:
            raise ConfigError(
                f"profiles.{name}: a {kind} profile takes no settings besides kind "
                f"(got {', '.join(sorted(set(entry) - {'kind'}))})"
            )
        return kind, None
    fields: dict[str, Any] = {}
    for raw, value in entry.items():
        field_name = str(raw).replace("-", "_")
        if field_name not in PROFILE_FIELDS:
            raise _unknown(f"profiles.{name}: unknown setting", raw, field_name, PROFILE_FIELDS)
        if value is not None:
            fields[field_name] = PROFILE_FIELDS[field_name](f"profiles.{name}.{field_name}", value)
    fields["kind"] = kind
    gpus = fields.get("gpus", 0)
    if gpus and fields.setdefault("processes", gpus) != gpus:
        raise ConfigError(
            f"profiles.{name}: processes {fields['processes']} with gpus {gpus}: each GPU gets one "
            f"worker process, so give processes: {gpus} (or leave it out)"
        )
    spec = JobQueueSpec(**fields)
    if (spec.adaptive_min is None) != (spec.adaptive_max is None):
        raise ConfigError(f"profiles.{name}: give both adaptive_min and adaptive_max, or neither (fixed jobs)")
    if spec.adaptive_max is not None and spec.adaptive_min is not None and spec.adaptive_min > spec.adaptive_max:
        raise ConfigError(f"profiles.{name}: adaptive_min {spec.adaptive_min} > adaptive_max {spec.adaptive_max}")
    return kind, spec


def parse_config(values: Mapping[str, Any], *, source: str = "config") -> Config:
    """Validate a flat mapping of keys (YAML keys / flag names) into a :class:`Config`.

    ``profiles`` (a mapping of named cluster profiles) is the one nested key; ``profile`` picks one.
    """
    sections: dict[str, dict[str, Any]] = {
        "data": {},
        "index": {},
        "search": {},
        "cluster": {},
        "dedup": {},
        "graph": {},
        "": {},
    }
    values = dict(values)
    profiles = values.pop("profiles", None)
    storage = _storage_options(values.pop("storage_options", None))
    for raw_key, value in values.items():
        key = str(raw_key).replace("-", "_")
        if key not in KEYS:
            raise _unknown(f"{source}: unknown key", raw_key, key, KEYS)
        if value is None:  # YAML null: unset, the default applies
            continue
        section, name, parser, _ = KEYS[key]
        sections[section][name] = parser(key, value)
    top = sections.pop("")
    cluster = sections["cluster"]
    kind, jobqueue = _profile(cluster.get("profile", "local"), profiles)
    if kind == "address" and not cluster.get("scheduler_address"):
        raise ConfigError("profile address: give the scheduler with --scheduler-address tcp://HOST:8786")
    if cluster.get("scheduler_address") and kind not in ("local", "address"):
        raise ConfigError(
            f"--scheduler-address joins an existing scheduler; it cannot be combined with a {kind} profile"
        )
    cluster.update(kind="address" if cluster.get("scheduler_address") else kind, jobqueue=jobqueue)
    return Config(
        data=DataSpec(**sections["data"]),
        index=IndexSpec(**sections["index"]),
        search=SearchSpec(**sections["search"]),
        cluster=ClusterSpec(**sections["cluster"]),
        dedup=DedupSpec(**sections["dedup"]),
        graph=GraphSpec(**sections["graph"]),
        storage_options=storage,
        **top,
    )


def _storage_options(raw: Any) -> dict[str, Any]:
    """``storage_options``: keyword arguments of the remote filesystem (pyarrow's ``S3FileSystem``,
    ``GcsFileSystem``, ...), e.g. ``endpoint_override``, ``region``, ``anonymous``."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) for k in raw):
        raise ConfigError(f"storage_options: expected a mapping of option names to values, got {raw!r}")
    bad = [k for k, v in raw.items() if not isinstance(v, (str, int, float, bool))]
    if bad:
        raise ConfigError(f"storage_options.{bad[0]}: expected a string, number or true/false")
    return dict(raw)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file with the safe loader; its top level must be a mapping."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


PATH_KEYS = ("input", "against", "output", "index_dir", "scratch_dir")  # resolved against the YAML file's folder


def _beside(folder: Path, value: Any) -> Any:
    """A relative local path (or each of a list) as written in a YAML file in ``folder``: relative
    to that folder, not to the working directory. URLs and absolute paths are left as they are."""
    if isinstance(value, (list, tuple)):
        return [_beside(folder, v) for v in value]
    if not isinstance(value, str) or not value or "://" in value or os.path.isabs(os.path.expanduser(value)):
        return value
    return os.path.normpath(folder / value)


def load_config(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any]) -> Config:
    """Defaults < YAML file at ``path`` < ``overrides`` (flags; ``None`` values are ignored).

    Relative paths in the file are relative to the file; an error about a value that came from
    the file names the file."""
    from_file: dict[str, Any] = dict(read_yaml(path)) if path else {}
    if path:
        folder = Path(path).parent
        from_file = {
            k: _beside(folder, v) if str(k).replace("-", "_") in PATH_KEYS else v for k, v in from_file.items()
        }
    flags = {k: v for k, v in overrides.items() if v is not None}
    try:
        return parse_config({**from_file, **flags}, source=str(path) if path else "flags")
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0].strip().replace("-", "_")
        if path and key in {str(k).replace("-", "_") for k in from_file} and key not in flags:
            raise ConfigError(f"{path}: {exc}") from None
        raise


def dump_config(config: Config, storage_options: bool = False) -> str:
    """The config as flat YAML keys, as a user would write it (stored beside the index).
    ``storage_options`` (which may hold credentials) only when asked: for a batch job's driver."""
    flat: dict[str, Any] = {}
    for key, (section, name, _, _) in KEYS.items():
        holder = getattr(config, section) if section else config
        value = getattr(holder, name)
        if value is None and getattr(type(holder)(), name) is not None:
            value = "off"  # turned off where the default is on (target_recall): null would mean the default
        flat[key] = list(value) if isinstance(value, tuple) else value
    if storage_options and config.storage_options:
        flat["storage_options"] = dict(config.storage_options)
    jq = config.cluster.jobqueue
    if jq is not None:
        flat["profiles"] = {
            config.cluster.profile: {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(jq).items() if v is not None
            }
        }
    return yaml.safe_dump(flat, sort_keys=False)
