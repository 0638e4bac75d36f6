"""Typed errors: each one carries a message that names the file, the column and the fix."""

from __future__ import annotations

import errno

__all__ = [
    "PipelineError",
    "InputError",
    "ConfigError",
    "ResumeError",
    "DeviceError",
    "StorageError",
    "DISK_ERROR_FIXES",
]


class PipelineError(Exception):
    """Base class for errors the CLI reports as one line, without a traceback."""


class InputError(PipelineError, ValueError):
    """The input data is unusable as given (missing column, NaN, duplicate ids, ...)."""


class ConfigError(PipelineError, ValueError):
    """A configuration value is invalid or inconsistent with the data."""


class ResumeError(PipelineError):
    """An existing run directory does not match the current input or configuration."""


class DeviceError(PipelineError, RuntimeError):
    """The requested device (GPU) is not available."""


class StorageError(PipelineError, OSError):
    """An output could not be written (disk full, quota, read-only, file-size limit).

    Built as ``StorageError(errno, message)``; it reads as the message alone.
    """

    def __str__(self) -> str:
        return str(self.strerror)


_FULL = "free space there (or raise the quota), or choose another --output / --index-dir"
_READ_ONLY = "the directory is not writable: fix its permissions, or choose another --output / --index-dir"
# OS errors the CLI reports in one line (the file, the reason, this fix) rather than a traceback;
# their "Compute Failed" dumps on the workers are silenced too (cluster.clients.is_reported)
DISK_ERROR_FIXES = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EROFS: _READ_ONLY,
    errno.EACCES: _READ_ONLY,
    errno.EPERM: _READ_ONLY,
    errno.EFBIG: "a file grew past what this filesystem or the process's file-size limit allows; "
    "lower --partition-size or choose another --output / --index-dir",
    errno.ENOENT: "a file or folder of the job's vanished while it ran (was the output or index "
    "directory removed or moved?); keep it in place",
}
