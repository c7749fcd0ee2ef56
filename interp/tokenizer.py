"""Tokenizer, chat template and streaming detokenizer, without transformers.

A program directory carries the Hugging Face tokenizer files. At run time we read them
with the ``tokenizers`` library and render the chat template with jinja2, the way
transformers does, so ``paw run`` never imports transformers (and through it, torch).
The template renders under limits on time and size (``interp/chat_template.py``), and
every file is read so that a malformed one is one ``ProgramError`` line.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from interp.chat_template import compile_template, render_chat_template
from interp.errors import InputError, ProgramError
from interp.jsonfile import read_json_object
from interp.template_probe import Render, chat_template_notes, check_chat_template
from interp.token_bytes import TokenText, decode_whole, ends_inside_character
from interp.token_span import least_tokens, max_token_bytes

#: the tokenizer files of a program directory, as paw reads them
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
#: template variables paw sets itself, which a caller's ``variables`` may not replace
TEMPLATE_RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt"})


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from_config(template) -> str | None:
    """tokenizer_config.json's chat_template: a string, or transformers' list of named templates."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        chosen = named.get("default", next(iter(named.values()), None))
        return chosen if isinstance(chosen, str) else None
    return None


def _library_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an error of the tokenizers library (a Rust panic is a BaseException)."""
    return not isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _unencodable(text: str) -> str | None:
    """Why ``text`` is not valid Unicode (a lone surrogate: JSON's "\\ud800", undecodable bytes in argv), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"it holds an unpaired surrogate (U+{ord(text[exc.start]):04X}), which is not valid Unicode"
    return None



def _encode_with(tok: _HFTokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """``tok``'s ids of ``text``; a library failure on the text is one ``InputError``."""
    try:
        # encode_batch lets other threads run meanwhile; encode holds the GIL throughout (a long
        # prompt froze every stream of `paw serve` while it was tokenized: docs/reliability.md)
        return tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    except BaseException as exc:
        if not _library_error(exc):
            raise
        raise InputError(f"the tokenizer could not encode the text: {_unencodable(text) or exc}") from exc

class Tokenizer:
    """Encode, decode and apply the chat template of one program's tokenizer."""

    def __init__(self, directory: str | Path, eos_token_ids: list[int] | None = None):
        directory = Path(directory)
        self._json: str | None = None  # to_json's text, made on first use
        for name in TOKENIZER_FILES:  # one that is there but unreadable as a file would be silently skipped
            if (directory / name).exists() and not (directory / name).is_file():
                raise ProgramError(f"{directory / name} is not a file")
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ProgramError(f"{directory} has no tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except BaseException as exc:
            if not _library_error(exc):
                raise
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ProgramError(f"cannot read {path}: {reason}") from exc
        config_path = directory / "tokenizer_config.json"
        self.config = read_json_object(config_path) if config_path.is_file() else {}
        template_path = directory / "chat_template.jinja"
        if template_path.is_file():
            try:
                self.chat_template = template_path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ProgramError(f"cannot read {template_path}: {exc}") from exc
        else:
            self.chat_template = _template_from_config(self.config.get("chat_template"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        ids = set(eos_token_ids or [])
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            ids.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = ids
        self._template = None
        #: the text of each special token (``<|im_end|>``), which ``encode`` turns into that token
        self.special_texts = tuple(t.content for t in self._tok.get_added_tokens_decoder().values() if t.special)
        self._literal: _HFTokenizer | None = None
        self._spelling: TokenText | None = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a string, not {type(text).__name__}")
        return _encode_with(self._tok, text, add_special_tokens)

    def holds_special_text(self, text: str) -> bool:
        """Whether ``text`` holds a special token's text, which ``encode`` would make that token."""
        return any(special in text for special in self.special_texts)

    def encode_literal(self, text: str) -> list[int]:
        """``text``'s ids with a special token's text in it (``<|im_end|>``) kept as text, never
        that token: for data such as a program's input, which must not end its own turn.
        No BOS or other added special tokens."""
        if not self.holds_special_text(text):
            return self.encode(text, add_special_tokens=False)
        if self._literal is None:  # a copy, so the shared tokenizer's setting never changes under a thread
            literal = _HFTokenizer.from_str(self._tok.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return _encode_with(self._literal, text, add_special_tokens=False)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        try:
            return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except BaseException as exc:
            if not _library_error(exc):
                raise
            raise InputError(f"the tokenizer could not decode the ids: {exc}") from exc

    @functools.cached_property
    def _normalize(self):
        normalizer = self._tok.normalizer
        return normalizer.normalize_str if normalizer is not None else None

    @functools.cached_property
    def max_token_bytes(self) -> int | None:
        """The most bytes of text one token stands for (``interp/token_span.py``), or None when the
        tokenizer allows no such bound; read from the vocabulary once."""
        return max_token_bytes(json.loads(self._tok.to_str()), self._normalize)

    def least_tokens(self, text: str) -> int:
        """A lower bound on ``len(encode(text))`` from the text's size alone, without tokenizing
        it (0 when the tokenizer allows no bound): a prompt too long for the context is refused
        at once."""
        return least_tokens(text, self.max_token_bytes, self._normalize)

    def decode_finished(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """The text of a finished output: ``decode``, less half a character at its end (an
        output cut by its token budget inside a character ends before it, not in U+FFFD)."""
        if self._spelling is None:
            self._spelling = TokenText(self)
        special = self.special_ids if skip_special_tokens else frozenset()
        return decode_whole(lambda part: self.decode(part, skip_special_tokens), list(ids), 0,
                            lambda token: b"" if token in special else self._spelling.bytes(token))

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """The ids of the special tokens (those ``skip_special_tokens`` leaves out)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's string for an id (byte-level BPE spells bytes as letters), or None."""
        return self._tok.id_to_token(token_id)

    def to_json(self) -> str:
        """The tokenizer.json text (what grammar engines build their token tables from); made once
        (a program's copy rule compiles a grammar per call)."""
        if self._json is None:
            self._json = self._tok.to_str()
        return self._json

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def takes_tools(self) -> bool:
        """Whether the chat template reads ``tools`` (one that does not would drop them silently)."""
        return bool(self.chat_template) and re.search(r"\btools\b", self.chat_template) is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, variables: dict[str, Any] | None = None) -> str:
        """Render the conversation as transformers' ``apply_chat_template(tokenize=False)`` does
        (``tools``: function definitions, passed to the template as transformers passes them;
        ``variables``: more template variables, as its ``**kwargs``, e.g. ``enable_thinking``;
        they may not be named as the variables above: ``TEMPLATE_RESERVED``)."""
        if not self.chat_template:
            raise ProgramError("this program's tokenizer has no chat template; use --raw")
        if self._template is None:
            template = compile_template(self.chat_template)
            check_chat_template(self._renderer(template))  # refused as `paw export` refuses it
            self._template = template
        extra = dict(variables or {})
        taken = sorted(set(extra) & TEMPLATE_RESERVED)
        if taken:
            raise InputError(f"chat template variable {taken[0]!r} is set by paw itself")
        return self._render(self._template, messages, add_generation_prompt, tools, extra)

    def chat_template_notes(self) -> list[str]:
        """What the chat template does not carry through (``interp.template_probe``); TemplateError
        when it cannot render a user's message at all; [] without a template."""
        if not self.chat_template:
            return []
        render = self._renderer(compile_template(self.chat_template))
        check_chat_template(render)
        return chat_template_notes(render)

    def _renderer(self, template) -> Render:
        return lambda messages, generation_prompt: self._render(template, messages, generation_prompt)

    def _render(self, template, messages: list[dict], add_generation_prompt: bool,
                tools: list[dict] | None = None, variables: dict[str, Any] | None = None) -> str:
        special = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token") and k.isidentifier()}
        return render_chat_template(template, **{**special, **(variables or {})}, messages=messages,
                                    add_generation_prompt=add_generation_prompt, tools=tools or None, documents=None)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    variables: dict[str, Any] | None = None) -> list[int]:
        """Token ids of ``apply_chat_template`` (``variables`` as there)."""
        # Templates already contain the special tokens they need.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, variables=variables),
                           add_special_tokens=False)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A streaming detokenizer; ``skip_special_tokens`` leaves special tokens out of its text."""
        return StreamingDetokenizer(self, skip_special_tokens)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that are safe to print.

    Decoding token by token breaks multi-byte characters and the spaces some tokenizers
    attach to the next word, so we decode the whole sequence and emit only the new
    suffix. Text ending inside a UTF-8 character (a U+FFFD read from half its bytes) is
    held back until the next token completes it; invalid bytes and the character U+FFFD
    itself read the same once decoded, so which it is comes from the tokens' bytes
    (``interp/token_bytes.py``, as the server's ``TextStream`` reads them), and such text
    streams as it comes. A stream that ends inside a character drops that half character.
    Decoding a few thousand ids takes well under a millisecond.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._spelling = TokenText(tokenizer)
        self._left_out = tokenizer.special_ids if skip_special_tokens else frozenset()
        self.tokens: list[int] = []
        self._whole = 0  # tokens before this decode to the text emitted: whole characters
        self.text = ""

    def add_token(self, token: int) -> str:
        """Add one token; return the new printable text (possibly empty)."""
        self.tokens.append(token)
        full = self._tokenizer.decode(self.tokens, skip_special_tokens=self._skip)
        if not full.startswith(self.text) or full.endswith("\ufffd") and self._half_character():
            return ""
        piece = full[len(self.text) :]
        self.text, self._whole = full, len(self.tokens)
        return piece

    def _half_character(self) -> bool:
        """Whether the tokens since the text last came out whole end inside a character."""
        return ends_inside_character(b"".join(self._shown_bytes(t) for t in self.tokens[self._whole :]))

    def _shown_bytes(self, token: int) -> bytes:
        """A token's bytes in the text: none for a special token the text leaves out."""
        return b"" if token in self._left_out else self._spelling.bytes(token)

    def finalize(self) -> str:
        """The text still held back, once the stream has ended; half a character at the end is
        dropped (``interp.token_bytes.decode_whole``)."""
        full = decode_whole(lambda ids: self._tokenizer.decode(ids, skip_special_tokens=self._skip), self.tokens,
                            self._whole, self._shown_bytes)
        piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text, self._whole = full, len(self.tokens)
        return piece
