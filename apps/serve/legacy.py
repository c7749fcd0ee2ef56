"""OpenAI's deprecated ``functions`` API, served on the tools path.

Older clients and frameworks still send ``functions`` (a list of function definitions) and
``function_call`` (``"none"``, ``"auto"`` or ``{"name": ...}``), put an assistant's call in
``message.function_call`` and its result in a ``role: "function"`` message named after the
function. ``modernize`` rewrites such a request into the tools form the rest of the server
reads (``functions`` -> tools, ``function_call`` -> ``tool_choice``, one call at most, as the
legacy API has), and the reply goes back in the legacy form: ``message.function_call``
``{name, arguments}`` (the first call only) with ``finish_reason: "function_call"``, or
``delta.function_call`` pieces when streamed (``legacy_message``, ``legacy_deltas``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from apps.serve.errors import ApiError
from apps.serve.schemas import ChatCompletionRequest, ChatMessage, MessageToolCall, NamedToolChoice, Tool

#: the finish reason of a legacy reply that calls a function
FINISH_REASON = "function_call"
#: the tools path's fields by the names a legacy request sent them under
FIELDS = {"tools": "functions", "tool_choice": "function_call"}


@contextmanager
def fields_as_sent() -> Iterator[None]:
    """An ``ApiError`` raised inside names the legacy field a request sent (``functions``), not
    the tools field it was served as."""
    try:
        yield
    except ApiError as exc:
        exc.param = FIELDS.get(exc.param, exc.param)
        raise


def modernize(body: ChatCompletionRequest) -> tuple[ChatCompletionRequest, bool]:
    """(the request with its legacy fields in the tools form, whether the reply takes the legacy
    form: the request sent ``functions``); ``ApiError`` (400) for fields that contradict."""
    functions = body.functions or None  # an empty list, as some clients send by default, is none
    if functions is not None and body.tools:
        raise ApiError(400, "send either tools or the deprecated functions, not both", param="functions")
    if body.function_call is not None and body.tool_choice is not None:
        raise ApiError(400, "send either tool_choice or the deprecated function_call, not both",
                       param="function_call")
    update: dict = {}
    if functions is not None:
        update["tools"] = [Tool(type="function", function=f) for f in functions]
        update["parallel_tool_calls"] = False  # a legacy reply holds one call
    choice = body.function_call
    if choice is not None:
        offered = [f.name for f in functions or []] or [t.function.name for t in body.tools or []]
        if not isinstance(choice, str) and choice.name not in offered:
            among = f"which is not among the {'tools' if body.tools else 'functions'}" if offered else \
                "but the request offers no functions"
            raise ApiError(400, f"function_call names function {choice.name!r}, {among}", param="function_call")
        update["tool_choice"] = choice if isinstance(choice, str) else NamedToolChoice(type="function",
                                                                                       function=choice)
    if any(m.function_call is not None or m.role == "function" for m in body.messages):
        update["messages"] = modern_messages(body.messages)
    return (body.model_copy(update=update) if update else body), functions is not None


def modern_messages(messages: list[ChatMessage]) -> list[ChatMessage]:
    """Messages with legacy calls as ``tool_calls`` and legacy results as ``tool`` messages.

    A legacy call has no id: each gets one (``call_<message index>``), and a ``function``
    message answers the latest call of its name (so templates that match results to calls
    by id, or print the function's name, render it as they render tools).
    """
    out, calls = [], {}  # function name -> id of its latest legacy call
    for i, message in enumerate(messages):
        if message.function_call is not None:
            if message.role != "assistant":
                raise ApiError(400, f"messages[{i}] has function_call but role {message.role!r}: only an "
                               "assistant message calls a function", param="messages")
            if message.tool_calls:
                raise ApiError(400, f"messages[{i}] has both tool_calls and the deprecated function_call: send "
                               "one", param="messages")
            call = MessageToolCall(id=f"call_{i}", function=message.function_call)
            calls[call.function.name] = call.id
            message = message.model_copy(update={"function_call": None, "tool_calls": [call]})
        elif message.role == "function":
            if not message.name:
                raise ApiError(400, f"messages[{i}] has role function and needs the name of the function whose "
                               "result it holds", param="messages")
            message = message.model_copy(update={"role": "tool", "content": message.content or "",
                                                  "tool_call_id": calls.get(message.name, f"call_{i}")})
        out.append(message)
    return out


def legacy_message(message: dict) -> dict:
    """An assistant message with its first tool call as ``function_call`` (the legacy reply)."""
    calls = message.pop("tool_calls", None)
    if calls:
        message["function_call"] = calls[0]["function"]
    return message


def legacy_deltas(index: int, calls: list[dict]) -> list[dict]:
    """Streamed choices for a legacy reply's call, as OpenAI sent them: the name (arguments
    empty), then the arguments."""
    if not calls:
        return []
    function = calls[0]["function"]
    return [{"index": index, "delta": {"function_call": delta}, "logprobs": None, "finish_reason": None}
            for delta in ({"name": function["name"], "arguments": ""}, {"arguments": function["arguments"]})]
