"""One refusal for the paths that cannot run a program with recurrent state.

A recurrent state (``interp/state_cache.py``: a conv, delta, SSM or LRU state) is one array per
layer, not one entry per position: it goes back a few positions or none, is not saved with
a KV prefix or split over ranks by layer or head as the KV cache is, and a padded batch
would feed its padding into it (``check_whole_rows``, which the stateful ops call). The
plain generation path runs such a program exactly; every other path either handles the
state itself through its interface (``state``, ``trim``, ``copy``, ``nbytes``: ``paw chat``
goes back where the states can, else prefills again; ``paw serve`` prefills each request on
its own state, from the longest whole snapshot its prompt cache holds, then decodes it in a
row of batched states, ``interp/slot_states.py``; a
compiled program's calls start from copies of its prefix's states,
``paw_mlx/programs/recurrent_prefix.py``) or calls ``refuse_recurrent`` before any work, as
distributed execution does.
"""

from __future__ import annotations

from interp.errors import PawError, ProgramError
from interp.program import Program

#: each recurrent state kind as the refusal names it
_NAMED = {"conv": "a conv state", "delta": "a delta state", "ssm": "an SSM state", "lru": "an LRU state"}


def refuse_recurrent(program: Program, what: str, error: type[PawError] = PawError) -> None:
    """Raise ``error`` naming ``what`` (e.g. "tensor parallelism") when ``program`` keeps recurrent state."""
    if program.recurrent:
        kinds = " and ".join(f"{_NAMED[kind]} in {count} layers" for kind, count in program.recurrent_states.items())
        raise error(f"{what} does not run programs with recurrent state: {program.directory} keeps {kinds} "
                    f"({program.model_info.get('model_type') or 'hybrid'}), which splits over ranks do not carry; "
                    "run it in one process (paw run, paw chat, paw serve)")


def check_whole_rows(ctx, length: int, op: str) -> None:
    """Raise ``ProgramError`` unless every row of ``op``'s input is real positions that continue its state.

    Padding (a key mask) would enter every later position's state. Rows of a slot batch, each
    at its own cache column (``query_columns``: the server's decode step, ``interp/slots.py``),
    are fine one position each, as every row then advances by one real token; more positions
    per row are a padded prefill of rows of different lengths.
    """
    if ctx.key_mask is not None or (ctx.query_columns is not None and length > 1):
        raise ProgramError(f"{op} runs on whole, unpadded rows; padded batches and slot batches of more than "
                           "one position per row are not supported")
