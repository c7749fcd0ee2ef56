"""Shape, indexing, creation and type ops.

MLX does not check everything it is given: an index past an axis reads memory beyond
the array, a split of negative size aborts, a shape too large to allocate crashes. So
the ops here check what MLX would not before calling it: gathers clip their indices to
the axis (a valid program never leaves it; a malformed one must not read past it),
``select`` refuses an index outside its axis, ``split`` sizes must add up to the axis,
and ops that allocate from their attributes check the size first (``interp/limits.py``).
"""

from __future__ import annotations

import mlx.core as mx

from interp.errors import ProgramError
from interp.limits import arange_length, check_shape, dtype_bytes
from interp.ops.dtypes import to_mlx
from interp.ops.registry import implementation


def axis_index(x: mx.array, dim: int) -> int:
    """``dim`` as an axis of ``x`` in [0, ndim), negative counting from the end."""
    if not -x.ndim <= dim < x.ndim:
        raise ProgramError(f"axis {dim} is out of range for a tensor of {x.ndim} dimensions")
    return dim % x.ndim


def clip_indices(indices: mx.array, length: int) -> mx.array:
    """Integer indices held inside [0, length): a gather never reads past its axis."""
    if not mx.issubdtype(indices.dtype, mx.integer):
        raise ProgramError(f"indices must be integers, got {indices.dtype}")
    if length == 0:
        raise ProgramError("cannot gather from an empty axis")
    return mx.clip(indices, 0, length - 1)


def _allocates(shape, x: mx.array) -> None:
    check_shape(list(shape), x.itemsize, "its output")


@implementation("reshape")
def reshape(x, *, shape):
    if shape.count(-1) > 1:
        raise ProgramError(f"reshape to {shape}: only one entry may be -1")
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
    if lead < 0 or any(s == -1 for s in shape[:lead]):
        raise ProgramError(f"cannot expand a tensor of shape {list(x.shape)} to {shape}")
    target = [x.shape[i - lead] if s == -1 else s for i, s in enumerate(shape)]
    _allocates(target, x)
    return mx.broadcast_to(x, target)


@implementation("slice")
def slice_(x, *, dim, start=0, end=None, step=1):
    axis = axis_index(x, dim)
    length = x.shape[axis]
    # Python's slice rules clamp start and end to the axis (as torch does), so any
    # integers reach MLX as valid 32-bit bounds.
    start, end, step = slice(start, end, step).indices(length)
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, end, step)
    return x[tuple(index)]


@implementation("select")
def select(x, *, dim, index):
    axis = axis_index(x, dim)
    if not -x.shape[axis] <= index < x.shape[axis]:
        raise ProgramError(f"select index {index} is out of range for an axis of length {x.shape[axis]}")
    where = [slice(None)] * x.ndim
    where[axis] = index
    return x[tuple(where)]


@implementation("cat")
def cat(xs, *, dim):
    return mx.concatenate(xs, axis=dim)


@implementation("split")
def split(x, *, sizes, dim):
    axis = axis_index(x, dim)
    if sum(sizes) != x.shape[axis]:
        raise ProgramError(f"split sizes {sizes} do not add up to the axis length {x.shape[axis]}")
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


def _index(index: mx.array, size: int) -> mx.array:
    """Clipped indices, outside any gradient: a router's chosen experts come from the values being
    differentiated (training a LoRA on a mixture-of-experts base), and MLX refuses a VJP into indices."""
    return mx.stop_gradient(clip_indices(index, size))


@implementation("take")
def take(x, index, *, dim):
    axis = axis_index(x, dim)
    return mx.take(x, _index(index, x.shape[axis]), axis=axis)


@implementation("gather")
def gather(x, index, *, dim):
    axis = axis_index(x, dim)
    if index.ndim != x.ndim:
        raise ProgramError(f"gather index has {index.ndim} dimensions, the tensor {x.ndim}")
    return mx.take_along_axis(x, _index(index, x.shape[axis]), axis=axis)


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
    check_shape([arange_length(start, end, step)], dtype_bytes(dtype), "its output")
    return mx.arange(start, end, step, dtype=to_mlx(dtype))


@implementation("full")
def full(*, shape, value, dtype):
    check_shape(shape, dtype_bytes(dtype), "its output")
    return mx.full(shape, value, dtype=to_mlx(dtype))


@implementation("full_like")
def full_like(x, *, value, dtype=None):
    return mx.full(x.shape, value, dtype=to_mlx(dtype) if dtype else x.dtype)


@implementation("cumsum")
def cumsum(x, *, dim):
    return mx.cumsum(x, axis=dim)


@implementation("repeat_interleave")
def repeat_interleave(x, *, repeats, dim):
    axis = axis_index(x, dim)
    _allocates([*x.shape[:axis], x.shape[axis] * repeats, *x.shape[axis + 1:]], x)
    return mx.repeat(x, repeats, axis=axis)


@implementation("tile")
def tile(x, *, reps):
    reps = list(reps)
    shape = [1] * (len(reps) - x.ndim) + list(x.shape)
    reps = [1] * (len(shape) - len(reps)) + reps
    _allocates([s * r for s, r in zip(shape, reps, strict=True)], x)
    return mx.tile(x, reps)


@implementation("topk")
def topk(x, *, k, dim=-1, largest=True):
    if k > x.shape[axis_index(x, dim)]:
        raise ProgramError(f"topk k={k} is larger than the axis ({x.shape[axis_index(x, dim)]})")
    # A full sort, then the first k: sorted like torch.topk (MoE routers sort over a few experts).
    # Row-major first: MLX's GPU sort treats a dense permuted view as row-major (wrong rows).
    order = mx.argsort(mx.contiguous(-x if largest else x), axis=dim)
    index = [slice(None)] * x.ndim
    index[dim] = slice(0, k)
    indices = mx.stop_gradient(order[tuple(index)])  # an integer path: differentiating x must not enter it
    return mx.take_along_axis(x, indices, axis=dim), indices.astype(mx.int64)
