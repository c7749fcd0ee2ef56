"""Big-model benchmark: export memory and time, streamed against whole, and running against mlx-lm.

Run as ``python -m apps.benchmarks.bigmodels`` (heavy: wrap it in ``flock /work/heavy.lock``
on a shared machine). Three parts, each printed as a Markdown table and saved under
``apps/benchmarks/results/``:

- ``synthetic``: a ~1.1B-parameter Llama with random weights (hidden 2048, 22 layers,
  SmolLM2's 49,152-token vocabulary), written once as sharded bfloat16 safetensors
  under the bench cache. ``paw export hf`` in bfloat16 and float32, streamed and (for
  comparison) ``--no-stream``, each in a new process whose peak RSS is the kernel's
  maximum resident set of that process; then program load time, decode speed and peak
  memory of paw against ``mlx_lm.convert`` of the same folder, in the same dtype.
- ``smollm2``: ``paw export llama smollm2`` (the Q4_1 GGUF) in float32 and bfloat16,
  streamed and whole (are the programs the same bytes?), and with ``--quantize keep``;
  consts size and decode speed of each program.
- ``moe``: a wide tiny Mixtral (random weights) exported with sparse and dense experts;
  decode speed of each.

Decode speed is the worker's (``apps/benchmarks/worker.py``): 1 / median time between tokens,
greedy, after a warm-up, each engine in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from apps.benchmarks.prepare import bench_dir, mlx_lm_model

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "apps" / "benchmarks" / "results"

#: The synthetic model: TinyLlama-1.1B's shape with SmolLM2's tokenizer (1.17B parameters).
SYNTHETIC = dict(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rope_theta=10000.0,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
#: A wide tiny MoE: decode is dominated by the experts' weights (16 experts, 2 routed).
WIDE_MOE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, num_local_experts=16, num_experts_per_tok=2,
                max_position_embeddings=1024)

_PEAK_RSS = """
import json, subprocess, sys
from interp.device import max_rss_bytes
done = subprocess.run(sys.argv[1:])
peak = max_rss_bytes(children=True)
print("PAW-PEAK-RSS " + json.dumps({"rc": done.returncode, "peak_rss": peak}), file=sys.stderr)
"""


def say(message: str) -> None:
    print(f"[bigmodels {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measured(command: list[str], tree: Path | None = None) -> dict:
    """Run ``command`` in a new process; its wall time and the peak resident memory of that process.

    ``tree``: run it from another checkout of paw (``--before``), with this interpreter.
    """
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, *command], cwd=tree or ROOT, env=env,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    line = next((x for x in done.stderr.splitlines() if x.startswith("PAW-PEAK-RSS ")), None)
    if line is None or json.loads(line.split(" ", 1)[1])["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return {"seconds": seconds, "peak_rss": json.loads(line.split(" ", 1)[1])["peak_rss"]}


def export(src: str, out: Path, *args: str, kind: str = "hf", tree: Path | None = None) -> dict:
    """``paw export`` in a new process: seconds, peak RSS, and the program's consts bytes and fingerprint."""
    shutil.rmtree(out, ignore_errors=True)
    result = measured([sys.executable, "-m", "apps.cli", "export", kind, src, "-o", str(out), *args], tree)
    consts = [p for p in out.iterdir() if p.name.startswith("consts")]
    result["consts_bytes"] = sum(p.stat().st_size for p in consts if p.suffix == ".safetensors")
    result["files"] = len(consts)
    result["fingerprint"] = json.loads((out / "manifest.json").read_text())["fingerprint"]
    return result


def warm(*paths: Path) -> None:
    """Read the source files and import the exporter once, so the first export timed is not the only cold one."""
    for path in paths:
        for file in ([path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())):
            with file.open("rb") as fh:
                while fh.read(1 << 24):
                    pass
    subprocess.run([sys.executable, "-c", "import exporter.export, transformers.models.llama"], cwd=ROOT, check=True)


