"""Ternary benchmark: bits per weight on disk and decode speed against float and 4-bit.

    python apps/benchmarks/ternary.py --ternary smollm2-ternary [--base3 smollm2-ternary-base3] \
        --float /work/programs/smollm2-f32 [--tokens 32]

Bits per weight are measured from consts.safetensors itself: the bytes of each ternary
layer's packed codes plus its scale, over the number of weights (out x in, from the
program's ternary_linear nodes). Decode speed: one prompt prefilled, then greedy steps,
one mx.eval per token, on this machine's MLX backend. The float32 program is the
baseline; "float16" and "4-bit" rerun it with the same linear layers' weights converted
in-process (float16 copies; mx.quantize affine, group 64), as the quantized export is
another branch's work. lm_head / embeddings stay float32 in every row.
Results go to apps/benchmarks/results/ternary.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import interp  # noqa: E402, F401  (before MLX: puts the fast BLAS under it)

# isort: split
import mlx.core as mx  # noqa: E402

from interp import device  # noqa: E402
from interp.graph import GraphModel  # noqa: E402
from interp.ops import REGISTRY, Handler  # noqa: E402
from interp.program import read_program  # noqa: E402

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1}
PROMPT = "What is the capital of France?"


def ternary_bits(directory: Path) -> dict:
    """Bits per weight of the ternary layers, from the consts files' own headers."""
    program = read_program(directory)
    header = {name: meta for consts_file in program.consts_files for name, meta in consts_file.header.items()}

    def nbytes(name: str) -> int:
        start, end = header[name]["data_offsets"]
        return end - start

    weights = codes = scales = 0
    seen = set()
    for node in program.nodes:
        if node.op != "ternary_linear" or node.inputs[1] in seen:
            continue
        seen.add(node.inputs[1])
        weights += node.attrs["in_features"] * node.attrs["out_features"]
        codes += nbytes(node.inputs[1])
        scales += nbytes(node.inputs[2])
    packing = program.model_info.get("ternary", {}).get("packing", "2bit")
    total_bytes = sum(nbytes(n) for n in header)
    return {"packing": packing, "layers": len(seen), "weights": weights,
            "bits_per_weight_codes": 8 * codes / weights, "bits_per_weight": 8 * (codes + scales) / weights,
            "ternary_layer_bytes": codes + scales, "consts_bytes": total_bytes}


def _linear_weight_names(program) -> list[str]:
    """The float program's linear-layer weights that ternary export packs (all but the logits one)."""
    last = [n for n in program.nodes if n.op == "linear"][-1]
    return sorted({n.inputs[1] for n in program.nodes if n.op == "linear" and n is not last})


class _Converted:
    """A linear weight converted in-process for a comparison row."""

    def __init__(self, weight: mx.array, kind: str):
        self.kind = kind
        if kind == "4bit":
            self.parts = mx.quantize(weight, group_size=64, bits=4)
        else:
            self.parts = (weight.astype(mx.float16),)
        mx.eval(*self.parts)

    def __call__(self, x: mx.array) -> mx.array:
        if self.kind == "4bit":
            wq, scales, biases = self.parts
            return mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4)
        return (x.astype(mx.float16) @ self.parts[0].T).astype(x.dtype)


def load_model(directory: Path, convert: str | None = None) -> GraphModel:
    program = read_program(directory)
    model = GraphModel.from_program(program)
    if convert is None:
        return model
    for name in _linear_weight_names(program):
        model.consts[name] = _Converted(model.consts[name], convert)
    plain = REGISTRY["linear"]

    def linear(x, weight, bias=None):
        if isinstance(weight, _Converted):
            y = weight(x)
            return y if bias is None else y + bias
        return plain.fn(x, weight, bias)

    REGISTRY["linear"] = Handler(linear)
    try:
        model._node_runners = _recompile(model)  # node runners bind their handler when made
    finally:
        REGISTRY["linear"] = plain
    return model


def _recompile(model: GraphModel) -> list:
    from interp.graph import _make_node_runner

    return [_make_node_runner(index, node) for index, node in enumerate(model.program.nodes)]


def decode_speed(model: GraphModel, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(token)
    produced = [token.item()]
    for _ in range(3):  # warm up
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        produced.append(token.item())
    start = time.perf_counter()
    for _ in range(tokens):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(token)
        produced.append(token.item())
    return tokens / (time.perf_counter() - start), produced


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ternary", type=Path, required=True, help="program exported with --weights ternary")
    parser.add_argument("--base3", type=Path, help="program exported with --weights ternary-base3 (optional)")
    parser.add_argument("--float", dest="float_dir", type=Path, required=True, help="float32 program of the same model")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "apps" / "benchmarks" / "results")
    args = parser.parse_args()

    from interp.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.ternary)
    prompt = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    results: dict = {"machine": f"{platform.machine()} {platform.system()}, mlx {mx.__version__}, "
                                f"backend {device.backend()}",
                     "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                     "decode_tokens": args.tokens, "prompt_tokens": len(prompt), "sizes": {}, "decode": {}}
    results["sizes"]["ternary"] = ternary_bits(args.ternary)
    if args.base3:
        results["sizes"]["ternary-base3"] = ternary_bits(args.base3)

    rows = [("float32", args.float_dir, None), ("float16 (in-process)", args.float_dir, "float16"),
            ("4-bit affine g64 (in-process)", args.float_dir, "4bit"), ("ternary 2-bit", args.ternary, None)]
    if args.base3:
        rows.append(("ternary base-3", args.base3, None))
    for label, directory, convert in rows:
        tps, ids = decode_speed(load_model(directory, convert), prompt, args.tokens)
        results["decode"][label] = {"tokens_per_s": tps, "text": tokenizer.decode(ids[:24])}
        print(f"{label:32s} {tps:7.1f} tok/s   {results['decode'][label]['text'][:60]!r}", flush=True)
    base = results["decode"]["float32"]["tokens_per_s"]

    lines = ["# Ternary weights: size and decode speed", "", f"Machine: {results['machine']}; "
             f"{args.tokens} greedy decode tokens after a {len(prompt)}-token prompt.", "",
             "| layout | bits/weight (codes) | bits/weight (codes + scales) | ternary layers | consts.safetensors |",
             "| --- | --- | --- | --- | --- |"]
    for label, size in results["sizes"].items():
        lines.append(f"| {label} ({size['packing']}) | {size['bits_per_weight_codes']:.3f} "
                     f"| {size['bits_per_weight']:.3f} "
                     f"| {size['layers']} ({size['weights'] / 1e6:.1f} M weights) "
                     f"| {size['consts_bytes'] / 2**20:.1f} MiB |")
    lines += ["", "| weights | decode tok/s | vs float32 | first 24 tokens |", "| --- | --- | --- | --- |"]
    for label, row in results["decode"].items():
        text = row["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {label} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base:.2f}x | {text[:50]} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ternary.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    (args.out / "ternary.md").write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
