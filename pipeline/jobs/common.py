"""What every command shares: its directories (checked and locked), its cluster, and its end (the
report, the recall verdict, ``_SUCCESS``, or a loud failure below target)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from pipeline.cluster.clients import (
    ClusterInfo,
    NodeStaging,
    StorageOptions,
    dask_client,
    refuse_unseen,
    unseen_folders,
    worker_names,
)
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.io import nodes
from pipeline.io.atomic import atomic_path
from pipeline.io.owned import check_writable
from pipeline.io.parquet import resolve_paths
from pipeline.io.staging import staged, staged_dirs
from pipeline.io.storage import is_remote, set_storage_options
from pipeline.io.workdir import TIMINGS_NAME, check_locations, locked, shown
from pipeline.jobs.stages import Timings
from pipeline.report import write_report
from pipeline.results import (
    DedupResult,
    ExploreRow,
    GraphResult,
    JobReport,
    JoinResult,
    WorkerBusy,
    dedup_verdict,
    recall_verdict,
)
from pipeline.runtime.manifest import LOG_DIR
from pipeline.runtime.progress import busy_by_worker, record_busy, tasks_submitted
from pipeline.search.tuning import BelowTarget

T = TypeVar("T")

__all__ = [
    "Start",
    "job_cluster",
    "worker_busy",
    "staged_command",
    "check_remote_locations",
    "finish",
    "guarded",
    "index_dir_for",
    "recall_verdict",
    "require",
    "start",
]

log = logging.getLogger("pipeline.jobs.commands")


def index_dir_for(config: Config, output: Path) -> Path:
    """``--index-dir``, or ``OUTPUT/index`` for the commands that build their own index."""
    return Path(config.index_dir).resolve() if config.index_dir else output / "index"


def logs_dir(config: Config) -> str | None:
    """Where batch worker jobs write their logs: OUTPUT/logs."""
    return str(Path(config.output).resolve() / LOG_DIR) if config.output else None


@contextlib.contextmanager
def job_cluster(config: Config) -> Iterator[tuple[Any, Any]]:
    """The job's Dask cluster (batch worker logs in OUTPUT/logs); each worker chooses its device,
    and gets the job's ``storage_options`` for reading remote input."""
    with dask_client(config.cluster, logs_dir(config)) as (client, cluster):
        folders = [Path(d) for d in (config.output, config.index_dir) if d]
        with _staged_per_node(client, folders, config) as moved_since:
            if config.storage_options:
                client.register_plugin(StorageOptions(config.storage_options), name="knn-storage")
            yield client, replace(cluster, busy_since=record_busy(client), moved_since=moved_since)


@contextlib.contextmanager
def _staged_per_node(client: Any, folders: list[Path], config: Config) -> Iterator[dict[str, dict[str, int]] | None]:
    """Where workers do not see the job's folders as this machine does: refused in one line, unless
    those folders are staged from object storage; then every machine keeps its own copy, and the
    object store is the only place they meet (:mod:`pipeline.io.nodes`). Yields each worker's
    traffic so far where it stages per node (None otherwise)."""
    unseen = unseen_folders(client, folders)
    dirs = staged_dirs()
    if not unseen:
        for d in dirs:  # the workers read this machine's folders: every data file is wanted here
            d.pull_rest()
        nodes.deactivate()
        yield None
        return
    for u in unseen:
        if not any(u.folder == d.local or d.local in u.folder.parents for d in dirs):
            raise refuse_unseen(u)
    roots = [str(f) for f in folders]
    plugin = NodeStaging([(d.url, str(d.local)) for d in dirs], roots, dict(config.storage_options or {}))
    client.register_plugin(plugin, name=NODES_PLUGIN)
    workers = sorted({u.worker for u in unseen})
    log.info(
        "Dask worker%s %s do%s not see this machine's folders: each machine keeps its own copy of %s, "
        "staged through the object store",
        "s" if len(workers) > 1 else "",
        ", ".join(workers[:4]) + (", ..." if len(workers) > 4 else ""),
        "" if len(workers) > 1 else "es",
        ", ".join(d.url for d in dirs),
    )
    before = client.run(nodes.traffic)
    try:
        yield before
        _log_traffic(client, before)
    finally:
        with contextlib.suppress(Exception):  # the cluster may be gone already
            client.unregister_worker_plugin(NODES_PLUGIN)


