"""The dedup rule as tasks need it: threshold, mode, metric and keep priority, checked once."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.kinds import Metric

__all__ = ["DedupPlan", "check_plan", "default_thresholds", "bands"]


@dataclass(frozen=True)
class DedupPlan:
    """Resolved dedup settings, as the tasks need them."""

    threshold: float
    mode: str  # components | greedy
    metric: Metric
    keep_by: str | None
    keep_order: str  # max | min


def check_plan(plan: DedupPlan) -> None:
    if plan.metric == "cosine" and not -1.0 <= plan.threshold <= 1.0:
        raise ConfigError(
            f"--threshold {plan.threshold}: cosine similarity lies in [-1, 1]; near-duplicates are ~0.9-1.0"
        )
    if plan.metric == "l2" and plan.threshold < 0:
        raise ConfigError(f"--threshold {plan.threshold}: a squared l2 distance is >= 0")


def default_thresholds(metric: Metric, threshold: float | None) -> list[float]:
    """The thresholds ``--explore`` reports: a range of similarities (or distances) near duplicates."""
    if metric == "l2":
        top = threshold * 4 if threshold else 0.5
        return [round(top * f, 6) for f in (1, 0.5, 0.25, 0.1, 0.05, 0.02, 0.01, 0.0)]
    lo = min(threshold, 0.8) if threshold is not None else 0.8
    steps = [0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999]
    return sorted({round(t, 4) for t in steps + ([threshold] if threshold is not None else []) if t >= lo})


def bands(plan: DedupPlan) -> list[float]:
    """Lower edges of the score bands the report shows examples from (closest band last)."""
    t = plan.threshold
    if plan.metric == "l2":
        return [t, t * 0.5, t * 0.1, 0.0]
    return [t, t + (1 - t) * 0.5, t + (1 - t) * 0.9, 1.0 - 1e-6]
