"""Programs as weights: what compiling a spec buys at call time.

    python apps/benchmarks/programs_bench.py [--base DIR] [--out apps/benchmarks/results/programs_bench.json]

1. Time to first token of a call on a compiled ~300-token spec, against sending the
   spec and the input as one prompt (no prefix cache). Same token ids, same model.
2. A batch of 16 inputs in one call against 16 sequential calls (same outputs).
Prints a table; medians of a few repeats.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import interp  # noqa: E402, F401  (before MLX: puts the fast BLAS under it)

# isort: split
import mlx.core as mx  # noqa: E402

from interp.paths import DEFAULT_MODEL  # noqa: E402
from interp.sampling import greedy  # noqa: E402
from paw_mlx.programs import compile, function  # noqa: E402
from paw_mlx.programs.batch import prefill_batch  # noqa: E402

GUIDE = ("You label customer reviews. Read the review the user sends and decide whether the writer is "
         "happy or unhappy with the product or service. Answer with exactly one lowercase word: positive "
         "or negative. Do not explain. Consider praise of quality, price, staff, speed, comfort or "
         "design as positive; complaints about damage, delays, rudeness, bugs, dirt or cost as "
         "negative. ")
INPUTS = ["I loved this movie, it was wonderful.", "Terrible service, I will never come back.",
          "Great value for the price.", "The package arrived damaged.", "Such a friendly team.",
          "The battery dies in an hour.", "A beautiful, moving story.", "Cold coffee and rude staff.",
          "Excellent quality, highly recommended.", "It stopped working after a week.",
          "The view from the room was stunning.", "I want my money back.", "Lovely design.",
          "Disappointing and overpriced.", "The best pizza in town.", "The shoes hurt my feet."]


def spec_of(tokens: int, tokenizer) -> str:
    """The guide repeated until the spec is about ``tokens`` tokens long."""
    text = GUIDE
    while len(tokenizer.encode(text, add_special_tokens=False)) < tokens:
        text += GUIDE
    ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids)


def first_token_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default=DEFAULT_MODEL)
    parser.add_argument("--spec-tokens", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    probe = function(compile("probe", base=args.base), base=args.base)
    prog = probe.base
    spec = spec_of(args.spec_tokens, prog.tokenizer)
    art = compile(spec, base=args.base, max_new_tokens=args.max_new_tokens)
    f = function(art, base=args.base)
    ids = f.token_ids(INPUTS[0])

    def call_first_token():
        return greedy(prefill_batch(prog, art.prefix, [ids]).logits)

    def one_prompt_first_token():
        # The whole prompt through the model with no prefix cache, as `paw run` would.
        return greedy(prog.model(mx.array([art.prefix_ids + ids]), cache=prog.make_cache())[:, -1, :])

    assert call_first_token().item() == one_prompt_first_token().item()
    ttft_call = first_token_seconds(call_first_token, args.repeats)
    ttft_prompt = first_token_seconds(one_prompt_first_token, args.repeats)

    f(INPUTS[:2])  # warm up the batched path
    batch_times, seq_times = [], []
    for _ in range(max(1, args.repeats - 1)):
        start = time.perf_counter()
        batched = f(INPUTS)
        batch_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        sequential = [f(x) for x in INPUTS]
        seq_times.append(time.perf_counter() - start)
    same = sum(a == b for a, b in zip(batched, sequential, strict=True))
    t_batch, t_seq = statistics.median(batch_times), statistics.median(seq_times)

    rows = [
        ("prefix tokens (compiled spec)", f"{art.prefix_length}"),
        ("input tokens per call", f"{len(ids)}"),
        ("TTFT, compiled program call", f"{ttft_call * 1000:.0f} ms"),
        ("TTFT, spec + input as one prompt", f"{ttft_prompt * 1000:.0f} ms"),
        ("TTFT ratio (prompt / program)", f"{ttft_prompt / ttft_call:.1f}x"),
        (f"16 inputs, one batch ({args.max_new_tokens} new tokens max)", f"{t_batch:.2f} s"),
        ("16 inputs, sequential calls", f"{t_seq:.2f} s"),
        ("batch speed-up (sequential / batch)", f"{t_seq / t_batch:.1f}x"),
        ("batched outputs equal to sequential", f"{same}/16"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"programs_bench on {prog.name} ({platform.machine()}, mlx {mx.__version__})")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "base": prog.name, "prefix_tokens": art.prefix_length, "input_tokens": len(ids),
            "ttft_call_s": ttft_call, "ttft_one_prompt_s": ttft_prompt, "ttft_ratio": ttft_prompt / ttft_call,
            "batch16_s": t_batch, "sequential16_s": t_seq, "batch_speedup": t_seq / t_batch,
            "batched_equal_sequential": same, "max_new_tokens": args.max_new_tokens,
            "machine": platform.machine(), "mlx": mx.__version__,
        }, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
