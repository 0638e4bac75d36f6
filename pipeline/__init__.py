"""Batch similarity search over Parquet embeddings: FAISS IVF-PQ indexes built and joined with Dask.

Packages by concern, in the order data flows through them:

* ``io``: planning Parquet input (``parquet``), the scan into the row ``store``, ``ids``, atomic
  writes, run directories (``workdir``: locations, owned names, locks), generated sample data;
* ``index``: choosing the index (``choice``), the training sample, ``fill`` and merge;
* ``search``: the ``join``, ``exact`` ground truth and recall, ``tuning``;
* ``shuffle``: edge shuffles and connected components, shared by ``dedup`` and ``graph``;
* ``stages``: the ``manifest`` that makes every stage resumable, and ``progress``;
* ``cluster``: Dask clients (local, scheduler, Slurm/PBS, CUDA) and batch ``submit``;
* ``backends``: the CPU/GPU seam;
* ``jobs``: the shared build and join ``stages`` and the ``commands`` (run, build, join, dedup,
  graph, evaluate).
"""

from typing import Any

from pipeline.config import Config, load_config, parse_config
from pipeline.errors import ConfigError, DeviceError, InputError, PipelineError, ResumeError

_COMMANDS = ("build", "join", "run", "dedup", "graph")


def __getattr__(name: str) -> Any:
    """The commands, imported on first use: ``--help``, ``--version`` and ``sample-data`` need
    neither Dask nor FAISS (half a second of imports on a small machine)."""
    if name in _COMMANDS:
        from pipeline.jobs import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = [
    "Config",
    "load_config",
    "parse_config",
    "build",
    "join",
    "run",
    "dedup",
    "graph",
    "PipelineError",
    "InputError",
    "ConfigError",
    "ResumeError",
    "DeviceError",
]
__version__ = "0.1.0"
