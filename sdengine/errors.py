"""Typed errors raised by sdengine.

Every error a user can cause derives from :class:`SDEngineError`; the CLI prints its message on one line and
exits non-zero, and the Python API lets it propagate.
"""

from __future__ import annotations


class SDEngineError(Exception):
    """Base class of every error sdengine raises on purpose."""


class InvalidArgumentError(SDEngineError, ValueError):
    """A generation or export argument is out of range (size, steps, batch, guidance...)."""


class UnknownSchedulerError(InvalidArgumentError):
    """A scheduler name or scheduler class that sdengine does not implement."""


class UnsupportedConfigError(SDEngineError):
    """A model or scheduler configuration that sdengine cannot run faithfully."""


class ModelDirectoryError(SDEngineError):
    """A checkpoint, ONNX or engine directory is missing, incomplete or unreadable."""


class CorruptModelError(ModelDirectoryError):
    """A model file exists but cannot be parsed or loaded."""


class BackendUnavailableError(SDEngineError):
    """The requested backend or device is not available on this machine."""


class ExportVerificationError(SDEngineError):
    """An exported model's outputs are too far from its PyTorch module's (the export is kept)."""


class ExportError(SDEngineError):
    """An export step could not be done (a library's rewrite of the model failed, say)."""
