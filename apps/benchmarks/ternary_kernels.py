"""Ternary matmul per shape: paw's Metal kernel against MLX's 2-bit quantized matmul on the same bytes.

    python -m apps.benchmarks.ternary_kernels                       # on a Mac: every shape, float16
    python -m apps.benchmarks.ternary_kernels --rows 1,4,16 --dtype float32 --repeats 20

Both kernels read the same weights: a ternary layer laid out once by ``TernaryWeight``
(MLX's 2-bit layout). For each layer shape (SmolLM2-135M's, a 1B model's, an 8B model's)
and each number of token rows M (1 is a decode step, 512 a prefill chunk), the engines
run interleaved, ``--rounds`` times, each round timing ``--repeats`` calls; a row keeps
its fastest round's median:

- ``paw``: paw's Metal kernel (``PAW_TERNARY_KERNEL=paw``); needs Metal;
- ``mlx``: ``mx.quantized_matmul(bits=2)`` as the affine path runs it (float32
  activations, per-group float32 scales and biases kept in memory);
- ``dense``: the unpacked weight in the activations' dtype, ``x @ W.T`` (what ternary
  weights are measured against).

The table gives microseconds per call, the weight bytes each engine reads per call over
that time (GB/s), ``paw / mlx`` (above 1: paw's kernel is faster) and the kernel the
``auto`` rule picks (``KERNEL_MAX_ROWS`` in interp/kernels/ternary_mlx.py): where the
ratio crosses 1 is the number that rule should hold. Results go to
``apps/benchmarks/results/ternary-kernels-<backend>.json`` and ``.md``. Without Metal only the
``mlx`` and ``dense`` rows run (``--device cpu`` checks the script anywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import interp  # noqa: F401  (before MLX: puts the fast BLAS under it)

# isort: split
import mlx.core as mx
import numpy as np

from interp import device
from interp.kernels import ternary as tp
from interp.kernels import ternary_mlx
from interp.kernels.ternary_mlx import TernaryWeight

#: (name, out_features, in_features) of typical layers.
SHAPES = [
    ("smollm2-135m q/o", 576, 576), ("smollm2-135m up", 1536, 576), ("smollm2-135m down", 576, 1536),
    ("1b q/o", 2048, 2048), ("1b up", 8192, 2048), ("1b down", 2048, 8192),
    ("8b q/o", 4096, 4096), ("8b up", 14336, 4096), ("8b down", 4096, 14336),
]
ROWS = (1, 2, 4, 8, 16, 32, 128, 512)
RESULTS = Path(__file__).parent / "results"


def _median_us(fn, x: mx.array, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(x))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def _engines(out_features: int, in_features: int, dtype) -> dict:
    rng = np.random.default_rng(out_features + in_features)
    t = rng.integers(-1, 2, size=(out_features, in_features)).astype(np.int8)
    scale = (rng.random(out_features) * 0.1 + 0.01).astype(np.float32)
    packed = tp.pack_ternary(t)
    affine = TernaryWeight.prepare(packed, scale, in_features, out_features, path="affine")  # layout kept
    dense = (mx.array(t.astype(np.float32)) * mx.array(scale)[:, None]).astype(dtype)
    mx.eval(dense)
    scales, biases = affine.affine
    engines = {"mlx": (affine.affine_matmul, affine.codes.nbytes + scales.nbytes + biases.nbytes),
               "dense": (lambda x: x @ dense.T, dense.nbytes)}
    if device.metal_kernels():
        metal = TernaryWeight.prepare(packed, scale, in_features, out_features, path="metal")
        engines["paw"] = (lambda x: ternary_mlx.metal_matmul(x, metal.codes, metal.scale, out_features),
                          metal.codes.nbytes + metal.scale.nbytes)
    return engines


def run(rows: list[int], dtype, repeats: int, rounds: int, say=print) -> list[dict]:
    """One result row per (shape, M, engine)."""
    results = []
    for name, out_features, in_features in SHAPES:
        engines = _engines(out_features, in_features, dtype)
        for m in rows:
            x = mx.random.normal((m, in_features), key=mx.random.key(m)).astype(dtype)
            best: dict[str, float] = {}
            for fn, _ in engines.values():  # warm-up: kernel compilation, buffers
                mx.eval(fn(x))
            for round_index in range(rounds):
                order = list(engines) if round_index % 2 == 0 else list(engines)[::-1]
                for engine in order:
                    us = _median_us(engines[engine][0], x, repeats)
                    best[engine] = min(us, best.get(engine, us))
            for engine, us in best.items():
                row = {"shape": name, "out": out_features, "in": in_features, "rows": m, "engine": engine,
                       "us": us, "weight_gb_per_s": engines[engine][1] / us / 1e3}
                if engine == "paw":
                    row["paw_vs_mlx"] = best["mlx"] / us
                    row["auto_picks"] = "paw" if m <= ternary_mlx.KERNEL_MAX_ROWS else "mlx"
                results.append(row)
            say(f"{name} M={m}: " + ", ".join(f"{e} {us:.1f} us" for e, us in best.items()))
    return results


def markdown(results: list[dict], header: str) -> str:
    lines = [header, "", "| shape | out x in | M | engine | us / call | weight GB/s | paw / mlx | auto picks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['paw_vs_mlx']:.2f}x" if "paw_vs_mlx" in r else "-"
        lines.append(f"| {r['shape']} | {r['out']}x{r['in']} | {r['rows']} | {r['engine']} | {r['us']:.1f} | "
                     f"{r['weight_gb_per_s']:.1f} | {ratio} | {r.get('auto_picks', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="token rows M, comma list")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=30, help="calls timed per round (median kept)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (fastest kept)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device.use_device(args.device)
    if not device.metal_kernels():
        print(f"no Metal here ({device.describe()}): timing MLX's quantized matmul and the dense matmul only")
    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    results = run(rows, getattr(mx, args.dtype), args.repeats, args.rounds)
    header = (f"Run {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.machine()} {platform.system()}, "
              f"MLX {mx.__version__} on {device.describe()}; activations {args.dtype}; median of {args.repeats} "
              f"calls, fastest of {args.rounds} interleaved rounds; KERNEL_MAX_ROWS = {ternary_mlx.KERNEL_MAX_ROWS}; "
              f"load average {os.getloadavg()[0] if hasattr(os, 'getloadavg') else '?'}.")
    text = markdown(results, header)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"ternary-kernels-{device.backend()}"
    stem.with_suffix(".json").write_text(json.dumps({"header": header, "rows": results}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(text)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
