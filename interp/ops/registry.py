"""The table of op implementations, keyed by schema op name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from interp.schema import OPS


@dataclass(frozen=True)
class Handler:
    fn: Callable
    needs_context: bool = False


REGISTRY: dict[str, Handler] = {}


def implementation(name: str, needs_context: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the MLX implementation of schema op ``name``."""
    if name not in OPS:
        raise KeyError(f"op {name!r} is not in the schema; add it to interp/schema.py first")

    def register(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise KeyError(f"op {name!r} is implemented twice")
        REGISTRY[name] = Handler(fn, needs_context)
        return fn

    return register
