"""CLI commands for programs as weights: ``paw compile``, ``paw call``, ``paw eval-programs``,
``paw export program``. Registered on the main app by ``register``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from interp.errors import PawError

BASE_HELP = "Base program directory, or 'smollm2' for the default export location ($PAW_CACHE/programs/smollm2)."
# Kept in step with paw_mlx.constrain.RETURNS_HELP (not imported: --help must not load MLX).
RETURNS_HELP = ("Constrain every output: a JSON list of choices ('[\"yes\", \"no\"]'), choices:A|B|C, "
                "regex:PATTERN, json (any JSON object), a JSON schema ('{\"type\": ...}') or @FILE "
                "holding one of these as JSON.")


def compile_cmd(
    spec: Annotated[str, typer.Argument(help="The spec: text, or @FILE to read it from a file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Program directory to create.")],
    base: Annotated[str, typer.Option("--base", "-b", help=BASE_HELP)] = "smollm2",
    examples: Annotated[Path | None, typer.Option("--examples", "-e",
                                                  help="JSON lines of {\"input\", \"output\"}: tune the prefix on them.")] = None,
    steps: Annotated[int, typer.Option(help="Tuning steps (with --examples).")] = 36,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate for tuning.")] = 3e-2,
    layers: Annotated[int, typer.Option(help="Tune the prefix of this many top layers (0: all).")] = 12,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Default output budget of a call.")] = 64,
    returns: Annotated[str | None, typer.Option("--returns", "-r", help=RETURNS_HELP + " Stored with the program.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Compile a spec into a program (a KV prefix); with --examples, tune it by gradient descent."""
    from paw_mlx.programs.compile import compile

    options = {"steps": steps, "learning_rate": lr, "layers": layers}
    if examples is None:
        art = compile(spec, base=base, out_dir=out, max_new_tokens=max_new_tokens, force=force, returns=returns)
    else:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn("tuning"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), transient=True) as bar:
            tid = bar.add_task("tune", total=steps, loss=float("nan"))
            art = compile(spec, base=base, out_dir=out, examples=examples, max_new_tokens=max_new_tokens,
                          force=force, tune_options=options, returns=returns,
                          progress=lambda step, total, loss: bar.update(tid, completed=step, loss=loss))
        info = art.tuning
        typer.echo(f"tuned {len(info['tuned_layers'])} layers in {info['seconds']:.0f} s: held-out loss "
                   f"{info['heldout_loss'][0]:.3f} -> {info['heldout_loss'][1]:.3f}", err=True)
    typer.echo(f"compiled {art.prefix_length}-token prefix -> {out}", err=True)


def call_cmd(
    program: Annotated[Path, typer.Argument(help="Program directory (from paw compile) or a .txt spec.")],
    inputs: Annotated[list[str] | None, typer.Argument(help="Inputs; one per line from stdin if none.")] = None,
    base: Annotated[str | None, typer.Option("--base", "-b", help="Base program (default: the one it was compiled on).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="Output budget per input.")] = None,
    returns: Annotated[str | None, typer.Option("--returns", "-r", help=RETURNS_HELP + " Default: the program's own.")] = None,
) -> None:
    """Call a program on inputs (one batch); prints one output per line (newlines shown as \\n)."""
    from paw_mlx.programs.function import function

    if not inputs:
        if sys.stdin.isatty():
            raise PawError("no inputs: pass them as arguments or pipe one per line on stdin")
        inputs = [line for line in sys.stdin.read().splitlines() if line.strip()]
    f = function(program, base=base, max_new_tokens=max_new_tokens, returns=returns)
    for output in f(list(inputs)):
        typer.echo(output.replace("\\", "\\\\").replace("\n", "\\n"))


def eval_cmd(
    tasks: Annotated[Path, typer.Option(help="Folder of tasks (spec.txt + examples.jsonl each).")] = Path("examples/tasks"),
    base: Annotated[str, typer.Option("--base", "-b", help=BASE_HELP)] = "smollm2",
    only: Annotated[list[str] | None, typer.Option(help="Run only these tasks.")] = None,
    steps: Annotated[int, typer.Option(help="Tuning steps per task.")] = 36,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate for tuning.")] = 3e-2,
    layers: Annotated[int, typer.Option(help="Tune the prefix of this many top layers (0: all).")] = 12,
    out: Annotated[Path | None, typer.Option("--out", help="Write the JSON report here.")] = None,
) -> None:
    """Exact-match accuracy of spec-only vs tuned programs on each task's held-out inputs."""
    from paw_mlx.programs.evaluate import main

    argv = ["--tasks", str(tasks), "--base", base, "--steps", str(steps), "--lr", str(lr), "--layers", str(layers)]
    if only:
        argv += ["--only", *only]
    if out is not None:
        argv += ["--out", str(out)]
    main(argv)


def export_program_cmd(
    src: Annotated[Path, typer.Argument(help="An original programasweights artifact directory (program.json + prefix.pt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Program directory to create.")],
    base: Annotated[str, typer.Option("--base", "-b", help=BASE_HELP)] = "smollm2",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert an original programasweights artifact (torch KV prefix) into a paw program."""
    try:
        from exporter.pawprogram import convert_program
    except ImportError as exc:
        raise PawError(f"converting needs torch ({exc.name} is missing): pip install 'paw[export]'") from None
    art = convert_program(src, out, base=base, force=force)
    typer.echo(f"converted {src} ({art.prefix_length}-token prefix) -> {out}", err=True)


def register(app: typer.Typer, export_app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
    app.command("call")(call_cmd)
    app.command("eval-programs")(eval_cmd)
    export_app.command("program")(export_program_cmd)
