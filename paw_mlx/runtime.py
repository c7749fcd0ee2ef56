"""Loading programs and generating text: the public API behind ``paw run``."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from interp.errors import PawError, ProgramError
from interp.generate import GenerationStats, TokenChoice, generate_choices
from interp.graph import GraphModel
from interp.ops import REGISTRY
from interp.program import Program, read_program
from interp.sampling import SamplingParams
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
    (interp/compiled_step.py; segments, interp/compiled.py, where the whole step cannot
    be); turn it off to measure or debug the plain interpreter.
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
    #: the tokens behind this piece, with log-probabilities when they were asked for
    choices: list[TokenChoice]

    def __new__(cls, text: str, token: int, stats: GenerationStats, finish_reason: str | None = None,
                choices: list[TokenChoice] | None = None):
        obj = super().__new__(cls, text)
        obj.token = token
        obj.stats = stats
        obj.finish_reason = finish_reason
        obj.choices = choices or []
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


def sampling_params(*, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                    logit_bias: Mapping[int | str, float] | None = None, seed: int | None = None,
                    logprobs: int | None = None, vocab_size: int | None = None) -> SamplingParams:
    """Checked ``SamplingParams``; ``logprobs`` is how many alternatives to report (0: the chosen token only)."""
    try:
        params = SamplingParams.create(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                       presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                       repetition_penalty=repetition_penalty, logit_bias=logit_bias, seed=seed,
                                       logprobs=logprobs is not None, top_logprobs=logprobs or 0)
        params.check(vocab_size)
    except ValueError as exc:
        raise PawError(str(exc)) from None
    return params


def stream_choices(prog: LoadedProgram, ids: list[int], *, max_tokens: int = 256, sampling: SamplingParams | None = None,
                   cache: list | None = None, stats: GenerationStats | None = None,
                   stop: threading.Event | None = None) -> Iterator[TokenChoice]:
    """Generated tokens with their log-probabilities (when ``sampling.logprobs``), stopping at EOS or ``max_tokens``."""
    if max_tokens <= 0:
        return
    if not ids:
        raise PawError("the prompt is empty")
    if len(ids) + max_tokens > prog.context_length:
        max_tokens = max(0, prog.context_length - len(ids))
        if max_tokens == 0:
            raise PawError(f"the prompt ({len(ids)} tokens) fills the model's context of {prog.context_length}")
    sampling = sampling or SamplingParams()
    cache = cache if cache is not None else prog.make_cache()
    eos = prog.eos_token_ids
    with prog.lock:
        for choice in generate_choices(prog.model, ids, cache, params=sampling, max_tokens=max_tokens, stats=stats):
            if choice.token in eos:
                break
            yield choice
            if stop is not None and stop.is_set():
                break


def stream_tokens(prog: LoadedProgram, ids: list[int], *, max_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, top_k: int = 0, seed: int | None = None, cache: list | None = None,
                  stats: GenerationStats | None = None, stop: threading.Event | None = None,
                  sampling: SamplingParams | None = None, **controls) -> Iterator[int]:
    """Generated token ids for prompt ``ids``, stopping at EOS (not yielded) or ``max_tokens``.

    Sampling is greedy unless ``temperature`` > 0; ``controls`` are the other settings of
    ``sampling_params`` (``min_p``, ``presence_penalty``, ``frequency_penalty``,
    ``repetition_penalty``, ``logit_bias``); or pass ``sampling`` whole.
    """
    if sampling is None:
        sampling = sampling_params(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                                   vocab_size=_vocab_size(prog), **controls)
    for choice in stream_choices(prog, ids, max_tokens=max_tokens, sampling=sampling, cache=cache, stats=stats,
                                 stop=stop):
        yield choice.token


def stream_generate(prog: LoadedProgram, prompt: str | list[int], *, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                    raw: bool = False, system: str | None = None, cache: list | None = None,
                    stop: threading.Event | None = None, logprobs: int | None = None,
                    **controls) -> Iterator[TextChunk]:
    """Yield text pieces as they decode (each a ``TextChunk``: a str with ``.stats``).

    ``controls`` are the other sampling settings (``min_p``, ``presence_penalty``,
    ``frequency_penalty``, ``repetition_penalty``, ``logit_bias``). With ``logprobs`` (a
    count of alternatives, 0 for none) each chunk's ``.choices`` lists its tokens with their
    log-probabilities.
    """
    ids = prompt_ids(prog, prompt, raw=raw, system=system)
    sampling = sampling_params(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, logprobs=logprobs,
                               vocab_size=_vocab_size(prog), **controls)
    stats = GenerationStats()
    detok = prog.tokenizer.detokenizer()
    last = None
    count = 0
    held: list[TokenChoice] = []
    for choice in stream_choices(prog, ids, max_tokens=max_tokens, sampling=sampling, cache=cache, stats=stats,
                                 stop=stop):
        last = choice.token
        count += 1
        held.append(choice)
        piece = detok.add_token(choice.token)
        if piece:
            yield TextChunk(piece, choice.token, stats, choices=held)
            held = []
    tail = detok.finalize()
    reason = "length" if count >= max_tokens else "stop"
    yield TextChunk(tail, last if last is not None else -1, stats, reason, choices=held)


def _vocab_size(prog: LoadedProgram) -> int | None:
    size = prog.program.model_info.get("vocab_size")
    return int(size) if size else None


def generate(prog: LoadedProgram, prompt: str | list[int], **opts) -> str:
    """The whole generated text for ``prompt`` (greedy by default)."""
    return "".join(stream_generate(prog, prompt, **opts))
