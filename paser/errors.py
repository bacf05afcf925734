"""User-facing errors.

Every problem a user can fix (a missing file, a model paser cannot read, a pickle that needs the
trust flag) raises a ``PaserError`` whose message names the file, what was expected and what was
found. The CLI prints that message on one line and exits non-zero; it never shows a traceback for
these.
"""

from __future__ import annotations


class PaserError(Exception):
    """A problem with the user's input that the user can fix; the message says how."""


class ModelLoadError(PaserError):
    """A model reference that paser cannot load."""


class UntrustedPickleError(ModelLoadError):
    """A pickle checkpoint refused because the user did not opt in to unpickling it."""


class UnsafeCheckpointError(ModelLoadError):
    """A pickle checkpoint that needs a global outside the allowlist of LLM-Pruner's layout; the
    message names it. Nothing of the file has run."""


class TokenizerMismatchError(PaserError):
    """A dense/pruned pair whose tokenizers differ, so their token distributions cannot be compared."""


class UnsupportedModelError(PaserError):
    """A model whose architecture a paser stage cannot handle."""


class DataError(PaserError):
    """An instruction file or record paser cannot use."""


class ConfigError(PaserError):
    """A YAML config or override with an unknown key or a value of the wrong type."""


class ShardError(PaserError):
    """A scoring shard that failed; the message names the run, the shard, its record range and the
    reason. ``transient`` is true for I/O and connection failures, which are worth a retry."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):  # keeps ``transient`` when a Dask or Ray worker sends it back
        return type(self), (str(self), self.transient)
