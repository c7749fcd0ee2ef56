"""exp, sigmoid, SiLU and softmax for MLX's CPU backend, without libm calls.

MLX's CPU ``exp`` runs one element at a time through libm's ``fma``, and a float32 prefill
computes tens of millions of exponentials (softmax, SiLU). This ``exp`` is written in MLX's
own elementwise ops, which ``mx.compile`` fuses into loops with no libm call: Cody-Waite
range reduction ``x = n ln2 + r`` with ``|r| <= ln2 / 2``, a degree-8 Taylor polynomial for
``e^r``, and ``2^n`` built from its IEEE-754 bits; relative error below 2e-7 (float32's own
rounding is 6e-8). Speed, and why the loops stay scalar: docs/speed.md.

Only for large float32 arrays on the CPU (``use_fast_math``): on a GPU ``mx.exp`` is a
native instruction. Called directly, the functions take any float dtype, compute in
float32 and return the input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from interp import device

LOG2E = 1.4426950408889634
# ln 2 split so that n * LN2_HI is exact for |n| < 2^9 (Cody and Waite).
LN2_HI = 0.693359375
LN2_LO = -2.12194440e-4
# Adding then subtracting 1.5 * 2^23 rounds a float32 of magnitude < 2^22 to the nearest
# integer with plain additions, where floor() would be a libm call per element.
ROUNDER = 12582912.0
# exp overflows float32 above EXP_MAX and is below float32's smallest normal under EXP_MIN
# (where this returns 0 rather than a denormal).
EXP_MAX = 88.72283
EXP_MIN = -87.33654
# A fast exp is about six fused kernels where MLX's is one, and each costs a dispatch:
# below a few thousand elements (a decode step's SiLU over 1,536) the scalar exp is cheaper.
MIN_ELEMENTS = 4096


def _exp(x: mx.array) -> mx.array:
    dtype = x.dtype
    x = x.astype(mx.float32)
    # Written for few fused kernels: MLX's compile stops fusing at a bit-cast (``view``)
    # and 11 ops deep, and dispatches each kernel for a few microseconds. So n is computed
    # twice (once into 2^n's bits, once back from them), and the polynomial in Estrin's
    # form (depth 4 rather than Horner's 16).
    t = mx.clip(x * LOG2E, EXP_MIN * LOG2E, EXP_MAX * LOG2E)
    bits = (mx.minimum((t + ROUNDER) - ROUNDER, 127.0).astype(mx.int32) + 127) << 23
    two_n = bits.view(mx.float32)  # 2.0 ** n, n = round(x / ln2) in [-126, 127]
    n = ((bits >> 23) - 127).astype(mx.float32)
    # x = n ln2 + r; near the top n stops at 127 and r reaches ln2 rather than ln2 / 2,
    # which the eighth-degree term keeps within 1e-7.
    y = mx.clip(x, EXP_MIN, EXP_MAX)
    r = (y - n * LN2_HI) - n * LN2_LO
    r2 = r * r
    r4 = r2 * r2
    p = ((1.0 + r) + r2 * (1 / 2 + r * (1 / 6))) + r4 * (
        ((1 / 24 + r * (1 / 120)) + r2 * (1 / 720 + r * (1 / 5040))) + r4 * (1 / 40320))
    out = mx.where(x > EXP_MAX, mx.inf, mx.where(x < EXP_MIN, 0.0, p * two_n))
    return out.astype(dtype)


def _sigmoid(x: mx.array) -> mx.array:
    return (1.0 / (1.0 + _exp(-x.astype(mx.float32)))).astype(x.dtype)


def _silu(x: mx.array) -> mx.array:
    x32 = x.astype(mx.float32)
    return (x32 / (1.0 + _exp(-x32))).astype(x.dtype)


class _PerShape:
    """``mx.compile`` of ``fn``, retraced for each new input shape, with a bounded cache.

    A shapeless compile would trace once, but MLX cannot infer the shape of a bit-cast
    (``view``), and its shapeless kernels index every operand as a broadcast, which is
    slower. Prompts come in many lengths, so past ``limit`` shapes the compiled function
    is rebuilt, which lets MLX drop the old traces.
    """

    def __init__(self, fn: Callable[..., mx.array], limit: int = 256):
        self._fn, self._limit = fn, limit
        self._compiled = mx.compile(fn)
        self._shapes: set[tuple] = set()

    def __call__(self, *arrays: mx.array) -> mx.array:
        key = tuple((a.shape, a.dtype) for a in arrays)
        if key not in self._shapes:
            if len(self._shapes) >= self._limit:
                self._compiled = mx.compile(self._fn)
                self._shapes.clear()
            self._shapes.add(key)
        return self._compiled(*arrays)


def _with_vjp(forward: Callable[[mx.array], mx.array], vjp: Callable) -> Callable[[mx.array], mx.array]:
    """``forward`` with an analytic derivative: MLX cannot differentiate a bit-cast, and
    programs are compiled by gradient descent through the model (``paw programs compile``)."""
    fn = mx.custom_function(forward)
    fn.vjp(vjp)
    return fn


_exp_compiled, _sigmoid_compiled, _silu_compiled = _PerShape(_exp), _PerShape(_sigmoid), _PerShape(_silu)


# MLX hands a one-argument function's vjp that argument itself as ``primal``.
def _exp_vjp(primal, cotangent, output):
    return cotangent * output


def _sigmoid_vjp(primal, cotangent, output):
    return cotangent * output * (1 - output)


def _silu_vjp(primal, cotangent, output):
    s = _sigmoid_compiled(primal)
    return cotangent * s * (1 + primal * (1 - s))


exp = _with_vjp(_exp_compiled, _exp_vjp)
sigmoid = _with_vjp(_sigmoid_compiled, _sigmoid_vjp)
silu = _with_vjp(_silu_compiled, _silu_vjp)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis of ``x`` in float32; rows that are all ``-inf`` give 0, not NaN.

    Not compiled as a whole: the max subtraction broadcasts, and a fused kernel with a
    broadcast operand takes MLX's strided path, slower than the contiguous ``exp`` plus
    a separate subtraction.
    """
    x = x.astype(mx.float32)
    top = x.max(axis=-1, keepdims=True)
    e = exp(x - mx.where(top == -mx.inf, 0.0, top))
    total = e.sum(axis=-1, keepdims=True)
    return e / mx.where(total == 0, 1.0, total)


def use_fast_math(x: mx.array) -> bool:
    """Whether ``x`` should take this module's functions: a large float32 array on the CPU.

    Half-precision activations keep MLX's kernels: their float32 round trip costs more
    peak memory than it saves time (docs/speed.md).
    """
    return x.size >= MIN_ELEMENTS and x.dtype == mx.float32 and device.on_cpu()
