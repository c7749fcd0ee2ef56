"""Save a source's tokenizer as a program carries it, and check it before the export's heavy work.

The tokenizer files are what ``paw run`` reads without transformers (``interp/tokenizer.py``).
A chat template that run time would refuse (a syntax error, a ``raise_exception`` on every
conversation, a loop that drops the user's message) used to be found only there, after the
whole export. ``check_tokenizer`` saves the tokenizer as the export will write it, reads it
back as run time will, and probes its template (``interp/template_probe.py``), before the
weights are read: one ``SourceError`` naming the source's file.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from exporter.sources import Source
from interp.errors import PawError, SourceError, TemplateError, first_line

SaveTokenizer = Callable[[Path], None]


def tokenizer_saver(tokenizer) -> SaveTokenizer | None:
    """Writes the tokenizer files into a directory, without the keys that name where they came from."""
    if tokenizer is None:
        return None

    def save(directory: Path) -> None:
        tokenizer.save_pretrained(str(directory))
        # Drop the keys that record where the tokenizer came from (a temp path makes
        # the export non-deterministic and leaks local paths).
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            for key in ("name_or_path", "_name_or_path", "tokenizer_file"):
                config.pop(key, None)
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                   encoding="utf-8")

    return save


def template_origin(source: Source) -> str:
    """Where the source's chat template comes from, as the user would look for it."""
    if source.gguf_file:
        return f"{source.name} (tokenizer.chat_template)"
    if source.kind == "hub":
        return f"{source.location} (its chat template)"
    folder = Path(source.location)
    return str(next((folder / name for name in ("chat_template.jinja", "chat_template.json")
                     if (folder / name).is_file()), folder / "tokenizer_config.json"))


def check_tokenizer(tokenizer, source: Source, say: Callable[[str], None]) -> None:
    """SourceError when the tokenizer, as the program will carry it, cannot be read back or its
    chat template cannot render a user's message; notes (``say``) for what the template leaves out."""
    save = tokenizer_saver(tokenizer)
    if save is None:
        return
    from interp.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory(prefix="paw-tokenizer-") as tmp:
        try:
            save(Path(tmp))
        except Exception as exc:  # transformers raises many types; the tokenizer is the source's
            raise SourceError(f"{source.name}: the tokenizer cannot be saved: {first_line(exc)}") from exc
        try:
            saved = Tokenizer(tmp)
            notes = saved.chat_template_notes()
        except TemplateError as exc:
            raise SourceError(f"{template_origin(source)}: {first_line(exc)}") from None
        except PawError as exc:  # the saved files do not read back: name the file, not the temporary folder
            raise SourceError(f"{source.name}: {first_line(exc).replace(tmp, 'the saved tokenizer')}") from None
    for note in notes:
        say(f"note: the chat template {note}")

