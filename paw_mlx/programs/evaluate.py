"""``paw eval-programs``: every task's held-out exact match and time to first token, for the
prompted baselines and for each compile candidate.

    paw eval-programs --tasks examples/tasks --base smollm2

A task is a folder with ``spec.txt`` and ``examples.jsonl`` (rows {"input", "output",
"split"}); the compiler sees only the "train" rows, the "test" rows are scored. Rows:

* ``spec prompt``: the spec as system message and the input, one whole prompt per call;
* ``few-shot prompt``: the same plus the training examples as demonstration turns, one
  whole prompt per call (what a user would try first);
* each candidate of ``paw compile`` (``paw_mlx/programs/select.py``), rebuilt on all
  training rows, with its cross-validated score; and the candidate the compiler keeps.

Outputs are compared after stripping whitespace. Time to first token is the model's time
from a call's token ids to its first sampled token (tokenizing excluded), the median of
rounds that time every row once on the same held-out input in a rotating order, after two
untimed passes over those inputs (calls warm, as over a dataset): the rows share whatever
else loads the machine. Each finished task is
cached (``--cache``), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from interp.atomic import atomic_write_text
from interp.errors import PawError
from interp.jsonfile import parse_json
from interp.paths import DEFAULT_MODEL
from paw_mlx.programs.artifact import GenerationSettings, ProgramArtifact
from paw_mlx.programs.batch import generate_batch
from paw_mlx.programs.compile import choose_leads, input_ids, load_rows, output_budget
from paw_mlx.programs.function import ProgramFunction
from paw_mlx.programs.interpreter import interpreter, resolve_base
from paw_mlx.programs.select import Builder, Selection, SelectOptions, exact
from paw_mlx.runtime import LoadedProgram, stream_tokens

#: timed rounds per task; each round times every column once
TTFT_SAMPLES = 12
#: untimed passes over the timed rows first (see ``interleaved_ttft``)
WARMUP_PASSES = 2
#: part of the cache key: a change of how rows are measured invalidates cached tasks
EVALUATION_METHOD = "ttft-interleaved-12-warm-2-leads-copy-rule"
BASELINES = ("spec prompt", "few-shot prompt")


def task_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise PawError(f"no such tasks folder: {root}")
    dirs = sorted(p for p in root.iterdir() if (p / "spec.txt").is_file() and (p / "examples.jsonl").is_file())
    if not dirs:
        raise PawError(f"{root} holds no tasks (folders with spec.txt and examples.jsonl)")
    return dirs


def _score(outputs: list[str], rows: list[dict]) -> float:
    return sum(exact(o, r["output"]) for o, r in zip(outputs, rows, strict=True)) / len(rows)


def prompted_outputs(prog: LoadedProgram, artifact: ProgramArtifact, rows: list[dict], budget: int) -> list[str]:
    """Outputs of sending the whole prompt (prefix text + input) per call, as ``paw run`` would."""
    outputs = []
    for row in rows:
        ids = artifact.prefix_ids + input_ids(prog.tokenizer, artifact.layout, row["input"])
        tokens = list(stream_tokens(prog, ids, max_tokens=budget))
        outputs.append(artifact.layout.output_text(prog.tokenizer.decode_finished(tokens, skip_special_tokens=True)))
    return outputs


def first_token_seconds(call: Callable[[list[int]], object], ids: list[int]) -> float:
    """Seconds from a call's token ids to its first sampled token (``call`` generates one)."""
    start = time.perf_counter()
    call(ids)
    return time.perf_counter() - start


def interleaved_ttft(columns: dict[str, tuple], rows: list[dict]) -> dict[str, float]:
    """Median milliseconds to the first token per column, timed in rounds that visit every column
    once (in a rotating order), so load from other jobs falls on all of them alike.
    ``columns``: name -> (ids -> one token, row -> call ids).

    Before timing, every column runs every row it will be timed on ``WARMUP_PASSES`` times,
    untimed: a program call's input is traced the second time its length is seen
    (``interp/compiled_step.py``), so this times calls as they run over a dataset, once
    warm, and the prompts get the same passes."""
    names = list(columns)
    timed = [rows[round_ % len(rows)] for round_ in range(TTFT_SAMPLES)]
    for _ in range(WARMUP_PASSES):
        for row in timed[: len(rows)]:
            for name in names:
                call, ids = columns[name]
                call(ids(row))
    samples: dict[str, list[float]] = {name: [] for name in columns}
    for round_, row in enumerate(timed):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            call, ids = columns[name]
            samples[name].append(first_token_seconds(call, ids(row)))
    return {name: round(1000 * statistics.median(times), 1) for name, times in samples.items()}


