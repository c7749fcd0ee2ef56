"""Constrained decoding: outputs restricted to a list of choices, a regular expression or a
JSON schema, enforced token by token.

    grammar = compile_returns(["positive", "negative"], prog.tokenizer, vocab_size)
    row = grammar.start()               # one per generated row
    logits = mask_logits(logits, [row.allowed()])
    row.advance(token)                  # ... until row.done or the model's EOS

The grammar engine is llguidance (guidance-ai; the engine behind llama.cpp's and vLLM's
structured outputs): a Rust library in one dependency-free 3 MB abi3 wheel for macOS
arm64 and Linux x86_64, that builds a grammar in under a millisecond and a token mask in
tens of microseconds, lazily, with no vocabulary-sized precomputation. outlines-core
precomputes an index over the vocabulary per regex (seconds for a JSON schema) and
xgrammar requires torch, transformers and triton, which the run path must not import
(docs/programs.md).

Contract ("a constrained output always parses"): the mask allows the end-of-sequence
token only where the grammar accepts the output so far, and a row is ``done`` as soon
as the grammar cannot continue. A row whose token budget runs out before the grammar
accepts is an error (``ConstraintError``), never a truncated output.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from interp.errors import ConstraintError
from interp.jsonfile import parse_json
from interp.paths import require_file

#: how the error of a row whose constraint failed while generating begins
CONSTRAINT_FAILED = "the output constraint failed"

#: The JSON layout a constrained output takes: json.dumps's separators, no free whitespace
#: (free whitespace lets a small model pad forever; a schema's "x-guidance" may override).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# ----------------------------------------------------------------------------- specs


def normalize_returns(returns: Any) -> dict:
    """The canonical form of an output constraint, checked: one of ``{"choices": [str, ...]}``,
    ``{"regex": str}``, ``{"json_schema": dict}``, ``{"json_object": True}`` or ``{"lark": str}``
    (a grammar in llguidance's Lark dialect, whose ``%json {...}`` embeds a JSON schema: what a
    server's tool calls are built from).

    Accepts those forms, a plain list of choices, or a string in the CLI's forms
    (``parse_returns_option``). Raises ``ConstraintError`` naming what is wrong.
    """
    if isinstance(returns, str):
        return parse_returns_option(returns)
    if isinstance(returns, list | tuple):
        return _choices(list(returns))
    if not isinstance(returns, dict):
        raise ConstraintError(f"returns must be a list of choices or a dict, not {type(returns).__name__}")
    keys = set(returns) & {"choices", "regex", "json_schema", "json_object", "lark"}
    if len(keys) != 1 or len(returns) != 1:
        if "type" in returns or "properties" in returns or "$schema" in returns:
            return _schema(returns)  # a bare JSON schema
        raise ConstraintError("returns takes exactly one of 'choices', 'regex', 'json_schema', 'json_object' "
                              f"or 'lark'; got keys {sorted(returns)}")
    key = keys.pop()
    value = returns[key]
    if key == "choices":
        return _choices(value)
    if key in ("regex", "lark"):
        if not isinstance(value, str) or not value:
            raise ConstraintError(f"returns '{key}' must be a non-empty string")
        return {key: value}
    if key == "json_schema":
        return _schema(value)
    if value is not True:
        raise ConstraintError("returns 'json_object' must be true")
    return {"json_object": True}


def _choices(values: Any) -> dict:
    # A string or an object is not a list of choices (iterated, it would be its characters or keys).
    if not isinstance(values, list | tuple) or not values or not all(isinstance(v, str) and v for v in values):
        raise ConstraintError("returns choices must be a non-empty list of non-empty strings")
    return {"choices": list(dict.fromkeys(values))}


def _schema(schema: Any) -> dict:
    if not isinstance(schema, dict):
        raise ConstraintError(f"a JSON schema must be a JSON object, not {type(schema).__name__}")
    return {"json_schema": schema}


def parse_returns_option(text: str) -> dict:
    """The constraint a CLI ``--returns`` value names: a JSON list of choices, ``choices:A|B``,
    ``regex:PATTERN`` (or ``re:``), ``json`` (any object), a JSON schema, or ``@FILE`` of JSON."""
    text = text.strip()
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        require_file(path, "returns file", ConstraintError)
        return normalize_returns(parse_json(path.read_bytes(), str(path), ConstraintError))
    if text == "json":
        return {"json_object": True}
    for prefix in ("regex:", "re:"):
        if text.startswith(prefix):
            return normalize_returns({"regex": text[len(prefix):]})
    if text.startswith("choices:"):
        return _choices([c for c in text[len("choices:"):].split("|")])
    if text[:1] in "[{":
        return normalize_returns(parse_json(text, f"--returns {_shorten(text)!r}", ConstraintError))
    raise ConstraintError(f"cannot read --returns {_shorten(text)!r}: use a JSON list of choices, choices:A|B, "
                          "regex:PATTERN, json, a JSON schema or @FILE")


def _shorten(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters for an error line."""
    return text if len(text) <= limit else text[:limit] + "..."


def describe_returns(spec: dict) -> str:
    """A short human description of a normalized constraint (for logs and the CLI)."""
    if "choices" in spec:
        shown = ", ".join(repr(c) for c in spec["choices"][:6])
        return "one of " + shown + (" ..." if len(spec["choices"]) > 6 else "")
    if "regex" in spec:
        return f"regex {spec['regex']!r}"
    if "json_schema" in spec:
        return "JSON matching a schema"
    if "lark" in spec:
        return "a grammar"
    return "a JSON object"


def _grammar_text(spec: dict) -> str:
    import llguidance

    if "choices" in spec:
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec["choices"]))
    if "regex" in spec:
        return llguidance.LLMatcher.grammar_from_regex(spec["regex"])
    if "lark" in spec:
        return llguidance.LLMatcher.grammar_from_lark(spec["lark"])
    schema = spec["json_schema"] if "json_schema" in spec else {"type": "object"}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise ConstraintError(f"invalid JSON schema: {exc}") from exc