NODES_PLUGIN = "knn-nodes"


def _moved(now: dict[str, int] | None, since: dict[str, int] | None) -> dict[str, int] | None:
    """A worker's bytes fetched, read by range and uploaded in this job (None: not staged per node)."""
    if now is None:
        return None
    return {kind: int(n) - int((since or {}).get(kind, 0)) for kind, n in sorted(now.items())}


def _log_traffic(client: Any, before: dict[str, dict[str, int]]) -> None:
    """One line: the bytes each machine fetched whole, read by range and uploaded in this job."""
    names = worker_names(client)
    moved = {names.get(a, a): _moved(t, before.get(a)) or {} for a, t in client.run(nodes.traffic).items()}
    moved["driver"] = nodes.traffic()

    def gib(who: str, kind: str) -> str:
        return f"{moved[who].get(kind, 0) / 2**30:.3f}"

    log.info(
        "staged per node, GiB fetched/read by range/uploaded (reads by range): %s",
        "; ".join(
            f"{w} {gib(w, 'fetched')}/{gib(w, 'ranged')}/{gib(w, 'sent')} ({moved[w].get('reads', 0):,})"
            for w in sorted(moved)
        ),
    )


def worker_busy(client: Any, cluster: ClusterInfo) -> tuple[WorkerBusy, ...]:
    """Busy seconds per phase on each worker since the job's cluster started (report.json ``workers``)."""
    try:
        busy = busy_by_worker(client, cluster.busy_since)
    except Exception as exc:  # the report's busy table is not worth failing a finished job for
        log.warning("busy time per worker not recorded (%s)", str(exc).splitlines()[0] if str(exc) else exc)
        return ()
    info = client.scheduler_info(n_workers=-1).get("workers", {})
    devices = {d.worker: d for d in cluster.devices}  # by worker name
    moved_now = client.run(nodes.traffic) if cluster.moved_since is not None else {}
    out = []
    for addr, by_label in sorted(busy.items()):
        name = str(info.get(addr, {}).get("name", addr))
        device = devices.get(name)
        phases: dict[str, float] = {}
        for label, seconds in by_label.items():  # task labels named as the timing chart's phases
            phase = TASK_PHASES.get(label, label)
            phases[phase] = phases.get(phase, 0.0) + seconds
        out.append(
            WorkerBusy(
                name,
                device.host if device else addr,
                device.backend if device else "unknown",
                {k: round(v, 3) for k, v in sorted(phases.items())},
                slots=max(1, int(info.get(addr, {}).get("nthreads", 1) or 1)),
                moved=_moved(moved_now.get(addr), (cluster.moved_since or {}).get(addr)),
            )
        )
    return tuple(out)


# the phase of the timing chart that each kind of task belongs to (a task label not here is its own phase)
TASK_PHASES = {
    "ground_truth": "recall",
    "tune": "recall",
    "exact diagonal": "join",
    "exact pairs": "join",
    "pair_recall": "pair_recall",
    "components": "dedup",
    "contamination": "against",
    "dedup_dataset": "dataset",
    "graph_map": "graph",
    "graph_reduce": "graph",
    **{f"dedup_{s}": "dedup" for s in ("keep", "widen", "map", "pairs", "members", "assign", "groups")},
}


