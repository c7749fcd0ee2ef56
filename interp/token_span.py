"""The most bytes of text one token can stand for, and so the fewest tokens a text can take.

A prompt of 3,000,000 characters took `paw serve` about 14 s to tokenize before it was refused
as longer than the context. A text of N UTF-8 bytes takes at least N / L tokens when no token
stands for more than L bytes of it, so a prompt whose size alone proves it too long is refused
without tokenizing it. The bound must never refuse a prompt that fits, so L is computed only
for tokenizers where every token provably covers at most its own spelling:

- a BPE model (merges only join pieces of the vocabulary; WordPiece and Unigram can turn a
  whole unknown word into one ``[UNK]``, and so can BPE with ``fuse_unk`` unless byte fallback
  spells every byte);
- pre-tokenizers that keep every character (byte-level, metaspace, digit and punctuation
  splits, ``Split`` unless it removes what it matches), not those that drop whitespace;
- no added token with ``lstrip``/``rstrip`` (such a token swallows any run of spaces beside it).

A token's span is its spelling's length in bytes: a byte-level letter is one byte, ``<0xAB>``
one byte, any other piece its UTF-8 length (SentencePiece's ``▁`` is three bytes and stands
for one space), an added token its content. A normalizer may shrink text (NFKC turns the
three bytes of a fullwidth "Ａ" into one), so a text is measured after the tokenizer's own
normalizer, and an added token's span counts its normalized content too. Text a tokenizer
adds (a prefix space, ``▁``, BOS) only adds tokens, so the bound stays a lower one.
"""

from __future__ import annotations

import math
import re

from interp.token_bytes import _byte_level_decoder

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
#: pre-tokenizers that keep every character of the text (a ``behavior`` of "removed" drops some)
_KEEPING = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


def _keeps_text(pre: dict | None) -> bool:
    if pre is None:
        return True
    if pre.get("type") == "Sequence":
        return all(_keeps_text(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") in _KEEPING and str(pre.get("behavior", "")).lower() != "removed"


def _byte_level(pre: dict | None) -> bool:
    if pre is None:
        return False
    if pre.get("type") == "Sequence":
        return any(_byte_level(p) for p in pre.get("pretokenizers", []))
    return pre.get("type") == "ByteLevel"


def max_token_bytes(spec: dict, normalize=None) -> int | None:
    """The most bytes of (normalized) text one token of tokenizer.json ``spec`` covers, or None
    when no such bound is provable (see the module's docstring). ``normalize`` is the
    tokenizer's normalizer as a function of a string (None: it has none)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return None
    vocab: dict[str, int] = model["vocab"]
    if model.get("fuse_unk") and model.get("unk_token") is not None and not (
            model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256))):
        return None  # a run of unknown characters may fuse into one token
    pre = spec.get("pre_tokenizer")
    if not _keeps_text(pre):
        return None
    added = spec.get("added_tokens") or []
    if any(token.get("lstrip") or token.get("rstrip") for token in added):
        return None
    letters = _byte_level_decoder() if _byte_level(pre) else {}
    longest = 4 if model.get("unk_token") is not None else 1  # an unknown character: up to 4 bytes
    for piece in vocab:
        if letters and all(ch in letters for ch in piece):
            span = len(piece)
        elif _BYTE_TOKEN.match(piece):
            span = 1
        else:
            span = len(piece.encode("utf-8"))
        longest = max(longest, span)
    for token in added:
        content = str(token.get("content", ""))
        longest = max(longest, len(content.encode("utf-8")),
                      len(normalize(content).encode("utf-8")) if normalize is not None else 0)
    return longest


def least_tokens(text: str, longest: int | None, normalize=None) -> int:
    """A lower bound on the tokens ``text`` encodes to: its (normalized) UTF-8 bytes over
    ``longest`` (``max_token_bytes``); 0 when there is no bound (or the text is not valid
    Unicode, which encoding refuses with its own message)."""
    if not longest or not text:
        return 0
    try:
        if normalize is not None:
            text = normalize(text)
        size = len(text.encode("utf-8"))
    except (UnicodeError, ValueError, TypeError):
        return 0
    return math.ceil(size / longest)
