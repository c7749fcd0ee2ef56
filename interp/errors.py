"""The error hierarchy. The CLI turns any PawError into one line and a non-zero exit."""

from __future__ import annotations


class PawError(Exception):
    """Base of every error paw reports to a user as one clear line."""


class ProgramError(PawError):
    """A program directory or file is missing, malformed, or of an unknown version."""


class UnknownOpError(ProgramError):
    """A program uses an op this interpreter does not implement."""


class WeightsError(ProgramError):
    """consts.safetensors is missing, truncated, or disagrees with prog.json."""


class ExportError(PawError):
    """The exporter could not capture or lower a model."""


class SourceError(PawError):
    """A model source (hub id, folder, GGUF file, alias) cannot be resolved."""


class ArtifactError(PawError):
    """A programs-as-weights artifact is malformed or made for another base model."""


class ConstraintError(PawError):
    """An output constraint (choices, regex, JSON schema) is invalid or cannot be met."""


class RequestError(PawError):
    """A generation request cannot be served as asked: unknown model, too long, bad settings.

    ``code`` and ``param`` name the problem for an API client (OpenAI's error fields).
    """

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


class OverloadedError(PawError):
    """Too many requests are already waiting; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after
