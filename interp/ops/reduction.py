"""Reductions."""

from __future__ import annotations

import mlx.core as mx

from interp.ops import fastmath
from interp.ops.registry import implementation


@implementation("mean")
def mean(x, *, dims, keepdim=False):
    return mx.mean(x, axis=list(dims), keepdims=keepdim)


@implementation("sum")
def sum_(x, *, dims, keepdim=False):
    return mx.sum(x, axis=list(dims) if dims else None, keepdims=keepdim)


@implementation("amax")
def amax(x, *, dims, keepdim=False):
    return mx.max(x, axis=list(dims) if dims else None, keepdims=keepdim)


@implementation("softmax")
def softmax(x, *, dim):
    if not fastmath.use_fast_math(x):  # (float32 only, so the fast result needs no cast back)
        return mx.softmax(x, axis=dim, precise=True)
    if dim in (-1, x.ndim - 1):
        return fastmath.softmax(x)
    return mx.swapaxes(fastmath.softmax(mx.swapaxes(x, dim, -1)), dim, -1)


@implementation("argmax")
def argmax(x, *, dim, keepdim=False):
    return mx.argmax(x, axis=dim, keepdims=keepdim)