def evaluate_task(prog: LoadedProgram, task: Path, options: SelectOptions, progress=None) -> dict:
    """One task's row of the report (see the module docstring)."""
    spec = (task / "spec.txt").read_text(encoding="utf-8").strip()
    rows, _ = load_rows(task / "examples.jsonl")  # as paw compile reads them
    train = [r for r in rows if r.get("split", "train") == "train"]
    test = [r for r in rows if r.get("split", "train") == "test"]
    if len(train) < 2 or not test:
        raise PawError(f"{task}: needs at least 2 train rows and 1 test row")
    generation = GenerationSettings(max_new_tokens=output_budget(prog, rows, None))
    plain = Builder(prog, spec, str(prog.path), generation)  # the prompts a user writes: no leads
    builder = Builder(prog, spec, str(prog.path), generation, leads=choose_leads(prog.tokenizer, train),
                      copy_rule=options.copy_rule)
    selection = Selection(prog, builder, train, options, progress)
    budget = selection.budget
    result: dict = {"task": task.name, "train": len(train), "test": len(test), "rows": {}}
    timers: dict[str, tuple] = {}
    for name, demos in zip(BASELINES, ([], train), strict=True):
        prompted = plain.prompted(demos)
        outputs = prompted_outputs(prog, prompted, test, budget)
        result["rows"][name] = {"exact_match": round(_score(outputs, test), 4), "prefix_tokens": 0,
                                "prompt_tokens": len(prompted.prefix_ids), "outputs": outputs}
        timers[name] = (lambda ids: generate_batch(prog, [], [ids], max_new_tokens=1),
                        lambda row, a=prompted: a.prefix_ids + input_ids(prog.tokenizer, a.layout, row["input"]))
    selection.cross_validate()
    for name in options.candidates:
        started = time.perf_counter()
        artifact = selection.rebuild(name)
        function = ProgramFunction(artifact, prog, max_new_tokens=budget)
        outputs = function([r["input"] for r in test])
        score = selection.scores[name]
        result["rows"][name] = {
            "exact_match": round(_score(outputs, test), 4), "cv_exact_match": round(score.exact_match, 4),
            "compile_seconds": round(score.seconds, 1), "rebuild_seconds": round(time.perf_counter() - started, 1),
            "prefix_tokens": artifact.prefix_length, "training": artifact.tuning, "outputs": outputs}
        timers[name] = (lambda ids, f=function: f.call_ids([ids], max_new_tokens=1),
                        lambda row, f=function: f.token_ids(row["input"]))
    for name, ms in interleaved_ttft(timers, test).items():
        result["rows"][name]["ttft_ms"] = ms
    result["kept"] = selection.kept
    result["reason"] = selection.report()["reason"]
    return result


def _cache_key(task: Path, prog: LoadedProgram, options: SelectOptions) -> str:
    digest = hashlib.sha256()
    for part in (EVALUATION_METHOD, prog.fingerprint, json.dumps(asdict(options), sort_keys=True),
                 (task / "spec.txt").read_text(encoding="utf-8"),
                 (task / "examples.jsonl").read_text(encoding="utf-8")):
        digest.update(part.encode("utf-8"))
    return digest.hexdigest()[:16]


def _read_cached(path: Path | None) -> dict | None:
    """A task's cached result, or None: no cache, no entry, or one that cannot be read (a damaged
    entry is run again, never fatal)."""
    if path is None or not path.is_file():
        return None
    try:
        result = parse_json(path.read_bytes(), str(path), PawError)
    except (OSError, PawError):
        return None
    return result if isinstance(result, dict) and isinstance(result.get("rows"), dict) else None


