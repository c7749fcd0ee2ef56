"""Complex tensors lowered onto real program ops: a complex tensor is its real and imaginary pairs.

Some models write rotary embeddings with complex numbers (DeepSeek-V2's ``torch.polar``,
``view_as_complex``, a complex product, ``view_as_real``; Meta's original Llama). A
program has no complex dtype, so every complex value of the graph is lowered as the real
tensor ``view_as_real`` gives: the complex shape plus a trailing axis of 2 (real,
imaginary). ``view_as_complex`` and ``view_as_real`` are then the identity, ``polar`` is
(r cos t, r sin t), a complex product is the 2x2 real formula, and shape ops shift a
negative axis past the pair axis.

``lower`` sends a node here whenever its result or a tensor argument is complex
(``touches_complex``); an op on complex tensors without an entry in ``COMPLEX`` is
refused by name, as any unmapped op is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from exporter.aten_ops import _arg, _drop, _identity, cat_along, registrar, slice_along
from exporter.lazy import LazyTensor
from exporter.lower import Lowering, dtype_name
from interp.errors import ExportError

COMPLEX: dict[str, Callable[[Lowering, torch.fx.Node], Any]] = {}

#: complex dtypes a program can hold as pairs of the real dtype it has
PAIR_DTYPES = {torch.complex64: torch.float32, torch.complex32: torch.float16}


complex_op = registrar(COMPLEX)


def _is_complex(value: Any) -> bool:
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def touches_complex(node: torch.fx.Node) -> bool:
    """Whether an fx node's result or one of its tensor arguments is complex."""
    args = [*node.args, *node.kwargs.values()]
    flat = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return _is_complex(node) or any(_is_complex(a) for a in flat)


