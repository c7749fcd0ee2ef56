"""Prefill time per token of the gated delta rule: the scan against the chunked form, per chunk size.

    python -m apps.benchmarks.delta_rule                    # 512-token prompt, every layer shape
    python -m apps.benchmarks.delta_rule --length 64 --rounds 5

One layer's ``gated_delta_rule`` handler, as the interpreter calls it (through a
``DeltaState``, batch 1, random float32 inputs with unit keys), for a tiny-ish layer and a
Qwen3.5-0.8B-shaped one (16 heads, Dk = Dv = 128), both with a decay per head, and the
latter again with a decay per key channel (as Kimi Linear's layers have). The engines are
the scan (``PAW_DELTA_CHUNK=0``) and the chunked form at each chunk size
(``PAW_DELTA_CHUNK=<size>``); they run interleaved, ``--rounds`` times, and a cell keeps its
fastest round. The table (milliseconds per token, and the scan's time over the best chunk
size's) is printed and written to ``apps/benchmarks/results/delta-rule.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import interp  # noqa: F401  (before MLX: puts the fast BLAS under it)

# isort: split
import mlx.core as mx
import numpy as np

from interp.delta_state import DeltaState
from interp.device import describe
from interp.graph import RunContext
from interp.ops import REGISTRY

# layer: (key heads, value heads, Dk, Dv, decay per key channel)
SHAPES = {"tiny-ish (4 heads, 2 key heads, Dk = Dv = 64)": (2, 4, 64, 64, False),
          "Qwen3.5-0.8B layer (16 heads, Dk = Dv = 128)": (16, 16, 128, 128, False),
          "the same, decay per key channel (Kimi Linear)": (16, 16, 128, 128, True)}
RESULTS = Path(__file__).parent / "results" / "delta-rule.md"


def _inputs(length: int, key_heads: int, heads: int, key_size: int, value_size: int,
            per_channel: bool) -> list[mx.array]:
    rng = np.random.default_rng(0)

    def unit(*shape):
        x = rng.standard_normal(shape)
        return mx.array((x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32))

    return [unit(1, length, key_heads, key_size), unit(1, length, key_heads, key_size),
            mx.array(rng.standard_normal((1, length, heads, value_size)).astype(np.float32)),
            mx.array(-rng.random((1, length, heads, key_size)[:4 if per_channel else 3]).astype(np.float32)),
            mx.array(rng.random((1, length, heads)).astype(np.float32))]


def time_per_token(args: list[mx.array], chunk: int, repeats: int) -> float:
    """Milliseconds per position of one prefill call with ``PAW_DELTA_CHUNK=chunk`` (median of ``repeats``)."""
    os.environ["PAW_DELTA_CHUNK"] = str(chunk)
    scale = args[0].shape[-1] ** -0.5
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        ctx = RunContext(cache=[DeltaState()])
        start = time.perf_counter()
        mx.eval(REGISTRY["gated_delta_rule"].fn(ctx, *args, layer=0, scale=scale), ctx.cache[0].array)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times[1:])) / args[0].shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512, help="prompt positions")
    parser.add_argument("--chunks", default="16,32,64,128", help="chunk sizes to time")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    chunks = [int(c) for c in options.chunks.split(",")]
    engines = [0, *chunks]
    best = {shape: {engine: float("inf") for engine in engines} for shape in SHAPES}
    inputs = {shape: _inputs(options.length, *dims) for shape, dims in SHAPES.items()}
    for _ in range(options.rounds):
        for shape in SHAPES:
            for engine in engines:
                best[shape][engine] = min(best[shape][engine],
                                          time_per_token(inputs[shape], engine, options.repeats))
    header = " | ".join(["scan", *(f"chunk {c}" for c in chunks)])
    lines = [f"gated_delta_rule prefill, {options.length} positions, ms per token ({platform.machine()}, "
             f"{os.cpu_count()} CPUs, MLX {mx.__version__}, on {describe()}; fastest of {options.rounds} "
             f"rounds, median of {options.repeats} calls)", "",
             f"| layer | {header} | scan / best chunk |", "| --- |" + " ---: |" * (len(engines) + 1)]
    for shape, row in best.items():
        cells = " | ".join(f"{row[e]:.4f}" for e in engines)
        lines.append(f"| {shape} | {cells} | {row[0] / min(row[c] for c in chunks):.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
