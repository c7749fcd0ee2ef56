"""A program call's time to first token: the plain interpreter against the traced short
prefill, with the prefix copied per call or resident.

    python apps/benchmarks/call_path.py --base /path/to/smollm2 --rounds 15

A call feeds a few tokens after a cached prefix and samples one. Three ways to run it:

* ``plain, copied``: the interpreter builds the graph node by node (``compile=False``),
  in a cache made from the prefix for this call (every layer's keys and values copied
  into a larger buffer), as program calls ran before the two below;
* ``traced, copied``: the same input through ``CompiledStep.prefill`` (one traced
  function per input shape, ``interp/compiled_step.py``);
* ``traced, resident``: and in the function's ``ResidentPrefix``, which keeps the prefix
  in its own buffer and writes each call after it in place (``paw_mlx/programs/batch.py``):
  what ``paw_mlx.function`` does for one input.

Each shape is called twice before timing (the second call traces it). Rounds visit every
column in a rotating order; the medians are printed as a Markdown table, ``--out``
writes JSON.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace

import interp  # noqa: F401  (imported before MLX, so MLX's matmuls run on the BLAS shim)
from apps.benchmarks.cli import base_rounds_out

LENGTHS = (2, 4, 8, 16, 24)
PREFIX_TOKENS = 150
COLUMNS = ("plain, copied", "traced, copied", "traced, resident")


def measure(base: str, rounds: int) -> dict[str, dict[int, float]]:
    import mlx.core as mx  # after interp (imported above): MLX then runs on the BLAS shim

    from interp.graph import GraphModel
    from paw_mlx.programs.batch import ResidentPrefix, generate_batch, prefill_batch
    from paw_mlx.runtime import load

    prog = load(base)
    plain = replace(prog, model=GraphModel(prog.model.program, prog.model.consts, compile_decode=False))
    state = prefill_batch(prog, [], [list(range(1000, 1000 + PREFIX_TOKENS))])
    prefix = [(c.keys[..., :PREFIX_TOKENS, :], c.values[..., :PREFIX_TOKENS, :]) for c in state.cache]
    mx.eval(prefix)
    resident = ResidentPrefix(prefix)
    calls = {
        "plain, copied": lambda ids: generate_batch(plain, prefix, [ids], max_new_tokens=1),
        "traced, copied": lambda ids: generate_batch(prog, prefix, [ids], max_new_tokens=1),
        "traced, resident": lambda ids: generate_batch(prog, prefix, [ids], max_new_tokens=1, resident=resident),
    }
    samples: dict[str, dict[int, list[float]]] = {name: {n: [] for n in LENGTHS} for name in COLUMNS}
    for n in LENGTHS:
        ids = list(range(2000, 2000 + n))
        for call in calls.values():
            call(ids)
            call(ids)
    for round_ in range(rounds):
        for n in LENGTHS:
            ids = list(range(2000, 2000 + n))
            order = COLUMNS[round_ % 3:] + COLUMNS[:round_ % 3]
            for name in order:
                start = time.perf_counter()
                calls[name](ids)
                samples[name][n].append(time.perf_counter() - start)
    return {name: {n: 1000 * statistics.median(times) for n, times in by_length.items()}
            for name, by_length in samples.items()}


def main() -> None:
    args = base_rounds_out(__doc__, default_rounds=15)
    medians = measure(args.base, args.rounds)
    print(f"| call after a {PREFIX_TOKENS}-token prefix | " + " ms | ".join(COLUMNS) + " ms | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n in LENGTHS:
        cells = [medians[name][n] for name in COLUMNS]
        print(f"| {n} tokens | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {cells[0] / cells[-1]:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"rounds": args.rounds, "prefix_tokens": PREFIX_TOKENS,
                                        "median_ms": medians}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
