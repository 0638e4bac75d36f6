"""Batch similarity search over Parquet embeddings: FAISS IVF-PQ indexes built and joined with Dask.

The stages, each in its own module: ``shards`` (planning and reading Parquet), ``scan``
(validation into the row ``store``), ``sampling`` and ``indexing`` (training), ``fill``, ``join``,
then ``edges``, ``components`` and ``dedup`` / ``graph`` on the self-join's lists, with
``manifest`` for resuming, ``cluster`` for Dask and ``backends`` as the CPU/GPU seam.
``runner`` orders the shared stages (build, join); ``jobs`` holds the commands.
"""

from .config import Config, load_config, parse_config
from .errors import ConfigError, DeviceError, InputError, PipelineError, ResumeError
from .jobs import build, dedup, graph, join, run

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
