"""Time to first token of a chat's second turn on a recurrent program, the prompt cache on and off.

    python -m apps.benchmarks.recurrent_turns                        # lfm2, qwen3_5 and mamba2 small
    python -m apps.benchmarks.recurrent_turns --models lfm2-small --history 256 --rounds 1

A chat client resends the whole conversation every turn. Turn 1 is a prompt of ``--history``
random ids (a system prompt and earlier turns) answered with ``--reply`` greedy tokens (EOS
banned); turn 2 is turn 1's prompt, its reply and ``--message`` new ids. Both go to a
``paw_mlx.engine.Engine`` (no HTTP) one after the other, and the time from turn 2's
submission to its first token is its TTFT. With the prompt cache on, turn 2 starts from the
snapshot turn 1's row left after its reply (``paw_mlx/engine/prompt_cache.py``) and
prefills only the new ids; off (``prompt_cache_bytes=0``), it prefills everything again.
Each measurement runs on a fresh engine; the two settings alternate ``--rounds`` times after
a warm-up, and a cell keeps its best round. The models are ``recurrent_serve``'s small random
configs (hidden 512, 6 layers, vocabulary 8192) and a Mamba2 one of the same size.
Prints a Markdown table; ``--out`` writes it to a file.
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
from apps.benchmarks import recurrent_serve
from apps.benchmarks.args import emit_table, positive_int
from interp.device import describe
from interp.sampling import SamplingParams
from paw_mlx.engine import Engine, EngineConfig, GenerationRequest, ModelCatalog
from paw_mlx.runtime import load

#: the Mamba2 layers' shapes at recurrent_serve's size (no attention: the states are the whole cache)
MAMBA2 = ("mamba2", dict(hidden_size=512, num_hidden_layers=6, num_heads=16, head_dim=64, expand=2, n_groups=2,
                         state_size=64, conv_kernel=4, chunk_size=64, vocab_size=8192))
MODELS = {**{name: recurrent_serve.MODELS[name] for name in ("lfm2-small", "qwen3_5-small")}, "mamba2-small": MAMBA2}


def run_turn(engine: Engine, model, ids: list[int], tokens: int) -> tuple[float, list[int]]:
    """(seconds to the first token, the generated ids) of one greedy request with EOS banned."""
    ban = {str(t): -100.0 for t in model.base.eos_token_ids}
    got: list[int] = []
    first: list[float] = []
    ended = threading.Event()
    failures: list[str] = []

    def on_event(event) -> None:
        if event.tokens and not first:
            first.append(time.perf_counter())
        got.extend(event.tokens)
        if event.error:
            failures.append(event.error)
        if event.finish_reason is not None:
            ended.set()

    start = time.perf_counter()
    engine.submit(GenerationRequest(model, ids, tokens, SamplingParams.create(logit_bias=ban)), on_event=on_event)
    if not ended.wait(timeout=1800) or failures:
        raise RuntimeError(failures[0] if failures else "a request did not finish")
    return first[0] - start, got


def second_turn_ttft(catalog: ModelCatalog, seed: int, history: int, reply: int, message: int,
                     cache: bool) -> tuple[float, int]:
    """(turn 2's TTFT in seconds, the prompt tokens it took from the cache) on a fresh engine."""
    model = catalog.get("m")
    ids = [(7 * seed + 13 * j) % 4000 + 100 for j in range(history)]
    new = [(11 * seed + 5 * j) % 4000 + 100 for j in range(message)]
    config = EngineConfig(prompt_cache_bytes=EngineConfig.prompt_cache_bytes if cache else 0)
    with Engine(config) as engine:
        _, answer = run_turn(engine, model, ids, reply)
        hits = engine.prompt_cache.hit_tokens
        ttft, _ = run_turn(engine, model, ids + answer + new, 1)
        return ttft, engine.prompt_cache.hit_tokens - hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}")
    parser.add_argument("--history", type=positive_int, default=512, help="turn 1's prompt tokens")
    parser.add_argument("--reply", type=positive_int, default=64, help="turn 1's generated tokens")
    parser.add_argument("--message", type=positive_int, default=32, help="turn 2's new tokens")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--out", type=Path, help="write the table here too")
    options = parser.parse_args()
    sizes = (options.history, options.reply, options.message)
    lines = [f"{platform.machine()}, {describe()}; turn 1: {options.history} prompt + {options.reply} generated "
             f"tokens, turn 2: {options.message} more; best of {options.rounds}",
             "", "| model | turn 2 prompt | cached | TTFT, cache off (s) | TTFT, cache on (s) | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in options.models.split(","):
            catalog = ModelCatalog()
            catalog.add_base(load(recurrent_serve.export(name, Path(tmp), MODELS)), name="m")
            for cache in (False, True):  # warm-up: trace the steps' shapes
                second_turn_ttft(catalog, 0, *sizes, cache)
            best = {False: float("inf"), True: float("inf")}
            cached = 0
            for round_ in range(1, options.rounds + 1):
                for cache in (False, True):
                    ttft, hit = second_turn_ttft(catalog, round_, *sizes, cache)
                    best[cache] = min(best[cache], ttft)
                    cached = hit if cache else cached
            lines.append(f"| {name} | {sum(sizes)} | {cached} | {best[False]:.3f} | {best[True]:.3f} | "
                         f"{best[False] / best[True]:.1f}x |")
            print(lines[-1], flush=True)
    emit_table(lines, options.out)


if __name__ == "__main__":
    main()
