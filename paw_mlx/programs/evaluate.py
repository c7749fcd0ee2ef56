"""Evaluate programs on a task suite: spec-only vs tuned prefix, exact match on held-out inputs.

    python -m paw_mlx.programs.evaluate --tasks examples/tasks --base smollm2

A task is a folder with ``spec.txt`` and ``examples.jsonl`` (rows {"input", "output",
"split"}; "test" rows are held out). Outputs are compared after stripping whitespace.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from interp.errors import PawError
from paw_mlx.programs.compile import compile
from paw_mlx.programs.function import function
from paw_mlx.programs.interpreter import DEFAULT_BASE, interpreter
from paw_mlx.programs.tune import TuneOptions, load_examples, split_examples


@dataclass
class TaskResult:
    task: str
    heldout: int
    spec_only_accuracy: float
    tuned_accuracy: float
    heldout_loss_before: float
    heldout_loss_after: float
    tune_seconds: float
    spec_only_outputs: list[str]
    tuned_outputs: list[str]


def exact_match(outputs: list[str], wanted: list[str]) -> float:
    return sum(o.strip() == w.strip() for o, w in zip(outputs, wanted, strict=True)) / max(1, len(wanted))


def task_dirs(root: Path) -> list[Path]:
    dirs = sorted(p for p in root.iterdir() if (p / "spec.txt").is_file() and (p / "examples.jsonl").is_file())
    if not dirs:
        raise PawError(f"{root} holds no tasks (folders with spec.txt and examples.jsonl)")
    return dirs


def evaluate_task(task: Path, base: str | Path, options: TuneOptions, max_new_tokens: int = 24,
                  progress: Callable[[int, int, float], None] | None = None) -> TaskResult:
    spec = (task / "spec.txt").read_text(encoding="utf-8")
    rows = load_examples(task / "examples.jsonl")
    _, held = split_examples(rows, options.holdout, options.seed)
    inputs, wanted = [r["input"] for r in held], [r["output"] for r in held]
    plain = compile(spec, base=base, max_new_tokens=max_new_tokens)
    plain_out = function(plain, base=base)(inputs)
    tuned = compile(spec, base=base, max_new_tokens=max_new_tokens, examples=rows,
                    tune_options=asdict(options), progress=progress)
    tuned_out = function(tuned, base=base)(inputs)
    info = tuned.tuning
    return TaskResult(task.name, len(held), exact_match(plain_out, wanted), exact_match(tuned_out, wanted),
                      info["heldout_loss"][0], info["heldout_loss"][1], info["seconds"], plain_out, tuned_out)


def evaluate(tasks: Path, base: str | Path = DEFAULT_BASE, options: TuneOptions | None = None,
             only: list[str] | None = None, max_new_tokens: int = 24) -> dict:
    """Run every task; returns a JSON-able report (per task and mean accuracies)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    options = options or TuneOptions()
    console = Console(stderr=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    results = []
    dirs = [d for d in task_dirs(tasks) if not only or d.name in only]
    base_prog = interpreter(base)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=console) as bar:
        for task in dirs:
            tid = bar.add_task(f"tuning {task.name}", total=options.steps, loss=float("nan"))
            result = evaluate_task(task, base, options, max_new_tokens,
                                   progress=lambda step, total, loss, tid=tid: bar.update(tid, completed=step, loss=loss))
            results.append(result)
            console.log(f"{task.name}: spec-only {result.spec_only_accuracy:.2f}, tuned {result.tuned_accuracy:.2f}")
    table = Table(title=f"programs on {base_prog.name}: exact match on held-out inputs")
    for col in ("task", "held-out", "spec only", "tuned", "held-out loss", "tune s"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for r in results:
        table.add_row(r.task, str(r.heldout), f"{r.spec_only_accuracy:.2f}", f"{r.tuned_accuracy:.2f}",
                      f"{r.heldout_loss_before:.2f} -> {r.heldout_loss_after:.2f}", f"{r.tune_seconds:.0f}")
    mean_plain = sum(r.spec_only_accuracy for r in results) / len(results)
    mean_tuned = sum(r.tuned_accuracy for r in results) / len(results)
    table.add_row("mean", "", f"{mean_plain:.2f}", f"{mean_tuned:.2f}", "", "")
    Console().print(table)
    return {
        "base": base_prog.name, "base_fingerprint": base_prog.fingerprint, "options": asdict(options),
        "max_new_tokens": max_new_tokens, "machine": f"{platform.machine()} {platform.system()}",
        "total_seconds": round(time.perf_counter() - started, 1),
        # CPU seconds of this process: the wall time depends on what else shares the machine.
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "mean_spec_only_accuracy": mean_plain, "mean_tuned_accuracy": mean_tuned,
        "tasks": [asdict(r) for r in results],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=Path, default=Path("examples/tasks"))
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--only", nargs="*", help="task names to run")
    parser.add_argument("--steps", type=int, default=TuneOptions.steps)
    parser.add_argument("--lr", type=float, default=TuneOptions.learning_rate)
    parser.add_argument("--layers", type=int, default=TuneOptions.layers)
    parser.add_argument("--batch-size", type=int, default=TuneOptions.batch_size)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    options = TuneOptions(steps=args.steps, learning_rate=args.lr, layers=args.layers, batch_size=args.batch_size)
    report = evaluate(args.tasks, args.base, options, args.only, args.max_new_tokens)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