def as_pairs(value: Any) -> Any:
    """A complex const (a tensor or a lazy one) as its real pairs [..., 2]; any other const unchanged."""
    dtype = getattr(value, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_complex:
        return value
    if dtype not in PAIR_DTYPES:
        raise ExportError(f"a {dtype} constant has no program equivalent")
    if isinstance(value, LazyTensor):
        return LazyTensor([*value.shape, 2], PAIR_DTYPES[dtype], lambda: torch.view_as_real(value.materialize()))
    return torch.view_as_real(value).contiguous()


def _axis(dim: int) -> int:
    """A complex tensor's axis in its pairs: a negative axis counts past the trailing pair axis."""
    return dim - 1 if dim < 0 else dim


def _part(low: Lowering, pairs: Any, index: int) -> Any:
    """The real (0) or imaginary (1) part of a complex value's pairs."""
    return low.emit("select", [pairs], {"dim": -1, "index": index})


def _join(low: Lowering, real: Any, imag: Any) -> Any:
    """The pairs [..., 2] of real and imaginary parts of one shape."""
    real, imag = (low.emit("unsqueeze", [part], {"dim": -1}) for part in (real, imag))
    return low.emit("cat", [[real, imag]], {"dim": -1})


def _real_operand(low: Lowering, value: Any) -> Any:
    """A real operand of a complex elementwise op, broadcast against pairs: a scalar as is, a tensor [..., 1]."""
    if isinstance(value, torch.fx.Node):
        return low.emit("unsqueeze", [low.ref(value)], {"dim": -1})
    if isinstance(value, complex):
        raise ExportError(f"a complex Python scalar ({value}) has no program equivalent")
    return low.ref(value)


# ----------------------------------------------------------------------------- conversions


complex_op("aten.view_as_complex.default", "aten.view_as_real.default", "aten.alias.default", "aten.clone.default",
           "aten.contiguous.default", "aten.detach.default", "aten.lift_fresh_copy.default")(_identity)
complex_op("aten._assert_tensor_metadata.default")(_drop)


@complex_op("aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten.type_as.default")
def _to_copy(low: Lowering, node):
    """A cast to, from or between complex dtypes: a real tensor gains a zero imaginary part, a complex one
    cast to a real dtype keeps its real part (as torch does)."""
    have, want = node.args[0].meta["val"].dtype, node.meta["val"].dtype
    x = low.ref(node.args[0])
    if have == want:
        return x
    if want.is_complex and want not in PAIR_DTYPES:
        raise ExportError(f"a cast to {want} (node {node.name}) has no program equivalent")
    if have.is_complex and want.is_complex:
        return low.emit("cast", [x], {"dtype": dtype_name(PAIR_DTYPES[want])})
    if have.is_complex:
        return low.emit("cast", [_part(low, x, 0)], {"dtype": dtype_name(want)})
    real = low.emit("cast", [x], {"dtype": dtype_name(PAIR_DTYPES[want])})
    return _join(low, real, low.emit("full_like", [real], {"value": 0.0, "dtype": dtype_name(PAIR_DTYPES[want])}))


@complex_op("aten.polar.default")
def _polar(low: Lowering, node):
    """abs * (cos(angle), sin(angle))."""
    radius, angle = (low.ref(a) for a in node.args[:2])
    real = low.emit("mul", [radius, low.emit("cos", [angle])])
    imag = low.emit("mul", [radius, low.emit("sin", [angle])])
    return _join(low, real, imag)


@complex_op("aten.complex.default")
def _complex(low: Lowering, node):
    """real + imag i, of one shape (parts that broadcast are refused)."""
    real, imag = node.args[:2]
    if [str(d) for d in real.meta["val"].shape] != [str(d) for d in imag.meta["val"].shape]:
        raise ExportError(f"torch.complex of parts with different shapes (node {node.name}) is not supported")
    return _join(low, low.ref(node.args[0]), low.ref(node.args[1]))


@complex_op("aten.real.default", "aten.imag.default")
def _real_imag(low: Lowering, node):
    return _part(low, low.ref(node.args[0]), 0 if "real" in str(node.target) else 1)


@complex_op("aten.abs.default")
def _abs(low: Lowering, node):
    """|z| = sqrt(real^2 + imag^2), a real tensor."""
    squares = low.emit("mul", [low.ref(node.args[0]), low.ref(node.args[0])])
    return low.emit("sqrt", [low.emit("sum", [squares], {"dims": [-1], "keepdim": False})])


# ----------------------------------------------------------------------------- arithmetic


@complex_op("aten.mul.Tensor", "aten.mul.Scalar")
def _mul(low: Lowering, node):
    """(a + bi)(c + di) = (ac - bd) + (ad + bc)i; a real factor scales both parts."""
    x, y = node.args[:2]
    if not _is_complex(x):
        x, y = y, x
    if not _is_complex(y):
        return low.emit("mul", [low.ref(x), _real_operand(low, y)])
    a, b = _part(low, low.ref(x), 0), _part(low, low.ref(x), 1)
    c, d = _part(low, low.ref(y), 0), _part(low, low.ref(y), 1)
    real = low.emit("sub", [low.emit("mul", [a, c]), low.emit("mul", [b, d])])
    imag = low.emit("add", [low.emit("mul", [a, d]), low.emit("mul", [b, c])])
    return _join(low, real, imag)


@complex_op("aten.div.Tensor", "aten.div.Scalar")
def _div(low: Lowering, node):
    """A complex tensor divided by a real one (or a number); dividing by a complex one is refused."""
    x, y = node.args[:2]
    if _is_complex(y) or node.kwargs.get("rounding_mode") is not None:
        raise ExportError(f"a division by a complex tensor (node {node.name}) is not supported")
    return low.emit("div", [low.ref(x), _real_operand(low, y)])


@complex_op("aten.add.Tensor", "aten.sub.Tensor")
def _add_sub(low: Lowering, node):
    """The sum or difference of two complex tensors, part by part."""
    x, y = node.args[:2]
    if not (_is_complex(x) and _is_complex(y)):
        raise ExportError(f"{node.target} of a complex and a real tensor (node {node.name}) is not supported")
    other = low.ref(y)
    alpha = node.kwargs.get("alpha", 1)
    if alpha != 1:
        if isinstance(alpha, complex):
            raise ExportError(f"a complex alpha (node {node.name}) is not supported")
        other = low.emit("mul", [other, alpha])
    return low.emit("add" if "add" in str(node.target) else "sub", [low.ref(x), other])


@complex_op("aten.neg.default")
def _neg(low: Lowering, node):
    return low.emit("neg", [low.ref(node.args[0])])


@complex_op("aten.conj_physical.default", "aten._conj_physical.default", "aten._conj.default", "aten.conj.default")
def _conj(low: Lowering, node):
    pairs = low.ref(node.args[0])
    return _join(low, _part(low, pairs, 0), low.emit("neg", [_part(low, pairs, 1)]))


# ----------------------------------------------------------------------------- shapes


@complex_op("aten.unsqueeze.default")
def _unsqueeze(low: Lowering, node):
    return low.emit("unsqueeze", [low.ref(node.args[0])], {"dim": _axis(node.args[1])})


@complex_op("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(low: Lowering, node):
    """Squeeze complex axes; with none named, every axis of size 1 (the pair axis never is)."""
    dims = _arg(node, 1, "dim", [])
    dims = [dims] if isinstance(dims, int) else list(dims)
    return low.emit("squeeze", [low.ref(node.args[0])], {"dims": [_axis(d) for d in dims]})


@complex_op("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def _reshape(low: Lowering, node):
    return low.emit("reshape", [low.ref(node.args[0])], {"shape": low.ref([*node.args[1], 2])})


@complex_op("aten.expand.default")
def _expand(low: Lowering, node):
    return low.emit("expand", [low.ref(node.args[0])], {"shape": low.ref([*node.args[1], 2])})


@complex_op("aten.repeat.default")
def _repeat(low: Lowering, node):
    return low.emit("tile", [low.ref(node.args[0])], {"reps": low.ref([*node.args[1], 1])})


@complex_op("aten.transpose.int")
def _transpose(low: Lowering, node):
    return low.emit("transpose", [low.ref(node.args[0])], {"dim0": _axis(node.args[1]), "dim1": _axis(node.args[2])})


@complex_op("aten.permute.default")
def _permute(low: Lowering, node):
    rank = len(node.meta["val"].shape)
    return low.emit("permute", [low.ref(node.args[0])], {"dims": [d % rank for d in node.args[1]] + [rank]})


@complex_op("aten.slice.Tensor")
def _slice(low: Lowering, node):
    return slice_along(low, node, _axis(_arg(node, 1, "dim", 0)))


@complex_op("aten.select.int")
def _select(low: Lowering, node):
    return low.emit("select", [low.ref(node.args[0])], {"dim": _axis(node.args[1]), "index": low.ref(node.args[2])})


@complex_op("aten.cat.default")
def _cat(low: Lowering, node):
    return cat_along(low, node, _axis(_arg(node, 1, "dim", 0)))
