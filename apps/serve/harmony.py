"""gpt-oss's harmony format: a reply is a series of messages, each on a channel.

After the prompt's ``<|start|>assistant`` the model writes, for example::

    <|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant
    <|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>

or ends with ``<|channel|>final<|message|>It is sunny.<|return|>``. ``analysis`` is the
reasoning; ``final`` (and commentary addressed to no one: a preamble the user may see) is
the answer; a message addressed ``to=functions.NAME`` is a tool call, its body the arguments'
JSON. The recipient may stand before the channel (``<|start|>assistant to=functions.x<|channel|>
commentary json<|message|>``, as gpt-oss's template writes earlier calls back).

``HarmonyReader`` follows the messages as text arrives, so that reasoning and answer stream
as they come and a call is held until its message ends. A reply that does not open with a
marker (one an output constraint shaped, or a model that left the headers out) is all answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from apps.serve.call_format import (
    Special,
    ToolCall,
    ToolFormat,
    Tools,
    alternatives,
    checked_call,
    json_arguments,
    json_rule,
    lark_literal,
    marker_start,
    parameters,
    text_without,
)

MESSAGE = "<|message|>"
#: what ends a message's body: its end, a call, the reply's return, or a new message's header
ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>", "<|channel|>")
#: every marker of the format (special tokens, kept in the decoded text)
MARKERS = ("<|start|>", "<|channel|>", "<|constrain|>", MESSAGE, "<|end|>", "<|call|>", "<|return|>")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_FUNCTION = "functions."


@dataclass
class Parts:
    """Text of a reply by destination: ``reasoning`` and ``content``."""

    reasoning: str = ""
    content: str = ""

    def __iadd__(self, other: Parts) -> Parts:
        self.reasoning += other.reasoning
        self.content += other.content
        return self


@dataclass
class HarmonyReader:
    """A harmony reply read as it arrives: ``add`` returns what may be shown now, ``finish`` the
    rest and the calls (to ``tools``: a call to another function is shown as text)."""

    tools: Tools = ()
    pending: str = ""  # text not yet read
    state: str = "start"  # start | header | body | plain
    channel: str = ""
    recipient: str | None = None
    body: str = ""  # a call's body, held to its end
    calls: list[ToolCall] = field(default_factory=list)
    shown: Parts = field(default_factory=Parts)  # everything returned so far
    separate: bool = False  # the message continues a destination's text: a new paragraph

    def add(self, piece: str) -> Parts:
        self.pending += piece
        out = Parts()
        while True:
            if self.state == "start":
                head = self.pending.lstrip()
                if any(opening.startswith(head) for opening in ("<|", "to=")):
                    return out  # may still open a header
                self.state = "header" if head.startswith("<|") or head.startswith("to=") else "plain"
                continue
            if self.state == "plain":
                out += self._show(self.pending, to_reasoning=False)
                self.pending = ""
                return out
            if self.state == "header":
                at = self.pending.find(MESSAGE, max(0, len(self.pending) - len(piece) - len(MESSAGE)))
                if at < 0:
                    return out
                self._open(self.pending[:at])
                self.pending = self.pending[at + len(MESSAGE):]
                continue
            ends = [(at, end) for end in ENDS if (at := self.pending.find(end)) >= 0]
            if not ends:
                keep = marker_start(self.pending, ENDS)
                out += self._route(self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                return out
            at, end = min(ends)
            out += self._route(self.pending[:at])
            out += self._close()
            # a header starts the next message; the other ends are consumed
            self.pending = self.pending[at + (0 if end in ("<|start|>", "<|channel|>") else len(end)):]
            self.state = "header"

    def finish(self) -> tuple[Parts, list[ToolCall]]:
        """(the text still to show, the calls); a last message left open still counts."""
        out = Parts()
        if self.state == "body":
            out += self._route(self.pending)
            out += self._close()
        elif "<|channel|>" not in self.pending:  # text after a message's end, not a header cut short
            out += self._show(self.pending, to_reasoning=False)
        self.pending, self.state = "", "start"
        return out, self.calls

    def _open(self, header: str) -> None:
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        self.channel = channel.group(1) if channel else "final"
        self.recipient = recipient.group(1) if recipient else None
        self.state, self.body = "body", ""
        # messages to one destination are separate paragraphs
        target = self.shown.reasoning if self._reasoning else self.shown.content
        self.separate = bool(target) and self.recipient is None

    @property
    def _reasoning(self) -> bool:
        return self.channel == "analysis" and self.recipient is None

    def _route(self, text: str) -> Parts:
        if self.recipient is not None:
            self.body += text
            return Parts()
        if text and self.separate:
            text, self.separate = "\n" + text, False
        return self._show(text, self._reasoning)

    def _close(self) -> Parts:
        """End the current message: a call's body becomes a call, or text when it is none."""
        self.state = "header"
        if self.recipient is None:
            return Parts()
        name = self.recipient.removeprefix(_FUNCTION) if self.recipient.startswith(_FUNCTION) else None
        arguments = json_arguments(self.body.strip()) if name in self.tools else None
        call = checked_call(name, arguments) if arguments is not None else None
        if call is not None:
            self.calls.append(call)
            return Parts()
        return self._show(self.body, to_reasoning=False)

    def _show(self, text: str, to_reasoning: bool) -> Parts:
        part = Parts(reasoning=text) if to_reasoning else Parts(content=text)
        self.shown += part
        return part


