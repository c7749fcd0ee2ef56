"""``paw bench``: paw against mlx-lm and transformers on the same weights, one table.

The work lives in the ``apps.benchmarks`` package (harness, per-engine workers); this is the
Typer face. Heavy imports happen inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from interp.paths import DEFAULT_MODEL


def _split(values: list[str]) -> list[str]:
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def bench(
    src: Annotated[str, typer.Argument(
        help="The model: 'smollm2', a .gguf file or a Hugging Face folder.")] = DEFAULT_MODEL,
    dtypes: Annotated[list[str], typer.Option(
        "--dtypes", help="Variants: float32, bfloat16, q4 (comma list).")] = ["float32,bfloat16,q4"],  # noqa: B006
    engines: Annotated[list[str], typer.Option(
        "--engines", help=(
            "paw, paw-nocompile, paw-nofuse, paw-stock, mlx-lm, mlx-lm-stock, transformers, ceiling, ceiling-stock, "
            "export (-stock: MLX's bundled BLAS on Linux; export: times `paw export llama SRC`). "
            "Default: paw,mlx-lm,transformers,ceiling,export on the CPU; without transformers (torch's CPU build) "
            "on a GPU."))] = [],  # noqa: B006
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", help="Prompt length (prefill).")] = 512,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Tokens to decode greedily.")] = 256,
    group_size: Annotated[int, typer.Option("--group-size", help="Group size of the q4 variant.")] = 64,
    program: Annotated[list[str], typer.Option("--program", help="Use an existing paw program: VARIANT=PATH.")] = [],  # noqa: B006
    results: Annotated[Path, typer.Option(
        "--results", help="Directory for the JSON and markdown results.")] = Path("apps/benchmarks/results"),
    rounds: Annotated[int, typer.Option(
        "--rounds", min=1, help=(
            "Runs per engine, order reversed each round; each row keeps its best "
            "(a shared machine's noise only slows runs down)."))] = 2,
    docs: Annotated[Path | None, typer.Option(
        "--docs", help="Also rewrite the table in this markdown page (e.g. docs/benchmarks.md).")] = None,
    device: Annotated[str, typer.Option(
        "--device", help=(
            "Where the MLX engines compute: auto (MLX's default: the GPU on a Mac or with MLX's CUDA backend, "
            "else the CPU), gpu or cpu. A GPU run's results are named after its backend "
            "(latest-metal.md, latest-cuda.md)."))] = "auto",
) -> None:
    """Measure prefill, decode, time to first token, peak memory, load and export time per engine."""
    from apps.benchmarks.harness import (
        BenchConfig,
        default_engines,
        print_table,
        run_bench,
        write_results,
    )
    from interp.errors import PawError

    defaults = default_engines(device)  # checks the device before any heavy work
    programs = {}
    for item in program:
        variant, sep, path = item.partition("=")
        if not sep:
            raise PawError(f"--program takes VARIANT=PATH, got {item!r}")
        programs[variant] = path
    chosen = _split(engines) or defaults
    config = BenchConfig(src=src, dtypes=_split(dtypes), engines=chosen, prompt_tokens=prompt_tokens,
                         decode_tokens=decode_tokens, group_size=group_size, programs=programs, results_dir=results,
                         rounds=rounds, device=device)
    try:
        report = run_bench(config, say=lambda msg: typer.echo(f"  {msg}", err=True))
    except ValueError as exc:
        raise PawError(str(exc)) from exc
    print_table(report)
    json_path, md_path = write_results(report, results, docs)
    typer.echo(f"wrote {json_path} and {md_path}", err=True)
