"""Render a program's chat template in a sandbox with limits on time and size.

A chat template is code that came with a program. jinja2's immutable sandbox keeps it
from touching anything but its arguments; it does not keep it from running forever
(nested ``range(100000)`` loops) or from building a string of gigabytes
(``'A' * 4000000000``). So ``render_chat_template`` adds:

- a deadline (``TEMPLATE_SECONDS``), checked on every line Python runs while the template
  renders (a trace function on this thread only, removed afterwards);
- a size limit (``TEMPLATE_MAX_CHARS``) on the output, read as it is produced, and on every
  value the template builds: ``*``, ``**``, ``+`` and ``%`` are checked before they run,
  ``~`` and every call and filter after, and integer arguments of calls and filters
  (widths, counts) are bounded the same way, so no single C-level operation can
  allocate far past the limit.

Any failure, a template's own ``raise_exception`` included, is one ``TemplateError``.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from functools import wraps

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from interp.errors import TemplateError

#: wall-clock seconds one rendering may take (templates take milliseconds)
TEMPLATE_SECONDS = 2.0
#: characters (or items) the output and any value built inside may reach
TEMPLATE_MAX_CHARS = 8_000_000
#: Python refuses to print larger integers (4,300 digits); nothing bigger is built
_MAX_INT_BITS = 4300 * 4


class _Limit(Exception):
    """Raised inside a rendering that hit a limit (becomes a TemplateError)."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_value(value):
    if _size(value) > TEMPLATE_MAX_CHARS:
        raise _Limit(f"it built a value of {_size(value):,} items (the limit is {TEMPLATE_MAX_CHARS:,})")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _Limit("it built an integer too large to print")
    return value


def _check_arguments(args, kwargs) -> None:
    """Widths, counts and other integer arguments stay within the size limit."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > TEMPLATE_MAX_CHARS:
            raise _Limit(f"a call got a number beyond the size limit of {TEMPLATE_MAX_CHARS:,}")


def _predicted_size(operator: str, left, right) -> int:
    """An upper bound on the size of ``left <operator> right``'s result, before computing it."""
    if operator == "*":
        for seq, count in ((left, right), (right, left)):
            if _size(seq) and isinstance(count, int):
                return _size(seq) * max(count, 0)
        if isinstance(left, int) and isinstance(right, int):
            return (left.bit_length() + right.bit_length()) // 4
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        return math.ceil(right * math.log2(abs(left))) // 4
    if operator == "+":
        return _size(left) + _size(right)
    if operator == "%" and isinstance(left, str):
        return _formatted_size(left, right if isinstance(right, tuple) else (right,))
    return 0


def _call_size(name: str, args: tuple, kwargs: dict) -> int:
    """An upper bound on the result of the string operation ``name`` (a str method or a
    filter of the same name), for those whose result can dwarf their arguments."""
    text = args[0] if args and isinstance(args[0], str) else ""
    rest = args[1:]
    if name == "replace" and len(rest) >= 2 and isinstance(rest[0], str) and isinstance(rest[1], str):
        count = rest[2] if len(rest) > 2 and isinstance(rest[2], int) and rest[2] >= 0 else None
        matches = len(text) + 1 if not rest[0] else len(text) // len(rest[0])
        return len(text) + min(matches, count if count is not None else matches) * len(rest[1])
    if name == "join":
        items = args[1] if text and len(args) > 1 else args[0] if args else ()
        separator = text if text else (rest[0] if rest and isinstance(rest[0], str) else kwargs.get("d", ""))
        sizes = [_size(item) or 20 for item in items] if isinstance(items, (list, tuple, str, range)) else [0]
        return sum(sizes) + len(separator if isinstance(separator, str) else "") * len(sizes)
    if name == "indent":
        width = rest[0] if rest else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(text) + (text.count("\n") + 1) * max(width, 0)
    if name == "expandtabs":
        tab = rest[0] if rest and isinstance(rest[0], int) else kwargs.get("tabsize", 8)
        return len(text) + text.count("\t") * max(tab if isinstance(tab, int) else 8, 0)
    if name == "translate" and rest and isinstance(rest[0], dict):
        longest = max((_size(v) for v in rest[0].values()), default=1)
        return len(text) * max(longest, 1)
    if name == "format":
        return _formatted_size(text, [*rest, *kwargs.values()])
    return 0


