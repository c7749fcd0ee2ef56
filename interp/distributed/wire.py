"""The messages ranks exchange: a fixed-size header of int32s, then the tensors it describes.

Every message starts with a header (``HEADER_INTS`` int32s): what to do (``Op``), which
KV cache, the batch shape, the cache offset, cache ids rank 0 has let go of, and the
dtype and shape of each tensor that follows, so the receiver can post its ``recv``\\s.
The token ids, positions and key mask of a forward step ride inside the header when
they fit (a decode step's do) and in one int32 message after it when they do not.

MLX's ``send``/``recv`` are lazy and a socket is a byte stream, so each one is evaluated
on its own, in order: two receives evaluated together could read each other's bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from interp.errors import DistributedError
from interp.schema import DTYPES

HEADER_INTS = 256
MAGIC = 0x70617701  # "paw" and the protocol version
RELEASE_SLOTS = 16
_FIXED = 28  # the fields before the tensor descriptors
_INTS_FOLLOW, _NO_INTS = -1, -2  # header[27] when the ints are not inline


class Op(enum.IntEnum):
    FORWARD = 1  #: run the stage on the tensors that follow
    FORK = 2  #: copy cache ``source`` into ``cache``
    PING = 3  #: are you there (rank 0 sends one when idle)
    SHUTDOWN = 4  #: rank 0 is done: exit
    ERROR = 5  #: a rank could not run the step; the header's text says why


@dataclass
class Header:
    op: Op
    cache: int = 0  #: the KV cache id (0: run without a cache)
    batch: int = 0
    length: int = 0
    #: first position of the new tokens, for RoPE's fast path; -1 when the caller gave positions
    offset: int = -1
    cache_offset: int = 0  #: positions rank 0's cache held before this step (the others trim to it)
    mask_keys: int = 0  #: key-mask width, 0 for none
    source: int = 0  #: FORK: the cache to copy
    released: tuple[int, ...] = ()
    tensors: list[tuple[mx.Dtype, tuple[int, ...]]] = field(default_factory=list)
    #: FORWARD: ids, positions and key mask flattened (see ``payload_size``)
    ints: np.ndarray | None = None
    #: ERROR: what went wrong (sent in place of tensor descriptors)
    text: str = ""

    @property
    def payload_size(self) -> int:
        return 2 * self.batch * self.length + self.batch * self.mask_keys


def encode(header: Header) -> mx.array:
    out = np.zeros(HEADER_INTS, dtype=np.int32)
    out[:10] = [MAGIC, header.op, header.cache, header.batch, header.length, header.offset, header.cache_offset,
                header.mask_keys, header.source, len(header.released)]
    out[10:10 + len(header.released)] = header.released
    out[26] = len(header.tensors)
    at = _FIXED
    if header.op == Op.ERROR:
        data = header.text.encode()[: HEADER_INTS - _FIXED - 1]
        out[at] = len(data)
        out[at + 1:at + 1 + len(data)] = list(data)
        at += 1 + len(data)
    for dtype, shape in header.tensors:
        row = [DTYPES.index(_dtype_name(dtype)), len(shape), *shape]
        if at + len(row) > HEADER_INTS:
            raise DistributedError("too many tensors cross this pipeline cut for one message header")
        out[at:at + len(row)] = row
        at += len(row)
    inline = header.ints is not None and at + header.ints.size <= HEADER_INTS
    out[27] = _NO_INTS if header.ints is None else header.ints.size if inline else _INTS_FOLLOW
    if inline:
        out[at:at + header.ints.size] = header.ints
    return mx.array(out)


def decode(raw: mx.array) -> tuple[Header, bool]:
    """The header, and whether its ints follow in a message of their own."""
    values = np.array(raw, copy=True)
    if int(values[0]) != MAGIC:
        raise DistributedError("received a message that is not a paw header (ranks out of step, or another "
                               "program on the same ports)")
    released = tuple(int(v) for v in values[10:10 + int(values[9])])
    header = Header(Op(int(values[1])), int(values[2]), int(values[3]), int(values[4]), int(values[5]),
                    int(values[6]), int(values[7]), int(values[8]), released)
    at = _FIXED
    if header.op == Op.ERROR:
        size = int(values[at])
        header.text = bytes(int(v) for v in values[at + 1:at + 1 + size]).decode(errors="replace")
        at += 1 + size
    for _ in range(int(values[26])):
        code, ndim = int(values[at]), int(values[at + 1])
        header.tensors.append((getattr(mx, DTYPES[code]), tuple(int(v) for v in values[at + 2:at + 2 + ndim])))
        at += 2 + ndim
    inline = int(values[27])
    if inline >= 0:
        header.ints = values[at:at + inline]
    return header, inline == _INTS_FOLLOW


def pack_ints(tokens: mx.array, positions: mx.array, key_mask: mx.array | None) -> np.ndarray:
    parts = [np.asarray(tokens, dtype=np.int32).ravel(), np.asarray(positions, dtype=np.int32).ravel()]
    if key_mask is not None:
        parts.append(np.asarray(key_mask).astype(np.int32).ravel())
    return np.concatenate(parts)


def unpack_ints(header: Header) -> tuple[mx.array, mx.array, mx.array | None]:
    """(input_ids, position_ids, key_mask or None) of a FORWARD header whose ints arrived."""
    batch, length, keys = header.batch, header.length, header.mask_keys
    ints = header.ints
    tokens = mx.array(ints[: batch * length].reshape(batch, length))
    positions = mx.array(ints[batch * length: 2 * batch * length].reshape(batch, length))
    mask = mx.array(ints[2 * batch * length:].reshape(batch, keys).astype(bool)) if keys else None
    return tokens, positions, mask


def send_header(header: Header, dst: int, group) -> None:
    raw = encode(header)
    mx.eval(mx.distributed.send(raw, dst, group=group))
    if int(np.asarray(raw)[27]) == _INTS_FOLLOW:
        mx.eval(mx.distributed.send(mx.array(header.ints), dst, group=group))


def recv_header(src: int, group, wait: Callable[[], None] | None = None) -> Header:
    """The next header from ``src`` (and its ints); ``wait`` sleeps until bytes arrive."""
    if wait is not None:
        wait()
    raw = mx.distributed.recv((HEADER_INTS,), mx.int32, src, group=group)
    mx.eval(raw)
    header, follow = decode(raw)
    if follow:
        ints = mx.distributed.recv((header.payload_size,), mx.int32, src, group=group)
        mx.eval(ints)
        header.ints = np.array(ints, copy=True)
    return header


def broadcast_header(header: Header | None, group, wait: Callable[[], None] | None = None) -> Header:
    """Rank 0's header (``header``) on every rank: an all_sum to which the other ranks add zeros.

    ``wait`` (the other ranks) sleeps until rank 0's part of the sum starts to arrive.
    """
    if wait is not None:
        wait()
    raw = encode(header) if header is not None else mx.zeros((HEADER_INTS,), mx.int32)
    total = mx.distributed.all_sum(raw, group=group)
    mx.eval(total)
    received, follow = decode(total)
    if follow:
        size = received.payload_size
        ints = mx.array(header.ints) if header is not None else mx.zeros((size,), mx.int32)
        ints = mx.distributed.all_sum(ints, group=group)
        mx.eval(ints)
        received.ints = np.array(ints, copy=True)
    return received


def send_tensors(arrays: list[mx.array], dst: int, group) -> None:
    for array in arrays:
        mx.eval(mx.distributed.send(array, dst, group=group))


def recv_tensors(header: Header, src: int, group) -> list[mx.array]:
    arrays = []
    for dtype, shape in header.tensors:
        array = mx.distributed.recv(shape, dtype, src, group=group)
        mx.eval(array)
        arrays.append(array)
    return arrays


def describe(arrays: list[mx.array]) -> list[tuple[mx.Dtype, tuple[int, ...]]]:
    return [(a.dtype, tuple(a.shape)) for a in arrays]


def _dtype_name(dtype: mx.Dtype) -> str:
    for name in DTYPES:
        if getattr(mx, name) == dtype:
            return name
    raise DistributedError(f"cannot send a tensor of dtype {dtype} between ranks")
