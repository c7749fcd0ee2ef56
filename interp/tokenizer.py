"""Tokenizer, chat template and streaming detokenizer, without transformers.

A program directory carries the Hugging Face tokenizer files. At run time we read them
with the ``tokenizers`` library and render the chat template with jinja2, the way
transformers does, so ``paw run`` never imports transformers (and through it, torch).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from interp.errors import ProgramError


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode, decode and apply the chat template of one program's tokenizer."""

    def __init__(self, directory: str | Path, eos_token_ids: list[int] | None = None):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ProgramError(f"{directory} has no tokenizer.json")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise ProgramError(f"cannot read {path}: {exc}") from None
        config_path = directory / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template_path = directory / "chat_template.jinja"
        if template_path.is_file():
            self.chat_template = template_path.read_text(encoding="utf-8")
        else:
            template = self.config.get("chat_template")
            self.chat_template = template if isinstance(template, str) else None
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        ids = set(eos_token_ids or [])
        if self.eos_token is not None and self._tok.token_to_id(self.eos_token) is not None:
            ids.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids = ids
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's string for an id (byte-level BPE spells bytes as letters), or None."""
        return self._tok.id_to_token(token_id)

    def to_json(self) -> str:
        """The tokenizer.json text (what grammar engines build their token tables from)."""
        return self._tok.to_str()

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the conversation as transformers' ``apply_chat_template(tokenize=False)`` does."""
        if not self.chat_template:
            raise ProgramError("this program's tokenizer has no chat template; use --raw")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        special = {k: _token_text(v) for k, v in self.config.items() if k.endswith("_token")}
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     tools=None, documents=None, **special)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # Templates already contain the special tokens they need.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def detokenizer(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


class StreamingDetokenizer:
    """Turns a stream of token ids into text pieces that are safe to print.

    Decoding token by token breaks multi-byte characters and the spaces some tokenizers
    attach to the next word, so we decode the whole sequence and emit only the new
    suffix; a trailing U+FFFD (an incomplete UTF-8 sequence) is held back until the
    next token completes it. Decoding a few thousand ids takes well under a millisecond.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def add_token(self, token: int) -> str:
        """Add one token; return the new printable text (possibly empty)."""
        self.tokens.append(token)
        full = self._tokenizer.decode(self.tokens)
        if full.endswith("\ufffd") or not full.startswith(self.text):
            return ""
        piece = full[len(self.text) :]
        self.text = full
        return piece

    def finalize(self) -> str:
        full = self._tokenizer.decode(self.tokens)
        piece = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text = full
        return piece
