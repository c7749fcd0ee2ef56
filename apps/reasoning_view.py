"""``paw run``'s view of a reasoning model's reply: the reasoning on stderr (dimmed on a
terminal), the answer on stdout, so that ``paw run ... > answer.txt`` keeps the answer
alone and nothing is lost. The markers are read from the chat template as ``paw serve``
reads them (``apps/reasoning.py``); a model without them prints as before.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from apps.reasoning import ReplySplitter
from apps.serve.harmony import Parts
from interp.tokenizer import Tokenizer

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReplyPrinter:
    """Prints a reply's text pieces: reasoning to ``err``, the answer to ``out``."""

    def __init__(self, tokenizer: Tokenizer | None, prompt: Sequence[int], chat: bool,
                 out: TextIO | None = None, err: TextIO | None = None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.splitter = ReplySplitter(tokenizer if chat else None, prompt)
        self.dim = self.err.isatty()
        self.line_open = False  # reasoning printed on a line not yet ended

    def write(self, piece: str) -> None:
        self._show(self.splitter.add(piece))

    def finish(self, piece: str = "") -> None:
        """Print the last piece and what was held back, and end the line."""
        parts = self.splitter.add(piece)
        parts += self.splitter.finish()
        self._show(parts)
        self._end_reasoning()
        self.out.write("\n")
        self.out.flush()

    def _show(self, parts: Parts) -> None:
        if parts.reasoning:
            if not self.line_open and self.dim:
                self.err.write(DIM)
            self.line_open = True
            self.err.write(parts.reasoning)
            self.err.flush()
        if parts.content:
            self._end_reasoning()  # the answer starts on a line of its own on a terminal
            self.out.write(parts.content)
            self.out.flush()

    def _end_reasoning(self) -> None:
        if self.line_open:
            self.line_open = False
            self.err.write(f"{RESET}\n" if self.dim else "\n")
            self.err.flush()
