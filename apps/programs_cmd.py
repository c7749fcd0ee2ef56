"""CLI commands for programs as weights: ``paw compile``, ``paw call``, ``paw eval-programs``,
``paw export program``. Registered on the main app by ``register``."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from apps.stdin_text import read_stdin
from interp.errors import PawError
from interp.paths import DEFAULT_MODEL

BASE_HELP = ("Base program directory; 'smollm2' is ./smollm2 if that is a program, "
             "else the default export location ($PAW_CACHE/programs/smollm2).")
# Kept in step with paw_mlx.constrain.RETURNS_HELP (not imported: --help must not load MLX).
RETURNS_HELP = ("Constrain every output: a JSON list of choices ('[\"yes\", \"no\"]'), choices:A|B|C, "
                "regex:PATTERN, json (any JSON object), a JSON schema ('{\"type\": ...}') or @FILE "
                "holding one of these as JSON.")


# Kept in step with paw_mlx.programs.select.DEFAULT_CANDIDATES (a test checks; --help must not load MLX).
DEFAULT_CANDIDATES = "spec,fewshot,prefix,lora"
CANDIDATES_HELP = ("Candidates to score by cross-validation on the examples, comma-separated: spec, fewshot "
                   "(examples as demonstrations in the cached prefix), prefix (tuned prefix), lora (LoRA adapter "
                   "with the few-shot prefix), prefix+lora (LoRA adapter trained behind the tuned prefix; tried only "
                   "when named).")


# Kept in step with SelectOptions.folds (a test checks).
DEFAULT_FOLDS = 8
FOLDS_HELP = ("Cross-validation folds over the examples (at most one per example: with 8 examples or fewer, "
              "the default is leave-one-out). Each trained candidate is fitted once per fold.")

REPEATS_HELP = ("Cross-validate over this many shuffles of the examples into folds (each example predicted "
                "that many times), for that many times the training time. 1 by default: 2 was not better on "
                "the dev tasks (docs/programs.md).")


COPY_RULE_HELP = ("When every example answers with words of its input (extraction, reordering, a change of "
                  "case), hold every call's output to words of its own input too, token by token "
                  "(docs/programs.md, 'The copy rule'). --no-copy-rule: never.")


def select_options(candidates: str, folds: int, steps: int, lr: float, layers: int, rank: int, repeats: int = 1,
                   copy_rule: bool = True):
    """The compiler's options from the flags ``paw compile`` and ``paw eval-programs`` share
    (``--steps`` and ``--layers`` bound both trained candidates; ``--lr``, ``--rank`` are LoRA's)."""
    from paw_mlx.programs.select import SelectOptions
    from paw_mlx.programs.train import TrainOptions

    names = tuple(c.strip() for c in candidates.split(",") if c.strip())
    options = SelectOptions(candidates=names, folds=folds, repeats=repeats, copy_rule=copy_rule,
                            lora=TrainOptions(method="lora", steps=steps, learning_rate=lr, layers=layers, rank=rank))
    options.prefix.steps, options.prefix.layers = min(options.prefix.steps, steps), layers
    return options


def compile_cmd(
    spec: Annotated[str, typer.Argument(help="The spec: text, or @FILE to read it from a file.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Program directory to create (a .paw file with --format paw).")],
    base: Annotated[str, typer.Option("--base", "-b", help=BASE_HELP)] = DEFAULT_MODEL,
    examples: Annotated[Path | None, typer.Option("--examples", "-e", help=(
        "JSON lines of {\"input\", \"output\"} (5-8 are enough): the compiler tries each candidate, scores it "
        "on examples it held out, keeps the best. Rows with \"split\": \"test\" are only scored at the end."))] = None,
    candidates: Annotated[str, typer.Option("--candidates", help=CANDIDATES_HELP)] = DEFAULT_CANDIDATES,
    folds: Annotated[int, typer.Option("--folds", help=FOLDS_HELP)] = DEFAULT_FOLDS,
    repeats: Annotated[int, typer.Option("--repeats", help=REPEATS_HELP)] = 1,
    steps: Annotated[int, typer.Option(
        help="Most training steps of a trained candidate (early stopping may end sooner).")] = 40,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the LoRA candidate.")] = 1e-3,
    layers: Annotated[int, typer.Option(help="Train this many top layers (0: all).")] = 12,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    copy_rule: Annotated[bool, typer.Option("--copy-rule/--no-copy-rule", help=COPY_RULE_HELP)] = True,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", "-n", min=1,
        help="Default output budget of a call, in tokens (default: 64, or more to fit the longest "
             "example output).")] = None,
    returns: Annotated[str | None, typer.Option(
        "--returns", "-r", help=RETURNS_HELP + " Stored with the program.")] = None,
    output_format: Annotated[str, typer.Option("--format", help=(
        "dir: a paw program directory; paw: a .paw bundle of the programasweights package (LoRA in GGUF, "
        "prompt template), for a Qwen3 or GPT-2 base."))] = "dir",
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Compile a spec into a program; with --examples, choose the best of several candidates on held-out examples."""
    from paw_mlx.programs.compile import compile

    if output_format not in ("dir", "paw"):
        raise PawError(f"--format is 'dir' or 'paw', not {output_format!r}")
    options = select_options(candidates, folds, steps, lr, layers, rank, repeats, copy_rule)
    if output_format == "paw":
        from paw_mlx.programs.pawfile import compile_bundle

        art = compile_bundle(spec, out, base=base, examples=examples, options=options, force=force,
                             max_new_tokens=max_new_tokens, progress_bar=_progress_bar)
        print_selection(art.selection)
        typer.echo(f"compiled LoRA rank {art.adapter.rank} + {art.prefix_length}-token template -> {out}", err=True)
        return
    if examples is None:
        art = compile(spec, base=base, out_dir=out, max_new_tokens=max_new_tokens, force=force, returns=returns)
    else:
        with _progress_bar() as progress:
            art = compile(spec, base=base, out_dir=out, examples=examples, max_new_tokens=max_new_tokens,
                          force=force, options=options, returns=returns, progress=progress)
        print_selection(art.selection)
    what = f"{art.prefix_length}-token prefix" + (f" + LoRA rank {art.adapter.rank}" if art.adapter else "")
    typer.echo(f"compiled {what} -> {out}", err=True)


class _progress_bar:
    """A rich progress bar as a compile progress callback: (description, done, total)."""

    def __enter__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True)
        self._bar.__enter__()
        self._task = self._bar.add_task("compiling", total=1)
        return self

    def __call__(self, description: str, done: int, total: int) -> None:
        self._bar.update(self._task, description=description, completed=done, total=max(1, total))

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)


def print_selection(info: dict | None) -> None:
    """The compiler's report as a table on stderr: each candidate's held-out score and time."""
    from rich.console import Console
    from rich.table import Table

    if info and info.get("note"):
        Console(stderr=True).print(f"paw: note: {info['note']}", markup=False, highlight=False)
    if info and info.get("repeated_examples_dropped"):
        Console(stderr=True).print(f"dropped {info['repeated_examples_dropped']} repeated example(s): "
                                   "the same input and output given again")
    if not info or not info.get("candidates"):
        return

    table = Table(title=f"candidates ({info['method']})", title_justify="left")
    for column in ("candidate", "held-out exact match", "seconds", "s / fold", ""):
        table.add_column(column, justify="left" if column in ("candidate", "") else "right")
    for c in info["candidates"]:
        per_fold = sum(c["fold_seconds"]) / max(1, len(c["fold_seconds"]))
        table.add_row(c["name"], f"{c['correct']}/{c['total']} ({c['exact_match']:.2f})", f"{c['seconds']:.0f}",
                      f"{per_fold:.1f}", "kept" if c["name"] == info["kept"] else "")
    console = Console(stderr=True)
    console.print(table)
    console.print(f"kept {info['kept']}: {info['reason']}")
    if info.get("rebuild"):
        console.print(f"the program: {info['rebuild']}")
    shown = info.get("demonstrations")
    if shown and shown["shown"] < shown["examples"]:
        console.print(f"its prefix shows {shown['shown']} of the {shown['examples']} examples as demonstrations "
                      "(a spread of them within its budget, none holding a special token's text); every "
                      "example was used to choose the program "
                      "and to train a tuned one")
    if info.get("leads"):
        console.print(f"its {' and '.join(info['leads'])} follow a space, as words do in running text, where that "
                      "spells them in fewer tokens (docs/programs.md, \"Leads\")")
    if info.get("copy_rule"):
        from paw_mlx.programs.copy_rule import CopyRule

        rule = CopyRule.from_metadata(info["copy_rule"], "the compile report")
        console.print(f"every example answers with words of its input, so every call's output is {rule.describe()} "
                      "(docs/programs.md, \"The copy rule\"; --no-copy-rule: never)")
    for line in selection_notes(info):
        console.print(f"note: {line}")
    if "test" in info:
        test = info["test"]
        console.print(f"on the {test['total']} rows marked test (never seen while compiling): exact match "
                      f"{test['correct']}/{test['total']} ({test['exact_match']:.2f})")
        if test.get("inputs_also_in_training"):
            console.print(f"warning: {test['inputs_also_in_training']} of these rows share an input with a training "
                          "example, so their score is not a held-out one")


#: Below this many examples, a held-out score rests on too few predictions to choose well.
FEW_EXAMPLES = 5


def selection_notes(info: dict) -> list[str]:
    """Advice on a compile's report: too few examples to choose well, or a kept program that mostly failed held out."""
    notes = []
    kept = next((c for c in info["candidates"] if c["name"] == info["kept"]), None)
    shown = info.get("demonstrations") or {}
    examples = shown.get("examples", kept["total"] if kept else 0)
    if examples < FEW_EXAMPLES:
        notes.append(f"with {examples} examples each candidate's held-out score rests on {examples} predictions; "
                     f"{FEW_EXAMPLES}-8 examples give a steadier choice")
    if conflicting := info.get("conflicting_inputs"):
        notes.append(f"{conflicting} input(s) are given with different outputs: no program can answer all of those "
                     "examples exactly, and held-out scores count each against its own output")
    if kept and kept["total"] and kept["exact_match"] < 0.5:
        notes.append(f"the kept program answered {kept['correct']} of {kept['total']} held-out examples exactly: "
                     "the base model may not manage this task from these examples; more or clearer examples, a "
                     "clearer spec, --returns to fix the answer's form, or a larger base model may help")
    return notes


