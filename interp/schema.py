"""The op schema: the one contract between the exporter and the interpreter.

Every program op has exactly one entry here (name, inputs, attributes, outputs, doc).
The exporter maps aten ops onto these entries, the interpreter implements each entry in
MLX, the format documentation is generated from this table, and tests walk it so that a
new op without an implementation, a parity test or documentation fails the suite.

This module must stay free of torch and MLX imports: both sides read it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

FORMAT_NAME = "paw.program"
FORMAT_VERSION = 1
#: Versions this code base can read. A loader refuses anything else by name.
READABLE_VERSIONS = (1,)

#: dtypes a program may use, by their names on disk (safetensors names in parentheses
#: are mapped by the loader).
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint32", "uint16", "uint8", "bool")

# Kinds of node inputs (values that flow through the graph).
TENSOR = "tensor"  #: a reference to a tensor value (a string)
OPTIONAL_TENSOR = "tensor?"  #: a tensor reference or null
TENSOR_LIST = "tensor[]"  #: a list of tensor references
TENSOR_OR_SCALAR = "tensor|scalar"  #: a tensor reference or a number literal (int/float/bool)
SYMINT = "symint"  #: a symbolic integer: an int literal or a reference to an int value

# Kinds of node attributes (literals fixed at export time).
INT = "int"  #: int literal, or a string naming a symbolic int value
INTS = "int[]"  #: list whose items are int literals or names of symbolic int values
FLOAT = "float"
BOOL = "bool"
DTYPE = "dtype"  #: one of DTYPES
STR = "str"

INPUT_KINDS = (TENSOR, OPTIONAL_TENSOR, TENSOR_LIST, TENSOR_OR_SCALAR, SYMINT)
ATTR_KINDS = (INT, INTS, FLOAT, BOOL, DTYPE, STR)

_NO_DEFAULT = object()


#: The ops that keep a KV cache slot (its ``layer`` attribute), numbered together in graph order:
#: attention's keys and values, an indexer's keys (``index_topk``).
KV_CACHE_OPS = ("attention", "index_topk")

#: The largest size, axis or index MLX takes (its shapes are 32-bit integers).
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Arg:
    """One input or attribute of an op, with the range of values it accepts.

    ``low``/``high`` bound a number (each item of an ``int[]``), ``nonzero`` refuses 0,
    ``choices`` lists the only values allowed. The loader checks literal attributes
    against them (``interp/program.py``); the node runner checks values computed at run
    time (symbolic ints) against the same ranges (``interp/graph.py``).
    """

    name: str
    kind: str
    doc: str = ""
    default: object = _NO_DEFAULT
    low: float | None = None
    high: float | None = None
    nonzero: bool = False
    choices: tuple = ()

    @property
    def required(self) -> bool:
        return self.default is _NO_DEFAULT

    def range_problem(self, value: object) -> str | None:
        """Why one value (or one item of an ``int[]``) is outside this argument's range, or None."""
        if self.choices and value not in self.choices:
            return "must be one of " + ", ".join(json.dumps(c) for c in self.choices)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if self.low is not None and value < self.low:
                return f"must be >= {self.low}"
            if self.high is not None and value > self.high:
                return f"must be <= {self.high}"
            if self.nonzero and value == 0:
                return "must not be 0"
        return None

    def range_text(self) -> str:
        """The range in a few words for the op table ("" when any value of the kind goes)."""
        if self.choices:
            return "one of " + ", ".join(f"`{json.dumps(c)}`" for c in self.choices)
        parts = []
        if self.low is not None and self.low != -INT32_MAX - 1:
            parts.append(f">= {self.low}")
        if self.high == INT32_MAX:
            parts.append("32-bit")
        elif self.high is not None:
            parts.append(f"<= {self.high}")
        if self.nonzero:
            parts.append("not 0")
        return ", ".join(parts)


@dataclass(frozen=True)
class OpSpec:
    """One program op: what it takes, what it gives, what it means."""

    name: str
    category: str
    doc: str
    inputs: tuple[Arg, ...] = ()
    attrs: tuple[Arg, ...] = ()
    outputs: tuple[str, ...] = ("out",)
    #: outputs are symbolic ints (Python ints at run time), not tensors
    symbolic: bool = False
    attr_by_name: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attr_by_name", {a.name: a for a in self.attrs})


