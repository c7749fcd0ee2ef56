"""The one check of token ids, wherever they enter a program.

An id outside the vocabulary is not a token: MLX would gather a row past the end of
the embedding (garbage, or a crash far enough out). Every entry point that accepts ids
(``paw_mlx.prompt_ids`` / ``stream_tokens`` / ``generate``, ``ChatSession``, compiled
programs and their batches, ``paw run --prompt-ids``, ``paw decode``, ``paw export
program``, the server) calls ``check_token_ids`` with the program's vocabulary size
(``Program.vocab_size``: the rows of the embedding that reads ``input_ids``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from interp.errors import InputError
from interp.schema import INT32_MAX


def check_token_ids(ids: Iterable, vocab_size: int | None, *, what: str = "token ids",
                    allow_empty: bool = False) -> list[int]:
    """``ids`` as a list of ints, each in [0, vocab_size); InputError naming the first bad one.

    With ``vocab_size`` None (a program whose vocabulary cannot be read off its graph)
    ids need only be non-negative 32-bit integers.
    """
    if hasattr(ids, "tolist"):  # an mx.array or numpy array of ids
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InputError(f"{what} must be a sequence of integers, not {type(ids).__name__}")
    checked = []
    bound = vocab_size if vocab_size is not None else INT32_MAX + 1
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise InputError(f"{what}: item {position} is {token!r:.40}, not an integer token id")
        token = int(token)
        if not 0 <= token < bound:
            if vocab_size is None:
                raise InputError(f"{what}: {token} at position {position} is not a token id")
            raise InputError(f"{what}: {token} at position {position} is outside the vocabulary "
                             f"(ids 0 to {vocab_size - 1})")
        checked.append(token)
    if not checked and not allow_empty:
        raise InputError(f"{what}: there are none (an empty prompt)")
    return checked
