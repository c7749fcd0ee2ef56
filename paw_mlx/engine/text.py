"""From a request's tokens to the text a client sees: incremental decoding and stop strings.

``TextStream`` decodes each new token against a short window of the tokens before it (as
vLLM does), not the whole output, so a long reply costs the same per token as a short
one; it holds back an incomplete UTF-8 character (read from the tokens' bytes: invalid bytes
and the character U+FFFD are shown as they come; a half character still held when the stream
ends is dropped), and text that may be the start of a stop
string until it is clear either way. Special tokens (end-of-turn markers and the
like) are left out, as OpenAI and vLLM leave them out, except those a caller keeps: a
tool-call marker such as Llama's ``<|python_tag|>`` or Mistral's ``[TOOL_CALLS]`` is a
special token, and the server's tool-call parser reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

from interp.token_bytes import TokenText, decode_whole, ends_inside_character
from interp.tokenizer import Tokenizer

__all__ = ["TextStream", "TokenText"]


class TextStream:
    """Text pieces for a stream of tokens; ``stopped`` once a stop string is seen."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), keep: dict[int, str] | None = None,
                 lead: str = ""):
        self._tokenizer = tokenizer
        self._lead = lead  # a compiled program's output lead (``PromptLayout.output_lead``): not shown
        self._keep = keep or {}  # special token id -> its text, kept in the output
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._spelling = TokenText(tokenizer)  # tokens' exact bytes, to tell half a character from U+FFFD
        self._bytes: dict[int, bytes] = {}
        self._ids: list[int] = []
        self._prefix = 0  # window start: tokens before it are fully decoded
        self._read = 0  # tokens up to here have been turned into text
        self._pending = ""  # decoded text not yet released (a possible stop string start)
        self.text = ""  # everything released so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        if not self._keep or not any(i in self._keep for i in ids):
            return self._tokenizer.decode(ids, skip_special_tokens=True)
        pieces, start = [], 0
        for at, token in enumerate(ids):
            if token in self._keep:
                pieces += [self._tokenizer.decode(ids[start:at], skip_special_tokens=True), self._keep[token]]
                start = at + 1
        pieces.append(self._tokenizer.decode(ids[start:], skip_special_tokens=True))
        return "".join(pieces)

    def _half_character(self) -> bool:
        """Whether the tokens since the text last came out whole end inside a UTF-8 character.

        A U+FFFD at the end of the decoded text is not always one: invalid bytes, and the
        character U+FFFD itself, read the same. Only half a character is held back, so that
        such text streams as it comes (and the window decoded each step stays short) instead
        of waiting for the next other character or the end.
        """
        return ends_inside_character(b"".join(self._shown_bytes(token) for token in self._ids[self._read:]))

    def _shown_bytes(self, token: int) -> bytes:
        """A token's bytes in the decoded text: none for a special token decoding leaves out."""
        known = self._bytes.get(token)
        if known is None:
            shown = token in self._keep or self._tokenizer.decode([token], skip_special_tokens=True) != ""
            known = self._bytes[token] = self._spelling.bytes(token) if shown else b""
        return known

    @property
    def position(self) -> int:
        """Where the next token's text begins: characters of the text so far, counting what is
        held back (a possible stop string, half a character) as if it were shown."""
        window = self._ids[self._prefix:]
        undecoded = len(self._decode(window)) - len(self._decode(self._ids[self._prefix:self._read]))
        return len(self.text) + len(self._pending) + max(0, undecoded)

    def add(self, tokens: Sequence[int]) -> str:
        """Add tokens; return the text that may be shown now ('' while held back)."""
        if self.stopped:
            return ""
        self._ids.extend(tokens)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and self._half_character()):
            return ""  # nothing new, or half a character: wait for the next token
        self._pending += after[len(before):]
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still held back, once the stream has ended (less half a character at its end:
        a reply cut by ``max_tokens`` inside a character ends before it, not in U+FFFD)."""
        if self.stopped:
            return ""
        rest = decode_whole(self._decode, self._ids[self._prefix:], self._read - self._prefix, self._shown_bytes)
        done = self._decode(self._ids[self._prefix : self._read])
        if len(rest) > len(done):
            self._pending += rest[len(done):]
        self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._lead and (len(self._pending) >= len(self._lead) or final):
            if self._pending.startswith(self._lead):
                self._pending = self._pending[len(self._lead):]
            self._lead = ""
        elif self._lead:
            return ""  # too short to tell yet
        for stop in self._stop:
            at = self._pending.find(stop)
            if at >= 0:
                piece, self._pending = self._pending[:at], ""
                self.stopped = True
                self.text += piece
                return piece
        keep = 0 if final else self._held_back()
        cut = len(self._pending) - keep
        piece, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += piece
        return piece

    def _held_back(self) -> int:
        """How many trailing characters might begin a stop string."""
        if not self._stop:
            return 0
        tail = self._pending[-self._hold:] if self._hold else ""
        for size in range(len(tail), 0, -1):
            if any(stop.startswith(tail[-size:]) for stop in self._stop):
                return size
        return 0