# ----------------------------------------------------------------------------- tokenizers


def _tokenizer_json(tokenizer: Any) -> str:
    """The Hugging Face tokenizer.json text of paw's Tokenizer, a ``tokenizers.Tokenizer``,
    or a path to a tokenizer.json / a program directory."""
    if hasattr(tokenizer, "to_json"):
        return tokenizer.to_json()  # paw's Tokenizer serialises once and keeps the text
    if hasattr(tokenizer, "to_str"):
        return tokenizer.to_str()
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConstraintError(f"no tokenizer.json at {path}")
    return path.read_text(encoding="utf-8")


def _eos_ids(tokenizer: Any) -> list[int]:
    ids = getattr(tokenizer, "eos_token_ids", None)
    return sorted(int(i) for i in ids) if ids else []


@functools.lru_cache(maxsize=8)
def _ll_tokenizer(tokenizer_json: str, vocab_size: int, eos: tuple[int, ...]):
    # About 0.3 s for a 49k vocabulary: built once per tokenizer and shared.
    import llguidance

    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos) or None)


# ----------------------------------------------------------------------------- grammar


class Grammar:
    """A compiled output constraint for one tokenizer: shared by rows and threads."""

    def __init__(self, spec: dict, grammar: str, ll_tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self.spec = spec
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self._grammar = grammar
        self._tokenizer = ll_tokenizer

    def start(self, *, required: bool = True) -> Constraint:
        """A fresh constraint for one generated row. ``required=False``: a row that reaches its
        token budget before the grammar accepts ends truncated, as an unconstrained row would,
        not as an error (a compiled program's copy rule, which no caller asked to parse)."""
        import llguidance

        matcher = llguidance.LLMatcher(self._tokenizer, self._grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"cannot start the output constraint: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size, self.eos_token_ids, required=required)

    def matches(self, text: str) -> bool:
        """Whether ``text`` is a complete output the grammar accepts (for checks and tests)."""
        row = self.start()
        ids = self._tokenizer.tokenize_str(text)
        return row._matcher.try_consume_tokens(ids) == len(ids) and row._matcher.is_accepting()


class Constraint:
    """The state of one row under a grammar: which tokens may come next, and whether it is done."""

    def __init__(self, matcher, vocab_size: int, eos_token_ids: frozenset[int], *, required: bool = True):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._finished = False
        #: whether an output that stops short of the grammar is an error (``Grammar.start``)
        self.required = required

    def allowed(self) -> np.ndarray:
        """Boolean mask [vocab_size] of the tokens allowed next (EOS only where the output is complete)."""
        if self.done:
            mask = np.zeros(self._vocab_size, dtype=bool)
            mask[list(self._eos)] = True
            return mask
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self._vocab_size].astype(bool)

    def advance(self, token: int) -> None:
        """Consume the generated ``token``; a token the mask did not allow is an error."""
        if token in self._eos and self._matcher.is_accepting():
            self._finished = True
            return
        if not self._matcher.consume_token(int(token)):
            raise ConstraintError(f"token {token} breaks the output constraint: {_one_line(self._matcher.get_error())}")

    @property
    def failure(self) -> str | None:
        """Why the grammar engine gave up on this row (its mask then allows only EOS), or None.

        A grammar can be valid and still fail while generating (a regex whose automaton
        grows past llguidance's limits); the row must end as an error, not as a finished output.
        """
        if not self._matcher.is_error():
            return None
        return f"{CONSTRAINT_FAILED}: {_one_line(self._matcher.get_error())}"

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may still go on, e.g. more digits)."""
        return self._finished or self._matcher.is_accepting()

    @property
    def done(self) -> bool:
        """The output is complete and cannot continue (or ended with EOS): stop this row now."""
        return self._finished or self._matcher.is_stopped()


def _after_lead(grammar: str, lead: str) -> str:
    """``grammar`` with ``lead`` before what it matches: a compiled program's output lead
    (``PromptLayout.output_lead``), which the program writes and the caller never sees."""
    top = json.loads(grammar) if grammar.lstrip().startswith("{") else {"grammars": [{"lark_grammar": grammar}]}
    top["grammars"][0]["name"] = "body"
    top["grammars"].insert(0, {"name": "lead", "lark_grammar": f"start: {json.dumps(lead)} @body"})
    return json.dumps(top)


def compile_returns(returns: Any, tokenizer: Any, vocab_size: int, *,
                    eos_token_ids: Sequence[int] | None = None, lead: str = "", checked: bool = True) -> Grammar:
    """Compile an output constraint for ``tokenizer`` (paw's Tokenizer, a ``tokenizers.Tokenizer``
    or a tokenizer.json path) and a model of ``vocab_size`` logits.

    ``returns``: a list of choices, ``{"choices": [...]}``, ``{"regex": str}``,
    ``{"json_schema": dict}``, ``{"json_object": True}``, a bare JSON schema, or a string in
    the CLI's forms. EOS ids default to the tokenizer's. Raises ``ConstraintError`` (a
    ``PawError``) on an invalid spec, regex or schema. ``lead`` is text every output starts
    with before what ``returns`` describes (a compiled program's output lead). ``checked=False``
    skips validating the grammar and checking that it admits an output, for a
    grammar paw writes itself for every call (a program's copy rule).
    """
    import llguidance

    spec = normalize_returns(returns)
    eos = tuple(sorted(eos_token_ids)) if eos_token_ids is not None else tuple(_eos_ids(tokenizer))
    if not eos:
        raise ConstraintError("the model declares no end-of-sequence token, so a constrained output could not end")
    ll_tokenizer = _ll_tokenizer(_tokenizer_json(tokenizer), int(vocab_size), eos)
    grammar = _grammar_text(spec)
    if lead:
        grammar = _after_lead(grammar, lead)
    if not checked:
        return Grammar(spec, grammar, ll_tokenizer, int(vocab_size), eos)
    error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer)
    if error and not error.startswith("WARNING"):
        what = describe_returns(spec)
        raise ConstraintError(f"invalid output constraint ({what}): {_one_line(error)}")
    compiled = Grammar(spec, grammar, ll_tokenizer, int(vocab_size), eos)
    first = compiled.start()
    besides_eos = first.allowed()
    besides_eos[list(eos)] = False
    if not first.accepting and not besides_eos.any():
        # e.g. {"$ref": "#"}: recursion with no way out; every output would be empty
        raise ConstraintError(f"the output constraint ({describe_returns(spec)}) admits no output")
    return compiled


def _one_line(error: str) -> str:
    """llguidance's multi-line error as one line: its first line and its ``error:`` line
    (a regex error's first line ends in "regex parse error:" and the reason comes later)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    reason = next((line.removeprefix("error:").strip() for line in lines[1:] if line.startswith("error:")), "")
    return f"{lines[0].rstrip(':')}: {reason}" if reason else lines[0]


def grammar_for(prog, returns: Any, lead: str = "", checked: bool = True) -> Grammar:
    """``compile_returns`` for a loaded program (``paw_mlx.load``): its tokenizer, logits width
    and end-of-sequence ids; ``lead``: a compiled program's output lead."""
    vocab = prog.program.model_info.get("vocab_size") or prog.tokenizer.vocab_size
    return compile_returns(returns, prog.tokenizer, int(vocab), eos_token_ids=sorted(prog.eos_token_ids), lead=lead,
                           checked=checked)


def mask_logits(logits, allowed: Sequence[np.ndarray | None]):
    """``logits`` [batch, vocab] (MLX) with the disallowed tokens of each row set to -inf.

    ``allowed[i]`` is row i's mask from ``Constraint.allowed()``, or None for an
    unconstrained row.
    """
    import mlx.core as mx

    if all(a is None for a in allowed):
        return logits
    vocab = logits.shape[-1]
    rows = np.ones((len(allowed), vocab), dtype=bool)
    for i, mask in enumerate(allowed):
        if mask is not None:
            rows[i, : min(vocab, mask.shape[0])] = mask[:vocab]
            rows[i, mask.shape[0]:] = False
    return mx.where(mx.array(rows), logits, mx.array(-np.inf, dtype=logits.dtype))
