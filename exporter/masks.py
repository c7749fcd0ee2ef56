"""What a model's attention mask says, for the ``attention`` op: causal, windowed or chunked.

transformers builds each layer's mask through its mask interface, from an index-based
mask function (``transformers.masking_utils``). Under attn_implementation "paw" the mask
interface builds no tensor: it reads the mask function and returns an ``AttentionPattern``,
which reaches the attention interface as the layer's ``attention_mask``. That is where a
window lives for models that do not pass ``sliding_window`` to the attention interface
(PhiMoE): eager attention, the reference, applies the window through the mask only.

Chunked attention (Llama 4's local layers) is transformers' ``chunked_overlay``: a query sees
the keys of its own chunk of ``chunk_size`` positions. Its ``left_padding`` shifts chunks for
left-padded batches; a program needs no such shift, since the interpreter places chunks on
each row's own positions (interp/ops/attention.py), and capture runs without padding.

A mask the op cannot express (bidirectional, a custom overlay) is refused by name
at capture, and a model that uses the mask as a tensor (attention by hand that adds it to
its scores; Doge folds a learned bias into it) meets ``__torch_function__`` or
``__getattr__`` here, which refuse it, rather than exporting a program that silently drops
the masking (families with a recipe, exporter/recipes.py, never use the mask as a tensor;
converting it with ``.to``, as MPT's model does before its layers, keeps the pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from interp.errors import ExportError

#: mask-function parts, by qualified name (transformers 5.x): the three the op expresses, the
#: conjunction that joins them, and packed-sequence wrappers, which change nothing for a
#: program (each batch row is one sequence, positions counting from its start)
_CAUSAL = "causal_mask_function"
_WINDOW = "sliding_window_overlay.<locals>.inner_mask"
_CHUNK = "chunked_overlay.<locals>.inner_mask"
_AND = "and_masks.<locals>.and_mask"
_REMAP = "remap_positions_for_packed_sequence.<locals>.inner_mask"
_PACKED = "packed_sequence_mask_function.<locals>.inner_mask"


@dataclass(frozen=True)
class AttentionPattern:
    """A layer's mask as the attention op sees it: causal; ``window`` > 0 keeps only the last window keys,
    ``chunk`` > 0 only the keys of the query's own chunk of ``chunk`` positions."""

    window: int = 0
    chunk: int = 0
    model: str = ""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        model = next((a.model for a in args if isinstance(a, AttentionPattern) and a.model), "")
        raise _by_hand(model, getattr(func, "__name__", str(func)))

    def to(self, *args, **kwargs) -> AttentionPattern:
        """A dtype or device conversion (MPT's ``.to(torch.bool)``) leaves the pattern as it is."""
        return self

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _by_hand(self.model, name)


def _by_hand(model: str, use: str) -> ExportError:
    """The refusal for a model that uses its attention mask as a tensor (``use``: the op or attribute)."""
    who = f"{model} " if model else "the model "
    return ExportError(f"cannot export: {who}uses its attention mask as a tensor ({use}): it computes attention "
                       "by hand or builds a mask of its own, which the attention op cannot take, and paw has no "
                       "recipe for it (exporter/recipes.py)")


def _cell(fn: Callable, name: str):
    names = fn.__code__.co_freevars
    return fn.__closure__[names.index(name)].cell_contents if name in names else None


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", type(fn).__name__)


def _conjuncts(fn: Callable) -> list[Callable]:
    """The mask functions ``fn`` is the conjunction of, packed-sequence wrappers taken off."""
    name = _name(fn)
    if name == _AND:
        return [leaf for part in _cell(fn, "mask_functions") or () for leaf in _conjuncts(part)]
    if name == _REMAP:
        return _conjuncts(_cell(fn, "mask_function"))
    if name == _PACKED:
        return []
    return [fn]


def pattern_of(mask_function: Callable, model: str = "") -> AttentionPattern:
    """The pattern a mask function applies: causal with at most one window or chunk; ExportError if more than that."""
    parts = _conjuncts(mask_function)
    names = [_name(part) for part in parts]
    windows = [int(_cell(part, "sliding_window")) for part in parts if _name(part) == _WINDOW]
    chunks = [int(_cell(part, "chunk_size")) for part in parts if _name(part) == _CHUNK]
    if _CAUSAL in names and set(names) <= {_CAUSAL, _WINDOW, _CHUNK} and len(windows) + len(chunks) <= 1:
        return AttentionPattern(window=windows[0] if windows else 0, chunk=chunks[0] if chunks else 0, model=model)
    raise ExportError(f"cannot export: the model's attention mask ({' and '.join(names)}) is not causal with an "
                      "optional sliding window or chunks, which is all the attention op expresses (bidirectional "
                      "and custom masks are not supported)")


def paw_mask(*args, mask_function: Callable | None = None, config=None, **kwargs) -> AttentionPattern:
    """Mask interface for "paw": the layer's pattern, not a tensor (the attention op masks by itself)."""
    from transformers.masking_utils import causal_mask_function

    model = type(config).__name__.removesuffix("Config") if config is not None else ""
    return pattern_of(mask_function or causal_mask_function, model)
