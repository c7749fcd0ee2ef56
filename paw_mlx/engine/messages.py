"""Chat messages as a chat template takes them: roles, plain-text content, and tool calls.

OpenAI's messages carry tool calls with their arguments as a JSON string, and tool results
as ``role: "tool"`` messages that name the call they answer. Chat templates follow
transformers' ``apply_chat_template`` convention instead: a call's ``arguments`` is a dict
(Qwen's and Llama's templates index it or write it with ``tojson``), and some templates
print a tool result's function ``name``; an assistant's ``reasoning_content`` (a reasoning
model's reply, sent back) goes to the template as Qwen3's templates and gpt-oss's
(``thinking``) read it. ``normalize_messages`` converts the one into the
other and refuses, as a ``RequestError`` naming the message, what no template could render.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from interp.errors import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool")


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """Chat messages as the template wants them: role, plain-text content, tool calls and results."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    out: list[dict] = []
    called: dict[str, str] = {}  # tool call id -> function name, for the results that answer them
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}", param="messages")
        calls = message.get("tool_calls") if role == "assistant" else None
        content = message.get("content")
        if content is None and calls:  # OpenAI's assistant turn that only calls tools
            text = ""
        else:
            text = message_text(content, f"messages[{i}].content")
        item: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        reasoning = message.get("reasoning_content") if role == "assistant" else None
        if isinstance(reasoning, str) and reasoning:
            # templates name it either way: Qwen3's reasoning_content, gpt-oss's thinking
            item["reasoning_content"] = item["thinking"] = reasoning
        if calls:
            item["tool_calls"] = [_template_call(call, f"messages[{i}].tool_calls[{j}]")
                                  for j, call in enumerate(calls)]
            called.update((c["id"], c["function"]["name"]) for c in item["tool_calls"])
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise RequestError(f"messages[{i}] has role tool and needs the tool_call_id it answers",
                                   param="messages")
            item["tool_call_id"] = call_id
            name = message.get("name") or called.get(call_id)
            if name:
                item["name"] = name
        out.append(item)
    return out


def _template_call(call: Any, where: str) -> dict:
    """An assistant message's tool call with its arguments as a dict, as templates index them."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise RequestError(f"{where} needs a function with a name", param="messages")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            raise RequestError(f"{where}.function.arguments is not JSON", param="messages") from None
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object", param="messages")
    return {"id": str(call.get("id") or ""), "type": "function",
            "function": {"name": function["name"], "arguments": arguments}}


def message_text(content: Any, where: str) -> str:
    """The text of a message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{j}] must be a text part ({{'type': 'text', 'text': ...}}); "
                                   "images and audio are not supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where} must be a string or a list of text parts", param="messages")
