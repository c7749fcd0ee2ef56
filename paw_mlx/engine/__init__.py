"""Continuous batching from Python: many requests, many programs, one base model's batch.

    from paw_mlx.engine import Engine, ModelCatalog
    catalog = ModelCatalog()
    catalog.add_base(paw_mlx.load("smollm2"))
    catalog.add_program("programs/sentiment")
    with Engine() as engine:
        out = complete(engine, catalog.get("sentiment"), "I loved it")
        print(out.text)

``paw serve`` (``apps/serve``) is this engine behind an OpenAI-compatible HTTP API.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from interp.sampling import SamplingParams
from paw_mlx.engine.engine import Engine, EngineConfig
from paw_mlx.engine.models import ModelCatalog, ServedModel, user_texts
from paw_mlx.engine.requests import GenerationRequest, RequestHandle, TokenEvent
from paw_mlx.engine.text import TextStream

__all__ = ["Completion", "Engine", "EngineConfig", "GenerationRequest", "ModelCatalog", "RequestHandle",
           "ServedModel", "TextStream", "TokenEvent", "complete"]


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None


def complete(engine: Engine, model: ServedModel, prompt: str | Sequence[int] | None = None, *,
             messages: Sequence[dict] | None = None, max_tokens: int | None = None,
             sampling: SamplingParams | None = None, stop: Sequence[str] = (), timeout: float | None = 600.0,
             constraint=None) -> Completion:
    """Run one request to the end (blocking): a completion ``prompt`` or chat ``messages``."""
    ids = model.chat_ids(messages) if messages is not None else model.completion_ids(prompt)
    if constraint is None and model.returns is not None:  # a compiled program's own output constraint
        from paw_mlx.constrain import grammar_for

        constraint = grammar_for(model.base, model.returns, lead=model.output_lead).start()
    elif constraint is None and model.copy_rule is not None:  # a compiled program's copy rule, on this input
        constraint = model.copy_constraint(user_texts(messages) if messages is not None else [str(prompt)])
    budget = max_tokens or model.default_max_tokens or 256
    if sampling is None:
        sampling = SamplingParams(temperature=model.default_temperature)
    handle = engine.submit(GenerationRequest(model, ids, budget, sampling, constraint=constraint))
    stream = TextStream(model.base.tokenizer, stop, lead=model.output_lead)
    tokens: list[int] = []
    logprobs: list[float] | None = [] if sampling.logprobs else None
    reason = "stop"
    for event in handle.events(timeout=timeout):
        tokens.extend(event.tokens)
        if logprobs is not None and event.logprobs:
            logprobs.extend(event.logprobs)
        stream.add(event.tokens)
        if stream.stopped:
            handle.cancel()
            reason = "stop"
            break
        if event.finish_reason is not None:
            reason = event.finish_reason
            if event.error:
                from interp.errors import PawError

                raise PawError(event.error)
    stream.finish()
    return Completion(stream.text, tokens, reason, handle.prompt_tokens, handle.cached_tokens, logprobs)
