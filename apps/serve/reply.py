"""A chat reply read for what it holds: reasoning, answer and tool calls, whole or as it streams.

``ReplyPlan`` says what to look for (the request's tools, the model's reasoning markers and
whether its prompt opened a think block); ``ReplyReader`` reads the text as it arrives and
``reply_message`` reads a whole reply with the same reader, so a streamed reply and a whole
one always say the same. Reasoning goes to ``reasoning_content``, the field vLLM's and
mlx-lm's servers use, and is always separated when the model's template marks it: the
OpenAI API has no field that asks for it inline, clients that do not know the field just
show the answer, and a harmony reply read raw would be its markers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apps.serve.harmony import HarmonyReader, Parts
from apps.serve.reasoning import ReasoningFormat, ThinkSplitter, detect_reasoning, prompt_opens
from apps.serve.tools import CallScanner, ToolPlan
from interp.tokenizer import Tokenizer


@dataclass(frozen=True)
class ReplyPlan:
    """How a chat reply is read: tool calls (``tools``) and reasoning (``reasoning``)."""

    tools: ToolPlan | None
    reasoning: ReasoningFormat | None
    opened: bool = False  # the prompt opened a think block: the reply starts inside it
    reasoning_keep: dict[int, str] = field(default_factory=dict)  # the reasoning markers' tokens

    @property
    def keep(self) -> dict[int, str]:
        """Marker tokens (by id) kept in the decoded text, for the readers."""
        return {**(self.tools.keep if self.tools else {}), **self.reasoning_keep}

    def reader(self) -> ReplyReader:
        return ReplyReader(self)


def plan_reply(tools: ToolPlan | None, tokenizer: Tokenizer, prompt: list[int], constrained: bool) -> ReplyPlan:
    """The plan for a chat reply to ``prompt``; ``constrained``: an output grammar shapes it
    (its text is then all answer: a think block the prompt opened is not continued)."""
    fmt = detect_reasoning(tokenizer.chat_template or "")
    keep = {i: text for text in (fmt.kept if fmt else ()) if (i := tokenizer.token_to_id(text)) is not None}
    opened = fmt is not None and not constrained and prompt_opens(fmt, tokenizer, prompt)
    return ReplyPlan(tools, fmt, opened, keep)


class ReplyReader:
    """One reply read as it arrives: ``add`` returns the reasoning and answer that may be shown
    now, ``finish`` what was held back and the calls in OpenAI's form."""

    def __init__(self, plan: ReplyPlan):
        self.plan = plan
        harmony = plan.reasoning is not None and plan.reasoning.harmony
        if harmony or (plan.tools is not None and plan.tools.format.name == "harmony"):
            self.harmony: HarmonyReader | None = HarmonyReader(plan.tools.schemas if plan.tools else ())
            self.think = None
        else:
            self.harmony = None
            self.think = ThinkSplitter(plan.reasoning, plan.opened) if plan.reasoning else None
        self.calls = CallScanner(plan.tools) if plan.tools is not None and self.harmony is None else None

    def add(self, piece: str) -> Parts:
        if self.harmony is not None:
            return self.harmony.add(piece)
        parts = self.think.add(piece) if self.think else Parts(content=piece)
        if self.calls is not None:
            parts.content = self.calls.add(parts.content)
        return parts

    def finish(self) -> tuple[Parts, list[dict]]:
        if self.harmony is not None:
            parts, calls = self.harmony.finish()
            return parts, self.plan.tools.openai_calls(calls) if self.plan.tools and calls else []
        parts = self.think.finish() if self.think else Parts()
        if self.calls is None:
            return parts, []
        parts.content = self.calls.add(parts.content)
        rest, calls = self.calls.finish()
        parts.content += rest
        return parts, calls


def reply_message(plan: ReplyPlan, text: str) -> tuple[dict, bool]:
    """The assistant message of a finished reply, and whether it calls tools."""
    reader = plan.reader()
    parts = reader.add(text)
    rest, calls = reader.finish()
    parts += rest
    message: dict = {"role": "assistant", "content": parts.content, "refusal": None}
    if calls:
        message["content"] = parts.content.strip() or None
        message["tool_calls"] = calls
    if plan.reasoning is not None:
        message["reasoning_content"] = parts.reasoning or None
    return message, bool(calls)
