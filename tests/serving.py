"""Helpers the engine and server tests share: compiled programs on the tiny model, references."""

from __future__ import annotations

import threading
from pathlib import Path

import paw_mlx
from paw_mlx.engine import Engine, EngineConfig, ModelCatalog, RequestHandle, TokenEvent
from tests.paw_mlx.test_programs import one_prompt_greedy as greedy_alone  # noqa: F401 - shared here

SPECS = {
    "options": "Parse the options into a JSON list. (A) cat (B) dog",
    "sentiment": "Label the sentiment: positive negative neutral",
    "dates": "Normalise the date. 2024-01-05 is a date.",
    "capital": "Name the capital. The capital of France is Paris.",
}
INPUTS = ["(A) cat (B) dog (C) bird", "Hello, how are you today?", "2024-01-05", "Numbers like 3, 14 and 159",
          "def f(x): return x + 1", "positive negative", "The capital of France", "user assistant"]


def compile_programs(base: Path, root: Path, max_new_tokens: int = 12) -> dict[str, Path]:
    """The SPECS compiled on ``base`` into ``root/NAME``."""
    out = {}
    for name, spec in SPECS.items():
        out[name] = root / name
        if not out[name].exists():
            paw_mlx.compile(spec, base=base, out_dir=out[name], max_new_tokens=max_new_tokens)
    return out


def make_catalog(base, programs: dict[str, Path]) -> ModelCatalog:
    """The tiny base model served as "tiny", with every compiled program under its name."""
    catalog = ModelCatalog()
    catalog.add_base(base, name="tiny")
    for name, path in programs.items():
        catalog.add_program(path, name=name)
    return catalog


class ScriptedEngine(Engine):
    """An engine whose every reply is ``text``, a token an event: a model that calls tools or
    reasons by itself (special tokens in ``text`` are read as such)."""

    def __init__(self, tokenizer, text: str):
        super().__init__(EngineConfig())
        self.tokens = tokenizer.encode(text, add_special_tokens=False)

    def submit(self, request, on_event=None) -> RequestHandle:
        handle = RequestHandle(request, on_event)

        def reply() -> None:
            for token in self.tokens:
                handle.deliver(TokenEvent([token]))
            handle.deliver(TokenEvent([], finish_reason="stop"))

        threading.Thread(target=reply, daemon=True).start()
        return handle
