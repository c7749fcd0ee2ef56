"""Chat and text completions: an API request in, engine requests out, OpenAI's bodies back.

``prepare`` checks everything a request asks for (model, budget, context, sampling,
output format) before anything reaches the engine, so a bad request costs the batch
nothing. ``Generation`` submits one engine request per choice (``n``) and prompt,
gathers their events on the event loop, and turns them into chunks (streamed as
server-sent events) or one body.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from apps.serve.errors import ApiError, from_paw_error
from apps.serve.schemas import (
    MAX_PROMPTS,
    MAX_STOP,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
)
from interp.errors import PawError
from interp.sampling import SamplingParams
from paw_mlx.engine import (
    Engine,
    GenerationRequest,
    RequestHandle,
    ServedModel,
    TextStream,
    TokenEvent,
)
from paw_mlx.engine.text import TokenText

#: how often a request waiting for its answer checks that its client is still there
DISCONNECT_POLL_S = 0.25


@dataclass
class Prepared:
    """A checked request: what to submit to the engine for every choice."""

    model: ServedModel
    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt
    sampling: SamplingParams
    n: int
    stop: list[str]
    logprobs: int | None  # alternatives per token; None: no log-probabilities
    make_constraint: Callable[[], Any] | None = None
    echo: list[str] | None = None  # completions with echo: the prompt texts

    def requests(self) -> list[tuple[int, GenerationRequest]]:
        """(prompt index, request) for every choice, prompt-major as OpenAI numbers choices."""
        out = []
        for p, ids in enumerate(self.prompts):
            for c in range(self.n):
                sampling = self.sampling
                if sampling.seed is not None and c:
                    sampling = _replace_seed(sampling, sampling.seed + c)
                constraint = self.make_constraint() if self.make_constraint is not None else None
                out.append((p, GenerationRequest(self.model, ids, self.max_tokens[p], sampling, constraint)))
        return out


def _replace_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed % (1 << 64))


# ---------------------------------------------------------------------- checking


def prepare(body: ChatCompletionRequest | CompletionRequest, model: ServedModel, max_tokens_cap: int) -> Prepared:
    """Everything checked and tokenized; raises ``ApiError`` (4xx) for what cannot be served."""
    chat = isinstance(body, ChatCompletionRequest)
    if chat and (body.tools or body.functions):
        raise ApiError(400, "tools and functions are not supported by this server", param="tools")
    if not chat:
        if body.suffix:
            raise ApiError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise ApiError(400, "best_of is not supported by this server (only best_of = n)", param="best_of")
        if body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported (no prompt log-probabilities)", param="echo")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    try:
        if chat:
            prompts = [model.chat_ids([m.model_dump(exclude_none=True) for m in body.messages])]
            texts = None
        else:
            prompts, texts = _completion_prompts(model, body.prompt)
    except PawError as exc:
        raise from_paw_error(exc) from None
    requested = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    if requested is not None and requested > max_tokens_cap:
        raise ApiError(400, f"max_tokens is {requested}; this server allows at most {max_tokens_cap} "
                       "(paw serve --max-tokens)", param="max_tokens")
    budgets = []
    context = model.context_length
    for ids in prompts:
        room = context - len(ids)
        if room <= 0:
            raise ApiError(400, f"this model's context is {context} tokens and the prompt has {len(ids)}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if requested is not None and requested > room:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {len(ids)} and "
                           f"max_tokens asks for {requested} more", param="max_tokens",
                           code="context_length_exceeded")
        default = min(max_tokens_cap, room, model.default_max_tokens or room)
        budgets.append(requested or default)
    logprobs = (body.top_logprobs or 0 if body.logprobs else None) if chat else body.logprobs
    if chat and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    sampling = _sampling(body, model, logprobs)
    return Prepared(model, prompts, budgets, sampling, body.n or 1, stop, logprobs,
                    make_constraint=_constraint(body.response_format, model),
                    echo=texts if (not chat and body.echo) else None)


def _completion_prompts(model: ServedModel, prompt: Any) -> tuple[list[list[int]], list[str]]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise ApiError(400, "prompt is empty", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request, got {len(items)}", param="prompt")
    ids = [model.completion_ids(item) for item in items]
    if any(not i for i in ids):
        raise ApiError(400, "a prompt is empty", param="prompt")
    texts = [item if isinstance(item, str) else model.base.tokenizer.decode(item) for item in items]
    return ids, texts


def _sampling(body, model: ServedModel, logprobs: int | None) -> SamplingParams:
    temperature = body.temperature if body.temperature is not None else model.default_temperature
    settings = dict(temperature=temperature, top_p=body.top_p if body.top_p is not None else 1.0,
                    top_k=body.top_k or 0, min_p=body.min_p or 0.0, presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
                    seed=body.seed, logprobs=logprobs is not None, top_logprobs=logprobs or 0)
    vocab = int(model.base.program.model_info.get("vocab_size") or 0) or None
    try:
        params = SamplingParams.create(logit_bias=body.logit_bias, **settings)
        params.check(vocab)
    except ValueError as exc:
        message = str(exc)
        param = "logit_bias" if "logit_bias" in message else None
        raise ApiError(400, message, param=param) from None
    return params


def _constraint(response_format: ResponseFormat | None, model: ServedModel) -> Callable[[], Any] | None:
    """A factory of per-row constraints for ``response_format``, else the program's stored ``returns``."""
    spec = None
    if response_format is not None and response_format.type == "json_object":
        spec = {"json_object": True}
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a 'json_schema' object", param="response_format")
        spec = {"json_schema": response_format.json_schema.schema_}
    elif response_format is None or response_format.type == "text":
        spec = model.returns
    if spec is None:
        return None
    try:
        grammar = _grammar(model, json.dumps(spec, sort_keys=True))
    except PawError as exc:
        raise ApiError(400, f"response_format: {exc}", param="response_format") from None
    return grammar.start


