"""Batch similarity search over Parquet embeddings: FAISS IVF-PQ indexes built and joined with Dask.

Packages by concern, in the order data flows through them (CONTRIBUTING.md, "Layout", has the
map and the rules the import graph holds):

* ``io``: planning Parquet input (``parquet``), the ``scan`` into the row ``store``, ``ids``,
  atomic writes, run directories (``workdir``: locations, locks; ``owned``: the ledger of the
  tool's own files, so nothing else is ever removed or written through a link), remote
  filesystems (``storage``) and the local staging of remote outputs (``staging``), sample data;
* ``index``: the index build: choosing it (``choice``), the training ``sampling``, ``train``,
  ``fill`` and merge, and the finished index as later stages see it (``built``);
* ``search``: the ``join``, ``exact`` ground truth, ``recall`` metrics, ``tuning``, list-major
  search (``lists``), the exact self-join by ``pairs``, ``probes``;
* ``shuffle``: edge shuffles and connected components, shared by ``duplicates`` and ``graphs``;
* ``duplicates``: near-duplicate groups, ``contamination`` (``--against``) and the deduplicated
  ``dataset`` (the ``dedup`` command's stages);
* ``graphs``: k-NN graphs (the ``graph`` command's stages);
* ``runtime``: how stages run: the task seam (``runner``: task records, ``Stage``,
  ``run_stage``), the ``manifest`` that makes every stage resumable, and ``progress``;
* ``cluster``: Dask clients (local, scheduler, Slurm/PBS, CUDA) and batch ``submit``;
* ``backends``: the CPU/GPU seam owned by each worker, over the exact ``kernels``;
* ``jobs``: the shared build and join ``stages`` and the ``commands`` (run, build, join, dedup,
  graph, evaluate);
* ``results`` (what a job reports), ``report`` (report.json, .md, .html) and its SVG ``charts``;
* ``kinds``: the closed sets of names (metrics, strategies, modes) as ``Literal`` types.
"""

from pipeline.api import (
    Duplicates,
    Graph,
    Neighbors,
    build,
    dedup,
    evaluate,
    find_duplicates,
    graph,
    join,
    knn,
    knn_graph,
    run,
)
from pipeline.config import Config, load_config, parse_config
from pipeline.errors import ConfigError, DeviceError, InputError, PipelineError, ResumeError

__all__ = [
    "Config",
    "load_config",
    "parse_config",
    "build",
    "join",
    "run",
    "dedup",
    "graph",
    "evaluate",
    "knn",
    "find_duplicates",
    "knn_graph",
    "Neighbors",
    "Duplicates",
    "Graph",
    "PipelineError",
    "InputError",
    "ConfigError",
    "ResumeError",
    "DeviceError",
]
__version__ = "0.1.0"