def engine(name: str, path: Path, prompt: int, decode: int) -> dict:
    """One engine's load time, decode speed and peak memory (apps/benchmarks/worker.py, its own process)."""
    done = subprocess.run([sys.executable, "-m", "apps.benchmarks.worker", "--engine", name, "--path", str(path),
                           "--prompt-tokens", str(prompt), "--decode-tokens", str(decode), "--warmup-tokens", "4"],
                          cwd=ROOT, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("PAW-BENCH-RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{name} on {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


# ----------------------------------------------------------------------------- synthetic 1.1B Llama


def synthetic_folder(root: Path) -> Path:
    """The ~1.1B random Llama as a Hugging Face folder of bfloat16 safetensors shards (built once)."""
    target = root / "synthetic-llama-1.1b"
    if (target / "model.safetensors.index.json").is_file():
        return target
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from exporter.consts_writer import shard_names, write_safetensors
    from exporter.lazy import LazyTensor
    from exporter.sources import resolve_source

    say(f"writing the synthetic 1.1B Llama to {target}")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    config = LlamaConfig(**SYNTHETIC)
    config.save_pretrained(partial)
    source = resolve_source("smollm2", progress=True)
    AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file).save_pretrained(partial)
    tensors = {}
    for index, (name, shape) in enumerate(_llama_shapes(config)):
        def values(shape=shape, seed=index):
            if len(shape) == 1:
                return torch.ones(shape, dtype=torch.bfloat16)
            generator = torch.Generator().manual_seed(seed)
            return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        tensors[name] = LazyTensor(shape, torch.bfloat16, values)
    shards = shard_names(tensors, 10**9)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(partial / file, {n: tensors[n] for n in names}, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.nbytes for t in tensors.values())
    (partial / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    os.replace(partial, target)
    return target


def _llama_shapes(config) -> list[tuple[str, list[int]]]:
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * hidden // config.num_attention_heads
    shapes = [("model.embed_tokens.weight", [config.vocab_size, hidden]), ("model.norm.weight", [hidden]),
              ("lm_head.weight", [config.vocab_size, hidden])]
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes += [(p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden]),
                   (p + "self_attn.q_proj.weight", [hidden, hidden]), (p + "self_attn.k_proj.weight", [kv, hidden]),
                   (p + "self_attn.v_proj.weight", [kv, hidden]), (p + "self_attn.o_proj.weight", [hidden, hidden]),
                   (p + "mlp.gate_proj.weight", [inter, hidden]), (p + "mlp.up_proj.weight", [inter, hidden]),
                   (p + "mlp.down_proj.weight", [hidden, inter])]
    return shapes


def bench_synthetic(root: Path, args) -> list[dict]:
    folder = synthetic_folder(root)
    warm(folder)
    rows = []
    for dtype in args.dtypes:
        out = root / f"synthetic-paw-{dtype}"
        ways = [("streamed", [], None)]
        if dtype in args.baseline:
            ways.append(("whole (--no-stream)", ["--no-stream"], None))
            if args.before:
                ways.append((f"before ({args.before.name}'s exporter)", [], args.before))
        prints = []
        for way, flags, tree in reversed(ways):  # the streamed program last: it is the one run below
            say(f"synthetic: paw export hf, {dtype}, {way}")
            result = export(str(folder), out, "--dtype", dtype, *flags, tree=tree)
            prints.append(result["fingerprint"])
            rows.append({"model": "synthetic 1.1B", "dtype": dtype, "what": f"export, {way}", **result})
        for row in rows[len(rows) - len(prints):-1]:
            row["same_bytes"] = row["fingerprint"] == prints[-1]
        say(f"synthetic: paw run, {dtype}")
        paw = engine("paw", out, args.prompt_tokens, args.decode_tokens)
        say(f"synthetic: mlx_lm.convert + mlx-lm, {dtype}")
        mlx_dir = mlx_lm_model(folder, root / "synthetic-mlx", dtype, 0, 0, say)
        mlx = engine("mlx-lm", mlx_dir, args.prompt_tokens, args.decode_tokens)
        same = sum(a == b for a, b in zip(paw["tokens"], mlx["tokens"], strict=False))
        for name, result in (("paw", paw), ("mlx-lm", mlx)):
            rows.append({"model": "synthetic 1.1B", "dtype": dtype, "what": f"run, {name}", "load_s": result["load_s"],
                         "decode_tps": result["decode_tps"], "peak_memory_gb": result["peak_memory_gb"],
                         "same_tokens": same if name == "paw" else None,
                         "decode_vs_mlx": paw["decode_tps"] / mlx["decode_tps"] if name == "paw" else None})
    return rows


# ----------------------------------------------------------------------------- SmolLM2 (GGUF source)


def bench_smollm2(root: Path, args) -> list[dict]:
    from exporter.sources import smollm2_gguf

    warm(smollm2_gguf())
    rows = []
    programs = {}
    for dtype, quantize in (("float32", "0"), ("bfloat16", "0"), ("float32", "keep")):
        variant = dtype if quantize == "0" else "kept Q4_1/Q8_0 (float32 scales)"
        ways = [("streamed", ["--quantize", quantize], None)]
        if quantize == "0":
            ways.append(("whole (--no-stream)", ["--no-stream"], None))
            if args.before:
                ways.append((f"before ({args.before.name}'s exporter)", [], args.before))
        prints = []
        for way, flags, tree in ways:
            out = root / f"smollm2-{dtype}-{quantize}-{way.split()[0]}"
            say(f"smollm2: paw export llama smollm2, {variant}, {way}")
            result = export("smollm2", out, "--dtype", dtype, *flags, kind="llama", tree=tree)
            if prints:
                result["same_bytes"] = result["fingerprint"] == prints[0]
            prints.append(result["fingerprint"])
            rows.append({"model": "SmolLM2-135M", "dtype": variant, "what": f"export, {way}", **result})
            programs.setdefault(variant, out)
    for variant, out in programs.items():
        say(f"smollm2: paw run, {variant}")
        result = engine("paw", out, args.prompt_tokens, args.decode_tokens)
        rows.append({"model": "SmolLM2-135M", "dtype": variant, "what": "run, paw", "load_s": result["load_s"],
                     "decode_tps": result["decode_tps"], "peak_memory_gb": result["peak_memory_gb"]})
    return rows


# ----------------------------------------------------------------------------- sparse experts


def bench_moe(root: Path, args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from exporter.export import export_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(**WIDE_MOE)).eval()
    rows = []
    results = {}
    for mode in ("sparse", "dense"):
        out = root / f"moe-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        say(f"moe: export, {mode} experts")
        export_model(model, None, out, experts=mode)
        results[mode] = engine("paw", out, args.prompt_tokens, args.decode_tokens)
    same = sum(a == b for a, b in zip(results["sparse"]["tokens"], results["dense"]["tokens"], strict=False))
    for mode, result in results.items():
        label = (f"wide tiny Mixtral (hidden {WIDE_MOE['hidden_size']}, {WIDE_MOE['num_local_experts']} experts, "
                 f"top {WIDE_MOE['num_experts_per_tok']})")
        rows.append({"model": label, "dtype": "float32", "what": f"run, {mode}",
                     "decode_tps": result["decode_tps"], "prefill_tps": args.prompt_tokens / result["ttft_s"],
                     "peak_memory_gb": result["peak_memory_gb"],
                     "same_tokens": same if mode == "sparse" else None,
                     "decode_vs_dense": result["decode_tps"] / results["dense"]["decode_tps"]})
    return rows


# ----------------------------------------------------------------------------- report

COLUMNS = [("model", "model", str), ("dtype", "weights", str), ("what", "what", str),
           ("seconds", "export s", "{:.1f}"), ("peak_rss", "export peak RSS GB", lambda v: f"{v / 1e9:.2f}"),
           ("consts_bytes", "weights GB", lambda v: f"{v / 1e9:.3f}"),
           ("rss_ratio", "peak RSS / weights", "{:.2f}x"), ("target_gb", "target GB", "{:.2f}"),
           ("same_bytes", "same bytes as streamed", lambda v: "yes" if v else "NO"),
           ("load_s", "load s", "{:.2f}"), ("prefill_tps", "prefill tok/s", "{:.1f}"),
           ("decode_tps", "decode tok/s", "{:.2f}"), ("peak_memory_gb", "run peak mem GB", "{:.2f}"),
           ("decode_vs_mlx", "decode / mlx-lm", "{:.2f}x"), ("decode_vs_dense", "decode / dense", "{:.2f}x"),
           ("same_tokens", "same tokens", str)]


def table(rows: list[dict]) -> str:
    for row in rows:
        if "peak_rss" in row and row.get("consts_bytes"):
            row["rss_ratio"] = row["peak_rss"] / row["consts_bytes"]
            row["target_gb"] = 0.5 * row["consts_bytes"] / 1e9 + 1.5  # the bound
    used = [c for c in COLUMNS if any(row.get(c[0]) is not None for row in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in used) + " |", "|" + "---|" * len(used)]
    for row in rows:
        cells = []
        for key, _, fmt in used:
            value = row.get(key)
            cells.append("-" if value is None else fmt(value) if callable(fmt) else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import mlx.core as mx

    from interp.device import describe

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"Run {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.processor() or platform.machine()} "
            f"({os.cpu_count()} CPUs), MLX {mx.__version__} on {describe()}; load average at start {load}.")


PARTS = {"synthetic": bench_synthetic, "smollm2": bench_smollm2, "moe": bench_moe}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="synthetic,smollm2,moe", help="comma-separated: " + ", ".join(PARTS))
    parser.add_argument("--dtypes", default="bfloat16,float32", help="synthetic model export dtypes")
    parser.add_argument("--baseline", default="bfloat16",
                        help="dtypes of the synthetic model also exported with --no-stream (whole model in memory)")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout of paw (e.g. main) whose exporter is measured on the baseline rows")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=None, help="Markdown report (default apps/benchmarks/results/)")
    args = parser.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.baseline = [d for d in args.baseline.split(",") if d]
    root = bench_dir() / "bigmodels"
    root.mkdir(parents=True, exist_ok=True)
    header = machine()
    say(header)
    sections = []
    for part in [p for p in args.parts.split(",") if p]:
        rows = PARTS[part](root, args)
        sections.append(f"### {part}\n\n{table(rows)}\n")
        print(sections[-1], flush=True)
    report = (f"{header}\nPrompt {args.prompt_tokens} tokens, {args.decode_tokens} decoded greedily.\n\n"
              + "\n".join(sections))
    out = args.out or RESULTS / f"bigmodels-{time.strftime('%Y%m%d-%H%M')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")
    say(f"report written to {out}")


if __name__ == "__main__":
    main()
