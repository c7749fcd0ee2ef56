"""Request and error bodies of the OpenAI-compatible API, as pydantic models.

They are the server's OpenAPI document too (``/openapi.json``), which the schema fuzzer
reads. Fields paw does not use (``user``, ``store``, ``metadata``, ...) are accepted and
ignored, as OpenAI-compatible servers do; fields that would change the answer in a way
paw cannot honour (``suffix``, ``best_of`` other than ``n``) are refused with a 400. The
deprecated ``functions`` / ``function_call`` are served as tools (``apps/serve/legacy.py``).

Extensions, named as mlx-lm's and vLLM's servers name them: ``top_k``, ``min_p``,
``repetition_penalty``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.types import FailFast

#: most stop strings, choices per request and prompts per completion request
MAX_STOP = 16
MAX_CHOICES = 16
MAX_PROMPTS = 64



class _FirstError(FailFast):
    """Pydantic's ``FailFast``, hashable so that it may sit in a union (``str | list[str]``)."""

    def __hash__(self) -> int:
        return hash(FailFast)


#: a list or dict stops at its first bad item: pydantic otherwise builds an error per item (and
#: per form of a union), and a 3.6 MB prompt of a million mixed items took 42 s to refuse, with
#: the event loop, which validates bodies, blocked meanwhile (docs/reliability.md)
FIRST = _FirstError()
Strings = Annotated[list[str], FIRST]
Ids = Annotated[list[int], FIRST]

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Lenient(BaseModel):
    # unknown fields ignored; known ones strict, as JSON types: `"max_tokens": true` or `"5"` is a 400, not 1 or 5
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    name: str = Field(min_length=1, max_length=256)
    arguments: str | dict[str, Any]  # JSON text, as OpenAI sends it back (an object taken too)


class MessageToolCall(_Lenient):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # function: legacy result
    # text parts are checked when the messages are rendered, to say which part is not text;
    # null only for an assistant message that carries tool_calls (or a legacy function message)
    content: str | Annotated[list[dict[str, Any]], FIRST] | None = None
    name: str | None = None
    tool_calls: Annotated[list[MessageToolCall], FIRST] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this message answers
    function_call: FunctionCall | None = None  # assistant: its call in the deprecated functions API
    reasoning_content: str | None = None  # assistant: its reasoning, as this server returned it


class FunctionDefinition(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = Field("output", max_length=256)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Lenient):
    """The fields chat and completion requests share."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: Probability | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], FIRST] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | Strings | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], FIRST] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], FIRST] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    #: extra variables for the chat template (vLLM's and mlx-lm's field: Qwen3's enable_thinking, ...)
    chat_template_kwargs: dict[str, Any] | None = None
    #: OpenAI's reasoning effort; reaches the template as ``reasoning_effort`` (gpt-oss reads it)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    #: the deprecated functions API, served as tools (apps/serve/legacy.py)
    functions: Annotated[list[FunctionDefinition], FIRST] | None = Field(None, max_length=128)
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    modalities: Strings | None = None
    audio: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | Strings | Ids | Annotated[list[Ids], FIRST]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    response_format: ResponseFormat | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error object: what every 4xx and 5xx of this server carries."""

    error: ErrorDetail