def parse_harmony(text: str, tools: Tools) -> tuple[str, list[ToolCall]]:
    """(the reply's answer, its calls): the ``ToolFormat`` view of a whole harmony reply."""
    reader = HarmonyReader(tools)
    reader.add(text)
    reader.finish()
    return reader.shown.content, reader.calls


#: the longest analysis message a forced call may follow, in characters: gpt-oss reasons a few
#: sentences before a call; past this the grammar ends the analysis, so that a model that would
#: reason on and on still calls (the request's max_tokens may end it sooner)
ANALYSIS_CHARS = 4000


def grammar_harmony(special: Special, tools: list[dict], parallel: bool, arguments_key: str) -> str:
    """One call message, after at most one analysis message: gpt-oss is trained to reason on the
    analysis channel before it calls, and its arguments suffer when the call is forced at once.
    One call per reply: harmony's ``<|call|>`` ends the turn."""
    rules = []
    for i, tool in enumerate(tools):
        header = lark_literal(f"commentary to={_FUNCTION}{tool['function']['name']} ")
        rules.append(f'call_{i}: {special("<|channel|>")} {header} {special("<|constrain|>")} "json" '
                     f"{special(MESSAGE)} args_{i}\nargs_{i}: {json_rule(parameters(tool))}")
    end = special("<|end|>")
    # text that could read as a marker would end the message early when the reply is read back
    rules.append(f"ANALYSIS_TEXT: {text_without(ENDS, ANALYSIS_CHARS)}")
    if end.startswith("<["):  # a special token, which no text can be: it ends the text
        text = f"ANALYSIS_TEXT {end}"
    else:  # text: one terminal with the text, ending at the first end (lazy: llguidance cannot
        # tell that a text of bounded length must end there)
        text = "analysis_end"
        rules += [f"ANALYSIS_END: ANALYSIS_TEXT {end}", "analysis_end[lazy]: ANALYSIS_END"]
    rules.append(f'analysis: {special("<|channel|>")} "analysis" {special(MESSAGE)} {text} '
                 f'{special("<|start|>")} "assistant"')
    calls = alternatives(f"call_{i}" for i in range(len(tools)))
    return f"start: analysis? ({calls})\n" + "\n".join(rules) + "\n"


HARMONY = ToolFormat("harmony", ("<|channel|>",), "<|channel|>", "<|channel|>", "arguments", MARKERS,
                     parse_harmony, grammar_harmony)
