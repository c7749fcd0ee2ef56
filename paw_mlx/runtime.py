"""Loading programs and generating text: the public API behind ``paw run``."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from interp.errors import InputError, PawError, ProgramError, WeightsError, first_line
from interp.generate import GenerationStats, TokenChoice, generate_choices
from interp.graph import GraphModel
from interp.manifest import verify_manifest
from interp.ops import REGISTRY
from interp.program import Program, find_nan, read_program
from interp.sampling import SamplingParams
from interp.token_ids import check_token_ids
from interp.tokenizer import TOKENIZER_FILES, Tokenizer


@dataclass
class LoadedProgram:
    """A program ready to run: the executable model, its tokenizer and its metadata."""

    program: Program
    model: GraphModel
    _tokenizer: Tokenizer | None
    #: serialises generation on this program (the KV caches are per call, MLX is not
    #: re-entrant across threads building graphs on the same stream)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _kv_layout: list | None = field(default=None, repr=False)

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
    def vocab_size(self) -> int | None:
        """Token ids the program takes are 0 .. vocab_size - 1 (None when it does not say)."""
        return self.program.vocab_size

    def check_ids(self, ids, what: str = "token ids") -> list[int]:
        """``ids`` checked against this program's vocabulary (``interp.token_ids``)."""
        return check_token_ids(ids, self.vocab_size, what=what)

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

    def kv_layout(self) -> list[tuple[tuple[int, int], tuple[int, int], mx.Dtype]]:
        """Per KV cache layer: (KV heads, key size), (KV heads, value size) and the cache's dtype.

        Read off a one-token run (once, then kept), so it holds for any architecture; a
        compiled program's prefix must have exactly this layout.
        """
        if self._kv_layout is None:
            cache = self.make_cache()
            with self.lock:  # positions given: the plain interpreter, no decode step compiled for this
                self.model(mx.array([[0]], dtype=mx.int32), cache=cache, positions=mx.array([[0]], dtype=mx.int32))
                mx.eval([c.state for c in cache])
            cache = cache[: self.program.num_layers]  # the KV caches, before any recurrent state
            for i, c in enumerate(cache):
                if c.keys is None:
                    raise ProgramError(f"{self.path}: KV-cache layer {i} is never written by an attention node")
            self._kv_layout = [((c.keys.shape[1], c.keys.shape[3]), (c.values.shape[1], c.values.shape[3]),
                                c.keys.dtype) for c in cache]
        return self._kv_layout


def _arrays(consts: dict) -> list[mx.array]:
    """Every array in the consts, including those inside prepared weights (e.g. ternary layouts)."""
    found = []
    for value in consts.values():
        if isinstance(value, mx.array):
            found.append(value)
        elif hasattr(value, "__dict__"):
            found.extend(v for v in vars(value).values() if isinstance(v, mx.array))
    return found


def load(path: str | Path, *, compile: bool = True, verify: bool = False,  # noqa: A002 - mx.compile's name
         parallel: str = "auto", timeout: float | None = None,
         pipeline_shares: list[float] | None = None) -> LoadedProgram:
    """Load and validate a program directory (or its prog.json) for generation.

    ``compile`` runs each one-token decode step as one mx.compile'd function
    (interp/compiled_step.py); turn it off to measure or debug the plain interpreter. ``verify`` first checks
    every file against its sha256 in manifest.json (reads all the weights once more).

    Started by ``mlx.launch`` (or mpirun) with more than one rank, the program is split
    over the ranks: ``parallel`` is ``auto`` (= ``pipeline``), ``pipeline``, ``tensor``
    or ``none`` (every rank loads the whole program). Rank 0 gets the model; the other
    ranks serve it inside this call and exit when rank 0 is done. ``timeout`` (seconds,
    default $PAW_DIST_TIMEOUT or 60) bounds every wait on another rank;
    ``pipeline_shares`` (``[3, 1]``) gives a rank with more memory more layers.
    """
    from interp import distributed

    if parallel not in distributed.PARALLEL_MODES:
        raise PawError(f"unknown parallel mode {parallel!r}: use one of {', '.join(distributed.PARALLEL_MODES)}")
    if verify:
        checked = read_program(path, known_ops=set(REGISTRY))
        verify_manifest(checked.directory, checked.manifest, checked.defining_files, TOKENIZER_FILES)
    world = distributed.connect(timeout) if parallel != "none" else None
    if parallel in ("pipeline", "tensor") and world is None:
        raise PawError(
            f"parallel={parallel!r} needs several ranks: start paw with mlx.launch (see docs/distributed.md)")
    if world is not None:
        mode = "pipeline" if parallel == "auto" else parallel
        program, model = distributed.load_parallel(path, world, mode, compile=compile, shares=pipeline_shares)
    else:
        program = read_program(path, known_ops=set(REGISTRY))
        model = GraphModel.from_program(program, compile_decode=compile)
        # mx.load's arrays are lazy and tied to the loading thread's stream; evaluating them
        # here lets any thread (a chat worker, a thread pool of function calls) run the model.
        mx.eval(_arrays(model.consts))
        corrupt = find_nan({name: v for name, v in model.consts.items() if isinstance(v, mx.array)})
        if corrupt is not None:
            raise WeightsError(f"{program.directory}: const {corrupt!r} holds NaN values; the weights are corrupted")
    tokenizer = None
    if (program.directory / "tokenizer.json").exists():
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
    """Token ids for a prompt: through the chat template unless ``raw`` or there is none.

    A list of ids is checked against the vocabulary (InputError if one is outside it).
    """
    if not isinstance(prompt, str):
        return prog.check_ids(prompt, "prompt ids")
    if system is not None and not isinstance(system, str):
        raise InputError("the system message must be text")
    tok = prog.tokenizer
    if raw or not tok.has_chat_template:
        ids = tok.encode(prompt, add_special_tokens=True)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    return prog.check_ids(ids, "the tokenized prompt")


