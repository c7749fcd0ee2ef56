"""Elementwise ops. Python-number operands stay "weak": they take the tensor's dtype."""

from __future__ import annotations

import math

import mlx.core as mx

from interp.ops import fastmath
from interp.ops.registry import implementation

implementation("add")(lambda a, b: a + b)
implementation("sub")(lambda a, b: a - b)
implementation("mul")(lambda a, b: a * b)
implementation("div")(lambda a, b: a / b)
implementation("maximum")(lambda a, b: mx.maximum(a, b))
implementation("minimum")(lambda a, b: mx.minimum(a, b))
implementation("eq")(lambda a, b: mx.equal(a, b))
implementation("ne")(lambda a, b: mx.not_equal(a, b))
implementation("lt")(lambda a, b: mx.less(a, b))
implementation("le")(lambda a, b: mx.less_equal(a, b))
implementation("gt")(lambda a, b: mx.greater(a, b))
implementation("ge")(lambda a, b: mx.greater_equal(a, b))
implementation("logical_and")(lambda a, b: mx.logical_and(a, b))
implementation("logical_or")(lambda a, b: mx.logical_or(a, b))


@implementation("pow")
def pow_(a, b):
    # x ** 2 is by far the most common case (RMSNorm); a square is exact and cheaper.
    if isinstance(b, (int, float)) and b == 2:
        return mx.square(a)
    return mx.power(a, b)


implementation("neg")(lambda x: -x)
implementation("abs")(mx.abs)
implementation("log")(mx.log)
implementation("log1p")(mx.log1p)
implementation("sqrt")(mx.sqrt)
implementation("rsqrt")(mx.rsqrt)
implementation("reciprocal")(mx.reciprocal)
implementation("sin")(mx.sin)
implementation("cos")(mx.cos)
implementation("tanh")(mx.tanh)
implementation("relu")(lambda x: mx.maximum(x, 0))
implementation("erf")(mx.erf)
implementation("floor")(mx.floor)
implementation("logical_not")(mx.logical_not)


# exp and the activations built on it take interp/ops/fastmath.py's polynomial exp on the
# CPU, where MLX's own calls libm per element (docs/speed.md).
@implementation("exp")
def exp(x):
    return fastmath.exp(x) if fastmath.use_fast_math(x) else mx.exp(x)


@implementation("sigmoid")
def sigmoid(x):
    return fastmath.sigmoid(x) if fastmath.use_fast_math(x) else mx.sigmoid(x)


@implementation("silu")
def silu(x):
    return fastmath.silu(x) if fastmath.use_fast_math(x) else x * mx.sigmoid(x)


@implementation("gelu")
def gelu(x, *, approximate="none"):
    if approximate == "tanh":
        return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return x * (1 + mx.erf(x / math.sqrt(2))) / 2


@implementation("where")
def where(cond, a, b):
    return mx.where(cond, a, b)


@implementation("clamp")
def clamp(x, *, min=None, max=None):  # noqa: A002 - schema names
    return mx.clip(x, min, max)
