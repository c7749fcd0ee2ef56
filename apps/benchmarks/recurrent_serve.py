"""The serving engine on programs with recurrent state: each row's own pass against one batched step.

    python -m apps.benchmarks.recurrent_serve                       # both small configs, 1, 4, 8 streams
    python -m apps.benchmarks.recurrent_serve --models lfm2-real4 --streams 1,4 --rounds 1

Each model is a random Hugging Face model from a config, exported by ``paw export``'s code
into a temporary folder: ``lfm2-small`` and ``qwen3_5-small`` are small but not trivial
(hidden 512, 6 layers, the families' mix of layer kinds, vocabulary 8192);
``lfm2-real4`` has LFM2-350M's shapes (hidden 1024, vocabulary 65536) at 4 of its 16
layers. For N streams, N requests of different prompt lengths (8 + 4 i random ids) are
submitted at once to a ``paw_mlx.engine.Engine`` (no HTTP), each for ``--tokens`` greedy
tokens with EOS banned. Total tokens/s is all generated tokens over the wall time from
submission to the last token (prefills included: each prompt is prefilled alone, so they
weigh the same in both columns); steady tokens/s counts only the time every stream was
decoding, from the last one's first token to the first one's last. Two engines: ``batch_recurrent``
off (each row its own forward pass per step, the old *solo* path) and on (one batched
step). They alternate, ``--rounds`` times after a warm-up that traces every shape, and a
cell keeps its best round. Prints a Markdown table; ``--out`` writes it to a file.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import threading
import time
from pathlib import Path

import interp  # noqa: F401  (before MLX: puts the fast BLAS under it)

# isort: split
from apps.benchmarks.args import emit_table, positive_int
from interp.device import describe
from interp.sampling import SamplingParams
from paw_mlx.engine import Engine, EngineConfig, GenerationRequest, ModelCatalog
from paw_mlx.runtime import load

#: prompt tokens of the first stream, and how many more each next stream's prompt has
PROMPT, STAGGER = 8, 4
#: name -> (model_type, config parameters)
MODELS = {
    "lfm2-small": ("lfm2", dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                                num_key_value_heads=4, vocab_size=8192, block_auto_adjust_ff_dim=False,
                                layer_types=["conv", "conv", "full_attention", "conv", "conv", "full_attention"])),
    "qwen3_5-small": ("qwen3_5_text", dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
        head_dim=64, vocab_size=8192, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
        linear_value_head_dim=64, layer_types=["linear_attention", "linear_attention", "full_attention"] * 2)),
    # LFM2-350M's shapes (config.json of LiquidAI/LFM2-350M), 4 of its 16 layers
    "lfm2-real4": ("lfm2", dict(hidden_size=1024, intermediate_size=6656, num_hidden_layers=4,
                                num_attention_heads=16, num_key_value_heads=8, vocab_size=65536,
                                block_multiple_of=256, block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True,
                                layer_types=["conv", "conv", "full_attention", "conv"])),
}


def export(name: str, root: Path, models: dict | None = None) -> Path:
    """The random model ``name`` of ``models`` (``MODELS`` by default) exported (float32) under ``root``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from exporter.export import export_model

    model_type, params = (models or MODELS)[name]
    config = AutoConfig.for_model(model_type, **params, tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return export_model(model, None, root / name, source_info={"id": f"random-{name}"})


def tokens_per_s(catalog: ModelCatalog, streams: int, tokens: int, batch: bool) -> tuple[float, float]:
    """(total, steady) tokens/s of ``streams`` requests submitted at once: total is every generated
    token over the wall time; steady counts only the time every stream was decoding (from the
    last one's first token to the first one's last token), 0 when there was none."""
    model = catalog.get("m")
    ban = {str(t): -100.0 for t in model.base.eos_token_ids}
    prompts = [[(7 * i + 13 * j) % 4000 + 100 for j in range(PROMPT + STAGGER * i)] for i in range(streams)]
    stamps: list[list[float]] = [[] for _ in range(streams)]
    ended = threading.Semaphore(0)
    failures: list[str] = []

    def on_event(index: int, event) -> None:
        stamps[index].extend([time.perf_counter()] * len(event.tokens))
        if event.error:
            failures.append(event.error)
        if event.finish_reason is not None:
            ended.release()

    with Engine(EngineConfig(max_rows=max(8, streams), batch_recurrent=batch)) as engine:
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.submit(GenerationRequest(model, p, tokens, SamplingParams.create(logit_bias=ban)),
                          on_event=lambda event, i=i: on_event(i, event))
        for _ in prompts:
            if not ended.acquire(timeout=1800):
                raise RuntimeError("a request did not finish")
    if failures:
        raise RuntimeError(failures[0])
    total = sum(len(s) for s in stamps) / (max(s[-1] for s in stamps) - start)
    first, last = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if first <= t <= last)
    return total, (inside / (last - first) if last > first and inside > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lfm2-small,qwen3_5-small", help=f"of {', '.join(MODELS)}")
    parser.add_argument("--streams", default="1,4,8")
    parser.add_argument("--tokens", type=positive_int, default=64, help="generated per request")
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, help="write the table here too")
    options = parser.parse_args()
    streams = [int(s) for s in options.streams.split(",")]
    lines = [f"{platform.machine()}, {describe()}; {options.tokens} tokens per request, best of {options.rounds}",
             "", "| model | streams | solo total tok/s | batched total tok/s | ratio | solo steady tok/s | "
             "batched steady tok/s | ratio |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in options.models.split(","):
            catalog = ModelCatalog()
            catalog.add_base(load(export(name, Path(tmp))), name="m")
            for count in streams:  # warm-up: trace each batch shape's step
                for batch in (False, True):
                    tokens_per_s(catalog, count, 4, batch)
            for count in streams:
                best = {False: (0.0, 0.0), True: (0.0, 0.0)}
                for _ in range(options.rounds):
                    for batch in (False, True):
                        got = tokens_per_s(catalog, count, options.tokens, batch)
                        best[batch] = tuple(max(a, b) for a, b in zip(best[batch], got, strict=True))
                (solo, solo_steady), (batched, batched_steady) = best[False], best[True]
                steady = f"{batched_steady / solo_steady:.2f}" if solo_steady else "-"
                lines.append(f"| {name} | {count} | {solo:.1f} | {batched:.1f} | {batched / solo:.2f} | "
                             f"{solo_steady:.1f} | {batched_steady:.1f} | {steady} |")
                print(lines[-1], flush=True)
    emit_table(lines, options.out)


if __name__ == "__main__":
    main()
