"""A chat request's tools: checked, shown to the model through its chat template, and read
back out of its reply (whole, or streamed with possible calls held back).

What ``tool_choice`` does:

- ``"auto"`` (the default with tools): the template describes the tools; calls in the reply,
  in the template's format (``apps/serve/tool_calls.py``), become ``tool_calls``.
- ``"required"`` or ``{"type": "function", "function": {"name": ...}}``: decoding is
  constrained to the format's grammar, built from the tools' parameter schemas, so the
  reply is one call (a named function, or ``parallel_tool_calls: false``) or several,
  with arguments valid for their schema.
- ``"none"``: the model must not call a tool (OpenAI's definition), so the tools are left
  out of the prompt and the reply is not read for calls: a model shown tools may still
  write a call, which would then reach the client as text. Messages with earlier calls
  and results still render.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from apps.serve.call_format import ToolCall, ToolFormat, marker_start
from apps.serve.errors import ApiError
from apps.serve.schemas import ChatCompletionRequest
from apps.serve.tool_calls import call_grammar, detect_format
from paw_mlx.engine import ServedModel


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools change: the prompt, the constraint, and how the reply is read."""

    format: ToolFormat
    tools: list[dict]  # as the template takes them: {"type": "function", "function": {...}}
    names: frozenset[str]
    parallel: bool  # more than one call allowed
    keep: dict[int, str]  # marker tokens (by id) kept in the decoded text
    grammar: str | None = None  # "required" or a named function: the grammar of the calls, in Lark

    def read(self, text: str) -> tuple[str, list[dict]]:
        """(the reply's text outside its calls, unstripped; the calls in OpenAI's form)."""
        content, calls = self.format.parse(text, self.schemas)
        return content, self.openai_calls(calls)

    @property
    def schemas(self) -> dict[str, dict]:
        """The offered tools' parameters schemas by name (Qwen3-Coder's values are typed by them)."""
        return {t["function"]["name"]: t["function"].get("parameters") or {} for t in self.tools
                if t["function"]["name"] in self.names}

    def openai_calls(self, calls: list[ToolCall]) -> list[dict]:
        """Calls in OpenAI's form, each with a new id; only the first without parallel calls."""
        if not self.parallel:
            calls = calls[:1]  # OpenAI's contract: at most one call
        return [self._openai_call(call) for call in calls]

    def _openai_call(self, call: ToolCall) -> dict:
        return {"id": self.format.new_id(), "type": "function",
                "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def plan_tools(body: ChatCompletionRequest, model: ServedModel) -> ToolPlan | None:
    """The request's tool plan, or None when its reply is plain text; ``ApiError`` (400) for
    tools and choices that cannot be served."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice not in ("none", "auto"):
            raise ApiError(400, "tool_choice needs tools: the request offers none", param="tool_choice")
        return None
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ApiError(400, f"two tools are named {duplicate!r}", param="tools")
    if choice == "none":
        return None
    named = None if isinstance(choice, str) else choice.function.name
    if named is not None and named not in names:
        raise ApiError(400, f"tool_choice names function {named!r}, which is not among the tools",
                       param="tool_choice")
    if body.response_format is not None and body.response_format.type != "text" and choice != "auto":
        raise ApiError(400, "response_format and a tool_choice that requires a call ask for two different "
                       "replies: send one", param="response_format")
    tokenizer = model.base.tokenizer
    fmt = detect_format(tokenizer.chat_template or "")
    keep = {i: text for text in fmt.kept if (i := tokenizer.token_to_id(text)) is not None}
    parallel = body.parallel_tool_calls is not False and named is None
    grammar = None
    if choice != "auto":
        offered = [t for t in tools if t["function"]["name"] == named] if named else tools
        grammar = call_grammar(fmt, offered, parallel, tokenizer.token_to_id)
    return ToolPlan(fmt, tools, frozenset(names), parallel, keep, grammar)


class CallScanner:
    """A reply's text for streaming, holding back what may be a tool call until the reply ends.

    Text before a call's marker streams as it comes; from the marker on (or from the start, for
    a reply that opens as a call without its marker may), it is held, and ``finish`` reads the
    calls out of the whole reply or releases the held text when it was none.
    """

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.sent = 0  # characters released
        self.holding = False
        self.finished = False

    def add(self, piece: str) -> str:
        """Add the reply's next text; returns what may be shown now."""
        self.text += piece
        if self.holding:
            return ""
        fmt = self.plan.format
        begin = self.text.find(fmt.marker, self.sent)
        if begin >= 0:
            self.holding = True
            return self._release(begin)
        if self.sent == 0:
            head = self.text.lstrip()
            if head.startswith(fmt.bare_start):
                self.holding = True
                return ""
            if fmt.bare_start.startswith(head):  # still may become one
                return ""
        return self._release(len(self.text) - marker_start(self.text[self.sent:], [fmt.marker]))

    def _release(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

    def finish(self) -> tuple[str, list[dict]]:
        """(the text still to show, the reply's calls in OpenAI's form); once."""
        if self.finished:
            return "", []
        self.finished = True
        content, calls = self.plan.read(self.text)
        if not calls:
            return self._release(len(self.text)), []
        shown = self.text[:self.sent]
        rest = content[len(shown):] if content.startswith(shown) else ""
        return (rest.rstrip() if rest.strip() else ""), calls
