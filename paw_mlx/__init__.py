"""paw on MLX: load exported programs and generate with them.

    import paw_mlx
    prog = paw_mlx.load("smollm2/prog.json")
    print(paw_mlx.generate(prog, "What is the capital of France?"))

Nothing here imports torch; ``paw_mlx.export`` loads the exporter (and torch) lazily.
"""

from __future__ import annotations

import interp  # noqa: F401  (first: puts a fast BLAS under MLX before MLX loads)
from interp.errors import PawError
from interp.sampling import SamplingParams
from paw_mlx.chat import ChatSession
from paw_mlx.programs import ProgramFunction, compile, function
from paw_mlx.runtime import (
    LoadedProgram,
    TextChunk,
    generate,
    load,
    prompt_ids,
    sampling_params,
    stream_choices,
    stream_generate,
    stream_tokens,
)

__all__ = [
    "ChatSession",
    "LoadedProgram",
    "PawError",
    "ProgramFunction",
    "TextChunk",
    "compile",
    "export",
    "function",
    "generate",
    "load",
    "prompt_ids",
    "SamplingParams",
    "sampling_params",
    "stream_choices",
    "stream_generate",
    "stream_tokens",
]


def export(src: str, out_dir: str, **opts):
    """Export a Hugging Face model to a program directory (needs the export extra: torch)."""
    from exporter.export import export_source

    return export_source(src, out_dir, **opts)
