"""Read a JSON file a user handed us, failing with one line whatever is in it.

``json.loads`` raises more than ``JSONDecodeError``: ``RecursionError`` on deeply nested
arrays, a plain ``ValueError`` for an integer of more than 4,300 digits,
``UnicodeDecodeError`` for bytes that are not UTF-8. Every reader of a user's JSON
(prog.json, manifest.json, tokenizer_config.json, a compiled program, a saved chat)
goes through ``read_json_object`` so all of them are reported the same way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from interp.errors import PawError, ProgramError


def parse_json(text: str | bytes, what: str, error: type[PawError] = ProgramError, standard: bool = False):
    """The JSON value in ``text``; ``error`` naming ``what`` if it is not valid JSON.

    ``standard``: refuse ``NaN``, ``Infinity`` and ``-Infinity``, which Python's json reads
    (paw's own files may hold them: an attribute of -inf) but JSON does not have.
    """
    try:
        return json.loads(text, parse_constant=_refuse_constant) if standard else json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise error(f"{what} is not usable JSON: it is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not usable JSON: {exc}") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # CPython's guard against quadratic int parsing
            raise error(f"{what} is not usable JSON: an integer has more than {sys.get_int_max_str_digits()} "
                        "digits") from None
        raise error(f"{what} is not usable JSON: {exc}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json_object(path: Path, error: type[PawError] = ProgramError) -> dict:
    """The JSON object in the file ``path``; ``error`` with one line if unreadable or not an object."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from exc
    value = parse_json(data, str(path), error)
    if not isinstance(value, dict):
        raise error(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value