def _t(name: str, doc: str = "") -> Arg:
    return Arg(name, TENSOR, doc)


def _opt(name: str, doc: str = "") -> Arg:
    return Arg(name, OPTIONAL_TENSOR, doc)


def _ts(name: str, doc: str = "") -> Arg:
    return Arg(name, TENSOR_OR_SCALAR, doc)


def _attr(name: str, kind: str, doc: str = "", default: object = _NO_DEFAULT, **bounds) -> Arg:
    return Arg(name, kind, doc, default, **bounds)


#: ranges shared by many attributes
_SIZE = {"low": 0, "high": INT32_MAX}  # a size, or a count of repeats
_SHAPE = {"low": -1, "high": INT32_MAX}  # a target shape entry, -1 inferring or keeping the axis
_INT32 = {"low": -INT32_MAX - 1, "high": INT32_MAX}
_QUANT = {"group_size": {"choices": (32, 64, 128)}, "bits": {"choices": (2, 3, 4, 5, 6, 8)}}


_SPECS: list[OpSpec] = []


def _op(name: str, category: str, doc: str, inputs=(), attrs=(), outputs=("out",), symbolic=False) -> None:
    _SPECS.append(OpSpec(name, category, doc, tuple(inputs), tuple(attrs), tuple(outputs), symbolic))


# ----------------------------------------------------------------------------- elementwise
for _name, _doc in [
    ("add", "a + b, numpy broadcasting; a number operand takes the tensor's dtype"),
    ("sub", "a - b"),
    ("mul", "a * b"),
    ("div", "a / b (true division)"),
    ("pow", "a ** b"),
    ("maximum", "elementwise max(a, b)"),
    ("minimum", "elementwise min(a, b)"),
    ("eq", "a == b, bool result"),
    ("ne", "a != b, bool result"),
    ("lt", "a < b, bool result"),
    ("le", "a <= b, bool result"),
    ("gt", "a > b, bool result"),
    ("ge", "a >= b, bool result"),
    ("logical_and", "a and b on bool tensors"),
    ("logical_or", "a or b on bool tensors"),
]:
    _op(_name, "elementwise", _doc, [_ts("a"), _ts("b")])

for _name, _doc in [
    ("neg", "-x"),
    ("abs", "|x|"),
    ("exp", "e ** x"),
    ("log", "natural log"),
    ("log1p", "log(1 + x), accurate for small x"),
    ("sqrt", "square root"),
    ("rsqrt", "1 / sqrt(x)"),
    ("reciprocal", "1 / x"),
    ("sin", "sine"),
    ("cos", "cosine"),
    ("tanh", "hyperbolic tangent"),
    ("sigmoid", "1 / (1 + exp(-x))"),
    ("silu", "x * sigmoid(x)"),
    ("relu", "max(x, 0)"),
    ("erf", "Gauss error function"),
    ("floor", "the largest integer <= x, in x's dtype"),
    ("logical_not", "not x on bool tensors"),
]:
    _op(_name, "elementwise", _doc, [_t("x")])

_op("gelu", "elementwise", "Gaussian error linear unit; approximate is 'none' (erf) or 'tanh'",
    [_t("x")], [_attr("approximate", STR, "'none' or 'tanh'", "none", choices=("none", "tanh"))])
_op("where", "elementwise", "cond ? a : b", [_t("cond"), _ts("a"), _ts("b")])
_op("clamp", "elementwise", "clip x to [min, max]; a null bound is open",
    [_t("x")], [_attr("min", FLOAT, "lower bound or null", None), _attr("max", FLOAT, "upper bound or null", None)])

# ----------------------------------------------------------------------------- reductions
for _name, _doc in [
    ("mean", "mean over dims"),
    ("sum", "sum over dims"),
    ("amax", "max over dims"),
]:
    _op(_name, "reduction", _doc, [_t("x")],
        [_attr("dims", INTS, "axes to reduce"), _attr("keepdim", BOOL, "keep reduced axes as size 1", False)])
