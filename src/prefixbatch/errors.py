"""The package's errors.

``PrefixbatchError`` is the base of every error the package raises on purpose. ``JobError`` and
its subclasses are whole-job problems (bad model, bad input path, KV budget, device): they stop a
job before any compute, and the CLI reports them in one line with exit code 2. A problem with one
request is a ``RequestError``: it becomes that request's error record and every other request
runs. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PrefixbatchError(Exception):
    """Base of the package's errors."""


class JobError(PrefixbatchError):
    """A problem with the whole job: reported in one line, exit code 2."""


class ConfigError(JobError, ValueError):
    """An engine or job option has a value it cannot take."""


class ModelNotFoundError(JobError):
    """The model path does not exist or holds no usable checkpoint."""


class UnsupportedModelError(JobError):
    """The checkpoint's architecture (or rope scaling) is not one the engine implements."""


class KVBudgetError(JobError):
    """The KV cache cannot hold what is asked of it."""


class DeviceUnavailableError(JobError):
    """The requested device (e.g. ``cuda``) is not available on this machine."""


class InputFileError(JobError):
    """The batch input file is missing, unreadable, or the same file as the output."""


class MissingDependencyError(JobError):
    """An optional package that a feature needs is not installed (the message names it and the
    command that installs it)."""


class RayUnavailableError(JobError):
    """Ray is not installed, no worker could be started, or every worker died."""


class JobInterrupted(PrefixbatchError):
    """Ctrl-C or SIGTERM: what is answered is on disk; running the job again (without
    ``--overwrite``) resumes. The CLI adds that hint to the message."""

    def __init__(self, answered: int, runnable: int, failed: int = 0) -> None:
        """``answered`` of the ``runnable`` lines (those without an error record) have their
        answer; ``failed`` lines have an error record."""
        lines = f", {failed} line{'s' if failed != 1 else ''} failed" if failed else ""
        super().__init__(f"interrupted: {answered} of {runnable} runnable requests answered{lines}")


class RequestError(PrefixbatchError):
    """One request cannot run (bad field, too long, token id out of range)."""
