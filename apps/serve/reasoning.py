"""Reasoning in a reply: which markers a chat template uses, and the reply split into its
reasoning and its answer as text arrives.

Two families, read from the template's text as vLLM's reasoning parsers are chosen per model:

- a think block, ``<think>...</think>`` (Qwen3, DeepSeek-R1 and its distills, SmolLM3) or
  ``[THINK]...[/THINK]`` (Magistral), at the start of the reply. A template may open the
  block in the generation prompt (DeepSeek-R1's ends with ``<think>\\n``), so the reply starts
  inside it: ``opens_in_prompt`` says so from the prompt's own text. Within an open block
  everything is reasoning until its close, so a reply cut short while thinking has an
  empty answer (as vLLM's DeepSeek-R1 parser reads it);
- harmony's channels (gpt-oss, ``harmony.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from apps.serve.call_format import marker_start
from apps.serve.harmony import MARKERS as HARMONY_MARKERS
from apps.serve.harmony import Parts
from interp.tokenizer import Tokenizer

#: prompt tokens decoded to see whether the generation prompt opened a think block
PROMPT_TAIL_TOKENS = 8


@dataclass(frozen=True)
class ReasoningFormat:
    """How a family of templates marks reasoning: a think block's ``open`` and ``close``, or harmony."""

    name: str
    open: str
    close: str
    kept: tuple[str, ...]  # markers kept in decoded text where they are special tokens

    @property
    def harmony(self) -> bool:
        return self.name == "harmony"


THINK = ReasoningFormat("think", "<think>", "</think>", ("<think>", "</think>"))
MISTRAL_THINK = ReasoningFormat("mistral_think", "[THINK]", "[/THINK]", ("[THINK]", "[/THINK]"))
HARMONY_REASONING = ReasoningFormat("harmony", "<|channel|>analysis<|message|>", "<|end|>", HARMONY_MARKERS)
#: checked in this order; a format is the template's when all its signs are in the template's text
SIGNS = ((HARMONY_REASONING, ("<|channel|>", "<|message|>")), (MISTRAL_THINK, ("[THINK]", "[/THINK]")),
         (THINK, ("<think>", "</think>")))


def detect_reasoning(template: str) -> ReasoningFormat | None:
    """The reasoning markers a chat template's text shows, or None for a model that does not reason."""
    return next((fmt for fmt, signs in SIGNS if all(sign in template for sign in signs)), None)


def opens_in_prompt(fmt: ReasoningFormat, prompt_tail: str) -> bool:
    """Whether a prompt ending with ``prompt_tail`` (decoded with its special tokens) leaves a
    think block open, so that the reply starts inside it."""
    return not fmt.harmony and prompt_tail.rstrip().endswith(fmt.open)


def prompt_opens(fmt: ReasoningFormat, tokenizer: Tokenizer, prompt: Sequence[int]) -> bool:
    """Whether the prompt's ids leave a think block open (its last few tokens decoded)."""
    return opens_in_prompt(fmt, tokenizer.decode(list(prompt[-PROMPT_TAIL_TOKENS:]), skip_special_tokens=False))


class ThinkSplitter:
    """A reply's text split into reasoning (a think block at its start) and answer, as it arrives.

    Whitespace right after either marker, and at the end of the reasoning, is left out."""

    def __init__(self, fmt: ReasoningFormat, opened: bool):
        self.fmt = fmt
        self.state = "inside" if opened else "start"  # start | inside | after | answer
        self.pending = ""
        self.skip_space = opened

    def add(self, piece: str) -> Parts:
        self.pending += piece
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(self.fmt.open):
                self.pending, self.state, self.skip_space = head[len(self.fmt.open):], "inside", True
            elif self.fmt.open.startswith(head):
                return Parts()  # may still open the block
            else:
                self.state = "answer"
        out = Parts()
        if self.state == "inside":
            if self.skip_space:
                self.pending = self.pending.lstrip()
                self.skip_space = not self.pending
            at = self.pending.find(self.fmt.close)
            if at < 0:
                # a possible start of the close, and whitespace before it: held (dropped if the block closes)
                cut = len(self.pending[:len(self.pending) - marker_start(self.pending, [self.fmt.close])].rstrip())
                out.reasoning, self.pending = self.pending[:cut], self.pending[cut:]
                return out
            out.reasoning = self.pending[:at].rstrip()
            self.pending, self.state = self.pending[at + len(self.fmt.close):], "after"
        if self.state == "after":
            self.pending = self.pending.lstrip()
            if not self.pending:
                return out
            self.state = "answer"
        out.content, self.pending = self.pending, ""
        return out

    def finish(self) -> Parts:
        """The text still held back, once the reply has ended."""
        rest, self.pending = self.pending, ""
        if self.state == "inside":
            return Parts(reasoning=rest.rstrip())
        return Parts(content=rest if self.state in ("start", "answer") else "")
