"""Command line: ``knn-pipeline {run,build,join,evaluate,dedup,graph,submit,sample-data} ...``.

Flags are generated from :data:`pipeline.config.KEYS`, so every flag is also a YAML key. Logging
and the progress display are configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import DEVICES, KEYS, METRICS, Config, load_config
from pipeline.errors import DISK_ERROR_FIXES, ConfigError, PipelineError
from pipeline.io.workdir import shown
from pipeline.results import JobReport, RecallSummary
from pipeline.runtime import progress

__all__ = ["main"]

log = logging.getLogger("pipeline")

BOOL_KEYS = {"exclude_self", "overwrite", "explore", "allow_below_target", "write_dataset", "routed_join", "retrain"}


GROUPS = {
    "data": "input",
    "index": "index",
    "search": "search",
    "": "output",
    "cluster": "cluster",
    "dedup": "dedup",
    "graph": "graph",
}
_SELF_JOIN = ("data", "index", "search", "", "cluster")
# the sections of keys each command reads (submit forwards every key to the job it runs)
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "run": _SELF_JOIN,
    "build": ("data", "index", "", "cluster"),
    "join": ("data", "search", "", "cluster"),
    "evaluate": ("search", "", "cluster"),
    "dedup": (*_SELF_JOIN, "dedup"),
    "graph": (*_SELF_JOIN, "graph"),
    "submit": tuple(GROUPS),
    "plan": tuple(GROUPS),
}
_ALSO = {"join": {"metric"}, "evaluate": {"seed"}}  # single keys of other sections a command reads
_NOT = {"build": {"output"}, "evaluate": {"partition_size", "overwrite"}}
CHOICES = {
    "metric": METRICS,
    "device": DEVICES,
    "dedup_mode": ("components", "greedy"),
    "keep_order": ("max", "min"),
    "graph_mode": ("directed", "symmetric", "mutual"),
    "weight": ("score", "gaussian"),
}


def _default(key: str) -> Any:
    section, name, _, _ = KEYS[key]
    defaults = Config()
    value = getattr(getattr(defaults, section) if section else defaults, name)
    if key == "partition_size":
        return "128MiB"
    if value is None:
        return "off" if key == "target_recall" else None
    return value


def config_reference() -> str:
    """The docs' configuration table (docs/configuration.md), generated from the config schema (``KEYS``) so it cannot
    drift: every key with its flag, default, the commands that read it and what it means."""
    readers = {
        key: [
            c
            for c in COMMAND_SECTIONS
            if c not in ("submit", "plan")
            and (KEYS[key][0] in COMMAND_SECTIONS[c] or key in _ALSO.get(c, ()))
            and key not in _NOT.get(c, ())
        ]
        for key in KEYS
    }
    lines = ["| key / flag | default | commands | meaning |", "|---|---|---|---|"]
    for key, (_, _, _, help_text) in KEYS.items():
        default = _default(key)
        if default is None and "auto" in help_text:
            default = "auto"
        shown_default = (
            ""
            if default is None or default == ()
            else f"`{str(default).lower()}`"
            if isinstance(default, bool)
            else f"`{default}`"
        )
        choices = f" (one of: {', '.join(f'`{c}`' for c in CHOICES[key])})" if key in CHOICES else ""
        lines.append(
            f"| `{key}` / `--{key.replace('_', '-')}` | {shown_default} | {', '.join(readers[key])} | "
            f"{help_text}{choices} |"
        )
    return "\n".join(lines) + "\n"


# what an unset key means, shown in --help beside the keys whose default is "none"
AUTO_DEFAULTS = {
    "sample_size": "auto (64 rows a list, at most 1 GiB)",
    "nprobe": "auto (tuned to --target-recall)",
    "rerank": "auto (tuned with nprobe for lossy codes, 0 for exact ones)",
    "workers": "auto (one per 4 cores, or one per GPU)",
    "threads_per_worker": "auto (the cores over the workers)",
    "threshold": "none: required, unless --explore",
    "kernel_width": "auto",
}
# the keys a command cannot run without (here or in --config): marked in --help
REQUIRED = {
    "run": ("input", "output"),
    "build": ("input", "index_dir"),
    "join": ("input", "index_dir", "output"),
    "evaluate": (),
    "dedup": ("input", "output"),
    "graph": ("input", "output"),
    "submit": ("input",),
    "plan": ("input",),
}
EXAMPLES = {
    "run": [
        "knn-pipeline run --input data/ --output out/ --k 10 --exclude-self",
        "knn-pipeline run --config configs/selfjoin.yaml --target-recall 0.99",
    ],
    "build": ["knn-pipeline build --input data/ --index-dir idx/ --metric cosine"],
    "join": ["knn-pipeline join --index-dir idx/ --input queries/ --output joined/ --k 5"],
    "evaluate": [
        "knn-pipeline evaluate --output out/",
        "knn-pipeline evaluate --index-dir idx/ --nprobe 8 --rerank 0",
    ],
    "dedup": [
        "knn-pipeline dedup --input data/ --output dedup/ --explore",
        "knn-pipeline dedup --input data/ --output dedup/ --threshold 0.95 --dedup-mode greedy",
        "knn-pipeline dedup --input train/ --output clean/ --threshold 0.95 --against evals/",
    ],
    "graph": ["knn-pipeline graph --input data/ --output graph/ --k 15 --graph-mode mutual"],
    "submit": [
        "knn-pipeline submit dedup --config configs/slurm.yaml --profile slurm-gpu --dry-run",
        "knn-pipeline submit dedup --config configs/slurm.yaml --profile slurm-gpu",
    ],
}


def _epilog(command: str) -> str:
    lines = "\n".join(f"  {e}" for e in EXAMPLES.get(command, ()))
    return f"examples:\n{lines}\n\ndocs: docs/commands/ (one page per command)" if lines else ""


class _Parser(argparse.ArgumentParser):
    """argparse with no flag abbreviations (``--vector-colum`` is an error, not ``--vector-column``)
    and with examples kept as written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def _unknown_flags(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> None:
    """Exit with the command's own usage and a did-you-mean for each unknown flag."""
    import difflib

    sub = _subparser(parser, command)
    known = [o for action in sub._actions for o in action.option_strings]
    hints = []
    for word in extra:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
            hints.append(f"{word} (did you mean {close[0]}?)" if close else word)
        else:
            hints.append(word)
    sub.error(f"unrecognized arguments: {' '.join(hints)}")


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _add_job_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command``'s keys, grouped by section, each with its default and choices."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of keys (flags override it)")
    sections = COMMAND_SECTIONS[command]
    groups = {
        s: parser.add_argument_group(GROUPS[s])
        for s in GROUPS
        if s in sections or any(KEYS[k][0] == s for k in _ALSO.get(command, ()))
    }
    for key, (section, _, _, help_text) in KEYS.items():
        if (section not in sections and key not in _ALSO.get(command, ())) or key in _NOT.get(command, ()):
            continue
        group = groups[section]
        flag = "--" + key.replace("_", "-")
        notes = ["required, here or in --config"] if key in REQUIRED.get(command, ()) else []
        notes += [f"one of: {', '.join(CHOICES[key])}"] if key in CHOICES else []
        default = _default(key)
        if not (default is None or default is False or default == ()):
            notes.append(f"default: {default}")
        elif key in AUTO_DEFAULTS:
            notes.append(f"default: {AUTO_DEFAULTS[key]}")
        text = f"{help_text} ({'; '.join(notes)})" if notes else help_text
        if key in BOOL_KEYS:
            group.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif key in ("input", "against"):
            group.add_argument(flag, dest=key, nargs="+", action="extend", metavar="PATH", help=text)
        else:
            group.add_argument(flag, dest=key, default=None, metavar=key.upper(), help=text)
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging: every task as it ends, batch sizes, and Dask's own log lines",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def _prog() -> str:
    """How the user called us: ``knn-pipeline`` (the console script) or ``python -m pipeline``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "knn-pipeline" if name.startswith("knn-pipeline") else "python -m pipeline"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_prog(), description="Batch k-NN joins over Parquet embeddings with FAISS and Dask.")
    parser.add_argument("--version", action="version", version=f"knn-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (
        ("run", "build an index over --input and self-join it into OUTPUT/neighbors"),
        ("build", "build the index only, into --index-dir"),
        ("join", "search the --input queries against an existing --index-dir"),
        (
            "evaluate",
            "recall of the neighbour table in --output, or of --index-dir at given settings, "
            "against exact search on a sample",
        ),
        ("dedup", "near-duplicate pairs, groups and the rows to keep, from a self-join of --input"),
        ("graph", "a k-NN graph of --input: Parquet edges, a scipy CSR .npz and umap-learn's precomputed k-NN"),
    ):
        _add_job_flags(sub.add_parser(name, help=help_text, description=help_text, epilog=_epilog(name)), name)
    submit = sub.add_parser(
        "submit",
        help="submit JOB as a batch job (Slurm/PBS profile); it asks for its own workers",
        description="Write and submit one driver job script that runs JOB with this config; the "
        "driver then asks for worker jobs through dask-jobqueue. --dry-run prints the scripts.",
        epilog=_epilog("submit"),
    )
    submit.add_argument(
        "job",
        nargs="?",
        default="run",
        choices=("run", "build", "join", "dedup", "graph", "evaluate"),
        help="the command the driver runs (default: run)",
    )
    submit.add_argument(
        "--dry-run", action="store_true", help="print the driver and worker job scripts, submit nothing"
    )
    _add_job_flags(submit, "submit")
    plan = sub.add_parser(
        "plan",
        help="what JOB would do and cost: the index and why, time per phase, memory, disk",
        description="Estimate JOB before running it, from the input's metadata and rates measured on "
        "this machine in under a second: the index it would choose and why, time, bytes read and "
        "written per phase, peak memory per worker, and the disk the index and outputs take.",
        epilog="examples:\n  knn-pipeline plan run --input data/ --k 10\n"
        "  knn-pipeline plan dedup --config configs/dedup.yaml",
    )
    plan.add_argument(
        "job", nargs="?", default="run", choices=("run", "build", "dedup", "graph"), help="the command (default: run)"
    )
    _add_job_flags(plan, "plan")
    sample = sub.add_parser(
        "sample-data",
        help="write a generated clustered dataset as Parquet shards",
        description="Write a seeded, clustered dataset: part-NNNNN.parquet files with id (int64), text (a "
        "short string per row, for the report's example pairs) and embedding (float32 lists).",
        epilog="examples:\n  knn-pipeline sample-data demo/data\n"
        "  knn-pipeline sample-data big/ --rows 2000000 --dim 128 --shards 16",
    )
    sample.add_argument("directory", help="where to write part-NNNNN.parquet (id int64, text, embedding float32 lists)")
    sample.add_argument("--rows", type=int, default=50_000, help="rows to generate (default: 50000)")
    sample.add_argument("--dim", type=int, default=64, help="vector dimension (default: 64)")
    sample.add_argument("--shards", type=int, default=4, help="Parquet files to split the rows into (default: 4)")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    sample.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sample.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


class _OneLine(logging.Formatter):
    """One record, one line: control characters in a message (a file name holding a newline)
    are escaped, so no input can forge or split a log line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line if line.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if verbose:  # -v: Dask's own log lines too, through its own handler (silenced otherwise)
        logging.getLogger("distributed").setLevel(logging.INFO)
    progress.configure(live=sys.stderr.isatty() and not quiet and not verbose)


def _reads(command: str, key: str) -> bool:
    """Whether ``command`` reads ``key`` (its sections, the single keys it borrows, less those it never reads)."""
    section = KEYS[key][0]
    return (section in COMMAND_SECTIONS[command] or key in _ALSO.get(command, ())) and key not in _NOT.get(command, ())


def _warn_unread(path: str, command: str) -> None:
    """A key of the YAML file that ``command`` does not read (``threshold`` in a ``run``) is said,
    not silently ignored."""
    from pipeline.config import read_yaml

    for raw in read_yaml(path):
        key = str(raw).replace("-", "_")
        if key in KEYS and not _reads(command, key):
            users = [c for c in COMMAND_SECTIONS if c not in ("submit", "plan") and _reads(c, key)]
            log.warning("%s: %s is not read by %s (it is for %s); ignored", path, raw, command, ", ".join(users))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unknown_flags(parser, getattr(args, "command", None), extra)
    _setup_logging(args.verbose, args.quiet)
    try:
        if args.command == "sample-data":
            from pipeline.io.sample_data import clustered_vectors, write_shards

            for flag, value, least in (("--rows", args.rows, 1), ("--dim", args.dim, 1), ("--shards", args.shards, 1)):
                if value < least:
                    raise ConfigError(f"sample-data: {flag} {value} is below {least}; give a positive number")
            if args.shards > args.rows:
                raise ConfigError(
                    f"sample-data: --shards {args.shards} is more than --rows {args.rows} (a shard would "
                    "be empty); give fewer shards"
                )
            target = Path(args.directory)
            marker = target / ".sample-data.json"
            wanted = {"rows": args.rows, "dim": args.dim, "shards": args.shards, "seed": args.seed}
            if target.is_dir() and any(target.iterdir()):
                if marker.exists() and json.loads(marker.read_text()) == wanted:
                    log.info(
                        "%s already holds this sample (%d rows x %d dims): nothing to do", target, args.rows, args.dim
                    )
                    return 0
                raise ConfigError(
                    f"sample-data: {shown(target)} is not empty (its files would mix with the new "
                    "shards, and nothing there is removed); choose a new or empty directory"
                )
            paths = write_shards(
                args.directory, clustered_vectors(args.rows, args.dim, seed=args.seed), shards=args.shards
            )
            marker.write_text(json.dumps(wanted))
            log.info("wrote %d rows x %d dims in %d shards to %s", args.rows, args.dim, len(paths), args.directory)
            return 0
        from pipeline.jobs import commands as jobs

        overrides = {key: getattr(args, key, None) for key in KEYS}
        config = load_config(args.config, overrides)
        if args.config and args.command not in ("submit", "plan"):
            _warn_unread(args.config, args.command)
        if args.command == "plan":
            from pipeline.jobs.plan import estimate

            print("\n".join(estimate(config, args.job).lines()))
            return 0
        if args.command == "submit":
            from pipeline.cluster.submit import prepare, submit

            sub = prepare(args.job, config)
            if args.dry_run:
                print(f"# driver job script ({sub.script_path}):\n{sub.script}")
                print(f"# each worker job the driver asks for:\n{sub.worker_script}")
                print(f"# submit with: {' '.join(sub.argv)}")
                return 0
            job_id = submit(sub, config)
            print(
                f"submitted {sub.kind} job {job_id}: driver log {sub.log_dir}/driver-{job_id}.log, "
                f"worker logs in {sub.log_dir}"
            )
            return 0
        signal.signal(signal.SIGTERM, _terminated)  # a batch walltime or scancel: close worker jobs on the way out
        signal.signal(signal.SIGINT, _interrupted)
        result = getattr(jobs, args.command)(config)
        if isinstance(result, RecallSummary):
            print(json.dumps(result.to_json(), indent=2))
        if isinstance(result, JobReport) and result.dedup_explore:
            print(f"{'threshold':>10} {'pairs':>10} {'rows dropped':>13} {'share':>7}")
            for row in result.dedup_explore:
                share = row.rows_dropped / max(1, row.rows_in)
                print(f"{row.threshold:>10} {row.pairs:>10} {row.rows_dropped:>13} {share:>7.2%}")
            print(
                "(from each row's k nearest neighbours only: a real run also searches rows with more than k "
                "duplicates again, and rows with a pair over more lists, so it can find more pairs)"
            )
        return 0
    except PipelineError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        if exc.errno not in DISK_ERROR_FIXES:
            raise
        log.error(
            "%s: %s; %s, then run the same command again to resume (finished parts are kept)",
            shown(exc.filename or "output"),
            exc.strerror,
            DISK_ERROR_FIXES[exc.errno],
        )
        return 2
    except Terminated:
        log.error("terminated (SIGTERM: walltime, scancel or kill); run or submit the same command again to resume")
        return 143
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to resume: finished pieces are kept")
        return 130


class Terminated(Exception):
    """SIGTERM, raised in the main thread so the cluster (and any batch worker jobs) is closed."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated()


_STOPPING = [False]


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C: say at once that the job is stopping (cancelling its tasks and closing the cluster
    takes a few seconds); a second Ctrl-C quits without waiting."""
    if _STOPPING[0]:
        os._exit(130)
    _STOPPING[0] = True
    sys.stderr.write("\n")
    log.warning("stopping: cancelling the running tasks and closing the cluster (Ctrl-C again to quit at once)")
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
