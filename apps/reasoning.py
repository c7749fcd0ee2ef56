"""A reply split into its reasoning and its answer as text arrives, for ``paw run``
(``reasoning_view.py``) and ``paw chat`` (``chat/reply_view.py``).

The markers are read from the chat template as ``paw serve`` reads them
(``apps/serve/reasoning.py``, ``apps/serve/harmony.py``): a think block at the start of the
reply, or harmony's channels. Only those two modules are imported, never the server's tool
plans (``apps.serve.tools`` pulls in FastAPI, which README's first install leaves out).
"""

from __future__ import annotations

from collections.abc import Sequence

from apps.serve.harmony import HarmonyReader, Parts
from apps.serve.reasoning import ThinkSplitter, detect_reasoning, prompt_opens
from interp.tokenizer import Tokenizer


class ReplySplitter:
    """``add`` a reply's text pieces, get ``Parts`` (reasoning, content) that may be shown now;
    ``finish`` returns what was held back. Without reasoning markers everything is content."""

    def __init__(self, tokenizer: Tokenizer | None, prompt: Sequence[int]):
        """``tokenizer``: the model's, when its chat template rendered ``prompt``; None for text
        that went to the model as it is (no template, ``--raw``): all of the reply is content."""
        fmt = detect_reasoning(tokenizer.chat_template or "") if tokenizer is not None else None
        self.reader: ThinkSplitter | HarmonyReader | None = None
        if fmt is not None and fmt.harmony:
            self.reader = HarmonyReader()
        elif fmt is not None:
            self.reader = ThinkSplitter(fmt, prompt_opens(fmt, tokenizer, prompt))

    @property
    def splits(self) -> bool:
        """Whether the template marks reasoning (else every piece is content, as it came)."""
        return self.reader is not None

    @property
    def thinking(self) -> bool:
        """Whether the text so far ends inside the reasoning (a reply cut there never answered)."""
        if isinstance(self.reader, ThinkSplitter):
            return self.reader.state == "inside"
        if isinstance(self.reader, HarmonyReader):
            return self.reader.state == "body" and self.reader.channel == "analysis" and self.reader.recipient is None
        return False

    def add(self, piece: str) -> Parts:
        return self.reader.add(piece) if self.reader is not None else Parts(content=piece)

    def finish(self) -> Parts:
        """The text still held back, once the reply has ended (a harmony reply's calls are text:
        neither ``paw run`` nor ``paw chat`` offers tools)."""
        if self.reader is None:
            return Parts()
        rest = self.reader.finish()
        return rest[0] if isinstance(rest, tuple) else rest