def _formatted_size(pattern: str, args) -> int:
    """An upper bound on the length of ``pattern`` formatted with ``args`` (% or str.format):
    every run of digits in the pattern may be a field width."""
    widths = sum(int(run) for run in re.findall(r"\d+", pattern[:10_000]))
    return len(pattern) + widths + sum(_size(a) + (a.bit_length() // 3 if isinstance(a, int) else 0) for a in args)


class _LimitedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` so that the joined string is checked like every other value."""

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with size checks on operators, calls and filters."""

    code_generator_class = _LimitedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        self.filters["tojson"] = _tojson
        self.filters = {name: _limited(name, fn) for name, fn in self.filters.items()}
        self.globals.pop("lipsum", None)  # paragraphs of filler on demand: no template needs it
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)

    @staticmethod
    def checked(value):
        return _check_value(value)

    def call_binop(self, context, operator: str, left, right):
        if _predicted_size(operator, left, right) > TEMPLATE_MAX_CHARS:
            raise _Limit(f"'{operator}' would build a value beyond the limit of {TEMPLATE_MAX_CHARS:,}")
        return _check_value(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        _check_arguments(args, kwargs)
        name = getattr(__obj, "__name__", "")
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format comes wrapped
        if isinstance(owner, str) and _call_size(name, (owner, *args), kwargs) > TEMPLATE_MAX_CHARS:
            raise _Limit(f"str.{name} would build a value beyond the limit of {TEMPLATE_MAX_CHARS:,}")
        return _check_value(super().call(__context, __obj, *args, **kwargs))


def _limited(name: str, fn: Callable) -> Callable:
    """A filter whose parameters (not the value it filters) and result are checked."""
    skip = 1 if getattr(fn, "jinja_pass_arg", None) else 0  # jinja passes context/environment first

    @wraps(fn)
    def filter_(*args, **kwargs):
        _check_arguments(args[skip + 1:], kwargs)
        if _call_size(name, args[skip:], kwargs) > TEMPLATE_MAX_CHARS:
            raise _Limit(f"the filter {name} would build a value beyond the limit of {TEMPLATE_MAX_CHARS:,}")
        return _check_value(fn(*args, **kwargs))

    return filter_


def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the limited sandbox; TemplateError for a syntax error."""
    try:
        return LimitedSandbox().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"the chat template does not compile: {exc.message} (line {exc.lineno})") from None
    except Exception as exc:  # jinja raises assorted errors for broken sources
        raise TemplateError(f"the chat template does not compile: {exc}") from None


def render_chat_template(template: jinja2.Template, **context) -> str:
    """``template`` rendered with ``context`` under the time and size limits; TemplateError on failure."""
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Limit(f"it ran longer than {TEMPLATE_SECONDS:g} s")
        return on_line

    previous = sys.gettrace()
    pieces: list[str] = []
    total = 0
    sys.settrace(lambda frame, event, arg: on_line)
    try:
        for piece in template.generate(**context):
            total += len(piece)
            if total > TEMPLATE_MAX_CHARS:
                raise _Limit(f"its output passed {TEMPLATE_MAX_CHARS:,} characters")
            pieces.append(piece)
    except _Limit as exc:
        raise TemplateError(f"the chat template was stopped: {exc}") from None
    except jinja2.TemplateError as exc:  # raise_exception, undefined values, sandbox refusals
        raise TemplateError(f"the chat template failed: {exc.message or type(exc).__name__}") from None
    except RecursionError:
        raise TemplateError("the chat template failed: it recursed too deeply") from None
    except MemoryError:
        raise TemplateError("the chat template failed: it ran out of memory") from None
    except Exception as exc:  # the template is code: any error it makes is its own
        raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)