_op("softmax", "reduction", "softmax along dim, computed in float32 when the input is lower precision",
    [_t("x")], [_attr("dim", INT)])
_op("argmax", "reduction", "index of the max along dim", [_t("x")],
    [_attr("dim", INT), _attr("keepdim", BOOL, default=False)])

# ----------------------------------------------------------------------------- shapes
_op("reshape", "shape", "reshape to shape; one entry may be -1", [_t("x")], [_attr("shape", INTS, **_SHAPE)])
_op("transpose", "shape", "swap two axes", [_t("x")], [_attr("dim0", INT), _attr("dim1", INT)])
_op("permute", "shape", "reorder axes", [_t("x")], [_attr("dims", INTS)])
_op("unsqueeze", "shape", "insert a size-1 axis at dim", [_t("x")], [_attr("dim", INT)])
_op("squeeze", "shape", "remove size-1 axes dims (all size-1 axes when dims is empty)", [_t("x")],
    [_attr("dims", INTS, default=[])])
_op("expand", "shape", "broadcast to shape; -1 keeps an axis", [_t("x")], [_attr("shape", INTS, **_SHAPE)])
_op("slice", "shape", "x[start:end:step] along dim; end is clamped to the axis length", [_t("x")],
    [_attr("dim", INT), _attr("start", INT, default=0), _attr("end", INT, "null means the axis length", None),
     _attr("step", INT, default=1, low=1, high=INT32_MAX)])
_op("select", "shape", "x[index] along dim (the axis is removed); negative index counts from the end",
    [_t("x")], [_attr("dim", INT), _attr("index", INT, **_INT32)])
_op("cat", "shape", "concatenate along dim", [Arg("xs", TENSOR_LIST)], [_attr("dim", INT)])
_op("split", "shape", "split into pieces of the given sizes along dim", [_t("x")],
    [_attr("sizes", INTS, **_SIZE), _attr("dim", INT)], outputs=("outs...",))
_op("flip", "shape", "reverse along dims", [_t("x")], [_attr("dims", INTS)])
_op("take", "shape", "gather x[..., index, ...] along dim with an integer index tensor (index_select)",
    [_t("x"), _t("index")], [_attr("dim", INT)])
_op("gather", "shape", "torch.gather: out[i][j] = x[i][index[i][j]] along dim",
    [_t("x"), _t("index")], [_attr("dim", INT)])
_op("tril", "shape", "lower triangle (diagonal offset k), zeros elsewhere", [_t("x")],
    [_attr("k", INT, default=0, **_INT32)])
_op("triu", "shape", "upper triangle (diagonal offset k), zeros elsewhere", [_t("x")],
    [_attr("k", INT, default=0, **_INT32)])
_op("repeat_interleave", "shape", "repeat each element `repeats` times along dim (torch.repeat_interleave)",
    [_t("x")], [_attr("repeats", INT, **_SIZE), _attr("dim", INT)])
_op("tile", "shape", "repeat the whole tensor `reps` times per axis (torch.Tensor.repeat); reps may be longer "
    "than x's rank, adding leading axes", [_t("x")], [_attr("reps", INTS, **_SIZE)])
_op("topk", "shape", "the k largest (or smallest) entries along dim, sorted, and their int64 indices",
    [_t("x")], [_attr("k", INT, **_SIZE), _attr("dim", INT, default=-1), _attr("largest", BOOL, default=True)],
    outputs=("values", "indices"))

# ----------------------------------------------------------------------------- creation and types
_op("cast", "type", "convert to dtype", [_t("x")], [_attr("dtype", DTYPE)])
_op("arange", "creation", "[start, end) with step", [],
    [_attr("start", INT, default=0, **_INT32), _attr("end", INT, **_INT32),
     _attr("step", INT, default=1, nonzero=True, **_INT32), _attr("dtype", DTYPE, default="int64")])
_op("full", "creation", "a tensor of shape filled with value", [],
    [_attr("shape", INTS, **_SIZE), _attr("value", FLOAT), _attr("dtype", DTYPE)])