def staged_command(command: Callable[[Config], T], reads: tuple[str, ...] = ()) -> Callable[[Config], T]:
    """``command`` with its ``--output`` and ``--index-dir`` staged locally where they are URLs
    (:mod:`pipeline.io.staging`); local directories are used as they are. Each remote directory
    written is held by this job alone; those it only reads (``reads``: "output", "index_dir") are shared."""

    @functools.wraps(command)
    def run(config: Config) -> T:
        set_storage_options(config.storage_options)
        urls = [u for u in (config.output, config.index_dir) if u and is_remote(u)]
        if not urls:
            return command(config)
        check_remote_locations(config)
        out, idx = config.output, config.index_dir
        inside = bool(out and idx and is_remote(out) and _url_inside(idx, out))
        with contextlib.ExitStack() as stack:
            shared = {u for u in (out if "output" in reads else None, idx if "index_dir" in reads else None) if u}
            local = {
                u: str(stack.enter_context(staged(u, config.scratch_dir, lease=u not in shared)))
                for u in urls
                if not (inside and u == idx)
            }
            if inside and out and idx:  # the index inside the output (run's default layout): staged with it
                local[idx] = local[out] + idx.rstrip("/")[len(out.rstrip("/")) :]
            return command(replace(config, output=local.get(out or "", out), index_dir=local.get(idx or "", idx)))

    return run


def _url_inside(child: str, parent: str) -> bool:
    """Whether URL ``child`` lies below URL ``parent`` (not equal to it)."""
    return child.rstrip("/").startswith(parent.rstrip("/") + "/")


def check_remote_locations(config: Config) -> None:
    """Remote outputs must not lie inside (or hold) an input, the reference, or each other."""

    def prefix(u: str) -> str:  # a glob's fixed part; every URL ends with one slash
        return u[: min((u.index(c) for c in "*?[" if c in u), default=len(u))].rstrip("/") + "/"

    def overlap(a: str, b: str) -> bool:
        return prefix(a).startswith(prefix(b)) or prefix(b).startswith(prefix(a))

    inputs = [p for p in (*config.data.paths, *config.dedup.against) if is_remote(p)]
    dirs = [
        (flag, u) for flag, u in (("--output", config.output), ("--index-dir", config.index_dir)) if u and is_remote(u)
    ]
    for flag, u in dirs:
        for p in inputs:
            if overlap(u, p):
                raise ConfigError(
                    f"{flag} {u} overlaps the input {p}; write outputs to a prefix outside the input "
                    "(the tool never writes among input files)"
                )
    if (
        len(dirs) == 2 and overlap(dirs[0][1], dirs[1][1]) and not _url_inside(dirs[1][1], dirs[0][1])
    ):  # the index inside the output is fine
        raise ConfigError(f"--output {dirs[0][1]} and --index-dir {dirs[1][1]} overlap; give them separate prefixes")


@dataclass(frozen=True)
class Start:
    """Where a command started: its clock, whether its output was already complete, tasks so far."""

    clock: float
    complete: bool
    tasks: int


def start(output: Path) -> Start:
    return Start(time.monotonic(), (output / "_SUCCESS").exists(), tasks_submitted())


def reported_config(config: Config, command: str, metric: str) -> dict[str, Any]:
    """The settings a report shows: only the sections ``command`` reads, the metric the index was
    built with (not an unset key), and local paths made absolute (URLs as given)."""
    out = config.to_dict()
    for section in ("dedup", "graph"):
        if section != command:
            out.pop(section, None)
    out["index"]["metric"] = out["index"]["metric"] or metric

    def absolute(path: Any) -> Any:
        return path if not isinstance(path, str) or is_remote(path) else os.path.abspath(path)

    out["data"]["paths"] = [absolute(p) for p in out["data"]["paths"]]
    for key in ("output", "index_dir", "scratch_dir"):
        out[key] = absolute(out.get(key))
    if out.get("dedup"):
        out["dedup"]["against"] = [absolute(p) for p in out["dedup"].get("against") or ()]
    return out