def evaluate(tasks: Path, base: str | Path = DEFAULT_MODEL, options: SelectOptions | None = None,
             only: list[str] | None = None, cache: Path | None = None) -> dict:
    """Run every task (resuming from ``cache``); returns the JSON-able report."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    options = options or SelectOptions()
    options.check()
    options.check_base(resolve_base(base))  # before the weights load
    console = Console(stderr=True)
    prog = interpreter(base)
    dirs = [d for d in task_dirs(tasks) if not only or d.name in only]
    if only and len(dirs) != len(set(only)):
        missing = sorted(set(only) - {d.name for d in dirs})
        raise PawError(f"no such task in {tasks}: {', '.join(missing)}")
    started, cpu_started = time.perf_counter(), time.process_time()
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        for task in dirs:
            path = cache / f"{task.name}-{_cache_key(task, prog, options)}.json" if cache else None
            cached = _read_cached(path)
            if cached is not None:
                results.append(cached)
                console.log(f"{task.name}: from the cache ({path})")
                continue
            tid = bar.add_task(task.name, total=1)

            def progress(text: str, done: int, total: int, tid=tid, name=task.name) -> None:
                bar.update(tid, description=f"{name}: {text}", completed=done, total=max(1, total))

            result = evaluate_task(prog, task, options, progress)
            bar.remove_task(tid)
            results.append(result)
            rows = result["rows"]
            console.log(f"{task.name}: few-shot prompt {rows['few-shot prompt']['exact_match']:.2f}, "
                        f"kept {result['kept']} {rows[result['kept']]['exact_match']:.2f}")
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(result, ensure_ascii=False) + "\n")
    report = {
        "base": prog.name, "base_fingerprint": prog.fingerprint, "options": asdict(options),
        "machine": f"{platform.machine()} {platform.system()}", "mlx": mx.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "total_seconds": round(time.perf_counter() - started, 1),
        # CPU seconds of this process: the wall time depends on what else shares the machine.
        "cpu_seconds": round(time.process_time() - cpu_started, 1),
        "tasks": results, "summary": summarize(results, options),
    }
    print(markdown_tables(report))
    return report


def _columns(options: SelectOptions) -> list[str]:
    return [*BASELINES, *options.candidates, "kept"]


def _cell(result: dict, column: str) -> dict:
    return result["rows"][result["kept"] if column == "kept" else column]


def summarize(results: list[dict], options: SelectOptions) -> dict:
    """Means over the tasks, and how the kept program compares with few-shot prompting."""
    summary: dict = {}
    for column in _columns(options):
        cells = [_cell(r, column) for r in results]
        summary[column] = {"exact_match": round(statistics.mean(c["exact_match"] for c in cells), 4),
                           "ttft_ms": round(statistics.mean(c["ttft_ms"] for c in cells), 1)}
    kept_vs_fewshot = [_cell(r, "kept")["exact_match"] - r["rows"]["few-shot prompt"]["exact_match"] for r in results]
    speedups = [r["rows"]["few-shot prompt"]["ttft_ms"] / max(1e-9, _cell(r, "kept")["ttft_ms"]) for r in results]
    summary["kept_at_least_fewshot_prompt"] = sum(d >= 0 for d in kept_vs_fewshot)
    summary["tasks"] = len(results)
    summary["ttft_speedup_vs_fewshot_prompt"] = {"min": round(min(speedups), 2),
                                                 "median": round(statistics.median(speedups), 2)}
    return summary


def markdown_tables(report: dict) -> str:
    """The report as two Markdown tables: held-out exact match, and time to first token."""
    options = SelectOptions(**{k: v for k, v in report["options"].items() if k in ("candidates", "folds", "seed")})
    columns = _columns(options)
    results = report["tasks"]
    lines = ["| task | held-out | " + " | ".join(columns) + " | kept candidate |",
             "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | --- |"]
    for r in results:
        cells = [f"{_cell(r, c)['exact_match']:.2f}" for c in columns]
        lines.append(f"| {r['task']} | {r['test']} | " + " | ".join(cells) + f" | {r['kept']} |")
    summary = report["summary"]
    lines.append("| **mean** | | " + " | ".join(f"**{summary[c]['exact_match']:.2f}**" for c in columns) + " | |")
    lines += ["", "| task | " + " | ".join(f"{c} ms" for c in columns) + " | speed-up of kept vs few-shot prompt |",
              "| --- | " + " | ".join("---:" for _ in columns) + " | ---: |"]
    for r in results:
        cells = [f"{_cell(r, c)['ttft_ms']:.0f}" for c in columns]
        speedup = r["rows"]["few-shot prompt"]["ttft_ms"] / max(1e-9, _cell(r, "kept")["ttft_ms"])
        lines.append(f"| {r['task']} | " + " | ".join(cells) + f" | {speedup:.1f}x |")
    lines.append("| **mean** | " + " | ".join(f"**{summary[c]['ttft_ms']:.0f}**" for c in columns) + " | |")
    return "\n".join(lines)
