"""LoRA at run time, two ways: the ``lora`` op added by the load-time rewrite (interp/lora.py)
against the update merged into copies of the weights, with the plain base as reference.

    python apps/benchmarks/lora_bench.py --base /path/to/smollm2 --rounds 3

One process, engines interleaved round by round (best of the rounds kept), so the shared
CPU disturbs them alike. Per engine: time to first token of a program call (a cached
prefix, then the input), decode tokens per second, the extra memory the adapter costs,
and a batch of rows that each use their own adapter (the rewrite only: merged weights
hold one adapter). Prints a Markdown table; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import interp  # noqa: F401  (before MLX: puts the fast BLAS under it)

# isort: split
import mlx.core as mx
import numpy as np

from interp.graph import GraphModel
from interp.lora import ADAPTER_INPUT, linear_sites, merged_weights, with_adapters
from paw_mlx.programs.batch import prefix_cache
from paw_mlx.programs.compile import compute_prefix
from paw_mlx.runtime import load


def random_adapter(prog, rank: int, targets: str, layers: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    first = prog.model.num_layers - layers
    adapter = {}
    for module, site in linear_sites(prog.program).items():
        if site.layer is None or site.layer < first:
            continue
        if targets == "attention" and "attn" not in module:
            continue
        adapter[module] = (rng.standard_normal((rank, site.in_features)).astype(np.float32) * 0.01,
                           rng.standard_normal((site.out_features, rank)).astype(np.float32) * 0.01)
    return adapter


def time_call(model, prefix, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens per second) of one greedy call after ``prefix``."""
    cache = prefix_cache(prefix, 1)
    start = time.perf_counter()
    y = mx.argmax(model(mx.array([ids], dtype=mx.int32), cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
    return ttft, new_tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base program directory (SmolLM2)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="attention", choices=["attention", "all"])
    parser.add_argument("--layers", type=int, default=12, help="adapted top layers")
    parser.add_argument("--prefix-tokens", type=int, default=256)
    parser.add_argument("--input-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="rows of the mixed-adapter batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    prog = load(args.base)
    adapter = random_adapter(prog, args.rank, args.targets, args.layers, seed=0)
    rng = np.random.default_rng(1)
    vocab = int(prog.program.model_info.get("vocab_size", 1000))
    prefix_ids = rng.integers(100, vocab - 1, args.prefix_tokens).tolist()
    call_ids = rng.integers(100, vocab - 1, args.input_tokens).tolist()
    prefix = compute_prefix(prog, prefix_ids)

    before = mx.get_active_memory()
    rewritten = with_adapters(prog.model, [adapter])
    mx.eval(list(rewritten.consts.values()))
    rewrite_bytes = mx.get_active_memory() - before
    before = mx.get_active_memory()
    merged = GraphModel(prog.program, merged_weights(prog.model, adapter))
    mx.eval(list(merged.consts.values()))
    merged_bytes = mx.get_active_memory() - before
    engines = {"base": prog.model, "lora op": rewritten, "merged": merged}

    best: dict[str, dict] = {name: {"ttft_ms": float("inf"), "decode_tps": 0.0} for name in engines}
    for _ in range(args.rounds):
        for name, model in engines.items():
            time_call(model, prefix, call_ids, 2)  # warm-up: traces the compiled step
            ttft, tps = time_call(model, prefix, call_ids, args.new_tokens)
            best[name]["ttft_ms"] = min(best[name]["ttft_ms"], 1000 * ttft)
            best[name]["decode_tps"] = max(best[name]["decode_tps"], tps)

    # Rows of one batch with different adapters (and one with none) against the same rows one by one.
    adapters = [random_adapter(prog, args.rank, args.targets, args.layers, seed=s) for s in range(args.batch - 1)]
    stacked = with_adapters(prog.model, [*adapters, None], indexed=True)
    tokens = mx.array([call_ids] * args.batch, dtype=mx.int32)
    index = mx.array(list(range(args.batch)), dtype=mx.int32)
    singles = [with_adapters(prog.model, [a]) for a in adapters] + [prog.model]
    batch_s, singles_s = float("inf"), float("inf")
    for round_ in range(args.rounds + 1):  # round 0 warms up (traces)
        start = time.perf_counter()
        mx.eval(stacked(tokens, cache=prefix_cache(prefix, args.batch), extra_inputs={ADAPTER_INPUT: index}))
        middle = time.perf_counter()
        for model in singles:
            mx.eval(model(tokens[:1], cache=prefix_cache(prefix, 1)))
        if round_:
            batch_s = min(batch_s, middle - start)
            singles_s = min(singles_s, time.perf_counter() - middle)
    got = stacked(tokens, cache=prefix_cache(prefix, args.batch), extra_inputs={ADAPTER_INPUT: index})[:, -1]
    want = mx.concatenate([m(tokens[:1], cache=prefix_cache(prefix, 1))[:, -1] for m in singles])
    max_error = mx.abs(got - want).max().item()

    base = best["base"]
    rows = []
    for name, stats in best.items():
        rows.append({"engine": name, **{k: round(v, 2) for k, v in stats.items()},
                     "ttft_vs_base": round(stats["ttft_ms"] / base["ttft_ms"], 3),
                     "decode_vs_base": round(stats["decode_tps"] / base["decode_tps"], 3),
                     "extra_memory_mb": round(
                         {"base": 0, "lora op": rewrite_bytes, "merged": merged_bytes}[name] / 1e6, 1)})
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()} {platform.system()}",
              "mlx": mx.__version__, "base": prog.name, "options": vars(args) | {"base": str(args.base), "out": None},
              "adapter_modules": len(adapter), "engines": rows,
              "mixed_batch": {"rows": args.batch, "batch_ms": round(1000 * batch_s, 1),
                              "one_by_one_ms": round(1000 * singles_s, 1), "max_logit_error": max_error}}
    print("| engine | TTFT ms | decode tok/s | TTFT / base | decode / base | extra memory MB |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['engine']} | {r['ttft_ms']:.1f} | {r['decode_tps']:.2f} | {r['ttft_vs_base']:.2f}x | "
              f"{r['decode_vs_base']:.2f}x | {r['extra_memory_mb']:.1f} |")
    mixed = report["mixed_batch"]
    print(f"\n{args.batch} rows with {args.batch - 1} different adapters and one without, one prefill: "
          f"{mixed['batch_ms']:.0f} ms as one batch, {mixed['one_by_one_ms']:.0f} ms one by one "
          f"(max logit difference {max_error:.1e})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