def call_cmd(
    program: Annotated[Path, typer.Argument(
        help="Program directory (from paw compile), a .paw bundle (its base: --base) or a .txt spec.")],
    inputs: Annotated[list[str] | None, typer.Argument(help="Inputs; one per line from stdin if none.")] = None,
    base: Annotated[str | None, typer.Option(
        "--base", "-b", help="Base program (default: the one it was compiled on).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", "-n", help="Output budget per input.")] = None,
    returns: Annotated[str | None, typer.Option(
        "--returns", "-r", help=RETURNS_HELP + " Default: the program's own.")] = None,
) -> None:
    """Call a program on inputs (one batch); prints one output per line (newlines shown as \\n, other
    control characters escaped)."""
    from paw_mlx.programs.function import function

    if not inputs:
        if sys.stdin.isatty():
            raise PawError("no inputs: pass them as arguments or pipe one per line on stdin")
        # "\n" only: str.splitlines would also cut an input at U+2028, U+0085, form feeds ...
        inputs = [line for line in read_stdin("the inputs").split("\n") if line.strip()]
    f = function(program, base=base, max_new_tokens=max_new_tokens, returns=returns)
    completions = f.complete(list(inputs))
    for completion in completions:
        typer.echo(one_line(completion.text))
    for n, completion in enumerate(completions, 1):
        if completion.truncated:  # on stderr: stdout stays one output per line
            where = (f"the output budget of {f.max_new_tokens} tokens (raise --max-new-tokens)"
                     if completion.tokens >= f.max_new_tokens else "the end of the base model's context")
            typer.echo(f"note: the output for input {n} was cut off at {where}", err=True)


