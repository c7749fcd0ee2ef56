"""The error hierarchy. The CLI turns any PawError into one line and a non-zero exit."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (MLX and nanobind add lines of signatures)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


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


class DistributedError(PawError):
    """A run over several processes cannot start, or lost one of its ranks."""


class InputError(PawError):
    """What a caller feeds a program is out of range: token ids outside the vocabulary, an empty prompt."""


class TemplateError(PawError):
    """A chat template failed to render, or hit a limit on time or output size."""


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
