"""Dev-task probe of the bagged LoRA: more members (a second LoRA seed per fold) and a larger scale.

    python scripts/lora_bagging_probe.py BASE_PROGRAM OUT.json [--tasks examples/dev-tasks]

For each task, the `lora` candidate is cross-validated (leave-one-out, as `paw compile`
does) once with seed 0 and once with seed 1; the mean of each seed's fold adapters, and of
all of them, is then scored on the task's held-out rows at its own scale and at 1.5 times
it. The result of 2026-12-01 is `apps/benchmarks/results/programs-dev-seeds.json`, read in
docs/programs.md ("Choosing the defaults"). A probe for choosing defaults, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from paw_mlx.programs.adapter import LoraAdapter, mean_adapter  # noqa: E402
from paw_mlx.programs.artifact import GenerationSettings  # noqa: E402
from paw_mlx.programs.compile import load_rows, output_budget  # noqa: E402
from paw_mlx.programs.interpreter import interpreter  # noqa: E402
from paw_mlx.programs.select import Builder, Selection, SelectOptions, exact  # noqa: E402
from paw_mlx.programs.train import TrainOptions  # noqa: E402

SEEDS = (0, 1)
SCALES = (1.0, 1.5)


def probe_task(prog, task: Path) -> dict:
    spec = (task / "spec.txt").read_text(encoding="utf-8").strip()
    rows, _ = load_rows(task / "examples.jsonl")
    train = [r for r in rows if r.get("split", "train") == "train"]
    test = [r for r in rows if r.get("split", "train") == "test"]
    builder = Builder(prog, spec, str(prog.path), GenerationSettings(max_new_tokens=output_budget(prog, rows, None)))
    started = time.perf_counter()
    adapters, correct = {}, {}
    for seed in SEEDS:
        options = SelectOptions(candidates=("lora",), lora=TrainOptions(method="lora", seed=seed))
        selection = Selection(prog, builder, train, options)
        selection.cross_validate()
        adapters[f"seed{seed}"] = selection.scores["lora"].adapters
        correct[f"seed{seed}"] = selection.scores["lora"].correct
    adapters["both"] = [a for seed in SEEDS for a in adapters[f"seed{seed}"]]
    variants = {}
    for name, members in adapters.items():
        mean = mean_adapter(members)
        for scale in SCALES:
            artifact = builder.with_adapter(train, LoraAdapter(mean.modules, mean.alpha * scale), options.lora,
                                            {"method": "lora"})
            outputs = builder.outputs(artifact, [r["input"] for r in test], selection.budget)
            hits = sum(exact(o, r["output"]) for o, r in zip(outputs, test, strict=True))
            variants[f"{name} x{scale}"] = hits / len(test)
    return {"cv": correct, "variants": variants, "seconds": round(time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base")
    parser.add_argument("out", type=Path)
    parser.add_argument("--tasks", type=Path, default=Path("examples/dev-tasks"))
    args = parser.parse_args()
    prog = interpreter(args.base)
    report = {}
    for task in sorted(p for p in args.tasks.iterdir() if (p / "spec.txt").is_file()):
        report[task.name] = probe_task(prog, task)
        print(task.name, report[task.name], flush=True)
        args.out.write_text(json.dumps(report, indent=1))
    names = next(iter(report.values()))["variants"]
    print({n: round(sum(r["variants"][n] for r in report.values()) / len(report), 3) for n in names})


if __name__ == "__main__":
    main()
