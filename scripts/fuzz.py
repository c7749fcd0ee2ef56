"""Fuzz paw with many mutated programs and compiled programs (the long run of tests/test_fuzz.py).

    python scripts/fuzz.py --cases 2000 --jobs 2 --keep failures/
    python scripts/fuzz.py --surface requests --cases 5000     # or bundles, examples, cli, sources

Each case is a copy of a tiny exported program (or a program compiled on it) with a few
random mutations, run with ``paw`` in a subprocess under a timeout and a memory cap
(tests/fuzzing.py). Prints how the cases ended; a case that ends in anything but success
or one ``paw: error:`` line is kept (with the command to rerun it) and makes the exit
code 1. ``--surface`` fuzzes another input instead (tests/hostile.py): ``paw serve`` request
bodies, ``.paw`` bundles, ``--examples`` files, every hostile CLI argument list, or damaged model
folders exported with ``paw export``. Heavy: run
it under ``flock /work/heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzzing import Case, Outcome, RandomChooser, fuzz_case, make_bases  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200, help="how many cases to run")
    parser.add_argument("--seed", type=int, default=0, help="first case's seed (case i uses seed + i)")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at the same time")
    parser.add_argument("--mutations", type=int, default=3, help="at most this many mutations per case")
    parser.add_argument("--artifact-share", type=float, default=0.4, help="share of cases on a compiled program")
    parser.add_argument("--keep", type=Path, default=None, help="copy failing cases into this directory")
    parser.add_argument("--surface", choices=["programs", *SURFACES], default="programs",
                        help="what to fuzz: mutated programs (default) or one of tests/hostile.py's surfaces")
    args = parser.parse_args(argv)
    if args.surface != "programs":
        return SURFACES[args.surface](args)

    with tempfile.TemporaryDirectory(prefix="paw-fuzz-") as tmp:
        root = Path(tmp)
        print("building a tiny program and a compiled program ...", file=sys.stderr)
        program, artifact = make_bases(root / "bases")
        counts: Counter = Counter()
        failures = []

        def one(index: int):
            seed = args.seed + index
            chooser = RandomChooser(seed)
            kind = "artifact" if chooser.below(1000) < args.artifact_share * 1000 else "program"
            work = root / f"case-{seed}"
            work.mkdir()
            try:
                case, outcome, command = fuzz_case(kind, program, artifact, work, chooser,
                                                   1 + chooser.below(args.mutations))
            except Exception:  # a bug of the fuzzer itself: report it, keep going
                case, outcome, command = Case(kind), Outcome("harness", traceback.format_exc()), []
            if not outcome.acceptable and args.keep is not None:
                kept = args.keep / f"case-{seed}"
                shutil.copytree(work, kept, dirs_exist_ok=True)
                (kept / "case.json").write_text(json.dumps({"seed": seed, "kind": kind, "mutations": case.notes,
                                                            "command": ["paw", *command], "outcome": outcome.verdict,
                                                            "detail": outcome.detail}, indent=1))
            shutil.rmtree(work, ignore_errors=True)
            return seed, kind, case, outcome

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for done, (seed, kind, case, outcome) in enumerate(pool.map(one, range(args.cases)), 1):
                counts[(kind, outcome.verdict)] += 1
                if not outcome.acceptable:
                    failures.append((seed, kind, case.notes, outcome))
                    print(f"FAIL seed {seed} ({kind}): {outcome.verdict}: {outcome.detail[-300:]}\n  {case.notes}",
                          file=sys.stderr)
                if done % 50 == 0:
                    print(f"  {done}/{args.cases} cases, {len(failures)} failures", file=sys.stderr)
    print(f"{args.cases} cases (seeds {args.seed}..{args.seed + args.cases - 1}):")
    for (kind, verdict), count in sorted(counts.items()):
        print(f"  {kind:9s} {verdict:6s} {count}")
    return 1 if failures else 0


def fuzz_requests(args) -> int:
    """Hostile bodies against a server on the tiny program, in this process."""
    import httpx

    import paw_mlx
    from apps.serve.app import ServeConfig, create_app
    from apps.serve.runner import BackgroundServer
    from paw_mlx.engine import Engine, EngineConfig, ModelCatalog
    from tests.hostile import GOOD_CHAT, request_campaign
    from tests.tiny import export_tiny, make_tokenizer, tiny_llama_config

    with tempfile.TemporaryDirectory(prefix="paw-fuzz-") as tmp:
        catalog = ModelCatalog()
        program = export_tiny(tiny_llama_config(), Path(tmp) / "tiny", tokenizer=make_tokenizer())
        catalog.add_base(paw_mlx.load(program), name="tiny")
        engine = Engine(EngineConfig(max_rows=16, max_queue=64))
        with BackgroundServer(create_app(catalog, engine, ServeConfig(max_tokens=8))) as server:
            with httpx.Client(base_url=server.url, timeout=60, headers={"Connection": "close"}) as client:
                failures = request_campaign(client, RandomChooser(args.seed), args.cases)
                if client.post("/v1/chat/completions", json=GOOD_CHAT).status_code != 200:
                    failures.append("the server did not answer a good request afterwards")
    return report("requests", args.cases, failures)


def fuzz_bundles(args) -> int:
    from tests.archs import arch_config
    from tests.hostile import bundle_campaign
    from tests.paw_mlx.test_pawfile import gguf_adapter, members
    from tests.tiny import export_tiny, make_tokenizer

    with tempfile.TemporaryDirectory(prefix="paw-fuzz-") as tmp:
        base = export_tiny(arch_config("qwen3"), Path(tmp) / "qwen3", tokenizer=make_tokenizer())
        good = members(gguf_adapter("qwen3", "F32")[0])
        failures = bundle_campaign(base, good, Path(tmp), RandomChooser(args.seed), args.cases)
    return report("bundles", args.cases, failures)


def fuzz_examples(args) -> int:
    from tests.hostile import examples_campaign

    with tempfile.TemporaryDirectory(prefix="paw-fuzz-") as tmp:
        failures = examples_campaign(Path(tmp), RandomChooser(args.seed), args.cases)
    return report("examples", args.cases, failures)


def fuzz_cli(args) -> int:
    """Every hostile argument list of tests/hostile.cli_cases (--cases is ignored)."""
    from tests.hostile import cli_campaign, cli_cases
    from tests.tiny import export_tiny, make_tokenizer, tiny_llama_config

    with tempfile.TemporaryDirectory(prefix="paw-fuzz-") as tmp:
        program = export_tiny(tiny_llama_config(), Path(tmp) / "tiny", tokenizer=make_tokenizer())
        cases = cli_cases(program, Path(tmp))
        failures = cli_campaign(cases)
    return report("cli", len(cases), failures)


def fuzz_sources(args) -> int:
    """Damaged copies of a tiny Hugging Face model folder, exported in this process."""
    from tests.hostile import source_campaign
    from tests.tiny import make_tokenizer, tiny_llama_config, tiny_model

    with tempfile.TemporaryDirectory(prefix="paw-fuzz-") as tmp:
        folder, work = Path(tmp) / "model", Path(tmp) / "work"
        tiny_model(tiny_llama_config()).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        work.mkdir()
        failures = source_campaign(folder, work, RandomChooser(args.seed), args.cases)
    return report("sources", args.cases, failures)


def report(surface: str, cases: int, failures: list[str]) -> int:
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    print(f"{surface}: {cases} cases, {len(failures)} failures")
    return 1 if failures else 0


SURFACES = {"requests": fuzz_requests, "bundles": fuzz_bundles, "examples": fuzz_examples, "cli": fuzz_cli,
            "sources": fuzz_sources}


if __name__ == "__main__":
    sys.exit(main())
