"""Where files live: local paths, or any filesystem pyarrow supports by URL (``s3://``, ``gs://``,
``abfs://``, ``hdfs://``).

Input is read where it lies: planning reads each file's size, time and footer (in parallel), and
the scan streams row groups, through :func:`open_parquet`. Credentials and endpoints come from the
standard places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
each cloud's default credential chain), plus ``storage_options`` in the YAML (the filesystem's own
keyword arguments, e.g. ``endpoint_override`` or ``region`` for S3), which a worker plugin sets
on every worker. Output and index directories on such a filesystem are staged
locally (:mod:`pipeline.io.staging`).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = [
    "RemoteFile",
    "is_remote",
    "filesystem",
    "open_parquet",
    "list_parquet",
    "remote_info",
    "set_storage_options",
]

_OPTIONS: dict[str, Any] = {}  # this process's storage_options (set by the job, and on each worker by a plugin)


def set_storage_options(options: Mapping[str, Any] | None) -> None:
    """The filesystem keyword arguments of this job (YAML ``storage_options``), for this process."""
    _OPTIONS.clear()
    _OPTIONS.update(options or {})


def is_remote(path: str | os.PathLike[str]) -> bool:
    """A URL with a scheme other than ``file`` (a Windows drive letter is not a scheme)."""
    scheme = urlsplit(os.fspath(path)).scheme
    return len(scheme) > 1 and scheme != "file"


@lru_cache(maxsize=16)
def _filesystem(scheme: str, netloc: str, options: str) -> pafs.FileSystem:
    kwargs = json.loads(options)
    if scheme == "s3":
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_override" not in kwargs:
            parts = urlsplit(endpoint)
            kwargs["endpoint_override"] = parts.netloc or parts.path
            kwargs.setdefault("scheme", parts.scheme or "https")
        return pafs.S3FileSystem(**kwargs)
    if kwargs:
        if scheme in ("gs", "gcs"):
            return pafs.GcsFileSystem(**kwargs)
        if scheme in ("abfs", "abfss", "az"):
            return pafs.AzureFileSystem(**kwargs)
        if scheme in ("hdfs", "viewfs"):
            return pafs.HadoopFileSystem(**kwargs)
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{netloc}/")
    return fs


def filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``url`` and the path inside it (``bucket/key`` for object stores)."""
    parts = urlsplit(url)
    fs = _filesystem(parts.scheme, parts.netloc, json.dumps(_OPTIONS, sort_keys=True, default=str))
    if parts.scheme in ("hdfs", "viewfs"):
        return fs, parts.path or "/"
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file, local or remote (remote ones are read by ranged requests: the footer, then
    the row groups asked for)."""
    if not is_remote(path):
        return pq.ParquetFile(path)
    fs, inner = filesystem(path)
    return pq.ParquetFile(fs.open_input_file(inner))


@dataclass(frozen=True)
class RemoteFile:
    url: str
    size: int
    mtime_ns: int


def remote_info(url: str) -> RemoteFile | None:
    """Size and time of one remote file (None: it does not exist or is a directory)."""
    fs, inner = filesystem(url)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        return None
    return RemoteFile(url, int(info.size or 0), int(info.mtime_ns or 0))


def _url(url: str, inner: str) -> str:
    parts = urlsplit(url)
    if parts.scheme in ("hdfs", "viewfs"):
        return f"{parts.scheme}://{parts.netloc}{inner}"
    return f"{parts.scheme}://{inner}"


def list_parquet(url: str) -> list[RemoteFile]:
    """The Parquet files at ``url``: the file itself, every ``*.parquet`` below a prefix (names
    starting with ``.`` or ``_`` skipped), or the matches of a glob in the key."""
    fs, inner = filesystem(url)
    pattern = None
    if any(ch in inner for ch in "*?["):
        pattern = inner
        inner = inner[: min(inner.index(ch) for ch in "*?[" if ch in inner)].rsplit("/", 1)[0]
    info = fs.get_file_info(inner)
    if pattern is None and info.type == pafs.FileType.File:
        return [RemoteFile(url, int(info.size or 0), int(info.mtime_ns or 0))]
    if info.type == pafs.FileType.NotFound:
        return []
    found = []
    for f in fs.get_file_info(pafs.FileSelector(inner, recursive=True)):
        rel = f.path[len(inner) :].lstrip("/")
        if f.type != pafs.FileType.File or any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if pattern is not None and not fnmatch.fnmatchcase(f.path, pattern):
            continue
        if pattern is None and not f.path.lower().endswith(".parquet"):
            continue
        found.append(RemoteFile(_url(url, f.path), int(f.size or 0), int(f.mtime_ns or 0)))
    return sorted(found, key=lambda f: f.url)
