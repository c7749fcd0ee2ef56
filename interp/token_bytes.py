"""Tokens' exact bytes, and whether a run of them ends inside a UTF-8 character.

A decoded text that ends in U+FFFD may be half a character (its other bytes are in the
next tokens) or whole: invalid bytes and the character U+FFFD itself read the same. Streams
of text (``StreamingDetokenizer`` for ``paw run`` and ``paw chat``, the server's
``TextStream``) hold back only half a character, read from the tokens' bytes, so that such
text streams as it comes. When the stream ends inside a character (a reply cut by its token
budget), that half character is dropped (``decode_whole``), not shown as U+FFFD.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # interp/tokenizer.py imports this module for its streaming detokenizer
    from interp.tokenizer import Tokenizer

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenText:
    """A token's text and exact bytes (for log-probabilities: OpenAI's ``token`` and ``bytes``)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._known: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        known = self._known.get(token)
        if known is None:
            known = self._known[token] = self._spell(token)
        return known

    def _spell(self, token: int) -> bytes:
        piece = self._tokenizer.id_to_token(token)
        if piece is None:
            return b""
        byte = _BYTE_TOKEN.match(piece)
        if byte:  # SentencePiece byte fallback: <0xAB>
            return bytes([int(byte.group(1), 16)])
        table = _byte_level_decoder()
        if all(ch in table for ch in piece):  # byte-level BPE spells every byte as a letter
            return bytes(table[ch] for ch in piece)
        return self._tokenizer.decode([token]).encode("utf-8")

    def text(self, token: int) -> str:
        return self.bytes(token).decode("utf-8", errors="replace")


def ends_inside_character(data: bytes) -> bool:
    """Whether ``data`` ends inside a UTF-8 character: its last bytes begin one that the next
    bytes may complete (invalid bytes do not: they already read U+FFFD for good)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data)
    return bool(decoder.getstate()[0])  # bytes kept for the rest of a character


def decode_whole(decode: Callable[[list[int]], str], ids: list[int], since: int,
                 spell: Callable[[int], bytes]) -> str:
    """``decode(ids)`` less an unfinished character its last tokens begin: the text of a stream
    that has ended (a reply cut by ``max_tokens`` inside a character).

    ``ids[since:]`` are the tokens that may hold the half character (those after the text last
    came out whole), ``spell`` a token's bytes as the text shows them (b"" for one it leaves
    out). Only half a character goes: invalid bytes and the character U+FFFD stay.
    """
    pieces = [spell(token) for token in ids[since:]]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(b"".join(pieces))
    held = len(decoder.getstate()[0])  # bytes of the unfinished character
    if not held:
        return decode(ids)
    for at in range(len(pieces) - 1, -1, -1):
        if held <= len(pieces[at]):
            break
        held -= len(pieces[at])
    if held == len(pieces[at]):  # the character starts at a token: decode the tokens before it
        return decode(ids[:since + at])
    # a byte-level token holds whole characters and the start of the last: decoding reads that
    # start as one U+FFFD (a lossy UTF-8 decode), which goes
    text = decode(ids)
    return text[:-1] if text.endswith("\ufffd") else text


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-to-letter table, inverted: the letters byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    letters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            letters.append(256 + extra)
            extra += 1
    return {chr(letter): byte for byte, letter in zip(printable, letters, strict=True)}
