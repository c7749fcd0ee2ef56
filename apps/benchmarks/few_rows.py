"""Products of a few rows on the CPU: the BLAS shim's own kernel against OpenBLAS's gemm.

    python apps/benchmarks/few_rows.py --base /path/to/smollm2 --rounds 5

A forward pass of T rows after a cached prefix (a program call of T input tokens, or one
decode step of a batch of T rows) multiplies every weight by T rows. For 2 to 32 rows the
shim (``interp/blas.py``) runs its own kernel; ``PAW_BLAS_FEW_ROWS=0`` sends the same
products to OpenBLAS's gemm. The shim is loaded once per process, so each round starts
one child process per setting, alternating, and the best of the rounds is kept. Prints a
Markdown table (milliseconds per pass, and the ratio); ``--out`` writes JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from apps.benchmarks.cli import base_rounds_out

ROWS = (1, 2, 4, 8, 16, 32)
PREFIX_TOKENS = 150

CHILD = """
import json, sys, time
import interp  # before MLX: the shim
import mlx.core as mx
from paw_mlx.programs.batch import prefill_batch
from paw_mlx.runtime import load
prog = load(sys.argv[1])
state = prefill_batch(prog, [], [list(range(1000, 1000 + {prefix}))])
prefix = [(c.keys[..., :{prefix}, :], c.values[..., :{prefix}, :]) for c in state.cache]
mx.eval(prefix)
out = {{}}
for rows in {rows}:
    call = [list(range(2000, 2000 + rows))]          # one call of `rows` tokens
    step = [[2000 + r] for r in range(rows)]          # one token for each of `rows` rows
    for name, batch in (("call", call), ("batch step", step)):
        times = []
        for _ in range(6):
            start = time.perf_counter()
            mx.eval(prefill_batch(prog, prefix, batch).logits)
            times.append(time.perf_counter() - start)
        out[f"{{name}} {{rows}}"] = 1000 * min(times[1:])
print(json.dumps(out))
"""


def run_child(base: str, few_rows: bool) -> dict[str, float]:
    env = {**os.environ, "PAW_BLAS_FEW_ROWS": "1" if few_rows else "0"}
    code = CHILD.format(prefix=PREFIX_TOKENS, rows=ROWS)
    done = subprocess.run([sys.executable, "-c", code, base], env=env, capture_output=True, text=True,
                          check=True, timeout=900)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = base_rounds_out(__doc__, default_rounds=5)
    best: dict[str, dict[str, float]] = {"openblas": {}, "shim": {}}
    for round_ in range(args.rounds):
        for few_rows in ((False, True) if round_ % 2 == 0 else (True, False)):
            name = "shim" if few_rows else "openblas"
            for key, ms in run_child(args.base, few_rows).items():
                best[name][key] = min(ms, best[name].get(key, float("inf")))
    print(f"| pass after a {PREFIX_TOKENS}-token prefix | OpenBLAS gemm ms | shim kernel ms | speed-up |")
    print("| --- | ---: | ---: | ---: |")
    for key in best["shim"]:
        old, new = best["openblas"][key], best["shim"][key]
        print(f"| {key} {'tokens' if key.startswith('call') else 'rows'} | {old:.1f} | {new:.1f} | {old / new:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"rounds": args.rounds, "best_ms": best}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
