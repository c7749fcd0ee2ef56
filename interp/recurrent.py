"""One refusal for the paths that cannot run a program with recurrent state.

A conv state (``interp/conv_cache.py``) is one array per layer, not one entry per
position: it goes back only a few positions, is not saved with a KV prefix, split over
ranks by layer or head as the KV cache is, or kept per row in a slot batch. The plain
generation path runs such a program exactly; every other path either handles the state
itself through its interface (``state``, ``trim``, ``copy``, ``nbytes``: ``paw chat`` trims
within its depth, else prefills again; ``paw serve`` runs each request on its own state,
``paw_mlx/engine/engine.py``; a compiled program's calls start from copies of its prefix's
states, ``paw_mlx/programs/recurrent_prefix.py``) or calls ``refuse_recurrent`` before any
work, as distributed execution does.
"""

from __future__ import annotations

from interp.errors import PawError
from interp.program import Program


def refuse_recurrent(program: Program, what: str, error: type[PawError] = PawError) -> None:
    """Raise ``error`` naming ``what`` (e.g. "tensor parallelism") when ``program`` keeps recurrent state."""
    if program.recurrent:
        raise error(f"{what} does not run programs with recurrent state: {program.directory} keeps a conv state "
                    f"in {program.conv_layers} layers ({program.model_info.get('model_type') or 'hybrid'}), which "
                    "splits over ranks do not carry; run it in one process (paw run, paw chat, paw serve)")
