"""Run a checked request on the engine and answer in OpenAI's shapes.

``Generation`` submits one engine request per choice (``n``) and prompt, gathers their
events on the event loop, and turns them into chunks (streamed as server-sent events) or
one body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from apps.serve import legacy
from apps.serve.errors import ApiError
from apps.serve.prepare import Prepared
from apps.serve.reply import ReplyReader, reply_message
from paw_mlx.constrain import CONSTRAINT_FAILED
from paw_mlx.engine import Engine, GenerationRequest, RequestHandle, TextStream, TokenEvent
from paw_mlx.engine.text import TokenText

#: how often a request waiting for its answer checks that its client is still there
DISCONNECT_POLL_S = 0.25
#: engine finish reasons that are not an answer: the request fails (``Generation.failure``)
FAILED = ("timeout", "error", "cancelled")


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
    reader: ReplyReader | None = None  # chat: the streamed text read for reasoning and calls

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

    def submit(self, requests: list[tuple[int, GenerationRequest]]) -> None:
        """Submit ``requests`` (``Prepared.requests()``, built off the event loop: an output
        constraint compiles its grammar per row)."""
        loop = asyncio.get_running_loop()
        try:
            for index, (prompt, request) in enumerate(requests):
                reply = self.prepared.reply
                choice = Choice(index, prompt, TextStream(self.tokenizer, self.prepared.stop,
                                                          reply.keep if reply else None,
                                                          lead=self.prepared.model.output_lead))
                if reply is not None:
                    choice.reader = reply.reader()
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
            offset = choice.stream.position  # where this token's text starts, held-back text counted
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
                # the same request would run as long again: the openai client retries a 504 unless told not to
                return ApiError(504, f"the request ran past the server's timeout of {self.engine.config.timeout:g} s "
                                "(paw serve --timeout)", code="request_timeout", headers={"x-should-retry": "false"})
            if choice.finish_reason == "error" and (choice.error or "").startswith(CONSTRAINT_FAILED):
                forced = self.prepared.tools is not None and self.prepared.tools.grammar is not None
                param = "tools" if forced else "response_format"  # whose grammar gave up
                param = legacy.FIELDS.get(param, param) if self.prepared.legacy else param
                return ApiError(400, f"{param}: {choice.error}", param=param)
            if choice.finish_reason == "error":
                return ApiError(500, f"generation failed: {choice.error or 'unknown error'}", code="engine_error")
            if choice.finish_reason == "cancelled":  # by the engine (a shutdown): ours end a choice as "stop" first
                return ApiError(503, f"generation stopped: {choice.error or 'cancelled by the server'}",
                                code="server_unavailable")
        return None

    # ------------------------------------------------------------------ bodies

    def call_cut_short(self, choice: Choice, calls: bool) -> ApiError | None:
        """The error for a forced call that the token budget ended before any call was whole
        (gpt-oss may spend it on its analysis first): a reply without the call it was forced to
        make would read as an answer."""
        forced = self.prepared.tools is not None and self.prepared.tools.grammar is not None
        if not forced or calls or choice.finish_reason != "length":
            return None
        field = self.prepared.budget_field
        return ApiError(400, f"{field}: the reply used its {len(choice.tokens)} tokens before the forced tool call "
                        f"was complete; raise {field}", param=field)

    def usage(self) -> dict:
        prompt = sum(len(self.prepared.prompts[c.prompt]) for c in self.choices if c.index % self.prepared.n == 0)
        cached = sum(c.handle.cached_tokens for c in self.choices if c.handle is not None
                     and c.index % self.prepared.n == 0)
        completion = sum(len(c.tokens) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def finish_reason(self, choice: Choice, calls: bool = False) -> str:
        """OpenAI's finish reason; ``calls``: the reply called tools (and was not cut short)."""
        if choice.finish_reason == "length":
            return "length"
        if not calls:
            return "stop"
        return legacy.FINISH_REASON if self.prepared.legacy else "tool_calls"

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
            tops.append(self._by_text(top) if self.prepared.logprobs else None)
            offsets.append(echo + offset)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _by_text(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Alternatives keyed by their text, best first; tokens that read the same (byte pieces of
        one character all read U+FFFD) keep the best one's log-probability, not the last's."""
        alternatives: dict[str, float] = {}
        for token, lp in sorted(top, key=lambda item: -item[1]):
            alternatives.setdefault(self.token_text.text(token), lp)
        return alternatives

    def body(self) -> dict:
        """The whole (non-streamed) response."""
        choices = []
        for choice in self.choices:
            text = choice.stream.text
            if self.kind == "chat":
                message, calls = reply_message(self.prepared.reply, text)
                if (cut := self.call_cut_short(choice, calls)) is not None:
                    raise cut
                if self.prepared.legacy:
                    message = legacy.legacy_message(message)
                choices.append({"index": choice.index, "message": message,
                                "logprobs": self.chat_logprobs(choice.logprobs),
                                "finish_reason": self.finish_reason(choice, calls)})
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
        return await asyncio.to_thread(generation.body)  # n x tokens x top_logprobs entries: off the event loop
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
            if choice.done and choice.finish_reason in FAILED:
                failure = generation.failure()
                yield sse(failure.body())
                break
            calls: list[dict] = []
            reasoning = ""
            if choice.reader is not None:
                parts = choice.reader.add(text)
                if choice.done:
                    rest, calls = choice.reader.finish()
                    parts += rest
                text, reasoning = parts.content, parts.reasoning
                if choice.done and (cut := generation.call_cut_short(choice, bool(calls))) is not None:
                    yield sse(cut.body())
                    break
            if text or reasoning or fresh:
                if chat:
                    delta = {"reasoning_content": reasoning, "content": text} if reasoning else {"content": text}
                    piece = {"index": choice.index, "delta": delta,
                             "logprobs": generation.chat_logprobs(fresh), "finish_reason": None}
                else:
                    logprobs = generation.completion_logprobs(fresh, echoed[choice.index])
                    piece = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": None}
                yield generation.chunk([piece])
            deltas = legacy.legacy_deltas if generation.prepared.legacy else call_deltas
            for piece in deltas(choice.index, calls):
                yield generation.chunk([piece])
            if choice.done:
                reason = generation.finish_reason(choice, bool(calls))
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


def call_deltas(index: int, calls: list[dict]) -> list[dict]:
    """Streamed choices for a reply's tool calls, as OpenAI sends them: per call, one delta with
    its index, id, type and name (arguments empty), then one with its arguments."""
    pieces = []
    for at, call in enumerate(calls):
        head = {"index": at, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        body = {"index": at, "function": {"arguments": call["function"]["arguments"]}}
        pieces += [{"index": index, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None}
                   for delta in (head, body)]
    return pieces
