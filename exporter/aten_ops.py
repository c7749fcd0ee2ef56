"""The aten -> program-op registry. Each aten op maps to one small function.

The table ``ATEN`` *is* the exporter's coverage list: keys are the torch op names as
they print in an exported graph (``aten.linear.default``), values lower one fx node
into schema ops via ``Lowering.emit`` and return the program value that stands for the
node's result (a name, a list of names, or a literal for housekeeping ops).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from exporter.lower import INT64_MAX, Lowering, dtype_name
from interp.errors import ExportError
from interp.schema import KV_CACHE_OPS

ATEN: dict[str, Callable[[Lowering, torch.fx.Node], Any]] = {}


def registrar(table: dict[str, Callable]) -> Callable:
    """A decorator factory that files a lowering in ``table`` under each aten op name it is given, once."""

    def names(*ops: str):
        def register(fn):
            for name in ops:
                if name in table:
                    raise KeyError(f"{name} registered twice")
                table[name] = fn
            return fn

        return register

    return names


aten = registrar(ATEN)


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _rank(node: Any) -> int:
    return len(node.meta["val"].shape)


def _out_dtype(node: torch.fx.Node) -> str:
    return dtype_name(node.meta["val"].dtype)


# ----------------------------------------------------------------------------- housekeeping


@aten("aten._assert_tensor_metadata.default", "aten._assert_scalar.default",
      "aten.sym_constrain_range_for_size.default", "aten._assert_async.msg")
def _drop(low: Lowering, node):
    return None


@aten("aten.alias.default", "aten.clone.default", "aten.contiguous.default", "aten.detach.default",
      "aten.lift_fresh_copy.default")
def _identity(low: Lowering, node):
    return low.ref(node.args[0])


@aten("aten.dropout.default")
def _dropout(low: Lowering, node):
    if _arg(node, 2, "train", False) and _arg(node, 1, "p", 0.0):
        raise ExportError(f"dropout in training mode (node {node.name}); export the model in eval mode")
    return low.ref(node.args[0])


@aten("aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device")
def _to_copy(low: Lowering, node):
    src = node.args[0]
    want = node.meta["val"].dtype
    if src.meta["val"].dtype == want:
        return low.ref(src)
    return low.emit("cast", [low.ref(src)], {"dtype": dtype_name(want)})


@aten("aten.type_as.default")
def _type_as(low: Lowering, node):
    return low.emit("cast", [low.ref(node.args[0])], {"dtype": _out_dtype(node)})


@aten("getitem")
def _getitem(low: Lowering, node):
    container, index = node.args
    return low.ref(container)[index]


# ----------------------------------------------------------------------------- symbolic ints


@aten("aten.sym_size.int")
def _sym_size(low: Lowering, node):
    return low.emit("sym_size", [low.ref(node.args[0])], {"dim": node.args[1]})


for _py, _op in [("add", "sym_add"), ("sub", "sym_sub"), ("mul", "sym_mul"), ("floordiv", "sym_floordiv")]:
    def _make(op_name):
        def lower_sym(low: Lowering, node):
            return low.emit(op_name, [low.ref(node.args[0]), low.ref(node.args[1])])
        return lower_sym
    aten(f"operator.{_py}")(_make(_op))


@aten("operator.neg")
def _sym_neg(low: Lowering, node):
    """-a as 0 - a (OLMo Hybrid slices its convolution's output from -seq_len)."""
    return low.emit("sym_sub", [0, low.ref(node.args[0])])


# ----------------------------------------------------------------------------- elementwise


def _binary(op: str):
    def lower_binary(low: Lowering, node):
        a, b = low.ref(node.args[0]), low.ref(node.args[1])
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            b = low.emit("mul", [b, alpha])
        if op == "div" and node.kwargs.get("rounding_mode") is not None:
            raise ExportError(
                f"div with rounding_mode={node.kwargs['rounding_mode']!r} (node {node.name}) is not supported")
        return low.emit(op, [a, b])

    return lower_binary


for _aten_name, _op in [
    ("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"), ("maximum", "maximum"), ("minimum", "minimum"),
    ("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
    ("logical_and", "logical_and"), ("logical_or", "logical_or"),
    # torch's alias spellings, which a decomposition keeps as written (Gemma 3n's torch.multiply)
    ("multiply", "mul"), ("subtract", "sub"), ("divide", "div"), ("true_divide", "div"), ("greater", "gt"),
    ("greater_equal", "ge"), ("less", "lt"), ("less_equal", "le"), ("not_equal", "ne"),
]:
    aten(f"aten.{_aten_name}.Tensor", f"aten.{_aten_name}.Scalar", f"aten.{_aten_name}.default")(_binary(_op))

aten("aten.pow.Tensor_Scalar", "aten.pow.Tensor_Tensor", "aten.pow.Scalar")(_binary("pow"))


@aten("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(low: Lowering, node):
    return low.emit("sub", [low.ref(node.args[1]), low.ref(node.args[0])])


def _unary(op: str):
    def lower_unary(low: Lowering, node):
        return low.emit(op, [low.ref(node.args[0])])

    return lower_unary


for _name in ["neg", "abs", "exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "sigmoid",
              "silu", "relu", "erf", "logical_not", "floor"]:
    aten(f"aten.{_name}.default")(_unary(_name))


@aten("aten.gelu.default")
def _gelu(low: Lowering, node):
    approximate = node.kwargs.get("approximate", _arg(node, 1, "approximate", "none"))
    return low.emit("gelu", [low.ref(node.args[0])], {"approximate": approximate})


@aten("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar")
def _where(low: Lowering, node):
    return low.emit("where", [low.ref(a) for a in node.args[:3]])


@aten("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(low: Lowering, node):
    x, mask, value = node.args
    return low.emit("where", [low.ref(mask), low.ref(value), low.ref(x)])


@aten("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default")
def _clamp(low: Lowering, node):
    name = str(node.target)
    if "clamp_min" in name:
        lo, hi = node.args[1], None
    elif "clamp_max" in name:
        lo, hi = None, node.args[1]
    else:
        lo, hi = _arg(node, 1, "min"), _arg(node, 2, "max")
    return low.emit("clamp", [low.ref(node.args[0])], {"min": lo, "max": hi})


# ----------------------------------------------------------------------------- reductions


def _reduction(op: str):
    def lower_reduction(low: Lowering, node):
        x = node.args[0]
        dims = _arg(node, 1, "dim", None)
        if dims is None:
            dims = list(range(_rank(x)))
        elif isinstance(dims, int):
            dims = [dims]
        keepdim = bool(_arg(node, 2, "keepdim", False))
        out = low.emit(op, [low.ref(x)], {"dims": list(dims), "keepdim": keepdim})
        want = node.kwargs.get("dtype")
        if want is not None:
            out = low.emit("cast", [out], {"dtype": dtype_name(want)})
        return out

    return lower_reduction


@aten("aten.var.dim", "aten.var.correction", "aten.std.dim", "aten.std.correction")
def _variance(low: Lowering, node):
    """Variance (std: its square root) over dims with Bessel's correction, as sum((x - mean)^2) / (n - correction);
    n is the static count of the reduced elements (Gemma 3n's sparse MLP takes the std of its gate)."""
    x = node.args[0]
    dims = _arg(node, 1, "dim", None)
    dims = list(range(_rank(x))) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    if node.target.__name__.endswith("correction"):
        correction = node.kwargs.get("correction")
        correction = 1 if correction is None else correction
    else:
        correction = 1 if _arg(node, 2, "unbiased", True) else 0
    sizes = [x.meta["val"].shape[dim] for dim in dims]
    if not all(isinstance(size, int) for size in sizes):
        raise ExportError(f"a variance over a dynamic dim (node {node.name}) is not supported")
    keepdim = bool(_arg(node, 3, "keepdim", False))  # keyword-only in the correction overload
    centred = low.emit("sub", [low.ref(x), low.emit("mean", [low.ref(x)], {"dims": dims, "keepdim": True})])
    out = low.emit("sum", [low.emit("mul", [centred, centred])], {"dims": dims, "keepdim": keepdim})
    out = low.emit("div", [out, float(max(math.prod(sizes) - correction, 0))])
    return low.emit("sqrt", [out]) if node.target.__name__.startswith("std") else out


aten("aten.mean.dim", "aten.mean.default")(_reduction("mean"))
aten("aten.sum.dim_IntList", "aten.sum.default")(_reduction("sum"))
aten("aten.amax.default")(_reduction("amax"))


@aten("aten.softmax.int", "aten._softmax.default")
def _softmax(low: Lowering, node):
    out = low.emit("softmax", [low.ref(node.args[0])], {"dim": node.args[1]})
    want = node.meta["val"].dtype
    if want != node.args[0].meta["val"].dtype:
        out = low.emit("cast", [out], {"dtype": dtype_name(want)})
    return out


@aten("aten.argmax.default")
def _argmax(low: Lowering, node):
    attrs = {"dim": _arg(node, 1, "dim"), "keepdim": bool(_arg(node, 2, "keepdim", False))}
    return low.emit("argmax", [low.ref(node.args[0])], attrs)


# ----------------------------------------------------------------------------- shapes


@aten("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default")
def _reshape(low: Lowering, node):
    return low.emit("reshape", [low.ref(node.args[0])], {"shape": low.ref(list(node.args[1]))})


@aten("aten.flatten.using_ints")
def _flatten(low: Lowering, node):
    x = node.args[0]
    shape = list(x.meta["val"].shape)
    if not shape:  # a scalar flattens to one element
        return low.emit("reshape", [low.ref(x)], {"shape": [1]})
    start, end = _arg(node, 1, "start_dim", 0) % len(shape), _arg(node, 2, "end_dim", -1) % len(shape)
    if start >= end:
        return low.ref(x)
    sizes = [_dim_size(low, x, i) for i in range(len(shape))]
    merged = sizes[start]
    for size in sizes[start + 1 : end + 1]:
        both_known = isinstance(merged, int) and isinstance(size, int)
        merged = merged * size if both_known else low.emit("sym_mul", [merged, size])
    return low.emit("reshape", [low.ref(x)], {"shape": sizes[:start] + [merged] + sizes[end + 1 :]})


def _dim_size(low: Lowering, x: torch.fx.Node, dim: int) -> Any:
    """Dimension ``dim`` of ``x``: an int if static, else a symbolic-size program value.

    A size the graph already measured (the batch, the sequence) reuses that value, so the
    program is the same as the one a decomposed graph gives.
    """
    size = x.meta["val"].shape[dim]
    if isinstance(size, int):
        return size
    for node, value in low.values.items():
        if getattr(node, "target", None) is torch.ops.aten.sym_size.int and str(node.meta.get("val")) == str(size):
            return value
    return low.emit("sym_size", [low.ref(x)], {"dim": dim})


@aten("aten.transpose.int")
def _transpose(low: Lowering, node):
    return low.emit("transpose", [low.ref(node.args[0])], {"dim0": node.args[1], "dim1": node.args[2]})


@aten("aten.t.default")
def _t(low: Lowering, node):
    return low.emit("transpose", [low.ref(node.args[0])], {"dim0": 0, "dim1": 1})


@aten("aten.permute.default")
def _permute(low: Lowering, node):
    return low.emit("permute", [low.ref(node.args[0])], {"dims": list(node.args[1])})


@aten("aten.unsqueeze.default")
def _unsqueeze(low: Lowering, node):
    return low.emit("unsqueeze", [low.ref(node.args[0])], {"dim": node.args[1]})


@aten("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(low: Lowering, node):
    dims = _arg(node, 1, "dim", [])
    if isinstance(dims, int):
        dims = [dims]
    return low.emit("squeeze", [low.ref(node.args[0])], {"dims": list(dims)})


@aten("aten.expand.default")
def _expand(low: Lowering, node):
    return low.emit("expand", [low.ref(node.args[0])], {"shape": low.ref(list(node.args[1]))})


@aten("aten.slice.Tensor")
def _slice(low: Lowering, node):
    return slice_along(low, node, _arg(node, 1, "dim", 0))


def slice_along(low: Lowering, node: torch.fx.Node, dim: int) -> Any:
    """A ``slice.Tensor`` node's slice of its input along ``dim`` (complex_ops.py shifts the axis)."""
    x = node.args[0]
    start = _arg(node, 2, "start", None)
    end = _arg(node, 3, "end", None)
    step = _arg(node, 4, "step", 1)
    if isinstance(end, int) and end >= INT64_MAX // 2:  # open slice ends arrive as INT64_MAX
        end = None
    if start is None:
        start = 0
    # A full slice is a no-op; skip the node.
    if start == 0 and end is None and step == 1:
        return low.ref(x)
    return low.emit("slice", [low.ref(x)], {"dim": dim, "start": low.ref(start), "end": low.ref(end), "step": step})


@aten("aten.select.int")
def _select(low: Lowering, node):
    return low.emit("select", [low.ref(node.args[0])], {"dim": node.args[1], "index": low.ref(node.args[2])})


@aten("aten.cat.default", "aten.concat.default", "aten.concatenate.default")
def _cat(low: Lowering, node):
    return cat_along(low, node, _arg(node, 1, "dim", 0))


def cat_along(low: Lowering, node: torch.fx.Node, dim: int) -> Any:
    """A ``cat`` node's join of its tensors along ``dim``, empty 1-d ones dropped as torch does."""
    tensors = [t for t in node.args[0] if not (len(t.meta["val"].shape) == 1 and t.meta["val"].shape[0] == 0)]
    if len(tensors) == 1:
        return low.ref(tensors[0])
    return low.emit("cat", [low.ref(tensors)], {"dim": dim})


@aten("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default")
def _split(low: Lowering, node):
    sizes = [int(v.shape[_arg(node, 2, "dim", 0)]) for v in node.meta["val"]]
    return low.emit("split", [low.ref(node.args[0])], {"sizes": sizes, "dim": _arg(node, 2, "dim", 0)},
                    outputs=len(sizes))


@aten("aten.flip.default")
def _flip(low: Lowering, node):
    return low.emit("flip", [low.ref(node.args[0])], {"dims": list(node.args[1])})


@aten("aten.index_select.default")
def _index_select(low: Lowering, node):
    return low.emit("take", [low.ref(node.args[0]), low.ref(node.args[2])], {"dim": node.args[1]})


@aten("aten.gather.default")
def _gather(low: Lowering, node):
    return low.emit("gather", [low.ref(node.args[0]), low.ref(node.args[2])], {"dim": node.args[1]})


@aten("aten.tril.default")
def _tril(low: Lowering, node):
    return low.emit("tril", [low.ref(node.args[0])], {"k": _arg(node, 1, "diagonal", 0)})


@aten("aten.triu.default")
def _triu(low: Lowering, node):
    return low.emit("triu", [low.ref(node.args[0])], {"k": _arg(node, 1, "diagonal", 0)})


# ----------------------------------------------------------------------------- creation


@aten("aten.arange.default", "aten.arange.start", "aten.arange.start_step")
def _arange(low: Lowering, node):
    args = list(node.args)
    if str(node.target).endswith("default"):
        start, end, step = 0, args[0], 1
    else:
        start, end = args[0], args[1]
        step = args[2] if len(args) > 2 else 1
    return low.emit("arange", [], {"start": low.ref(start), "end": low.ref(end), "step": step,
                                   "dtype": _out_dtype(node)})


@aten("aten.full.default")
def _full(low: Lowering, node):
    return low.emit("full", [], {"shape": low.ref(list(node.args[0])), "value": float(node.args[1]),
                                 "dtype": _out_dtype(node)})


@aten("aten.full_like.default", "aten.zeros_like.default", "aten.ones_like.default")
def _full_like(low: Lowering, node):
    name = str(node.target)
    value = 0.0 if "zeros" in name else 1.0 if "ones" in name else float(node.args[1])
    return low.emit("full_like", [low.ref(node.args[0])], {"value": value, "dtype": _out_dtype(node)})


@aten("aten.cumsum.default")
def _cumsum(low: Lowering, node):
    out = low.emit("cumsum", [low.ref(node.args[0])], {"dim": node.args[1]})
    if node.kwargs.get("dtype") is not None:
        out = low.emit("cast", [out], {"dtype": dtype_name(node.kwargs["dtype"])})
    return out


# ----------------------------------------------------------------------------- neural network


@aten("aten.embedding.default")
def _embedding(low: Lowering, node):
    return low.emit("embedding", [low.ref(node.args[0]), low.ref(node.args[1])])


@aten("aten.linear.default")
def _linear(low: Lowering, node):
    bias = _arg(node, 2, "bias", None)
    return low.emit("linear", [low.ref(node.args[0]), low.ref(node.args[1]), low.ref(bias)])


@aten("aten.addmm.default", "aten.baddbmm.default")
def _addmm(low: Lowering, node):
    """beta * bias + alpha * (x @ w): a linear's bias (addmm), RecurrentGemma's block-diagonal gates (baddbmm)."""
    bias, x, w = node.args[:3]
    beta, alpha = _arg(node, 3, "beta", 1), _arg(node, 4, "alpha", 1)
    out = low.emit("matmul", [low.ref(x), low.ref(w)])
    if alpha != 1:
        out = low.emit("mul", [out, alpha])
    if beta == 0:  # torch ignores the bias then, NaN and all
        return out
    return low.emit("add", [out, low.ref(bias) if beta == 1 else low.emit("mul", [low.ref(bias), beta])])


@aten("aten.matmul.default", "aten.bmm.default", "aten.mm.default")
def _matmul(low: Lowering, node):
    return low.emit("matmul", [low.ref(node.args[0]), low.ref(node.args[1])])


@aten("aten.layer_norm.default")
def _layer_norm(low: Lowering, node):
    x, shape = node.args[:2]
    weight = _arg(node, 2, "weight", None)
    bias = _arg(node, 3, "bias", None)
    eps = _arg(node, 4, "eps", 1e-5)
    return low.emit("layer_norm", [low.ref(x), low.ref(weight), low.ref(bias)],
                    {"normalized_shape": list(shape), "eps": float(eps)})


@aten("aten.rms_norm.default")
def _rms_norm(low: Lowering, node):
    x = node.args[0]
    weight = _arg(node, 2, "weight", None)
    eps = _arg(node, 3, "eps", None)
    if eps is None:
        eps = torch.finfo(x.meta["val"].dtype).eps
    return low.emit("rms_norm", [low.ref(x), low.ref(weight)], {"eps": float(eps)})


@aten("paw.attention.default")
def _attention(low: Lowering, node):
    """One attention call; its KV cache slot is its rank among the graph's attention calls.

    Numbering calls rather than trusting the module's ``layer_idx`` gives a layer that
    attends twice (DiffLlama's differential attention) a slot per call, each with its own k, v.
    """
    q, k, v, _, scale, window, softcap = node.args[:7]
    layer = _kv_slots(low)
    attrs = {"layer": layer, "scale": float(scale), "window": int(window), "softcap": float(softcap)}
    alibi = float(_arg(node, 7, "alibi_max_bias", 0.0))
    if alibi > 0:
        attrs["alibi_max_bias"] = alibi
    chunk = int(_arg(node, 9, "chunk", 0))
    if chunk > 0:  # written only when set: programs without chunks stay as they were
        attrs["chunk"] = chunk
    inputs = [low.ref(q), low.ref(k), low.ref(v), low.ref(_arg(node, 8, "sinks"))]
    keep = _arg(node, 10, "keep")
    if keep is not None:  # written only when set: programs without an indexer stay as they were
        inputs.append(low.ref(keep))
    return low.emit("attention", inputs, attrs)


def _kv_slots(low: Lowering) -> int:
    """The next KV cache slot: attention calls and indexers (``index_topk``) take one each, in graph order."""
    return sum(1 for lowered in low.nodes if lowered["op"] in KV_CACHE_OPS)


@aten("paw.index_topk.default")
def _index_topk(low: Lowering, node):
    """A DeepSeek Sparse Attention indexer (exporter/indexed.py); its keys take a KV cache slot."""
    q, k, weights, _, topk, scale = node.args[:6]
    return low.emit("index_topk", [low.ref(q), low.ref(k), low.ref(weights)],
                    {"layer": _kv_slots(low), "topk": int(topk), "scale": float(scale)})


@aten("paw.causal_conv1d.default")
def _causal_conv1d(low: Lowering, node):
    """One short convolution (exporter/conv.py); its conv state slot is its rank among the graph's
    convolutions, which ``build_spec`` moves past the KV cache slots."""
    x, weight = node.args[:2]
    layer = sum(1 for lowered in low.nodes if lowered["op"] == "causal_conv1d")
    return low.emit("causal_conv1d", [low.ref(x), low.ref(weight), low.ref(_arg(node, 2, "bias"))], {"layer": layer})


@aten("paw.gated_delta_rule.default")
def _gated_delta_rule(low: Lowering, node):
    """One gated delta rule (exporter/delta_rule.py); its delta state slot is its rank among the graph's
    rules, which ``build_spec`` moves past the KV cache and conv state slots."""
    q, k, v, g, beta, scale = node.args[:6]
    layer = sum(1 for lowered in low.nodes if lowered["op"] == "gated_delta_rule")
    return low.emit("gated_delta_rule", [low.ref(x) for x in (q, k, v, g, beta)],
                    {"layer": layer, "scale": float(scale)})


@aten("paw.ssm_scan.default")
def _ssm_scan(low: Lowering, node):
    """One state-space scan (exporter/ssm.py); its SSM state slot is its rank among the graph's scans,
    which ``build_spec`` moves past the KV cache and conv state slots."""
    layer = sum(1 for lowered in low.nodes if lowered["op"] == "ssm_scan")
    return low.emit("ssm_scan", [low.ref(a) for a in node.args[:5]], {"layer": layer})


@aten("paw.lru_scan.default")
def _lru_scan(low: Lowering, node):
    """One RG-LRU recurrence (exporter/rg_lru.py); its LRU state slot is its rank among the graph's
    recurrences, which ``build_spec`` moves past the KV cache, conv, delta and SSM state slots."""
    layer = sum(1 for lowered in low.nodes if lowered["op"] == "lru_scan")
    return low.emit("lru_scan", [low.ref(a) for a in node.args[:2]], {"layer": layer})


@aten("paw.expert_linear.default")
def _expert_linear(low: Lowering, node):
    x, weight, indices = (low.ref(a) for a in node.args[:3])
    return low.emit("expert_linear", [x, weight, indices, low.ref(_arg(node, 3, "bias"))])


# ----------------------------------------------------------------------------- architecture coverage
# (repeat, interleaved RoPE, MoE routing, stacking: what the families in tests/archs.py add)


@aten("aten.repeat_interleave.self_int")
def _repeat_interleave(low: Lowering, node):
    x, repeats = node.args[:2]
    dim = _arg(node, 2, "dim", None)
    if not isinstance(repeats, int):
        raise ExportError(f"repeat_interleave with a symbolic repeat count (node {node.name}) is not supported")
    src = low.ref(x)
    if dim is None:  # torch flattens first
        src, dim = low.emit("reshape", [src], {"shape": [-1]}), 0
    return low.emit("repeat_interleave", [src], {"repeats": repeats, "dim": dim})


@aten("aten.repeat.default")
def _repeat(low: Lowering, node):
    return low.emit("tile", [low.ref(node.args[0])], {"reps": low.ref(list(node.args[1]))})


@aten("aten.topk.default")
def _topk(low: Lowering, node):
    k = node.args[1]
    dim = _arg(node, 2, "dim", -1)
    largest = bool(_arg(node, 3, "largest", True))
    return low.emit("topk", [low.ref(node.args[0])], {"k": low.ref(k), "dim": dim, "largest": largest}, outputs=2)


@aten("aten.stack.default")
def _stack(low: Lowering, node):
    dim = _arg(node, 1, "dim", 0)
    if dim < 0:
        dim += _rank(node)
    parts = [low.emit("unsqueeze", [low.ref(t)], {"dim": dim}) for t in node.args[0]]
    return parts[0] if len(parts) == 1 else low.emit("cat", [parts], {"dim": dim})


@aten("aten.zeros.default", "aten.ones.default")
def _zeros(low: Lowering, node):
    value = 1.0 if "ones" in str(node.target) else 0.0
    return low.emit("full", [], {"shape": low.ref(list(node.args[0])), "value": value, "dtype": _out_dtype(node)})


@aten("aten.one_hot.default")
def _one_hot(low: Lowering, node):
    x = node.args[0]
    classes = int(node.meta["val"].shape[-1])
    grid = low.emit("arange", [], {"start": 0, "end": classes, "step": 1, "dtype": _out_dtype(node)})
    hit = low.emit("eq", [low.emit("unsqueeze", [low.ref(x)], {"dim": -1}), grid])
    return low.emit("cast", [hit], {"dtype": _out_dtype(node)})


@aten("aten.max.dim", "aten.min.dim")
def _max_dim(low: Lowering, node):
    """(values, indices) of torch.max/min along dim: amax and argmax (of -x for min)."""
    x, dim = low.ref(node.args[0]), node.args[1]
    keepdim = bool(_arg(node, 2, "keepdim", False))
    if "min" in str(node.target):
        x = low.emit("neg", [x])
    values = low.emit("amax", [x], {"dims": [dim], "keepdim": keepdim})
    if "min" in str(node.target):
        values = low.emit("neg", [values])
    return [values, low.emit("argmax", [x], {"dim": dim, "keepdim": keepdim})]


@aten("aten.max.default", "aten.min.default")
def _max_all(low: Lowering, node):
    x = low.ref(node.args[0])
    dims = list(range(_rank(node.args[0])))
    if "min" in str(node.target):
        return low.emit("neg", [low.emit("amax", [low.emit("neg", [x])], {"dims": dims})])
    return low.emit("amax", [x], {"dims": dims})


def _scatter_hits(low: Lowering, node, x, dim: int, index) -> tuple[Any, int]:
    """([..., j, c, ...] bool: index[..., j, ...] == c along ``dim``, dim in [0, rank)) of a scatter.

    From comparing the index against arange(size of dim) on one new axis after ``dim``.
    """
    shape, index_shape = list(x.meta["val"].shape), list(index.meta["val"].shape)
    rank = len(shape)
    dim %= rank
    if len(index_shape) != rank or any(str(index_shape[i]) != str(shape[i]) for i in range(rank) if i != dim):
        raise ExportError(f"scatter with an index smaller than the tensor off its dim (node {node.name}) "
                          "is not supported")
    grid = low.emit("arange", [], {"start": 0, "end": _dim_size(low, x, dim), "step": 1, "dtype": "int64"})
    grid = low.emit("reshape", [grid], {"shape": [-1] + [1] * (rank - dim - 1)})
    return low.emit("eq", [low.emit("unsqueeze", [low.ref(index)], {"dim": dim + 1}), grid]), dim


def _any_hit(low: Lowering, hits, dim: int):
    hits = low.emit("amax", [low.emit("cast", [hits], {"dtype": "int32"})], {"dims": [dim]})
    return low.emit("ne", [hits, 0])


@aten("aten.scatter.value")
def _scatter_value(low: Lowering, node):
    """x with ``value`` written at ``index`` along dim (MoE group masks): where(hit, value, x),
    hit[..., c, ...] being whether any index[..., j, ...] equals c."""
    x, dim, index, value = node.args[:4]
    hits, dim = _scatter_hits(low, node, x, dim, index)
    dtype = x.meta["val"].dtype
    value = float(value) if dtype.is_floating_point else bool(value) if dtype == torch.bool else int(value)
    return low.emit("where", [_any_hit(low, hits, dim), value, low.ref(x)])


@aten("aten.scatter.src")
def _scatter_src(low: Lowering, node):
    """x with src[..., j, ...] written at index[..., j, ...] along dim (Llama 4's router writes its
    top-k scores into a row of -inf): where(hit, the src entry aimed at c, x).

    The entry aimed at c is the max over j of src where index hits c: exact for distinct
    indices (topk's); for repeated ones torch leaves the winner unspecified.
    """
    x, dim, index, src = node.args[:4]
    if not x.meta["val"].dtype.is_floating_point:
        raise ExportError(f"scatter of a {x.meta['val'].dtype} src (node {node.name}) is not supported; floats are")
    if list(src.meta["val"].shape) != list(index.meta["val"].shape):
        raise ExportError(f"scatter with a src shaped unlike its index (node {node.name}) is not supported")
    hits, dim = _scatter_hits(low, node, x, dim, index)
    aimed = low.emit("where", [hits, low.emit("unsqueeze", [low.ref(src)], {"dim": dim + 1}), float("-inf")])
    return low.emit("where", [_any_hit(low, hits, dim), low.emit("amax", [aimed], {"dims": [dim]}), low.ref(x)])


@aten("aten.index.Tensor")
def _index(low: Lowering, node):
    """x[..., index, ...] with one index tensor (a position table looked up by position ids, Falcon's
    ``qkv[..., [-2]]``); a negative index counts from the end, as in torch."""
    x, indices = node.args[:2]
    used = [i for i, index in enumerate(indices) if index is not None]
    if len(used) != 1:
        raise ExportError(f"indexing with {len(used)} index tensors (node {node.name}) is not supported; one is")
    dim = used[0]
    if indices[dim].meta["val"].dtype == torch.bool:
        raise ExportError(f"indexing with a bool mask (node {node.name}) has a data-dependent shape; not supported")
    index, size = low.ref(indices[dim]), x.meta["val"].shape[dim]
    if isinstance(size, int):
        index = low.emit("where", [low.emit("lt", [index, 0]), low.emit("add", [index, size]), index])
    elif isinstance(low.consts.get(index), torch.Tensor) and bool((low.consts[index] < 0).any()):
        raise ExportError(f"a negative index into a dynamic axis (node {node.name}) is not supported")
    return low.emit("take", [low.ref(x), index], {"dim": dim})


@aten("aten.clamp.Tensor", "aten.clamp_min.Tensor", "aten.clamp_max.Tensor")
def _clamp_tensor(low: Lowering, node):
    """clamp with tensor bounds: minimum(maximum(x, min), max), as torch orders them."""
    name = str(node.target)
    lo = node.args[1] if "clamp_min" in name else None if "clamp_max" in name else _arg(node, 1, "min")
    hi = node.args[1] if "clamp_max" in name else None if "clamp_min" in name else _arg(node, 2, "max")
    out = low.ref(node.args[0])
    if lo is not None:
        out = low.emit("maximum", [out, low.ref(lo)])
    if hi is not None:
        out = low.emit("minimum", [out, low.ref(hi)])
    return out


@aten("aten.bitwise_not.default", "aten.bitwise_and.Tensor", "aten.bitwise_or.Tensor")
def _bitwise(low: Lowering, node):
    """Bitwise ops on bool masks are the logical ones; on integers paw has no bitwise op."""
    if any(a.meta["val"].dtype != torch.bool for a in node.args if isinstance(a, torch.fx.Node)):
        raise ExportError(f"{node.target} on integers (node {node.name}) is not supported; on bool masks it is")
    op = {"not": "logical_not", "and": "logical_and", "or": "logical_or"}[str(node.target).split("_")[1].split(".")[0]]
    return low.emit(op, [low.ref(a) for a in node.args])


@aten("aten.expm1.default")
def _expm1(low: Lowering, node):
    """exp(x) - 1 (xIELU); near 0 it loses the relative precision torch keeps, not the absolute."""
    return low.emit("sub", [low.emit("exp", [low.ref(node.args[0])]), 1.0])


@aten("aten.softplus.default")
def _softplus(low: Lowering, node):
    """log(1 + exp(beta x)) / beta, as relu(y) + log(1 + exp(-|y|)) with y = beta x (no overflow).

    Above torch's threshold this equals x to float precision, so the threshold needs no branch.
    """
    beta = float(_arg(node, 1, "beta", 1.0))
    y = low.ref(node.args[0])
    if beta != 1.0:
        y = low.emit("mul", [y, beta])
    tail = low.emit("exp", [low.emit("neg", [low.emit("abs", [y])])])
    out = low.emit("add", [low.emit("relu", [y]), low.emit("log", [low.emit("add", [tail, 1.0])])])
    return out if beta == 1.0 else low.emit("div", [out, beta])

aten("aten.min.other")(_binary("minimum"))
aten("aten.max.other")(_binary("maximum"))


@aten("aten.linalg_vector_norm.default")
def _vector_norm(low: Lowering, node):
    """The p-norm over dims (DBRX normalises its routing weights with it): (sum |x|^p)^(1/p), max |x| for inf."""
    x, order = node.args[0], float(_arg(node, 1, "ord", 2))
    dims = _arg(node, 2, "dim", None)
    dims = list(range(_rank(x))) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    attrs = {"dims": dims, "keepdim": bool(_arg(node, 3, "keepdim", False))}
    if order == 0 or order == -float("inf"):
        raise ExportError(f"a vector norm of order {order:g} (node {node.name}) is not supported")
    out = low.emit("abs", [low.ref(x)])
    want = node.kwargs.get("dtype")
    if want is not None:
        out = low.emit("cast", [out], {"dtype": dtype_name(want)})
    if order == float("inf"):
        return low.emit("amax", [out], attrs)
    if order != 1:
        out = low.emit("pow", [out, order])
    out = low.emit("sum", [out], attrs)
    return out if order == 1 else low.emit("pow", [out, 1.0 / order])


@aten("aten.unbind.int")
def _unbind(low: Lowering, node):
    """The slices of x along dim, the axis removed: one select each (its size is static)."""
    x, dim = node.args[0], _arg(node, 1, "dim", 0)
    count = x.meta["val"].shape[dim]
    if not isinstance(count, int):
        raise ExportError(f"unbind along a dynamic axis (node {node.name}) is not supported")
    return [low.emit("select", [low.ref(x)], {"dim": dim, "index": i}) for i in range(count)]


@aten("aten.new_empty.default", "aten.empty.memory_format", "aten.new_zeros.default", "aten.new_ones.default")
def _new_filled(low: Lowering, node):
    """A new tensor of a given shape: zeros (an empty one's contents are never read before written)."""
    shape = node.args[1] if "new_" in str(node.target) else node.args[0]
    value = 1.0 if "ones" in str(node.target) else 0.0
    return low.emit("full", [], {"shape": low.ref(list(shape)), "value": value, "dtype": _out_dtype(node)})


@aten("aten.slice_scatter.default")
def _slice_scatter(low: Lowering, node):
    """x with x[start:end:step] along dim replaced by src (a slice written in place, functionalized): a cat,
    or for a step over a static axis a take from cat(x, src) (interleaved M-RoPE writes every third frequency)."""
    x, src = node.args[:2]
    dim = _arg(node, 2, "dim", 0) % _rank(x)
    start, end, step = _arg(node, 3, "start", None) or 0, _arg(node, 4, "end", None), _arg(node, 5, "step", 1)
    size = x.meta["val"].shape[dim]
    if end is None or (isinstance(end, int) and (end >= INT64_MAX // 2 or isinstance(size, int) and end >= size)):
        end = size
    if isinstance(size, int):  # negative bounds count from the end, as in torch
        start, end = (v + size if isinstance(v, int) and v < 0 else v for v in (start, end))
    if step != 1:
        return _strided_slice_scatter(low, node, dim, start, end, step)
    return _write_slice(low, x, low.ref(src), dim, start, end)


@aten("aten.select_scatter.default")
def _select_scatter(low: Lowering, node):
    """x with x.select(dim, index) replaced by src (a view of one row written in place, functionalized)."""
    x, src, dim, index = node.args[:4]
    dim %= _rank(x)
    size = x.meta["val"].shape[dim]
    if index < 0:
        if not isinstance(size, int):
            raise ExportError(f"select_scatter at a negative index of a dynamic axis (node {node.name}) "
                              "is not supported")
        index += size
    row = low.emit("unsqueeze", [low.ref(src)], {"dim": dim})
    return _write_slice(low, x, row, dim, index, index + 1)


def _write_slice(low: Lowering, x, src, dim: int, start, end):
    """x (a graph node) with [start, end) along dim replaced by the value src: a cat of the pieces."""
    size = x.meta["val"].shape[dim]
    parts = []
    if start != 0:
        parts.append(low.emit("slice", [low.ref(x)], {"dim": dim, "start": 0, "end": low.ref(start), "step": 1}))
    parts.append(src)
    if not (isinstance(end, int) and isinstance(size, int) and end == size):
        parts.append(low.emit("slice", [low.ref(x)], {"dim": dim, "start": low.ref(end), "end": None, "step": 1}))
    return parts[0] if len(parts) == 1 else low.emit("cat", [parts], {"dim": dim})


def _strided_slice_scatter(low: Lowering, node, dim: int, start, end, step: int):
    """slice_scatter with a step: position i of the static axis reads src[(i - start) / step] where the slice
    holds i and x[i] elsewhere, one take from cat(x, src) with a constant index."""
    x, src = node.args[:2]
    size = x.meta["val"].shape[dim]
    if not all(isinstance(v, int) for v in (size, start, end)):
        raise ExportError(f"slice_scatter with step {step} along a dynamic axis (node {node.name}) is not supported")
    index = torch.arange(size)
    written = torch.arange(start, end, step)
    index[written] = size + torch.arange(len(written))
    name = f"folded.{node.name}.index"
    low.consts[name] = index
    joined = low.emit("cat", [[low.ref(x), low.ref(src)]], {"dim": dim})
    return low.emit("take", [joined, name], {"dim": dim})


@aten("aten.copy.default")
def _copy(low: Lowering, node):
    """copy(x, src): src broadcast to x's shape in x's dtype (an in-place copy_, functionalized)."""
    x, src = node.args[:2]
    out = low.ref(src)
    if src.meta["val"].dtype != x.meta["val"].dtype:
        out = low.emit("cast", [out], {"dtype": dtype_name(x.meta["val"].dtype)})
    if [str(d) for d in src.meta["val"].shape] != [str(d) for d in x.meta["val"].shape]:
        shape = [_dim_size(low, x, i) for i in range(_rank(x))]
        out = low.emit("expand", [out], {"shape": shape})
    return out
