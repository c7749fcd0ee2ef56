"""Fuzz paw with many mutated programs and compiled programs (the long run of tests/test_fuzz.py).

    python scripts/fuzz.py --cases 2000 --jobs 2 --keep failures/

Each case is a copy of a tiny exported program (or a program compiled on it) with a few
random mutations, run with ``paw`` in a subprocess under a timeout and a memory cap
(tests/fuzzing.py). Prints how the cases ended; a case that ends in anything but success
or one ``paw: error:`` line is kept (with the command to rerun it) and makes the exit
code 1. Heavy: run it under ``flock /work/heavy.lock`` on a shared machine.
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
    args = parser.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
