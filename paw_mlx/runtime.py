"""Loading programs and generating text: the public API behind ``paw run``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from interp.errors import PawError, ProgramError
from interp.generate import GenerationStats, generate_step
from interp.graph import GraphModel
from interp.ops import REGISTRY
from interp.program import Program, read_program
from interp.sampling import make_sampler
from interp.tokenizer import Tokenizer


@dataclass
class LoadedProgram:
    """A program ready to run: the executable model, its tokenizer and its metadata."""

    program: Program
    model: GraphModel
    _tokenizer: Tokenizer | None
    #: serialises generation on this program (the KV caches are per call, MLX is not
    #: re-entrant across threads building graphs on the same stream)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def path(self) -> Path:
        return self.program.directory

    @property
    def name(self) -> str:
        source = self.program.model_info.get("source", {})
        return source.get("id") or source.get("file") or self.program.directory.name

    @property
    def fingerprint(self) -> str:
        return self.program.fingerprint

    @property
    def context_length(self) -> int:
        return int(self.program.model_info.get("context_length", 2048))

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise ProgramError(f"{self.path} has no tokenizer.json: only token ids can be used with it")
        return self._tokenizer

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.program.model_info.get("eos_token_ids", []))
        if self._tokenizer is not None:
            ids |= set(self._tokenizer.eos_token_ids)
        return ids

    def make_cache(self) -> list:
        return self.model.make_cache()


def _arrays(consts: dict) -> list[mx.array]:
    """Every array in the consts, including those inside prepared weights (e.g. ternary layouts)."""
    found = []
    for value in consts.values():
        if isinstance(value, mx.array):
            found.append(value)
        elif hasattr(value, "__dict__"):
            found.extend(v for v in vars(value).values() if isinstance(v, mx.array))
    return found


def load(path: str | Path, *, compile: bool = True) -> LoadedProgram:  # noqa: A002 - mx.compile's name
    """Load and validate a program directory (or its prog.json) for generation.

    ``compile`` runs each one-token decode step as one mx.compile'd function
    (interp/compiled_step.py); turn it off to measure or debug the plain interpreter.
    """
    program = read_program(path, known_ops=set(REGISTRY))
    model = GraphModel.from_program(program, compile_decode=compile)
    # mx.load's arrays are lazy and tied to the loading thread's stream; evaluating them
    # here lets any thread (a chat worker, a thread pool of function calls) run the model.
    mx.eval(_arrays(model.consts))
    tokenizer = None
    if (program.directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer(program.directory, eos_token_ids=program.model_info.get("eos_token_ids", []))
    return LoadedProgram(program=program, model=model, _tokenizer=tokenizer)


class TextChunk(str):
    """A piece of generated text (a ``str``) that also carries the run's statistics."""

    token: int
    stats: GenerationStats
    finish_reason: str | None

    def __new__(cls, text: str, token: int, stats: GenerationStats, finish_reason: str | None = None):
        obj = super().__new__(cls, text)
        obj.token = token
        obj.stats = stats
        obj.finish_reason = finish_reason
        return obj


def prompt_ids(prog: LoadedProgram, prompt: str | list[int], *, raw: bool = False,
               system: str | None = None) -> list[int]:
    """Token ids for a prompt: through the chat template unless ``raw`` or there is none."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    tok = prog.tokenizer
    if raw or not tok.has_chat_template:
        return tok.encode(prompt, add_special_tokens=True)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tok.encode_chat(messages)


def stream_tokens(prog: LoadedProgram, ids: list[int], *, max_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None, cache: list | None = None,
                  stats: GenerationStats | None = None, stop: threading.Event | None = None) -> Iterator[int]:
    """Generated token ids for prompt ``ids``, stopping at EOS (not yielded) or ``max_tokens``."""
    if max_tokens <= 0:
        return
    if len(ids) + max_tokens > prog.context_length:
        max_tokens = max(0, prog.context_length - len(ids))
        if max_tokens == 0:
            raise PawError(f"the prompt ({len(ids)} tokens) fills the model's context of {prog.context_length}")
    try:
        sampler = make_sampler(temperature, top_p, top_k)
    except ValueError as exc:
        raise PawError(str(exc)) from None
    if seed is not None:
        mx.random.seed(seed)
    cache = cache if cache is not None else prog.make_cache()
    eos = prog.eos_token_ids
    with prog.lock:
        for token in generate_step(prog.model, ids, cache, sampler=sampler, max_tokens=max_tokens, stats=stats):
            if token in eos:
                break
            yield token
            if stop is not None and stop.is_set():
                break


def stream_generate(prog: LoadedProgram, prompt: str | list[int], *, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                    raw: bool = False, system: str | None = None, cache: list | None = None,
                    stop: threading.Event | None = None) -> Iterator[TextChunk]:
    """Yield text pieces as they decode (each a ``TextChunk``: a str with ``.stats``)."""
    ids = prompt_ids(prog, prompt, raw=raw, system=system)
    stats = GenerationStats()
    detok = prog.tokenizer.detokenizer()
    last = None
    count = 0
    for token in stream_tokens(prog, ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, seed=seed, cache=cache, stats=stats, stop=stop):
        last = token
        count += 1
        piece = detok.add_token(token)
        if piece:
            yield TextChunk(piece, token, stats)
    tail = detok.finalize()
    reason = "length" if count >= max_tokens else "stop"
    yield TextChunk(tail, last if last is not None else -1, stats, reason)


def generate(prog: LoadedProgram, prompt: str | list[int], **opts) -> str:
    """The whole generated text for ``prompt`` (greedy by default)."""
    return "".join(stream_generate(prog, prompt, **opts))
