"""Slash commands: their names, usage lines and parsing. The app implements each one."""

from __future__ import annotations

from dataclasses import dataclass

#: name -> (arguments, what it does); the order is the order /help lists them in
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("", "these commands and keys"),
    "system": ("[TEXT|-]", "show or set the system message; - removes it"),
    "clear": ("", "new conversation (the system message stays)"),
    "save": ("FILE", "save the conversation as JSON"),
    "load": ("FILE", "load a conversation saved with /save"),
    "program": ("DIR|FILE.paw|-", "send each message to a compiled program (- leaves it)"),
    "temp": ("[T]", "show or set the temperature (0: greedy)"),
    "max-tokens": ("[N]", "show or set the longest reply, in tokens"),
    "reasoning": ("[show|hide]", "show or hide a reasoning model's thinking"),
    "think": ("[on|off]", "let the model think or not (enable_thinking)"),
    "model": ("DIR", "switch to another program directory"),
}

KEYS = [
    ("Enter", "send"),
    ("Ctrl+J", "new line (also Shift+Enter, if the terminal has it)"),
    ("Esc", "stop the reply being written"),
    ("Ctrl+C twice", "quit (Ctrl+Q quits at once)"),
]


@dataclass
class Command:
    name: str
    arg: str


def parse(text: str) -> Command | None:
    """A slash command, or None for a message ("//x" sends the message "/x")."""
    stripped = text.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    name, _, arg = stripped[1:].partition(" ")
    return Command(name.lower(), arg.strip())


def message_text(text: str) -> str:
    """The text to send for input that is not a command (undoing the "//" escape)."""
    stripped = text.strip()
    return stripped[1:] if stripped.startswith("//") else stripped


def help_text() -> str:
    width = max(len(f"/{name} {args}".rstrip()) for name, (args, _) in COMMANDS.items())
    lines = ["Commands:"]
    for name, (args, what) in COMMANDS.items():
        lines.append(f"  {f'/{name} {args}'.rstrip():<{width}}  {what}")
    lines.append("Keys:")
    key_width = max(len(k) for k, _ in KEYS)
    lines += [f"  {key:<{key_width}}  {what}" for key, what in KEYS]
    lines.append("Start a message with // to send a line that begins with /.")
    return "\n".join(lines)
