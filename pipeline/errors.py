"""Typed errors: each one carries a message that names the file, the column and the fix."""

from __future__ import annotations

__all__ = ["PipelineError", "InputError", "ConfigError", "ResumeError", "DeviceError", "StorageError"]


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