_op("full_like", "creation", "a tensor like x filled with value", [_t("x")],
    [_attr("value", FLOAT), _attr("dtype", DTYPE, "null keeps x's dtype", None)])
_op("cumsum", "creation", "cumulative sum along dim", [_t("x")], [_attr("dim", INT)])

# ----------------------------------------------------------------------------- neural network
_op("embedding", "nn", "rows of weight picked by integer indices", [_t("weight"), _t("indices")])
_op("linear", "nn", "x @ weight.T + bias", [_t("x"), _t("weight"), _opt("bias")])
_op("matmul", "nn", "batched matrix product a @ b", [_t("a"), _t("b")])
_op("layer_norm", "nn", "LayerNorm over the last len(normalized_shape) axes",
    [_t("x"), _opt("weight"), _opt("bias")], [_attr("normalized_shape", INTS, low=1, high=INT32_MAX),
                                              _attr("eps", FLOAT)])
_op("rms_norm", "nn", "x * rsqrt(mean(x^2, -1) + eps) * weight, in x's dtype (fused by the exporter)",
    [_t("x"), _opt("weight")], [_attr("eps", FLOAT)])
_op("attention", "nn",
    "causal attention with the interpreter's KV cache. q: [B, Hq, L, D], k and v: [B, Hkv, L, D] "
    "for the L new positions only. The interpreter appends k, v to the cache of `layer` and "
    "attends over cache + new, causally aligned to the end (the last query sees every key). "
    "Hq must be a multiple of Hkv (grouped-query attention). window > 0 limits each query to "
    "the last `window` keys; chunk > 0 to the keys of its own chunk (key position // chunk = query "
    "position // chunk; Llama 4's chunked attention); softcap > 0 applies softcap * tanh(scores / softcap). "
    "alibi_max_bias > 0 adds "
    "ALiBi: slope_h * key_position to head h's scores, with slopes 2 ** (-alibi_max_bias * (h + 1) / Hq) "
    "(ALiBi's interleaving rule when Hq is not a power of two). sinks (float [Hq], or null; gpt-oss) adds "
    "exp(sinks[h]) to head h's softmax denominator, a key that takes weight but has no value. "
    "keep (bool [B, L, T] over the T cache columns after this call's keys, or null; an `index_topk` "
    "output) limits each query further to the keys it marks: indexed sparse attention (DeepSeek-V3.2). "
    "Output [B, Hq, L, D]. A node may omit sinks and keep (programs written before they existed).",
    [_t("q"), _t("k"), _t("v"), _opt("sinks"), _opt("keep")],
    [_attr("layer", INT, "KV cache slot, below state.kv_cache.layers", low=0), _attr("scale", FLOAT, "score scale"),
     _attr("window", INT, "sliding window, 0 for none", 0, **_SIZE), _attr("softcap", FLOAT, "0 for none", 0.0, low=0),
     _attr("alibi_max_bias", FLOAT, "ALiBi's maximal bias (8 for BLOOM), 0 for none", 0.0, low=0),
     _attr("chunk", INT, "attention chunk size, 0 for none", 0, **_SIZE)])

_op("index_topk", "nn",
    "the keys an indexer keeps for each query: the lightning indexer of DeepSeek Sparse Attention "
    "(DeepSeek-V3.2, GLM-5). q: [B, L, H, D] and k: [B, L, D] for the L new positions only; weights: [B, L, H]. "
    "The interpreter appends k to KV cache slot `layer` (keys only, no values) and scores every query against "
    "the T keys there: score[b, i, t] = sum_h weights[b, i, h] * relu(scale * q[b, i, h] . k[b, t]), in float32; "
    "keys the query may not see (causally, as the attention op masks them) score -inf. Output bool [B, L, T]: "
    "True at the keys whose score is among the query's `topk` largest (every key when T <= topk; a tie at the "
    "k-th score keeps all tied keys), the `keep` input of the layer's `attention`.",
    [_t("q"), _t("k"), _t("weights")],
    [_attr("layer", INT, "KV cache slot of the indexer's keys, below state.kv_cache.layers", low=0),
     _attr("topk", INT, "keys kept per query", low=1, high=INT32_MAX), _attr("scale", FLOAT, "factor on q . k")])
