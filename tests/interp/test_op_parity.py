"""Every schema op against its torch counterpart, enumerated from the schema, in three dtypes.

CASES maps each op name to a torch reference and sample inputs; a schema op without a
case, without an MLX implementation, or without documentation fails the suite. Every case
runs in float32; a case with floating-point inputs also runs in float16 and bfloat16: the
inputs are rounded to that dtype once, both sides compute from the same values, and the
result must keep the reference's dtype and agree within the dtype's tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporter.attention_reference import alibi_slopes, attention_reference
from interp import schema
from interp.graph import RunContext
from interp.ops import REGISTRY

RNG = np.random.default_rng(0)
#: rtol = atol per dtype, as ExecuTorch's MLX op tests set them; a case overrides with a reason.
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}
HALF_DTYPES = ("float16", "bfloat16")


def randn(*shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def positive(*shape):
    return (RNG.random(shape) + 0.5).astype(np.float32)


def ints(high, *shape):
    return RNG.integers(0, high, shape).astype(np.int64)


def mask(*shape):
    return RNG.random(shape) > 0.5


def distinct(*shape):
    """Shuffled multiples of 1/4: exact in every float dtype, so ranks and indices have no ties."""
    return (RNG.permutation(math.prod(shape)) / 4 - 2).reshape(shape).astype(np.float32)


@dataclass
class Case:
    torch_fn: Any
    inputs: list
    attrs: dict = field(default_factory=dict)
    #: tolerances that differ from TOLERANCE, by dtype name
    tol: dict = field(default_factory=dict)

    def tolerance(self, dtype: str) -> float:
        return self.tol.get(dtype, TOLERANCE[dtype])

    @property
    def floating(self) -> bool:
        """Whether the case has floating-point inputs (or makes a float32 tensor) to run in half precision."""
        arrays = [v for item in self.inputs for v in (item if isinstance(item, list) else [item])]
        return (any(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in arrays)
                or self.attrs.get("dtype") == "float32")


def _attention_ref(q, k, v, sinks=None, keep=None, *, layer, **attrs):
    return attention_reference(q, k, v, sinks=sinks, keep=keep, **attrs)


def _index_topk_ref(q, k, weights, *, layer, topk, scale):
    from exporter.indexed import paw_index_topk

    return paw_index_topk(q, k, weights, layer, topk, scale)


def _keep(batch, length):
    """A random indexer choice [batch, length, length] that keeps at least each query's own key."""
    return mask(batch, length, length) | np.eye(length, dtype=bool)


def _ssm_ref(x, dt, A, B, C, *, layer):
    from exporter.ssm import paw_ssm_scan

    return paw_ssm_scan(x, dt, A, B, C)


def _lru_ref(a, x, *, layer):
    from exporter.rg_lru import paw_lru_scan

    return paw_lru_scan(a, x)


def _conv_ref(x, weight, bias=None, *, layer):
    from exporter.conv import paw_causal_conv1d

    return paw_causal_conv1d(x, weight, bias)


def _delta_rule_ref(q, k, v, g, beta, *, layer, scale):
    from exporter.delta_rule import paw_gated_delta_rule

    return paw_gated_delta_rule(q, k, v, g, beta, scale)


