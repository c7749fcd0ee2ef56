"""One reply on the chat screen: a reasoning model's reasoning in a ``ReasoningMessage``
above its answer, an ``AssistantMessage``, without the markers between them.

The text is split as ``paw run`` and ``paw serve`` split it (``apps/reasoning.py``, the
markers read from the chat template). The reasoning widget is mounted when the first
reasoning arrives, so a reply without any looks exactly as one from a model that has no
markers at all.
"""

from __future__ import annotations

from textual.widget import Widget

from apps.chat.widgets import AssistantMessage, Notice, ReasoningMessage
from apps.reasoning import ReplySplitter
from apps.serve.harmony import Parts


class ReplyView:
    """Routes a reply's text pieces to its reasoning and answer widgets."""

    def __init__(self, conversation: Widget, answer: AssistantMessage) -> None:
        self.conversation = conversation
        self.answer = answer
        self.splitter = ReplySplitter(None, [])  # everything is answer until the prompt is known
        self.reasoning: ReasoningMessage | None = None
        self.thinking = False  # the reply ended inside its reasoning (set by ``finish``)

    async def write(self, piece: str) -> None:
        await self._show(self.splitter.add(piece))

    async def finish(self) -> None:
        """Show what the splitter held back and settle both widgets."""
        self.thinking = self.splitter.thinking
        await self._show(self.splitter.finish())
        if self.reasoning is not None and not self.reasoning.closed:
            self.reasoning.close(answered=bool(self.answer.text))
        await self.answer.finish()

    @property
    def reasoning_text(self) -> str:
        return self.reasoning.text if self.reasoning is not None else ""

    async def _show(self, parts: Parts) -> None:
        if parts.reasoning:
            if self.reasoning is None:
                self.reasoning = ReasoningMessage()
                await self.conversation.mount(self.reasoning, before=self.answer)
            self.reasoning.write(parts.reasoning)
        if parts.content:
            if self.reasoning is not None and not self.reasoning.closed:
                self.reasoning.close(answered=True)  # the answer starts: the reasoning folds away
            await self.answer.write(parts.content)


def no_answer_text(thinking: bool, stopped: bool, limit: int | None) -> str:
    """The note for a reply that reasoned and never answered: stopped (Esc), cut at its
    token ``limit`` (None when it was not), or ended by the model."""
    if not thinking:
        return "no answer: the model ended its reply after the reasoning"
    if stopped:
        return "no answer: stopped while the model was thinking"
    if limit is not None:
        return f"no answer: the reply reached its limit of {limit} tokens while the model was thinking (/max-tokens)"
    return "no answer: the reply ended while the model was thinking"


def saved_reply(message: dict) -> list[Widget]:
    """The widgets of a stored assistant message (after /load): its reasoning, collapsed, then its answer."""
    reasoning, content = message.get("reasoning_content"), message["content"]
    if not reasoning:
        return [AssistantMessage(content)]
    widget = ReasoningMessage(reasoning)
    widget.close(answered=bool(content))
    return [widget, AssistantMessage(content) if content else Notice("no answer after the reasoning")]