_op("causal_conv1d", "nn",
    "depthwise causal 1-D convolution over the sequence, with the interpreter's conv state: the short "
    "convolutions of hybrid recurrent models (LFM2). x: [B, L, C] for the L new positions only; weight: "
    "[C, 1, K] (torch's depthwise Conv1d layout); bias: [C] or null. out[b, t, c] = bias[c] + sum_k "
    "weight[c, 0, k] * xs[b, t + k, c], where xs is x preceded by the K - 1 inputs before it: the conv "
    "state of `layer` (zeros at the start of a sequence). The interpreter then keeps the last K - 1 rows "
    "of xs as that state. Output [B, L, C]. Rows must be whole, unpadded sequences.",
    [_t("x"), _t("weight"), _opt("bias")],
    [_attr("layer", INT, "conv state slot: state.kv_cache.layers <= layer < that + state.conv.layers", low=0)])
_op("gated_delta_rule", "nn",
    "linear attention by the gated delta rule, with the interpreter's delta state: the Gated DeltaNet layers "
    "of hybrid models (Qwen3.5, Qwen3-Next, OLMo Hybrid). q, k: [B, L, Hk, Dk] and v: [B, L, H, Dv] for the "
    "L new positions only, H a multiple of Hk (value head h reads query/key head h // (H / Hk)); g: [B, L, H] "
    "log-decay per head, or [B, L, H, Dk] per key channel; beta: [B, L, H]. Per head, from the state S "
    "[Dk, Dv] of `layer` (zeros at the start of a sequence), for each position t in order: "
    "S = exp(g_t) * S (per key row when g is per channel); S = S + k_t outer (beta_t * (v_t - k_t @ S)); "
    "out_t = (scale * q_t) @ S. Computed in float32; the interpreter keeps the last S as the state. Output "
    "[B, L, H, Dv] in v's dtype. Rows must be whole, unpadded sequences.",
    [_t("q"), _t("k"), _t("v"), _t("g"), _t("beta")],
    [_attr("layer", INT, "delta state slot, after the KV cache and conv state slots (state.delta.layers of them)",
           low=0),
     _attr("scale", FLOAT, "factor on the queries (Dk ** -0.5)")])
_op("ssm_scan", "nn",
    "selective state-space scan with the interpreter's SSM state: the recurrence of Mamba2 layers "
    "(Mamba2, Nemotron-H, Granite 4, Bamba, Zamba2, Falcon-H1) and Mamba 1 layers (Mamba, Falcon-Mamba, "
    "Jamba, Zamba: a head per channel, P = 1, G = 1). x: [B, L, H, P] for the L new positions only; dt: "
    "[B, L, H] (the step, already softplus'd); A: [H] or [H, N] (negative; a decay per head, or per head and "
    "state column); B, C: [B, L, G, N], group g serving heads "
    "g * H/G .. (g + 1) * H/G - 1. In float32, per head h of group g and position t: "
    "state = state * exp(dt[t, h] * A[h]) + dt[t, h] * outer(x[t, h], B[t, g]); y[t, h] = state @ C[t, g] "
    "(with A [H, N], state column n decays by exp(dt[t, h] * A[h, n])), where state [H, P, N] is the SSM "
    "state of `layer` (zeros at the start of a sequence), which keeps the last one. "
    "Output float32 [B, L, H, P]. Rows must be whole, unpadded sequences.",
    [_t("x"), _t("dt"), _t("A"), _t("B"), _t("C")],
    [_attr("layer", INT, "SSM state slot, after the KV cache, conv and delta state slots (state.ssm.layers of them)",
           low=0)])
_op("lru_scan", "nn",
    "diagonal linear recurrence with the interpreter's LRU state: the RG-LRU of RecurrentGemma's recurrent "
    "blocks (its gates, decay and input normalisation are ordinary ops before it). a, x: [B, L, D] for the L "
    "new positions only. In float32, per channel d and position t in order: h[d] = a[t, d] * h[d] + x[t, d]; "
    "out[t, d] = h[d], where h [D] is the LRU state of `layer` (zeros at the start of a sequence), which keeps "
    "the last one. Output float32 [B, L, D]. Rows must be whole, unpadded sequences.",
    [_t("a"), _t("x")],
    [_attr("layer", INT, "LRU state slot, after the KV cache, conv, delta and SSM state slots (state.lru.layers "
           "of them)", low=0)])
