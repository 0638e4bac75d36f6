"""The closed sets of names the tool passes around, as ``Literal`` types mypy checks: a metric,
a search strategy, a dedup or graph mode, a cluster profile's kind, a device backend. Values
are parsed once, at the edge (:mod:`pipeline.config`), into these."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "Metric",
    "Strategy",
    "DedupMode",
    "GraphMode",
    "ProfileKind",
    "BackendName",
    "METRICS",
    "STRATEGIES",
    "DEDUP_MODES",
    "GRAPH_MODES",
    "PROFILE_KINDS",
]

Metric = Literal["l2", "ip", "cosine"]  # cosine: inner product of L2-normalised vectors
Strategy = Literal["index", "exact"]  # search the index, or exact search over the row store
DedupMode = Literal["components", "greedy"]
GraphMode = Literal["directed", "symmetric", "mutual"]
ProfileKind = Literal["local", "address", "slurm", "pbs", "local-cuda"]
BackendName = Literal["cpu", "gpu"]

METRICS: tuple[Metric, ...] = get_args(Metric)
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
DEDUP_MODES: tuple[DedupMode, ...] = get_args(DedupMode)
GRAPH_MODES: tuple[GraphMode, ...] = get_args(GraphMode)
PROFILE_KINDS: tuple[ProfileKind, ...] = get_args(ProfileKind)