def check_generation_options(max_tokens: int | None, temperature: float, top_p: float, top_k: int,
                             seed: int | None) -> None:
    """InputError for an option no sampler can use (NaN, negative, a seed MLX cannot take);
    ``max_tokens`` None: not checked here."""
    def number(value, kind) -> bool:
        return isinstance(value, kind) and not isinstance(value, bool)

    if max_tokens is not None and not number(max_tokens, int):
        raise InputError(f"max_tokens must be an integer, not {max_tokens!r:.40}")
    if not number(temperature, (int, float)) or not 0 <= temperature < float("inf"):
        raise InputError(f"temperature must be a number >= 0, not {temperature!r:.40}")
    if not number(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InputError(f"top-p must be in (0, 1], not {top_p!r:.40}")
    if not number(top_k, int) or top_k < 0:
        raise InputError(f"top-k must be an integer >= 0, not {top_k!r:.40}")
    if seed is not None and not (number(seed, int) and 0 <= seed < 2**64):
        raise InputError(f"the seed must be an integer in [0, 2**64), not {seed!r:.40}")


def sampling_params(*, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                    logit_bias: Mapping[int | str, float] | None = None, seed: int | None = None,
                    logprobs: int | None = None, vocab_size: int | None = None) -> SamplingParams:
    """Checked ``SamplingParams``; ``logprobs`` is how many alternatives to report (0: the chosen token only)."""
    check_generation_options(None, temperature, top_p, top_k, seed)
    try:
        params = SamplingParams.create(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                       presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                       repetition_penalty=repetition_penalty, logit_bias=logit_bias, seed=seed,
                                       logprobs=logprobs is not None, top_logprobs=logprobs or 0)
        params.check(vocab_size)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(first_line(exc)) from None
    return params


def stream_choices(prog: LoadedProgram, ids: list[int], *, max_tokens: int = 256,
                   sampling: SamplingParams | None = None, cache: list | None = None,
                   stats: GenerationStats | None = None, stop: threading.Event | None = None) -> Iterator[TokenChoice]:
    """Generated tokens with their log-probabilities (when ``sampling.logprobs``), stopping at EOS or ``max_tokens``.

    The ids are checked against the vocabulary before anything runs (InputError); an
    error MLX raises while running the program is a ProgramError.
    """
    ids = prog.check_ids(ids, "prompt ids")
    check_generation_options(max_tokens, 0.0, 1.0, 0, None)
    if max_tokens <= 0:
        return
    cached = cache[0].offset if cache else 0
    room = prog.context_length - cached - len(ids)
    if room <= 0:
        raise InputError(f"the prompt ({cached + len(ids)} tokens) fills the model's context of {prog.context_length}")
    max_tokens = min(max_tokens, room)
    sampling = sampling or SamplingParams()
    cache = cache if cache is not None else prog.make_cache()
    eos = prog.eos_token_ids
    with prog.lock:
        steps = generate_choices(prog.model, ids, cache, params=sampling, max_tokens=max_tokens, stats=stats)
        try:
            for choice in steps:
                if choice.token in eos:
                    break
                yield choice
                if stop is not None and stop.is_set():
                    break
        except (RuntimeError, ValueError, MemoryError) as exc:  # MLX's errors while evaluating the graph
            raise ProgramError(f"running {prog.path} failed: {first_line(exc)}") from exc
        finally:
            steps.close()


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
    return prog.vocab_size


def generate(prog: LoadedProgram, prompt: str | list[int], **opts) -> str:
    """The whole generated text for ``prompt`` (greedy by default)."""
    return "".join(stream_generate(prog, prompt, **opts))
