"""Batch similarity search over Parquet embeddings: FAISS IVF-PQ indexes built and joined with Dask.

Packages by concern, in the order data flows through them:

* ``io``: planning Parquet input (``parquet``), the scan into the row ``store``, ``ids``, atomic
  writes, run directories (``workdir``: locations, locks; ``owned``: the ledger of the tool's own
  files, so nothing else is ever removed or written through a link), remote filesystems
  (``storage``) and the local staging of remote outputs (``staging``), generated sample data;
* ``index``: choosing the index (``choice``), the training sample, ``fill`` and merge, and the
  finished index as later stages see it (``built``);
* ``search``: the ``join``, ``exact`` ground truth and recall, ``tuning``, list-major search (``lists``),
  exact search and re-ranking against the row store, on the host or resident on a device (``stored``);
* ``shuffle``: edge shuffles and connected components, shared by ``duplicates`` and ``graphs``;
* ``duplicates``: near-duplicate groups, decontamination and the deduplicated dataset (``dedup``);
* ``graphs``: k-NN graphs (``graph``);
* ``stages``: the ``manifest`` that makes every stage resumable, and ``progress``;
* ``cluster``: Dask clients (local, scheduler, Slurm/PBS, CUDA) and batch ``submit``;
* ``backends``: the CPU/GPU seam;
* ``jobs``: the shared build and join ``stages`` and the ``commands`` (run, build, join, dedup,
  graph, evaluate);
* ``results`` (typed outcomes), ``report`` (report.json, .md, .html) and its SVG ``charts``;
* ``kinds``: the closed sets of names (metrics, strategies, modes) as ``Literal`` types.
"""

from pipeline.config import Config, load_config, parse_config
from pipeline.errors import ConfigError, DeviceError, InputError, PipelineError, ResumeError
from pipeline.jobs.commands import build, dedup, graph, join, run

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
