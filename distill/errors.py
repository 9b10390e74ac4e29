"""Errors a user can fix. Each message names what to fix: the file (and line or row), the recipe
key, or the cache field. The ``distill`` CLI prints them as one line,
``distill <command>: error: <message>``; anything else is a bug and keeps its traceback.

Every type also derives from the built-in exception it refines (``ValueError``, ``KeyError``, ...),
so code that caught those before keeps working.
"""
from __future__ import annotations


class DistillError(Exception):
    """Base of every error the user can fix."""


class RecipeError(DistillError, ValueError):
    """A recipe or option is invalid; the message starts with the key's dotted path."""


class DataError(DistillError, ValueError):
    """A data file or row cannot be used as it is; the message names the file and line or row."""


class MissingFileError(DistillError, FileNotFoundError):
    """A file or folder the command needs does not exist; the message names it and what makes one."""

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(DataError, MissingFileError):
    """A data file or folder does not exist."""


class FileFormatError(DistillError, ValueError):
    """A file is not what it should be (another format, damaged); the message names it."""


class ModelError(DistillError, ValueError):
    """A model cannot do what was asked (no image tower, another embedding size, not a CLIP model)."""


class CacheError(DistillError, ValueError):
    """A teacher cache cannot be used: unfinished, damaged, unwritable or from an older version."""


class CacheMismatchError(CacheError):
    """The cache was built with another teacher, preprocessing or view policy; the message names the field."""


class CacheMissError(CacheError):
    """Rows have no teacher embedding in the cache and no teacher was named to encode them."""


class RunConflictError(DistillError, ValueError):
    """The output folder holds work of another run (or of this one, without ``train.resume``)."""


class ExportError(DistillError, ValueError):
    """The student cannot be written exactly in the asked format; the message says why and what to use."""


class ExportGateError(DistillError, RuntimeError):
    """The exported model's embeddings are too far from the PyTorch student's (the parity gate)."""


class PhotoIndexError(DistillError, ValueError):
    """A photo index folder that cannot be read or written, or a model that does not embed as it did."""


class NonFiniteLossError(DistillError, FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


class UnknownNameError(DistillError, KeyError):
    """A registry has no entry of that name; the message lists the closest ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(DistillError, ImportError):
    """An optional package is needed; the message gives the pip command."""


class ProcessStoppedError(DistillError, RuntimeError):
    """Several processes: another process failed (the message names it and its cause), or stopped answering
    (it died, or waited longer than ``train.dist_timeout``)."""


__all__ = ["DistillError", "PhotoIndexError", "RecipeError", "DataError", "DataNotFoundError", "MissingFileError", "FileFormatError",
           "ModelError", "CacheError", "CacheMismatchError", "CacheMissError",
           "RunConflictError", "ExportError", "ExportGateError", "NonFiniteLossError", "UnknownNameError", "MissingDependencyError",
           "ProcessStoppedError", "user_message"]


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (its type's name when it has none), at most ``limit`` characters:
    what a one-line message quotes of an error raised by another library."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def unreachable(e: BaseException, what: str, key: str, fix: str) -> BaseException:
    """A model hub that cannot be reached (or has no such model), as one line naming the model and the
    recipe key (``key``) with ``fix``; any other error is returned as it is."""
    if isinstance(e, OSError) and not isinstance(e, DistillError):
        return ModelError(f"{key}: {what} cannot be loaded ({first_line(e, 160)}); {fix}")
    return e


_SYSTEM = {28: "no space left on the disk", 122: "disk quota exceeded", 30: "the file system is read-only",
           13: "permission denied", 5: "input/output error (the disk or the network share failed)"}


def user_message(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix (this library's, a missing or unwritable file, a full
    disk, memory), or None for a bug."""
    if isinstance(e, DistillError):
        return str(e)
    if isinstance(e, OSError) and getattr(e, "filename", None):  # missing file, permission, disk full
        return f"{e.strerror or e} ({e.filename})"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return str(e)
    if isinstance(e, OSError) and e.errno in _SYSTEM:
        return f"{_SYSTEM[e.errno]} ({first_line(e, 200)})"
    if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
        return ("out of memory: lower train.batch_size (with train.grad_accum to keep the effective batch), or see "
                "`distill plan --vram`")
    return None
