"""Measure one engine in this process and print one JSON line of results.

Run as ``python -m apps.benchmarks.worker --engine paw --path DIR ...``. The harness starts
one process per engine so that one engine's imports and allocations never count
against another (peak memory is per process).

Every engine sees the same prompt (deterministic ids), decodes greedily and ignores
EOS, so each run does exactly the same amount of work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator

PROMPT_SEED = 1234


def prompt_ids(count: int, vocab: int) -> list[int]:
    """``count`` deterministic pseudo-random token ids below ``vocab`` (no special ids)."""
    state, ids = PROMPT_SEED, []
    low = min(100, vocab // 4)
    for _ in range(count):
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        ids.append(low + (state >> 33) % (vocab - low))
    return ids


def _max_rss_gb() -> float:
    from interp import device

    return device.max_rss_bytes() / 1e9


def time_stream(tokens: Iterator[int], decode_tokens: int) -> dict:
    """Time a token stream: first token (prefill) and the rate of the ones after it."""
    start = time.perf_counter()
    stamps: list[float] = []
    ids: list[int] = []
    for token in tokens:
        stamps.append(time.perf_counter())
        ids.append(int(token))
        if len(ids) >= decode_tokens:
            break
    ttft = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    median_gap = gaps[len(gaps) // 2] if gaps else 0.0
    # The headline rate is 1 / the median gap between tokens: on a CPU shared with other
    # work, a burst of someone else's load hits one engine's mean but barely its median.
    return {"ttft_s": ttft, "decode_s": decode_s, "generated": len(ids),
            "decode_tps": 1.0 / median_gap if median_gap > 0 else 0.0,
            "decode_tps_mean": (len(ids) - 1) / decode_s if decode_s > 0 else 0.0, "tokens": ids}


# ----------------------------------------------------------------------------- engines


def run_paw(args) -> dict:
    import mlx.core as mx

    import paw_mlx
    from interp.generate import generate_step

    start = time.perf_counter()
    prog = paw_mlx.load(args.path, compile=not args.no_compile)
    load_s = time.perf_counter() - start
    vocab = int(prog.program.model_info.get("vocab_size") or 0)

    def stream(prompt: list[int], count: int) -> Iterator[int]:
        return generate_step(prog.model, prompt, prog.make_cache(), max_tokens=count)

    return _measure_mlx(mx, stream, vocab, load_s, args)


def run_mlx_lm(args) -> dict:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    start = time.perf_counter()
    model, tokenizer = load(args.path)
    load_s = time.perf_counter() - start
    vocab = int(model.args.vocab_size)

    def stream(prompt: list[int], count: int) -> Iterator[int]:
        steps = generate_step(mx.array(prompt), model, max_tokens=count, prompt_cache=make_prompt_cache(model),
                              prefill_step_size=512)
        return (token for token, _ in steps)

    return _measure_mlx(mx, stream, vocab, load_s, args)


def _measure_mlx(mx, stream: Callable[[list[int], int], Iterator[int]], vocab: int, load_s: float, args) -> dict:
    warm = prompt_ids(args.warmup_tokens, vocab)
    time_stream(stream(warm, 4), 4)  # warm-up: first kernels, compiled decode step
    mx.reset_peak_memory()
    result = time_stream(stream(prompt_ids(args.prompt_tokens, vocab), args.decode_tokens), args.decode_tokens)
    result.update(load_s=load_s, peak_memory_gb=mx.get_peak_memory() / 1e9, max_rss_gb=_max_rss_gb())
    return result


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype).eval()
    load_s = time.perf_counter() - start
    vocab = int(model.config.vocab_size)

    def stream(prompt: list[int], count: int) -> Iterator[int]:
        cache = DynamicCache()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            for _ in range(count):
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1, :]
                ids = logits.argmax(-1, keepdim=True)
                yield int(ids[0, 0])

    time_stream(stream(prompt_ids(args.warmup_tokens, vocab), 4), 4)
    result = time_stream(stream(prompt_ids(args.prompt_tokens, vocab), args.decode_tokens), args.decode_tokens)
    result.update(load_s=load_s, peak_memory_gb=_max_rss_gb(), max_rss_gb=_max_rss_gb())
    return result


def run_ceiling(args) -> dict:
    """MLX's own matvec speed over exactly the weights one decoded token reads.

    Every linear (or quantized linear) weight of the paw program is multiplied by one
    activation row, all in a single ``mx.eval``: no MLX program that reads those
    weights per token can decode faster than 1 / that time.
    """
    import mlx.core as mx

    from interp.program import load_consts, read_program

    program = read_program(args.path)
    consts = load_consts(program)
    mx.eval(consts)
    mx.eval(_matvecs(program, consts, mx))  # warm-up
    times = []
    for _ in range(args.repeats):
        products = _matvecs(program, consts, mx)
        start = time.perf_counter()
        mx.eval(products)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    nbytes = _weight_bytes(program, consts)
    return {"decode_tps": 1.0 / seconds, "seconds_per_token": seconds, "weight_bytes": nbytes,
            "gb_per_s": nbytes / seconds / 1e9, "peak_memory_gb": mx.get_peak_memory() / 1e9}


def _weights(program, consts) -> Iterator[tuple]:
    """(node, [weight arrays]) for every matrix product a decoded token makes."""
    for node in program.nodes:
        if node.op == "linear" and node.inputs[1] in consts:
            yield node, [consts[node.inputs[1]]]
        elif node.op == "quantized_linear":
            yield node, [consts[name] for name in node.inputs[1:4]]


def _weight_bytes(program, consts) -> int:
    return sum(a.nbytes for _, arrays in _weights(program, consts) for a in arrays)


def _matvecs(program, consts, mx) -> list:
    out = []
    for node, arrays in _weights(program, consts):
        if node.op == "linear":
            (w,) = arrays
            out.append(mx.ones((1, w.shape[1]), dtype=w.dtype) @ w.T)
        else:
            w, scales, biases = arrays
            x = mx.ones((1, w.shape[1] * 32 // node.attrs["bits"]), dtype=scales.dtype)
            out.append(mx.quantized_matmul(x, w, scales, biases, transpose=True,
                                           group_size=node.attrs["group_size"], bits=node.attrs["bits"]))
    return out


ENGINES = {"paw": run_paw, "mlx-lm": run_mlx_lm, "transformers": run_transformers, "ceiling": run_ceiling}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=sorted(ENGINES), required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--warmup-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                        help="where MLX engines compute (transformers always runs on torch's CPU)")
    args = parser.parse_args(argv)
    from interp import blas, device

    if args.engine != "transformers":
        device.use_device(args.device)
    result = ENGINES[args.engine](args)
    result["blas"] = blas.status()
    result["device"] = "cpu" if args.engine == "transformers" else device.backend()
    sys.stdout.write("PAW-BENCH-RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
