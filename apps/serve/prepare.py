"""Check a chat or text completion request and turn it into engine requests, before any work.

Everything a request asks for (model, budget, context, sampling, output format) is checked
here, so a bad request is a 400 that never reaches the batch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from apps.serve.errors import ApiError, from_paw_error
from apps.serve.legacy import fields_as_sent, modernize
from apps.serve.reply import ReplyPlan, plan_reply
from apps.serve.schemas import (
    MAX_PROMPTS,
    MAX_STOP,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseFormat,
)
from apps.serve.tools import ToolPlan, plan_tools
from interp.errors import PawError
from interp.sampling import SamplingParams
from interp.tokenizer import TEMPLATE_RESERVED
from paw_mlx.engine import GenerationRequest, ServedModel
from paw_mlx.engine.models import user_texts


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
    tools: ToolPlan | None = None  # chat with tools: how the reply's calls are read
    reply: ReplyPlan | None = None  # chat: how the reply is read (reasoning, calls)
    legacy: bool = False  # chat with the deprecated functions: a call is answered as function_call
    budget_field: str = "max_tokens"  # the field that set max_tokens (max_completion_tokens when sent)
    #: each prompt's input texts, where a compiled program's copy rule holds its output to their words
    copy_inputs: list[list[str]] | None = None

    def requests(self) -> list[tuple[int, GenerationRequest]]:
        """(prompt index, request) for every choice, prompt-major as OpenAI numbers choices."""
        out = []
        for p, ids in enumerate(self.prompts):
            for c in range(self.n):
                sampling = self.sampling
                if sampling.seed is not None and c:
                    sampling = _replace_seed(sampling, sampling.seed + c)
                constraint = self.make_constraint() if self.make_constraint is not None else None
                if constraint is None and self.copy_inputs is not None:
                    constraint = self.model.copy_constraint(self.copy_inputs[p])
                out.append((p, GenerationRequest(self.model, ids, self.max_tokens[p], sampling, constraint)))
        return out


def _replace_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return replace(params, seed=seed % (1 << 64))


def prepare(body: ChatCompletionRequest | CompletionRequest, model: ServedModel, max_tokens_cap: int) -> Prepared:
    """Everything checked and tokenized; raises ``ApiError`` (4xx) for what cannot be served."""
    if isinstance(body, ChatCompletionRequest):
        _refuse_audio(body)
        body, legacy = modernize(body)
        if legacy:
            with fields_as_sent():  # a refusal names functions, not the tools they became
                return _prepare(body, model, max_tokens_cap, legacy=True)
    return _prepare(body, model, max_tokens_cap)


def _prepare(body: ChatCompletionRequest | CompletionRequest, model: ServedModel, max_tokens_cap: int,
             legacy: bool = False) -> Prepared:
    chat = isinstance(body, ChatCompletionRequest)
    tools = None
    if chat:
        tools = plan_tools(body, model)
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
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            prompts = [model.chat_ids(messages, tools=tools.tools if tools else None,
                                      variables=_template_variables(body))]
            texts = None
        else:
            prompts, texts = _completion_prompts(model, body.prompt)
    except PawError as exc:
        raise from_paw_error(exc) from None
    budget = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"  # the field sent
    requested = getattr(body, budget)
    if requested is not None and requested > max_tokens_cap:
        raise ApiError(400, f"{budget} is {requested}; this server allows at most {max_tokens_cap} "
                       "(paw serve --max-tokens)", param=budget)
    budgets = []
    context = model.context_length
    for ids in prompts:
        room = context - len(ids)
        if room <= 0:
            raise ApiError(400, f"this model's context is {context} tokens and the prompt has {len(ids)}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        if requested is not None and requested > room:
            raise ApiError(400, f"this model's context is {context} tokens; the prompt has {len(ids)} and "
                           f"{budget} asks for {requested} more", param=budget,
                           code="context_length_exceeded")
        default = min(max_tokens_cap, room, model.default_max_tokens or room)
        budgets.append(requested or default)
    logprobs = (body.top_logprobs or 0 if body.logprobs else None) if chat else body.logprobs
    if chat and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    sampling = _sampling(body, model, logprobs)
    forced = {"lark": tools.grammar} if tools is not None and tools.grammar else None
    make_constraint = _constraint(body.response_format, model, forced)
    copy_inputs = None
    if make_constraint is None and model.copy_rule is not None:
        copy_inputs = [user_texts(messages)] if chat else [[t] for t in texts]
    reply = plan_reply(tools, model.base.tokenizer, prompts[0], make_constraint is not None) if chat else None
    return Prepared(model, prompts, budgets, sampling, body.n or 1, stop, logprobs, make_constraint=make_constraint,
                    echo=texts if (not chat and body.echo) else None, tools=tools, reply=reply,
                    legacy=legacy, budget_field=budget, copy_inputs=copy_inputs)


def _template_variables(body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The chat template's extra variables: ``chat_template_kwargs``, and ``reasoning_effort``."""
    variables = dict(body.chat_template_kwargs or {})
    for name in variables:
        if not name.isidentifier() or name in TEMPLATE_RESERVED:
            raise ApiError(400, f"chat_template_kwargs: {name[:60]!r} is not a template variable a request may set",
                           param="chat_template_kwargs")
    if body.reasoning_effort is not None:
        variables.setdefault("reasoning_effort", body.reasoning_effort)
    return variables or None


def _refuse_audio(body: ChatCompletionRequest) -> None:
    """400 for a request that needs audio: answering it with text only would be wrong."""
    if body.audio is not None or any(m != "text" for m in body.modalities or []):
        raise ApiError(400, "this server answers with text only (no audio)", param="modalities")


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


def _constraint(response_format: ResponseFormat | None, model: ServedModel,
                forced: dict | None = None) -> Callable[[], Any] | None:
    """A factory of per-row constraints: ``forced`` (the grammar of a required tool call), else
    ``response_format``, else the program's stored ``returns``."""
    spec = None
    param = "tools" if forced is not None else "response_format"
    if forced is not None:
        spec = forced
    elif response_format is not None and response_format.type == "json_object":
        spec = {"json_object": True}
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a 'json_schema' object", param="response_format")
        spec = {"json_schema": response_format.json_schema.schema_}
    elif response_format is None or response_format.type == "text":
        spec = model.returns
    if spec is None:
        return None
    text = json.dumps(spec)  # keys in order: a schema's order is its output's
    try:
        kept = len(text) <= CACHED_SPEC_CHARS or spec is model.returns  # a served program's own: one per model
        grammar = _grammar(model, text) if kept else _compile(model, spec)
    except PawError as exc:
        raise ApiError(400, f"{param}: {exc}", param=param) from None
    return grammar.start


#: a request's spec up to this size is compiled once and kept; a larger one is compiled for its
#: request alone, so that clients cannot fill memory with big schemas (measured: docs/reliability.md)
CACHED_SPEC_CHARS = 64 * 1024


@functools.lru_cache(maxsize=256)
def _grammar(model: ServedModel, spec: str):
    """A compiled output constraint, once per model and spec (requests repeat their schemas)."""
    return _compile(model, json.loads(spec))


def _compile(model: ServedModel, spec: Any):
    from paw_mlx.constrain import grammar_for

    return grammar_for(model.base, spec, lead=model.output_lead)