def finish(
    output: Path,
    config: Config,
    joined: JoinResult,
    timings: Timings,
    *,
    command: str,
    started: Start,
    dedup: DedupResult | None = None,
    explored: tuple[ExploreRow, ...] | None = None,
    graph: GraphResult | None = None,
    workers: tuple[WorkerBusy, ...] = (),
) -> JobReport:
    report_path = output / "report.json"
    if started.complete and tasks_submitted() == started.tasks and report_path.exists():
        # a rerun of a finished job: nothing was redone, so the report of the run that did the work stays
        report = JobReport.from_json(json.loads(report_path.read_text()))
        log.info("nothing to do: %s is complete; its report (from the run that did the work) is kept", output)
        log.info("%s", recall_verdict(report.join))
        if report.dedup is not None:
            log.info("%s", dedup_verdict(report.dedup))
        with atomic_path(output / "_SUCCESS") as tmp:
            tmp.write_text("")
        return report
    wall = timings.earlier_wall + time.monotonic() - started.clock
    report = JobReport(
        command,
        joined,
        reported_config(config, command, joined.index.metric),
        dict(timings.phases),
        round(wall, 3),
        round(joined.queries / wall, 1) if wall > 0 else None,
        dedup,
        explored,
        graph,
        workers=workers,
    )
    report = write_report(output, report, config.index.seed)
    where = {"dedup": output / "groups", "graph": output / "graph.npz"}.get(command, output / "neighbors")
    if explored is not None:
        where = output / "report.md"
    elif dedup is not None and dedup.dataset is not None:
        where = output / "deduplicated"
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in timings.phases.items())
    this_run = time.monotonic() - started.clock
    earlier = f"; {wall:.1f} s with the earlier, interrupted run(s)" if timings.earlier_wall else ""
    log.info("done in %.1f s%s: %s (%s)", this_run, earlier, shown(where), phases)
    verdict = recall_verdict(joined)
    recall = joined.recall
    pairs = dedup.exactness if dedup is not None else None
    if (
        dedup is not None
        and pairs is not None
        and pairs.pair_recall is not None
        and dedup.target_pair_recall
        and pairs.pair_recall < dedup.target_pair_recall
    ):
        below = (
            f"dedup pair recall {pairs.pair_recall:.4f} on {pairs.queries} sampled rows, target "
            f"{dedup.target_pair_recall}: MISSED"
        )
        if not config.search.allow_below_target:
            fix = (
                f"{dedup.saturated_rows:,} rows have more duplicates than fit the shuffle: raise --partition-size"
                if dedup.saturated_rows
                else "use a richer --index-key (e.g. IVF...,Flat or Flat)"
            )
            raise BelowTarget(
                f"{below}; the outputs in {output} are complete but not marked _SUCCESS. To reach it, "
                f"{fix}; or accept it with --allow-below-target"
            )
        log.warning("%s (accepted: --allow-below-target)", below)
    if recall is not None and not recall.met and not config.search.allow_below_target:
        raise BelowTarget(
            f"{verdict}; the outputs in {output} are complete but not marked _SUCCESS. Raise the "
            "target's reach (a richer --index-key, e.g. IVF...,Flat or Flat), or accept it with "
            "--allow-below-target"
        )
    (log.warning if recall is not None and not recall.met else log.info)("%s", verdict)
    if dedup is not None:  # a dedup's last word is its own result
        log.info("%s", dedup_verdict(dedup))
    with atomic_path(output / "_SUCCESS") as tmp:
        tmp.write_text("")
    (output / TIMINGS_NAME).unlink(missing_ok=True)  # the job is complete: a later one starts its own
    return report


def require(value: str | None, flag: str, command: str) -> Path:
    if not value:
        raise ConfigError(f"{command}: {flag} is required")
    return Path(value).resolve()


def guarded(
    config: Config,
    output: Path | None,
    index_dir: Path | None,
    index_read_only: bool = False,
    output_read_only: bool = False,
) -> contextlib.ExitStack:
    """Check that the job's directories overlap no input and each other, then lock them for the
    job's duration: exclusively where it writes, shared where it only reads. A directory to be
    written that the tool may not use is refused first (:func:`check_writable`). Nothing is written
    before this."""
    files = resolve_paths(config.data.paths) if config.data.paths else []
    check_locations(config.data.paths, files, output, index_dir)
    nested = index_dir.name if output is not None and index_dir is not None and index_dir.parent == output else None
    for d, read_only, keep in ((output, output_read_only, nested), (index_dir, index_read_only, None)):
        if d is not None and not read_only:
            check_writable(d, config.overwrite, keep)
    stack = contextlib.ExitStack()
    try:
        for d, read_only in ((output, output_read_only), (index_dir, index_read_only)):
            if d is not None:
                stack.enter_context(locked(d, shared=read_only))
    except BaseException:
        stack.close()
        raise
    return stack