@functools.lru_cache(maxsize=256)
def _grammar(model: ServedModel, spec: str):
    """A compiled output constraint, once per model and spec (requests repeat their schemas)."""
    from paw_mlx.constrain import grammar_for

    return grammar_for(model.base, json.loads(spec))


# ---------------------------------------------------------------------- running


@dataclass
class Choice:
    """One choice's progress: its text stream, tokens and log-probabilities."""

    index: int
    prompt: int
    stream: TextStream
    handle: RequestHandle | None = None
    tokens: list[int] = field(default_factory=list)
    #: (token, log-probability, alternatives, offset of its text in the output)
    logprobs: list[tuple[int, float, list[tuple[int, float]], int]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    sent: int = 0  # log-probability entries already streamed

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Generation:
    """The engine requests of one API request, with their events on the event loop."""

    def __init__(self, engine: Engine, prepared: Prepared, model_name: str, kind: str):
        self.engine, self.prepared, self.kind = engine, prepared, kind
        self.model_name = model_name
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.fingerprint = f"paw-{prepared.model.base.fingerprint[:12]}"
        self.tokenizer = prepared.model.base.tokenizer
        self.token_text = TokenText(self.tokenizer)
        self.events: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()
        self.choices: list[Choice] = []
        self.include_usage = False  # stream_options.include_usage: a last chunk with the usage

    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for index, (prompt, request) in enumerate(self.prepared.requests()):
                choice = Choice(index, prompt, TextStream(self.tokenizer, self.prepared.stop))
                self.choices.append(choice)

                def deliver(event: TokenEvent, index: int = index) -> None:
                    loop.call_soon_threadsafe(self.events.put_nowait, (index, event))

                choice.handle = self.engine.submit(request, on_event=deliver)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for choice in self.choices:
            if choice.handle is not None and not choice.done:
                choice.handle.cancel()

    async def next_update(self) -> tuple[Choice, str, int]:
        """Wait for an event; returns its choice, the new text and how many tokens it brought."""
        index, event = await self.events.get()
        choice = self.choices[index]
        if choice.done:  # events after a stop string cut the choice short
            return choice, "", 0
        choice.tokens.extend(event.tokens)
        if event.logprobs is not None:
            tops = event.top or [[] for _ in event.tokens]
            offset = len(choice.stream.text)  # where this token's text starts (as far as it shows)
            for token, lp, top in zip(event.tokens, event.logprobs, tops, strict=True):
                choice.logprobs.append((token, lp, top, offset))
        text = choice.stream.add(event.tokens)
        if choice.stream.stopped:
            choice.finish_reason = "stop"
            choice.handle.cancel()
        elif event.finish_reason is not None:
            text += choice.stream.finish()
            choice.finish_reason = event.finish_reason
            choice.error = event.error
        return choice, text, len(event.tokens)

    def failure(self) -> ApiError | None:
        """The error to report if a choice ended without an answer (timeout, engine failure)."""
        for choice in self.choices:
            if choice.finish_reason == "timeout":
                return ApiError(504, f"the request ran past the server's timeout of {self.engine.config.timeout:g} s "
                                "(paw serve --timeout)", code="request_timeout")
            if choice.finish_reason == "error":
                return ApiError(500, f"generation failed: {choice.error or 'unknown error'}", code="engine_error")
        return None

    # ------------------------------------------------------------------ bodies

    def usage(self) -> dict:
        prompt = sum(len(self.prepared.prompts[c.prompt]) for c in self.choices if c.index % self.prepared.n == 0)
        cached = sum(c.handle.cached_tokens for c in self.choices if c.handle is not None
                     and c.index % self.prepared.n == 0)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def finish_reason(self, choice: Choice) -> str:
        return choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"

    def _token_entry(self, token: int, lp: float) -> dict:
        raw = self.token_text.bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

    def chat_logprobs(self, entries: list) -> dict | None:
        if self.prepared.logprobs is None:
            return None
        content = []
        for token, lp, top, _ in entries:
            item = self._token_entry(token, lp)
            item["top_logprobs"] = [self._token_entry(t, v) for t, v in top]
            content.append(item)
        return {"content": content, "refusal": None}

    def completion_logprobs(self, entries: list, echo: int) -> dict | None:
        """The legacy completions form; ``echo`` is the length of echoed prompt text before the output."""
        if self.prepared.logprobs is None:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for token, lp, top, offset in entries:
            tokens.append(self.token_text.text(token))
            values.append(lp)
            tops.append({self.token_text.text(t): v for t, v in top} if self.prepared.logprobs else None)
            offsets.append(echo + offset)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def body(self) -> dict:
        """The whole (non-streamed) response."""
        choices = []
        for choice in self.choices:
            text = choice.stream.text
            if self.kind == "chat":
                choices.append({"index": choice.index, "message": {"role": "assistant", "content": text,
                                                                   "refusal": None},
                                "logprobs": self.chat_logprobs(choice.logprobs),
                                "finish_reason": self.finish_reason(choice)})
            else:
                echo = self.prepared.echo[choice.prompt] if self.prepared.echo else ""
                logprobs = self.completion_logprobs(choice.logprobs, len(echo))
                choices.append({"index": choice.index, "text": echo + text, "logprobs": logprobs,
                                "finish_reason": self.finish_reason(choice)})
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model_name, "system_fingerprint": self.fingerprint,
                "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model_name, "system_fingerprint": self.fingerprint,
                "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return sse(body)


def sse(body: dict | str) -> str:
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def run_to_end(generation: Generation, disconnected: Callable[[], Any]) -> dict:
    """Gather every choice; returns the response body. A client that leaves cancels the rows."""
    try:
        while not all(c.done for c in generation.choices):
            try:
                await asyncio.wait_for(generation.next_update(), DISCONNECT_POLL_S)
            except TimeoutError:
                if await disconnected():
                    generation.cancel()
                    raise ApiError(499, "the client disconnected") from None
        failure = generation.failure()
        if failure is not None:
            raise failure
        return generation.body()
    finally:
        generation.cancel()


async def stream_events(generation: Generation) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, finish reasons, usage, then [DONE]."""
    chat = generation.kind == "chat"
    echoed = {c.index: len(generation.prepared.echo[c.prompt]) if generation.prepared.echo else 0
              for c in generation.choices}
    try:
        if chat:
            yield generation.chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": None, "finish_reason": None} for c in generation.choices])
        elif generation.prepared.echo:
            yield generation.chunk([{"index": c.index, "text": generation.prepared.echo[c.prompt], "logprobs": None,
                                     "finish_reason": None} for c in generation.choices])
        while not all(c.done for c in generation.choices):
            choice, text, _ = await generation.next_update()
            fresh, choice.sent = choice.logprobs[choice.sent:], len(choice.logprobs)
            if choice.done and choice.finish_reason in ("timeout", "error"):
                failure = generation.failure()
                yield sse(failure.body())
                break
            if text or fresh:
                if chat:
                    piece = {"index": choice.index, "delta": {"content": text},
                             "logprobs": generation.chat_logprobs(fresh), "finish_reason": None}
                else:
                    logprobs = generation.completion_logprobs(fresh, echoed[choice.index])
                    piece = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": None}
                yield generation.chunk([piece])
            if choice.done:
                reason = generation.finish_reason(choice)
                if chat:
                    yield generation.chunk([{"index": choice.index, "delta": {}, "logprobs": None,
                                             "finish_reason": reason}])
                else:
                    yield generation.chunk([{"index": choice.index, "text": "", "logprobs": None,
                                             "finish_reason": reason}])
        else:
            if generation.include_usage:
                yield generation.chunk([], usage=generation.usage())
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()