#: characters that end a line for some reader or drive a terminal: C0 controls but tab, DEL,
#: C1 controls (U+0085 is a line end to Python's str.splitlines) and the Unicode line and
#: paragraph separators
_UNPRINTABLE = re.compile(r"[\\\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r"}


def one_line(text: str) -> str:
    r"""``text`` on one line, reversibly: a backslash, newline and carriage return are written
    ``\\``, ``\n``, ``\r``; other controls and line separators as ``\xNN`` or ``\uNNNN``, so
    each output is one line for every reader and no output can move a terminal's cursor."""
    def escape(match: re.Match) -> str:
        ch = match.group()
        return _ESCAPES.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")

    return _UNPRINTABLE.sub(escape, text)


def eval_cmd(
    tasks: Annotated[Path, typer.Option(
        help="Folder of tasks (spec.txt + examples.jsonl each).")] = Path("examples/tasks"),
    base: Annotated[str, typer.Option("--base", "-b", help=BASE_HELP)] = DEFAULT_MODEL,
    only: Annotated[list[str] | None, typer.Option(help="Run only these tasks (repeat the option).")] = None,
    candidates: Annotated[str, typer.Option("--candidates", help=CANDIDATES_HELP)] = DEFAULT_CANDIDATES,
    folds: Annotated[int, typer.Option("--folds", help=FOLDS_HELP)] = DEFAULT_FOLDS,
    repeats: Annotated[int, typer.Option("--repeats", help=REPEATS_HELP)] = 1,
    steps: Annotated[int, typer.Option(help="Most training steps of a trained candidate.")] = 40,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of the LoRA candidate.")] = 1e-3,
    layers: Annotated[int, typer.Option(help="Train this many top layers (0: all).")] = 12,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    copy_rule: Annotated[bool, typer.Option("--copy-rule/--no-copy-rule", help=COPY_RULE_HELP)] = True,
    out: Annotated[Path | None, typer.Option(
        "--out", help="JSON report (default: apps/benchmarks/results/programs-DATE.json).")] = None,
    cache: Annotated[Path, typer.Option("--cache", help="Finished tasks are kept here, so a rerun resumes.")] = Path(
        "apps/benchmarks/results/.programs-cache"),
    show: Annotated[Path | None, typer.Option(
        "--show", help="Only print the tables of an earlier JSON report.")] = None,
) -> None:
    """Held-out exact match and time to first token per task: prompted baselines, each compile candidate,
    the kept one."""
    import json
    import time

    if show is not None:
        from interp.jsonfile import read_json_object
        from paw_mlx.programs.evaluate import markdown_tables

        report = read_json_object(show, PawError)
        try:
            tables = markdown_tables(report)
        except Exception as exc:  # any field of the wrong shape: KeyError, TypeError, AttributeError, ...
            raise PawError(f"{show} is not a paw eval-programs report: {type(exc).__name__}: {exc}") from exc
        typer.echo(tables)
        return
    from interp.atomic import atomic_write_text, check_writable
    from paw_mlx.programs.evaluate import evaluate

    out = out or Path("apps/benchmarks/results") / f"programs-{time.strftime('%Y%m%d-%H%M')}.json"
    # before the evaluation (minutes of training), not when its results are written
    if out.is_dir():
        raise PawError(f"--out {out} is a folder; the report is a file")
    if cache.exists() and not cache.is_dir():
        raise PawError(f"--cache {cache} is not a folder")
    check_writable(out)
    check_writable(cache / "entry")
    options = select_options(candidates, folds, steps, lr, layers, rank, repeats, copy_rule)
    report = evaluate(tasks, base, options, only, cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    typer.echo(f"report -> {out}", err=True)


def export_program_cmd(
    src: Annotated[Path, typer.Argument(
        help="A .paw bundle of the programasweights package (meta.json, adapter.gguf, prompt_template.txt).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Program directory to create.")],
    base: Annotated[str, typer.Option("--base", "-b", help=(
        "The bundle's base model exported by paw (e.g. `paw export hf Qwen/Qwen3-0.6B -o qwen3`), "
        "or 'smollm2'."))] = DEFAULT_MODEL,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert a programasweights .paw bundle (LoRA + prompt template) into a paw program directory."""
    from paw_mlx.programs.pawfile import export_bundle

    art = export_bundle(src, out, base=base, force=force)
    typer.echo(f"converted {src} ({art.prefix_length}-token prefix, LoRA rank {art.adapter.rank}) -> {out}", err=True)


def register(app: typer.Typer, export_app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
    app.command("call")(call_cmd)
    app.command("eval-programs")(eval_cmd)
    export_app.command("program")(export_program_cmd)
