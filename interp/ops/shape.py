"""Shape, indexing, creation and type ops."""

from __future__ import annotations

import mlx.core as mx

from interp.ops.dtypes import to_mlx
from interp.ops.registry import implementation


@implementation("reshape")
def reshape(x, *, shape):
    return mx.reshape(x, shape)


@implementation("transpose")
def transpose(x, *, dim0, dim1):
    return mx.swapaxes(x, dim0, dim1)


@implementation("permute")
def permute(x, *, dims):
    return mx.transpose(x, dims)


@implementation("unsqueeze")
def unsqueeze(x, *, dim):
    return mx.expand_dims(x, dim if dim >= 0 else dim + x.ndim + 1)


@implementation("squeeze")
def squeeze(x, *, dims=()):
    if not dims:
        return mx.squeeze(x)
    axes = [d % x.ndim for d in dims if x.shape[d] == 1]
    return mx.squeeze(x, axes) if axes else x


@implementation("expand")
def expand(x, *, shape):
    lead = len(shape) - x.ndim
    target = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(shape)]
    return mx.broadcast_to(x, target)


@implementation("slice")
def slice_(x, *, dim, start=0, end=None, step=1):
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, end, step)
    return x[tuple(index)]


@implementation("select")
def select(x, *, dim, index):
    where = [slice(None)] * x.ndim
    where[dim] = index
    return x[tuple(where)]


@implementation("cat")
def cat(xs, *, dim):
    return mx.concatenate(xs, axis=dim)


@implementation("split")
def split(x, *, sizes, dim):
    bounds, total = [], 0
    for size in sizes[:-1]:
        total += size
        bounds.append(total)
    return tuple(mx.split(x, bounds, axis=dim))


@implementation("flip")
def flip(x, *, dims):
    index = [slice(None)] * x.ndim
    for d in dims:
        index[d] = slice(None, None, -1)
    return x[tuple(index)]


@implementation("take")
def take(x, index, *, dim):
    return mx.take(x, index, axis=dim)


@implementation("gather")
def gather(x, index, *, dim):
    return mx.take_along_axis(x, index, axis=dim)


@implementation("tril")
def tril(x, *, k=0):
    return mx.tril(x, k)


@implementation("triu")
def triu(x, *, k=0):
    return mx.triu(x, k)


@implementation("cast")
def cast(x, *, dtype):
    return x.astype(to_mlx(dtype))


@implementation("arange")
def arange(*, start=0, end, step=1, dtype="int64"):
    return mx.arange(start, end, step, dtype=to_mlx(dtype))


@implementation("full")
def full(*, shape, value, dtype):
    return mx.full(shape, value, dtype=to_mlx(dtype))


@implementation("full_like")
def full_like(x, *, value, dtype=None):
    return mx.full(x.shape, value, dtype=to_mlx(dtype) if dtype else x.dtype)


@implementation("cumsum")
def cumsum(x, *, dim):
    return mx.cumsum(x, axis=dim)


@implementation("repeat_interleave")
def repeat_interleave(x, *, repeats, dim):
    return mx.repeat(x, repeats, axis=dim)


@implementation("tile")
def tile(x, *, reps):
    return mx.tile(x, list(reps))


@implementation("topk")
def topk(x, *, k, dim=-1, largest=True):
    # A full sort, then the first k: sorted like torch.topk (MoE routers sort over a few experts).
    order = mx.argsort(-x if largest else x, axis=dim)
    index = [slice(None)] * x.ndim
    index[dim] = slice(0, k)
    indices = order[tuple(index)]
    return mx.take_along_axis(x, indices, axis=dim), indices.astype(mx.int64)