_op("rope", "nn",
    "rotate-half rotary position embedding (fused by the exporter from HF's pattern). x: [B, H, L, D] "
    "with D = 2 * len(inv_freq); positions: [B, L] integer positions; angle = positions * inv_freq; "
    "out = (x * cos(cat(angle, angle)) + rotate_half(x) * sin(cat(angle, angle))) * mscale, "
    "where rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]).",
    [_t("x"), _t("positions"), _t("inv_freq")],
    [_attr("mscale", FLOAT, "factor on cos and sin (HF's attention_scaling)", 1.0)])
_op("quantized_linear", "nn",
    "x @ dequantize(weight).T + bias with MLX's affine layout: weight uint32 [out, in * bits / 32] "
    "packs `bits`-bit codes q (lowest bits first), scales and biases [out, in / group_size]; "
    "w = q * scale + bias per group of group_size inputs (mx.quantized_matmul).",
    [_t("x"), _t("weight"), _t("scales"), _t("biases"), _opt("bias")],
    [_attr("group_size", INT, **_QUANT["group_size"]), _attr("bits", INT, **_QUANT["bits"])])
_op("lora", "nn",
    "the low-rank update a LoRA adapter adds to a linear layer's output (inserted by the loader's "
    "adapter rewrite, interp/lora.py; never exported): (x @ a[i].T) @ b[i].T, with a: [adapters, rank, "
    "in], b: [adapters, out, rank] (the adapter's scale folded into b) and i = index[row] for each row of "
    "the batch (index: int [B]; x is [B, ..., in], or [B * L, in] batch-major when 2-D). A null index uses "
    "adapter 0. Rows of one batch may use different adapters; an all-zero adapter is none.",
    [_t("x"), _t("a"), _t("b"), _opt("index")])
_op("quantized_embedding", "nn",
    "rows of an affine-quantized weight (layout as quantized_linear) picked by integer indices, "
    "dequantized to scales' dtype",
    [_t("weight"), _t("scales"), _t("biases"), _t("indices")],
    [_attr("group_size", INT, **_QUANT["group_size"]), _attr("bits", INT, **_QUANT["bits"])])

_op("expert_linear", "nn",
    "mixture-of-experts projection reading only the routed experts' weights: out[..., j, :] = "
    "x[..., j, :] @ weight[indices[..., j]].T (+ bias[indices[..., j]]). weight: [E, out, in]; indices: "
    "integer [..., k]; x: [..., in] whose leading axes broadcast against indices' shape (x [T, 1, in] with "
    "indices [T, k] sends each token to its k experts; x [T, k, in] gives each slot its own input). "
    "Output: broadcast(x.shape[:-1], indices.shape) + [out] (mx.gather_mm).",
    [_t("x"), _t("weight"), _t("indices"), _opt("bias")])
_op("quantized_expert_linear", "nn",
    "expert_linear with an affine-quantized weight, laid out per expert as quantized_linear's: weight uint32 "
    "[E, out, in * bits / 32], scales and biases [E, out, in / group_size] (mx.gather_qmm).",
    [_t("x"), _t("weight"), _t("scales"), _t("biases"), _t("indices"), _opt("bias")],
    [_attr("group_size", INT, **_QUANT["group_size"]), _attr("bits", INT, **_QUANT["bits"])])

# ----------------------------------------------------------------------------- symbolic ints
_op("sym_size", "symbolic", "the size of axis dim of x, as a symbolic int", [_t("x")], [_attr("dim", INT)],
    symbolic=True)
for _name, _doc in [("sym_add", "a + b"), ("sym_sub", "a - b"), ("sym_mul", "a * b"), ("sym_floordiv", "a // b")]:
    _op(_name, "symbolic", _doc + " on symbolic ints", [Arg("a", SYMINT), Arg("b", SYMINT)], symbolic=True)