def _unit_rows(*shape):
    """Rows of length 1 along the last axis, as Gated DeltaNet's L2-normed keys are."""
    x = randn(*shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


CASES: dict[str, Case] = {
    # elementwise, tensor-tensor with broadcasting and tensor-scalar
    "add": Case(torch.add, [randn(2, 3, 4), randn(3, 4)]),
    "sub": Case(torch.sub, [randn(2, 3, 4), 0.5]),
    "mul": Case(torch.mul, [randn(2, 3, 4), randn(2, 1, 4)]),
    "div": Case(torch.div, [randn(2, 3), positive(2, 3)]),
    "pow": Case(torch.pow, [positive(2, 3), 2]),
    "maximum": Case(torch.maximum, [randn(3, 4), randn(3, 4)]),
    "minimum": Case(torch.minimum, [randn(3, 4), randn(3, 4)]),
    "eq": Case(torch.eq, [ints(3, 4, 4), ints(3, 4, 4)]),
    "ne": Case(torch.ne, [ints(3, 4, 4), 1]),
    "lt": Case(torch.lt, [randn(3, 4), randn(3, 4)]),
    "le": Case(torch.le, [randn(3, 4), 0.0]),
    "gt": Case(torch.gt, [randn(3, 4), randn(3, 4)]),
    "ge": Case(torch.ge, [randn(3, 4), 0.0]),
    "logical_and": Case(torch.logical_and, [mask(3, 4), mask(3, 4)]),
    "logical_or": Case(torch.logical_or, [mask(3, 4), mask(3, 4)]),
    "neg": Case(torch.neg, [randn(3, 4)]),
    "abs": Case(torch.abs, [randn(3, 4)]),
    "exp": Case(torch.exp, [randn(3, 4)]),
    "log": Case(torch.log, [positive(3, 4)]),
    "sqrt": Case(torch.sqrt, [positive(3, 4)]),
    "rsqrt": Case(torch.rsqrt, [positive(3, 4)]),
    "log1p": Case(torch.log1p, [positive(3, 4) * 1e-6]),
    "reciprocal": Case(torch.reciprocal, [positive(3, 4)]),
    "sin": Case(torch.sin, [randn(3, 4)]),
    "cos": Case(torch.cos, [randn(3, 4)]),
    "tanh": Case(torch.tanh, [randn(3, 4)]),
    "sigmoid": Case(torch.sigmoid, [randn(3, 4)]),
    "silu": Case(F.silu, [randn(3, 4)]),
    "relu": Case(F.relu, [randn(3, 4)]),
    "erf": Case(torch.erf, [randn(3, 4)]),
    "floor": Case(torch.floor, [randn(3, 4) * 3]),
    "logical_not": Case(torch.logical_not, [mask(3, 4)]),
    "gelu": Case(lambda x, approximate: F.gelu(x, approximate=approximate), [randn(3, 4)], {"approximate": "tanh"}),
    "where": Case(torch.where, [mask(3, 4), randn(3, 4), randn(3, 4)]),
    "clamp": Case(lambda x, min, max: torch.clamp(x, min, max), [randn(3, 4)], {"min": -0.5, "max": 0.7}),
    # reductions
    "mean": Case(lambda x, dims, keepdim: x.mean(dims, keepdim=keepdim), [randn(2, 3, 4)],
                 {"dims": [-1], "keepdim": True}),
    "sum": Case(lambda x, dims, keepdim: x.sum(dims, keepdim=keepdim), [randn(2, 3, 4)],
                {"dims": [0, 2], "keepdim": False}),
    "amax": Case(lambda x, dims, keepdim: x.amax(dims, keepdim=keepdim), [randn(2, 3, 4)],
                 {"dims": [1], "keepdim": True}),
    "softmax": Case(lambda x, dim: x.softmax(dim), [randn(2, 3, 5)], {"dim": -1}),
    "argmax": Case(lambda x, dim, keepdim: x.argmax(dim, keepdim=keepdim), [distinct(3, 7)],
                   {"dim": 1, "keepdim": False}),
    # shapes
    "reshape": Case(lambda x, shape: x.reshape(shape), [randn(2, 3, 4)], {"shape": [2, -1, 2]}),
    "transpose": Case(lambda x, dim0, dim1: x.transpose(dim0, dim1), [randn(2, 3, 4)], {"dim0": 1, "dim1": 2}),
    "permute": Case(lambda x, dims: x.permute(dims), [randn(2, 3, 4)], {"dims": [2, 0, 1]}),
    "unsqueeze": Case(lambda x, dim: x.unsqueeze(dim), [randn(2, 3)], {"dim": -1}),
    "squeeze": Case(lambda x, dims: x.squeeze(dims), [randn(2, 1, 3, 1)], {"dims": [1, 3]}),
    "expand": Case(lambda x, shape: x.expand(shape), [randn(2, 1, 4)], {"shape": [3, 2, -1, 4]}),
    "slice": Case(lambda x, dim, start, end, step: x[:, start:end:step], [randn(2, 9, 3)],
                  {"dim": 1, "start": 1, "end": 8, "step": 2}),
    "select": Case(lambda x, dim, index: x.select(dim, index), [randn(2, 5, 3)], {"dim": 1, "index": -1}),
    "cat": Case(lambda xs, dim: torch.cat(xs, dim), [[randn(2, 3), randn(2, 5)]], {"dim": 1}),
    "split": Case(lambda x, sizes, dim: x.split(sizes, dim), [randn(7, 3)], {"sizes": [2, 5], "dim": 0}),
    "flip": Case(lambda x, dims: x.flip(dims), [randn(3, 4)], {"dims": [1]}),
    "take": Case(lambda x, index, dim: x.index_select(dim, index), [randn(5, 3), ints(5, 4)], {"dim": 0}),
    "gather": Case(lambda x, index, dim: x.gather(dim, index), [randn(3, 5), ints(5, 3, 2)], {"dim": 1}),
    "tril": Case(lambda x, k: x.tril(k), [randn(4, 4)], {"k": 0}),
    "triu": Case(lambda x, k: x.triu(k), [randn(4, 4)], {"k": 1}),
    # creation and types
    "cast": Case(lambda x, dtype: x.to(getattr(torch, dtype)), [randn(3, 4) * 10], {"dtype": "int32"}),
    "arange": Case(lambda start, end, step, dtype: torch.arange(start, end, step, dtype=getattr(torch, dtype)), [],
                   {"start": 2, "end": 11, "step": 3, "dtype": "int32"}),
    "full": Case(lambda shape, value, dtype: torch.full(shape, value, dtype=getattr(torch, dtype)), [],
                 {"shape": [2, 3], "value": 1.5, "dtype": "float32"}),
    "full_like": Case(lambda x, value, dtype: torch.full_like(x, value), [randn(2, 3)], {"value": -2.0, "dtype": None}),
    "cumsum": Case(lambda x, dim: x.cumsum(dim), [randn(2, 5)], {"dim": 1}),
    # neural network
    "embedding": Case(F.embedding, [ints(10, 2, 3), randn(10, 4)]),  # reordered below
    "linear": Case(F.linear, [randn(2, 3, 8), randn(5, 8), randn(5)]),
    "matmul": Case(torch.matmul, [randn(2, 3, 4), randn(2, 4, 5)]),
    "layer_norm": Case(lambda x, w, b, normalized_shape, eps: F.layer_norm(x, normalized_shape, w, b, eps),
                       [randn(2, 3, 8), randn(8), randn(8)], {"normalized_shape": [8], "eps": 1e-5}),
    "rms_norm": Case(lambda x, w, eps: F.rms_norm(x, [x.shape[-1]], w, eps), [randn(2, 3, 8), randn(8)], {"eps": 1e-6}),
    "attention": Case(_attention_ref, [randn(1, 4, 5, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8)],
                      {"layer": 0, "scale": 8**-0.5, "window": 0, "softcap": 0.0}),
    # DSA's indexer: 3 of up to 7 earlier keys kept per query (the first 3 queries keep all they see)
    "index_topk": Case(_index_topk_ref, [randn(2, 7, 4, 8), randn(2, 7, 8), randn(2, 7, 4)],
                       {"layer": 0, "topk": 3, "scale": 8**-0.5}),
    # symbolic ints (plain Python)
    "sym_size": Case(lambda x, dim: x.shape[dim], [randn(2, 7)], {"dim": 1}),
    "sym_add": Case(lambda a, b: a + b, [3, 4]),
    "sym_sub": Case(lambda a, b: a - b, [3, 4]),
    "sym_mul": Case(lambda a, b: a * b, [3, 4]),
    "sym_floordiv": Case(lambda a, b: a // b, [11, 4]),
}


def _ternary_case(packing: str) -> Case:
    from interp.kernels.ternary import pack_ternary, pack_ternary_base3

    trits = RNG.integers(-1, 2, (6, 13)).astype(np.int8)
    scale = positive(6)
    packed = pack_ternary(trits) if packing == "2bit" else pack_ternary_base3(trits)

    def reference(x, packed_t, scale_t, bias, in_features, out_features, packing):
        weight = torch.from_numpy(trits.astype(np.float32)).to(scale_t.dtype) * scale_t[:, None]
        return F.linear(x, weight, bias)

    return Case(reference, [randn(2, 3, 13), packed, scale, randn(6)],
                {"in_features": 13, "out_features": 6, "packing": packing})


def _act_quant_ref(x, bits):
    qmax = 2 ** (bits - 1) - 1
    s = qmax / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-qmax - 1, qmax) / s


CASES["repeat_interleave"] = Case(lambda x, repeats, dim: x.repeat_interleave(repeats, dim), [randn(2, 3, 4)],
                                  {"repeats": 3, "dim": 1})
CASES["tile"] = Case(lambda x, reps: x.repeat(reps), [randn(2, 3)], {"reps": [2, 1, 3]})
CASES["topk"] = Case(lambda x, k, dim, largest: x.topk(k, dim, largest=largest), [distinct(3, 9)],
                     {"k": 3, "dim": -1, "largest": True})


def _rope_ref(x, positions, inv_freq, mscale):
    """HF's rotate-half RoPE, angles and products in float32, the result in ``x``'s dtype."""
    freqs = positions[:, :, None].float() * inv_freq.float()[None, None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * mscale)[:, None], (emb.sin() * mscale)[:, None]
    half = x.shape[-1] // 2
    x32 = x.float()
    return (x32 * cos + torch.cat([-x32[..., half:], x32[..., :half]], dim=-1) * sin).to(x.dtype)


def _dequantize_ref(q, scales, biases, group_size, bits):
    """MLX's affine layout: ``bits``-bit codes packed into uint32 words, lowest bits first."""
    words = q.to(torch.int64)
    codes = (words[..., None] >> torch.arange(0, 32, bits)) & (2**bits - 1)  # [out, words, codes per word]
    codes = codes.reshape(*q.shape[:-1], -1).to(scales.dtype)
    return codes * scales.repeat_interleave(group_size, -1) + biases.repeat_interleave(group_size, -1)


def _quantized(bits: int):
    """MLX affine-quantized [12, 128] weights: codes, scales and biases."""
    q, scales, biases = mx.quantize(mx.array(randn(12, 128)), group_size=64, bits=bits)
    return np.array(q), np.array(scales), np.array(biases)


def _expert_ref(*args, **attrs):
    from exporter.experts import paw_expert_linear  # the capture's own torch reference

    return paw_expert_linear(*args)


def _quantized_experts(bits: int):
    """A stack of 4 affine-quantized experts [4, 12, 64]: codes, scales and biases."""
    q, scales, biases = mx.quantize(mx.array(randn(4, 12, 64)), group_size=32, bits=bits)
    return np.array(q), np.array(scales), np.array(biases)


#: half-precision sums of quantized products: as for quantized_linear below
_QUANT_TOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
_INV_FREQ = (1.0 / (10000 ** (np.arange(0, 16, 2) / 16))).astype(np.float32)
# angles of up to 50 radians carry float32's rounding (3e-6) into cos and sin
CASES["rope"] = Case(_rope_ref, [randn(2, 3, 4, 16), ints(50, 2, 4).astype(np.int32), _INV_FREQ], {"mscale": 1.0},
                     tol={"float32": 2e-5})
# Sums of 128 products: the order of summation shows at 1e-5 in float32. In half precision
# MLX's CPU quantized_matmul sums in the activations' dtype where torch sums in float32:
# errors up to 0.01 (float16) and 0.05 (bfloat16) on outputs of about 1.
CASES["quantized_linear"] = Case(
    lambda x, q, s, b, bias, group_size, bits: F.linear(x, _dequantize_ref(q, s, b, group_size, bits), bias),
    [randn(2, 3, 128) / 8, *_quantized(4), randn(12) / 8], {"group_size": 64, "bits": 4},
    tol={"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1})
CASES["quantized_embedding"] = Case(
    lambda q, s, b, ids, group_size, bits: F.embedding(ids, _dequantize_ref(q, s, b, group_size, bits)),
    [*_quantized(8), ints(12, 2, 5)], {"group_size": 64, "bits": 8})
CASES["ternary_linear"] = _ternary_case("2bit")
CASES["expert_linear"] = Case(_expert_ref, [randn(5, 1, 16), randn(4, 12, 16), ints(4, 5, 2), randn(4, 12)])
CASES["quantized_expert_linear"] = Case(
    lambda x, q, s, b, i, bias, group_size, bits: _expert_ref(x, _dequantize_ref(q, s, b, group_size, bits), i, bias),
    [randn(5, 1, 64) / 8, *_quantized_experts(4), ints(4, 5, 2), None], {"group_size": 32, "bits": 4}, tol=_QUANT_TOL)
CASES["act_quant"] = Case(_act_quant_ref, [randn(2, 5, 16)], {"bits": 8})


def _lora_ref(x, a, b, index):
    rows = index if index is not None else torch.zeros(x.shape[0], dtype=torch.int64)
    if x.dim() == 2:  # batch-major rows of batch * length
        rows = rows.repeat_interleave(x.shape[0] // rows.shape[0])
    return torch.stack([(x[i] @ a[rows[i]].T) @ b[rows[i]].T for i in range(x.shape[0])])


CASES["lora"] = Case(_lora_ref, [randn(3, 4, 16), randn(2, 5, 16), randn(2, 12, 5), np.array([1, 0, 1], np.int32)])
# F.embedding takes (indices, weight); the program op takes (weight, indices).
CASES["embedding"] = Case(lambda w, i: F.embedding(i, w), [randn(10, 4), ints(10, 2, 3)])
# In one process (the test's) the sum over the ranks is x itself; tests/interp/distributed runs it over several.
CASES["all_sum"] = Case(lambda x: x.clone(), [randn(2, 3, 4)])
CASES["causal_conv1d"] = Case(_conv_ref, [randn(2, 5, 6), randn(6, 1, 3), randn(6)], {"layer": 0})
# two value heads per key head, a log-decay per head (Qwen3.5) and beta in (0, 1)
CASES["gated_delta_rule"] = Case(
    _delta_rule_ref, [_unit_rows(2, 5, 2, 4), _unit_rows(2, 5, 2, 4), randn(2, 5, 4, 3), -positive(2, 5, 4),
                      positive(2, 5, 4) - 0.5], {"layer": 0, "scale": 0.5})
# 4 heads of 3 in 2 groups, state size 6; dt > 0 and A < 0 as softplus and -exp make them
CASES["ssm_scan"] = Case(_ssm_ref, [randn(2, 5, 4, 3), positive(2, 5, 4), -positive(4), randn(2, 5, 2, 6),
                                    randn(2, 5, 2, 6)], {"layer": 0})
# decays in (0, 1) as exp(-8 * r * softplus) makes them, one zero where a sequence restarts (RG-LRU's reset)
_RESTART = np.arange(6)[:, None] == 3
CASES["lru_scan"] = Case(_lru_ref, [np.where(_RESTART, 0.0, np.exp(-positive(2, 6, 5))).astype(np.float32),
                                    randn(2, 6, 5)], {"layer": 0})
EXTRA_CASES = {
    "attention with window, softcap and a cache-like longer key": Case(
        _attention_ref, [randn(1, 4, 3, 8), randn(1, 2, 7, 8), randn(1, 2, 7, 8)],
        {"layer": 0, "scale": 0.3, "window": 4, "softcap": 5.0}),
    "attention decoding one query over many keys": Case(
        _attention_ref, [randn(2, 4, 1, 8), randn(2, 4, 6, 8), randn(2, 4, 6, 8)], {"layer": 0, "scale": 0.35}),
    "attention with ALiBi over six heads": Case(
        _attention_ref, [randn(2, 6, 7, 8), randn(2, 6, 7, 8), randn(2, 6, 7, 8)],
        {"layer": 0, "scale": 8**-0.5, "alibi_max_bias": 8.0}),
    "attention with ALiBi, a window and fewer queries than keys": Case(
        _attention_ref, [randn(1, 4, 2, 8), randn(1, 2, 9, 8), randn(1, 2, 9, 8)],
        {"layer": 0, "scale": 0.3, "window": 4, "alibi_max_bias": 8.0}),
    "attention with sinks, a window and fewer queries than keys": Case(
        _attention_ref, [randn(1, 4, 2, 8), randn(1, 2, 9, 8), randn(1, 2, 9, 8), randn(4)],
        {"layer": 0, "scale": 0.3, "window": 4}),
    "attention with sinks decoding one query": Case(
        _attention_ref, [randn(2, 4, 1, 8), randn(2, 4, 6, 8), randn(2, 4, 6, 8), randn(4)],
        {"layer": 0, "scale": 0.35}),
    "attention with an indexer's keep mask": Case(
        _attention_ref, [randn(2, 4, 6, 8), randn(2, 2, 6, 8), randn(2, 2, 6, 8), None, _keep(2, 6)],
        {"layer": 0, "scale": 0.35}),
    "index_topk keeping more keys than a short sequence has": Case(
        _index_topk_ref, [randn(1, 3, 2, 8), randn(1, 3, 8), randn(1, 3, 2)], {"layer": 0, "topk": 4, "scale": 0.5}),
    "attention in chunks with fewer queries than keys": Case(
        _attention_ref, [randn(1, 4, 4, 8), randn(1, 2, 9, 8), randn(1, 2, 9, 8)],
        {"layer": 0, "scale": 0.3, "chunk": 3}),
    "attention in chunks decoding one query, sinks": Case(
        _attention_ref, [randn(2, 4, 1, 8), randn(2, 4, 10, 8), randn(2, 4, 10, 8), randn(4)],
        {"layer": 0, "scale": 0.35, "chunk": 4}),
    "ternary_linear base3": _ternary_case("base3"),
    "expert_linear for one token, fewer pairs than experts": Case(
        _expert_ref, [randn(1, 1, 16), randn(4, 12, 16), np.array([[2, 0]], np.int64), randn(4, 12)]),
    "expert_linear over many pairs, grouped by expert": Case(
        _expert_ref, [randn(40, 2, 16), randn(4, 12, 16), ints(4, 40, 2), None], tol={"float32": 2e-5}),
    "quantized_expert_linear over many pairs": Case(
        lambda x, q, s, b, i, bias, group_size, bits: _expert_ref(
            x, _dequantize_ref(q, s, b, group_size, bits), i, bias),
        [randn(40, 1, 64) / 8, *_quantized_experts(4), ints(4, 40, 2), randn(4, 12) / 8], {"group_size": 32, "bits": 4},
        tol=_QUANT_TOL),
    "rope with scaling factor": Case(_rope_ref, [randn(1, 2, 3, 16), ints(9, 1, 3).astype(np.int32), _INV_FREQ],
                                     {"mscale": 0.75}, tol={"float32": 2e-5}),
    "repeat_interleave along the last axis": Case(lambda x, repeats, dim: x.repeat_interleave(repeats, dim),
                                                  [randn(3, 4, 5)], {"repeats": 2, "dim": -1}),
    "tile with reps of the same rank": Case(lambda x, reps: x.repeat(reps), [randn(3, 4, 5)], {"reps": [2, 1, 3]}),
    "topk smallest": Case(lambda x, k, dim, largest: x.topk(k, dim, largest=largest), [distinct(4, 6)],
                          {"k": 2, "dim": 0, "largest": False}),
    "gelu erf": Case(lambda x, approximate: F.gelu(x, approximate=approximate), [randn(3, 4)], {"approximate": "none"}),
    "slice with open end": Case(lambda x, dim, start, end, step: x[..., start:], [randn(2, 6)],
                                {"dim": -1, "start": 3, "end": None, "step": 1}),
    "expand rank-preserving": Case(lambda x, shape: x.expand(shape), [randn(1, 3)], {"shape": [4, -1]}),
    "pow with tensor exponent": Case(torch.pow, [positive(3, 4), randn(3, 4)]),
    "lora one adapter, no index": Case(_lora_ref, [randn(2, 3, 16), randn(1, 4, 16), randn(1, 8, 4), None]),
    "lora on batch-major 2-D rows": Case(_lora_ref, [randn(6, 16), randn(3, 4, 16), randn(3, 8, 4),
                                                     np.array([2, 0], np.int32)]),
    "causal_conv1d without bias, one position, a wide kernel": Case(
        _conv_ref, [randn(2, 1, 6), randn(6, 1, 4), None], {"layer": 0}),
    "gated_delta_rule with a decay per key channel (Kimi's KDA), one head per key head": Case(
        _delta_rule_ref, [_unit_rows(1, 3, 2, 4), _unit_rows(1, 3, 2, 4), randn(1, 3, 2, 5), -positive(1, 3, 2, 4),
                          positive(1, 3, 2) - 0.5], {"layer": 0, "scale": 0.5}),
    "ssm_scan with a decay per state column (Mamba 1): a head per channel, one group": Case(
        _ssm_ref, [randn(2, 5, 6, 1), positive(2, 5, 6), -positive(6, 4), randn(2, 5, 1, 4), randn(2, 5, 1, 4)],
        {"layer": 0}),
    "layer_norm without affine": Case(
        lambda x, w, b, normalized_shape, eps: F.layer_norm(x, normalized_shape, w, b, eps),
        [randn(2, 8), None, None], {"normalized_shape": [8], "eps": 1e-5}),
}


def _leaves(value, convert):
    if isinstance(value, list):
        return [_leaves(v, convert) for v in value]
    return convert(value)


def _inputs(case: Case, dtype: str) -> tuple[list, list, dict]:
    """The case's inputs for torch and for MLX, float32 arrays rounded to ``dtype`` once."""
    def to_torch(value):
        if not isinstance(value, np.ndarray):
            return value
        tensor = torch.from_numpy(value)
        return tensor.to(getattr(torch, dtype)) if tensor.dtype == torch.float32 else tensor

    def to_mlx(tensor):
        if not isinstance(tensor, torch.Tensor):
            return tensor
        if tensor.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16: go through float32 exactly
            return mx.array(tensor.float().numpy()).astype(getattr(mx, dtype))
        return mx.array(tensor.numpy())

    torch_args = [_leaves(v, to_torch) for v in case.inputs]
    attrs = dict(case.attrs)
    if attrs.get("dtype") == "float32":
        attrs["dtype"] = dtype
    return torch_args, [_leaves(v, to_mlx) for v in torch_args], attrs


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return (value.float() if value.is_floating_point() else value).numpy()
    if isinstance(value, mx.array):
        return np.array(value.astype(mx.float32) if mx.issubdtype(value.dtype, mx.floating) else value)
    return np.asarray(value)


def _dtype_name(value) -> str:
    return str(value.dtype).rsplit(".", 1)[-1]


def _run(op: str, case: Case, dtype: str = "float32"):
    torch_args, mlx_args, attrs = _inputs(case, dtype)
    expected = case.torch_fn(*torch_args, **attrs)
    handler = REGISTRY[op]
    context = (RunContext(cache=None),) if handler.needs_context else ()
    got = handler.fn(*context, *mlx_args, **attrs)
    if isinstance(expected, (tuple, list)):
        assert len(got) == len(expected)
        pairs = list(zip(got, expected, strict=True))
    else:
        pairs = [(got, expected)]
    tol = case.tolerance(dtype)
    for g, e in pairs:
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            assert _dtype_name(g) == _dtype_name(e), f"{op}: {_dtype_name(g)} result, torch gives {_dtype_name(e)}"
        g, e = _as_numpy(g), _as_numpy(e)
        assert g.shape == e.shape, f"{op}: shape {g.shape} != {e.shape}"
        if e.dtype == bool or np.issubdtype(e.dtype, np.integer):
            np.testing.assert_array_equal(g, e)
        else:
            np.testing.assert_allclose(g, e, rtol=tol, atol=tol, err_msg=f"{op} in {dtype}")


@pytest.mark.parametrize("op", schema.op_names())
def test_op_matches_torch(op):
    assert op in CASES, f"schema op {op!r} has no torch parity case in tests/interp/test_op_parity.py"
    assert op in REGISTRY, f"schema op {op!r} has no MLX implementation"
    _run(op, CASES[op])


@pytest.mark.parametrize("name", sorted(EXTRA_CASES))
def test_op_variant_matches_torch(name):
    op = name.split()[0]
    _run(op, EXTRA_CASES[name])


HALF_CASES = [(op, case) for op, case in sorted(CASES.items()) if case.floating]
HALF_CASES += [(name, case) for name, case in sorted(EXTRA_CASES.items()) if case.floating]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize(("name", "case"), HALF_CASES, ids=[name for name, _ in HALF_CASES])
def test_op_matches_torch_in_half_precision(name, case, dtype):
    _run(name.split()[0], case, dtype)


@pytest.mark.parametrize("largest", [True, False])
def test_topk_of_a_permuted_view_matches_torch(largest):
    """The sort inside ``topk`` sees the rows in their true order when its input is a dense
    view that is not row-major (a permuted 3-D array): MLX's GPU sort took such views for
    row-major and sorted the wrong rows, without an error (mlx PR 4366)."""
    x = distinct(3, 4, 8)
    view = mx.transpose(mx.array(x), (1, 0, 2))  # [4, 3, 8]
    values, indices = REGISTRY["topk"].fn(view, k=3, dim=-1, largest=largest)
    want = torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 0, 1))).topk(3, -1, largest=largest)
    np.testing.assert_array_equal(np.array(values), want.values.numpy())
    np.testing.assert_array_equal(np.array(indices), want.indices.numpy())


def test_attention_reference_has_bloom_alibi_slopes():
    """The reference's ALiBi slopes are BLOOM's, for power-of-two head counts and others."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for heads in (4, 6, 12):
        torch.testing.assert_close(alibi_slopes(heads, 8.0), _get_alibi_slopes(heads, torch.device("cpu")))


def test_every_implementation_is_in_the_schema():
    assert set(REGISTRY) <= set(schema.OPS)


def test_every_op_is_documented():
    doc = (Path(__file__).parents[2] / "docs" / "program-format.md").read_text(encoding="utf-8")
    generated = schema.render_markdown()
    assert generated in doc, "docs/program-format.md's op table is stale: run `python -m interp.schema --write-docs`"
    for op in schema.op_names():
        assert f"| `{op}` |" in doc
