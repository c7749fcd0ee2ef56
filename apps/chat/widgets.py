"""The pieces of the chat screen: the prompt box, the messages (a reply's reasoning apart)
and the status bar."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import Collapsible, Markdown, Static, TextArea

#: keys that insert a newline in the prompt. Ctrl+J works in every terminal (it sends a
#: line feed, Enter sends a carriage return); Shift+Enter and Alt+Enter only where the
#: terminal reports them (kitty keyboard protocol, iTerm2 with CSI u, WezTerm, ...).
NEWLINE_KEYS = ("ctrl+j", "shift+enter", "alt+enter")


class PromptInput(TextArea, inherit_bindings=False):
    """A multi-line prompt: Enter sends, Ctrl+J (or Shift+Enter where it exists) breaks the line."""

    # TextArea's own keys, minus Ctrl+C (copy): in this app Ctrl+C belongs to quitting.
    BINDINGS = [
        Binding("enter", "submit", "Send"),
        Binding("ctrl+j", "newline", "Newline"),
        *[b for b in TextArea.BINDINGS if isinstance(b, Binding) and "ctrl+c" not in b.key.split(",")],
    ]

    @dataclass
    class Submitted(Message):
        text: str

    async def _on_key(self, event: events.Key) -> None:
        # TextArea inserts "\n" for Enter before bindings are looked at, so decide here.
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.action_submit()
        elif event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.action_newline()
        else:
            await super()._on_key(event)

    def action_submit(self) -> None:
        text = self.text
        if text.strip():
            self.post_message(self.Submitted(text))

    def action_newline(self) -> None:
        self.insert("\n")


class UserMessage(Static):
    """What the user wrote, shown as typed (no markup)."""

    def __init__(self, text: str) -> None:
        super().__init__(Text(text), classes="message")
        self.text = text


class AssistantMessage(Markdown):
    """The model's reply, rendered as Markdown while it streams in."""

    def __init__(self, text: str = "") -> None:
        super().__init__(text, classes="message")
        self.text = text
        self.stream = None

    async def start_stream(self) -> None:
        self.stream = Markdown.get_stream(self)

    async def write(self, piece: str) -> None:
        self.text += piece
        if self.stream is None:
            await self.start_stream()
        await self.stream.write(piece)

    async def finish(self) -> None:
        if self.stream is not None:
            await self.stream.stop()
            self.stream = None
        await self.update(self.text)  # render the whole reply once more, exactly


class ReasoningMessage(Collapsible):
    """A reply's reasoning, dimmed, under a "Thinking" title: open while it streams in, then
    collapsed once the answer starts (a click on the title, or Enter on it, opens it again)."""

    def __init__(self, text: str = "") -> None:
        self.body = Static(Text(text), classes="reasoning-text")
        super().__init__(self.body, title="Thinking…", collapsed=False)
        self.text = text
        self.closed = False  # folded (or left open) once; from then on the user decides

    def write(self, piece: str) -> None:
        self.text += piece
        self.body.update(Text(self.text))
        if self.closed:  # harmony may reason again after an answer
            self._count_words()

    def close(self, answered: bool) -> None:
        """The reasoning is complete: its title says how long it is; collapsed when ``answered``
        (a reply without an answer keeps its reasoning in view)."""
        self.closed = True
        self._count_words()
        self.collapsed = answered

    def _count_words(self) -> None:
        self.title = f"Thinking ({len(self.text.split())} words)"


class Notice(Static):
    """A line from the app itself: help, confirmations and errors (class ``error``)."""

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__(Text(text), classes="notice error" if error else "notice")
        self.text = text


@dataclass
class StatusInfo:
    """What the status bar shows; ``None`` means not measured yet (shown as a dash)."""

    model: str
    context_used: int
    context_size: int
    tokens_per_second: float | None = None
    ttft_seconds: float | None = None
    peak_memory_gb: float | None = None
    state: str = ""  # "generating", "stopping", "loading", or ""
    program: str | None = None


def _or_dash(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _memory(gigabytes: float | None) -> str:
    if gigabytes is None:
        return "– GB"
    return f"{gigabytes:.2f} GB" if gigabytes >= 1 else f"{gigabytes * 1000:.0f} MB"


class StatusBar(Static):
    """One line: model (and program) on the left, speed, latency, context and memory on the right."""

    plain = ""

    def show(self, info: StatusInfo) -> None:
        left = Text(info.model, style="bold")
        if info.program:
            left.append(f" · {info.program}", style="italic")
        if info.state:
            left.append(f" ● {info.state}", style="bold yellow")
        right = Text.assemble(
            (f"{_or_dash(info.tokens_per_second, '.1f')} tok/s", ""), " │ ",
            (f"TTFT {_or_dash(None if info.ttft_seconds is None else info.ttft_seconds * 1000, '.0f')} ms", ""),
            " │ ", (f"ctx {info.context_used}/{info.context_size}", ""), " │ ",
            (f"peak {_memory(info.peak_memory_gb)}", ""),
        )
        self.plain = f"{left.plain}  {right.plain}"  # for tests and screen readers
        grid = Table.grid(expand=True)
        grid.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        grid.add_column(justify="right", no_wrap=True)
        grid.add_row(left, right)
        self.update(grid)