# ----------------------------------------------------------------------------- ternary
# Weights in {-1, 0, +1} times a scale, stored packed (docs/ternary.md; the packing is
# defined in interp/kernels/ternary.py).
_op("ternary_linear", "ternary",
    "x @ (t * scale[:, None]).T + bias, with t the [out_features, in_features] trits unpacked "
    "from packed (uint8 [out_features, ceil(in_features / k)]: k = 4 for packing '2bit', codes t + 1 "
    "at bits 2i..2i+1 of byte j for trit 4j + i; k = 5 for 'base3', byte = sum((t_i + 1) * 3**i)). "
    "scale: float [out_features] (per row) or [1] (per tensor). Never materialises float weights.",
    [_t("x"), _t("packed"), _t("scale"), _opt("bias")],
    [_attr("in_features", INT, low=1, high=INT32_MAX), _attr("out_features", INT, low=1, high=INT32_MAX),
     _attr("packing", STR, "'2bit' or 'base3'", "2bit", choices=("2bit", "base3"))])
_op("act_quant", "ternary",
    "BitNet activation fake-quantization, symmetric absmax per token (last axis): "
    "s = (2**(bits-1) - 1) / max(max(|x|), 1e-5); out = clip(round_half_even(x * s), -2**(bits-1), "
    "2**(bits-1) - 1) / s, in x's dtype",
    [_t("x")], [_attr("bits", INT, "activation bits", 8, low=2, high=16)])

# ----------------------------------------------------------------------------- distributed
_op("all_sum", "distributed",
    "x summed over every rank of the distributed group (mx.distributed.all_sum): the reduction after a "
    "row-parallel projection under tensor parallelism. Exported programs never hold it; "
    "interp/distributed/sharding.py inserts it into each rank's program. In one process it is x.",
    [_t("x")])


OPS: dict[str, OpSpec] = {spec.name: spec for spec in _SPECS}
if len(OPS) != len(_SPECS):  # pragma: no cover - guards the table itself
    raise RuntimeError("duplicate op name in the schema")


def op_names() -> list[str]:
    """All op names, sorted, for tests and documentation."""
    return sorted(OPS)


def _value_names(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in _value_names(item)]
    return []


def references(node) -> set[str]:
    """Names of the values a node reads: its inputs, and the symbolic ints its int attributes
    name (attribute strings such as dtypes excluded)."""
    spec = OPS[node.op]
    refs = set(_value_names(list(node.inputs)))
    for name, value in node.attrs.items():
        if spec.attr_by_name[name].kind in (INT, INTS):
            refs.update(_value_names(value))
    return refs


def render_markdown() -> str:
    """The op reference section of docs/program-format.md, generated from this table."""
    lines = [
        "| op | category | inputs | attributes | outputs | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(arg: Arg) -> str:
        text = f"`{arg.name}: {arg.kind}`"
        if not arg.required:
            text += f" = `{json.dumps(arg.default)}`"
        if arg.range_text():
            text += f" ({arg.range_text()})"
        return text

    for spec in sorted(_SPECS, key=lambda s: (s.category, s.name)):
        ins = ", ".join(fmt(a) for a in spec.inputs) or "-"
        attrs = ", ".join(fmt(a) for a in spec.attrs) or "-"
        outs = ", ".join(spec.outputs) + (" (symbolic int)" if spec.symbolic else "")
        doc = spec.doc.replace("|", "\\|")
        lines.append(f"| `{spec.name}` | {spec.category} | {ins} | {attrs} | {outs} | {doc} |")
    return "\n".join(lines) + "\n"


DOC_START = "<!-- ops:start (generated by `python -m interp.schema --write-docs`; do not edit) -->"
DOC_END = "<!-- ops:end -->"


def write_docs(path: str = "docs/program-format.md") -> None:
    """Replace the generated op table in the format document."""
    from pathlib import Path

    from interp.docblock import replace_block

    replace_block(Path(path), DOC_START, DOC_END, render_markdown())


if __name__ == "__main__":
    import sys

    if "--write-docs" in sys.argv:
        write_docs()
    else:
        print(render_markdown(), end="")
