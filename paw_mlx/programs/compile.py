"""Compile a natural-language spec into a program: the KV prefix of the spec on a base model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx

from interp.errors import PawError
from interp.tokenizer import Tokenizer
from paw_mlx.programs.artifact import (
    GenerationSettings,
    ProgramArtifact,
    PromptLayout,
    write_artifact,
)
from paw_mlx.programs.interpreter import DEFAULT_BASE, interpreter, resolve_base
from paw_mlx.runtime import LoadedProgram

_INPUT_MARK = "\u2063PAW-INPUT\u2063"  # invisible separator: never in a real spec or input
RAW_PREFIX_SEP = "\n\nInput: "
RAW_SUFFIX = "\nOutput:"


def prompt_layout(tokenizer: Tokenizer, spec: str) -> PromptLayout:
    """Split the chat-templated prompt around the input: the spec is the system message."""
    if not tokenizer.has_chat_template:
        return PromptLayout("raw", spec + RAW_PREFIX_SEP, RAW_SUFFIX)
    text = tokenizer.apply_chat_template([{"role": "system", "content": spec},
                                          {"role": "user", "content": _INPUT_MARK}])
    if text.count(_INPUT_MARK) != 1:
        raise PawError("the base model's chat template does not place the user message once")
    before, after = text.split(_INPUT_MARK)
    return PromptLayout("chat", before, after)


def layout_prefix_ids(tokenizer: Tokenizer, layout: PromptLayout) -> list[int]:
    # The chat template carries its own special tokens; raw prompts get the tokenizer's BOS.
    return tokenizer.encode(layout.prefix_text, add_special_tokens=layout.kind == "raw")


def input_ids(tokenizer: Tokenizer, layout: PromptLayout, text: str) -> list[int]:
    """The ids a call appends after the prefix: the input and the fixed suffix after it."""
    return tokenizer.encode(text + layout.suffix_text, add_special_tokens=False)


def compute_prefix(prog: LoadedProgram, ids: list[int]) -> list[tuple[mx.array, mx.array]]:
    """Run the base model over ``ids`` once and keep every layer's keys and values."""
    if not ids:
        raise PawError("the program's prefix is empty")
    cache = prog.make_cache()
    with prog.lock:
        prog.model(mx.array([ids], dtype=mx.int32), cache=cache)
        states = [c.state for c in cache]
        mx.eval(states)
    return [(mx.array(k), mx.array(v)) for k, v in states]


def read_spec(spec: str) -> str:
    """A spec given as text, or as @path to a text file."""
    if spec.startswith("@"):
        path = Path(spec[1:])
        if not path.is_file():
            raise PawError(f"no such spec file: {path}")
        spec = path.read_text(encoding="utf-8")
    spec = spec.strip()
    if not spec:
        raise PawError("the spec is empty")
    return spec


def compile(spec: str, base: str | Path = DEFAULT_BASE, out_dir: str | Path | None = None, *,
            examples: Sequence[dict] | str | Path | None = None, max_new_tokens: int = 64,
            force: bool = False, tune_options: dict | None = None,
            progress: Callable[[int, int, float], None] | None = None, returns=None) -> ProgramArtifact:
    """Compile ``spec`` into a program for ``base``; with ``examples``, tune its prefix on them.

    ``returns`` (choices, a regex or a JSON schema; ``paw_mlx.constrain``) is checked and
    stored with the program, so every call enforces it. Returns the artifact and, when
    ``out_dir`` is given, writes it there atomically.
    """
    spec = read_spec(spec)
    base_path = resolve_base(base)
    prog = interpreter(base_path)
    if returns is not None:
        from paw_mlx.constrain import grammar_for

        returns = grammar_for(prog, returns).spec  # checked against the tokenizer before any work
    layout = prompt_layout(prog.tokenizer, spec)
    ids = layout_prefix_ids(prog.tokenizer, layout)
    artifact = ProgramArtifact(spec=spec, base_fingerprint=prog.fingerprint, base_hint=str(base_path),
                               layout=layout, prefix_ids=ids, prefix=compute_prefix(prog, ids),
                               generation=GenerationSettings(max_new_tokens=max_new_tokens), returns=returns)
    if examples is not None:
        from paw_mlx.programs.tune import load_examples, tune

        rows = load_examples(examples) if isinstance(examples, str | Path) else list(examples)
        artifact = tune(artifact, prog, rows, progress=progress, **(tune_options or {}))
    if out_dir is not None:
        write_artifact(artifact, out_dir, force=force)
    return artifact
