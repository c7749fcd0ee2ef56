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


#: a Hermes-style template (Qwen2.5's structure, shortened): tools in the system turn, calls as
#: <tool_call> blocks with the arguments written by ``tojson`` (so they must be a dict), results
#: in <tool_response>
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools>\nCall one as <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n{{ message.content }}"
    "{% for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def export_hermes(tokenizer, out: Path) -> Path:
    """A tiny random model whose chat template takes tools (``HERMES_TEMPLATE``), with room for
    their descriptions (the tiny tokenizer spells JSON almost a character a token)."""
    from tests.tiny import export_tiny, tiny_llama_config

    export_tiny(tiny_llama_config(max_position_embeddings=2048), out, tokenizer=tokenizer)
    (out / "chat_template.jinja").write_text(HERMES_TEMPLATE, encoding="utf-8")
    return out


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
    reasons by itself (special tokens in ``text`` are read as such). A request's output
    constraint must allow each token (else the reply fails as the engine fails a row: a
    forced reply's script must be one its grammar takes); ``finish_reason`` ends the reply
    ("length": the budget ran out)."""

    def __init__(self, tokenizer, text: str, finish_reason: str = "stop"):
        super().__init__(EngineConfig())
        self.tokens = tokenizer.encode(text, add_special_tokens=False)
        self.finish_reason = finish_reason

    def submit(self, request, on_event=None) -> RequestHandle:
        handle = RequestHandle(request, on_event)

        def reply() -> None:
            for token in self.tokens:
                if request.constraint is not None:
                    if not request.constraint.allowed()[token]:
                        handle.deliver(TokenEvent([], finish_reason="error", error=f"token {token} is not allowed"))
                        return
                    request.constraint.advance(token)
                handle.deliver(TokenEvent([token]))
            handle.deliver(TokenEvent([], finish_reason=self.finish_reason))

        threading.Thread(target=reply, daemon=True).start()
        return handle
