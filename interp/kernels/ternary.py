"""Ternary weight packing: trits {-1, 0, +1} stored in 2 bits (or 1.6 bits) each.

Pure numpy, so the exporter (which writes packed weights) and the interpreter (which
reads them) share one definition of the format. Packing runs along the last axis: a
tensor of shape ``[..., n]`` becomes bytes of shape ``[..., ceil(n / per_byte)]``. The
true length ``n`` is not recoverable from the bytes and must be recorded beside them
(programs record it as the op attribute ``in_features``); tails are padded with the
code of 0, so padding never changes a dot product.

2-bit layout (``"2bit"``): code = t + 1 in {0, 1, 2}; trit ``4j + i`` of a row sits at
bits ``2i .. 2i+1`` of byte ``j``. Read as little-endian uint32 words this is exactly
MLX's 2-bit quantized layout (16 values per word, value i at bits 2i), which is why the
portable execution path needs no repacking.

Base-3 layout (``"base3"``): five trits per byte, byte = sum(code_i * 3**i) for
i = 0..4 (at most 242): 1.6 bits per weight.
"""

from __future__ import annotations

import numpy as np

PACKINGS = ("2bit", "base3")
TRITS_PER_BYTE = {"2bit": 4, "base3": 5}
_PAD_CODE = 1  # code of t = 0
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _check_trits(trits: np.ndarray) -> np.ndarray:
    t = np.asarray(trits)
    if t.dtype.kind not in "iub":
        if t.dtype.kind == "f" and np.all(np.isin(t, (-1.0, 0.0, 1.0))):
            t = t.astype(np.int8)
        else:
            raise ValueError(f"ternary values must be integers in {{-1, 0, 1}}, got dtype {t.dtype}")
    if t.ndim == 0:
        raise ValueError("cannot pack a scalar; give at least one axis")
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError("ternary values must lie in {-1, 0, 1}")
    return t.astype(np.int8, copy=False)


def _codes_padded(trits: np.ndarray, per_byte: int) -> np.ndarray:
    t = _check_trits(trits)
    n = t.shape[-1]
    groups = -(-n // per_byte)
    codes = np.full(t.shape[:-1] + (groups * per_byte,), _PAD_CODE, dtype=np.uint8)
    codes[..., :n] = (t + 1).astype(np.uint8)
    return codes.reshape(t.shape[:-1] + (groups, per_byte))


def packed_length(n: int, packing: str = "2bit") -> int:
    """Bytes that ``n`` trits take along the packed axis."""
    return -(-n // TRITS_PER_BYTE[packing])


def pack_ternary(trits: np.ndarray) -> np.ndarray:
    """Pack trits along the last axis, four 2-bit codes (t + 1) per byte."""
    codes = _codes_padded(trits, 4)
    out = codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)
    return np.ascontiguousarray(out, dtype=np.uint8)


def unpack_codes(packed: np.ndarray, n: int) -> np.ndarray:
    """The 2-bit codes (t + 1, uint8) of the first ``n`` trits of each packed row."""
    p = np.asarray(packed, dtype=np.uint8)
    if p.shape[-1] != packed_length(n, "2bit"):
        raise ValueError(f"{p.shape[-1]} bytes per row cannot hold exactly {n} trits in 2-bit packing")
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8)
    codes = (p[..., None] >> shifts) & 3
    return codes.reshape(p.shape[:-1] + (-1,))[..., :n]


def unpack_ternary(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary`: int8 trits of shape ``[..., n]``."""
    codes = unpack_codes(packed, n)
    if codes.size and codes.max() > 2:
        raise ValueError("packed ternary data holds the invalid code 3")
    return codes.astype(np.int8) - 1


def pack_ternary_base3(trits: np.ndarray) -> np.ndarray:
    """Pack trits along the last axis, five per byte in base 3 (1.6 bits per trit)."""
    codes = _codes_padded(trits, 5)
    return np.ascontiguousarray((codes * _POW3).sum(axis=-1, dtype=np.uint16), dtype=np.uint8)


# Row b of this table holds the five codes of byte b (rows 243..255 are invalid bytes).
_BASE3_TABLE = ((np.arange(256, dtype=np.int32)[:, None] // _POW3.astype(np.int32)) % 3).astype(np.uint8)


def unpack_ternary_base3(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary_base3`: int8 trits of shape ``[..., n]``."""
    p = np.asarray(packed, dtype=np.uint8)
    if p.shape[-1] != packed_length(n, "base3"):
        raise ValueError(f"{p.shape[-1]} bytes per row cannot hold exactly {n} trits in base-3 packing")
    if p.size and p.max() > 242:
        raise ValueError("packed base-3 data holds a byte above 242")
    codes = _BASE3_TABLE[p].reshape(p.shape[:-1] + (-1,))[..., :n]
    return codes.astype(np.int8) - 1


def pack(trits: np.ndarray, packing: str) -> np.ndarray:
    """Pack with the named layout (``"2bit"`` or ``"base3"``)."""
    if packing == "2bit":
        return pack_ternary(trits)
    if packing == "base3":
        return pack_ternary_base3(trits)
    raise ValueError(f"unknown ternary packing {packing!r}; choose one of {', '.join(PACKINGS)}")


def unpack(packed: np.ndarray, n: int, packing: str) -> np.ndarray:
    """Unpack with the named layout (``"2bit"`` or ``"base3"``)."""
    if packing == "2bit":
        return unpack_ternary(packed, n)
    if packing == "base3":
        return unpack_ternary_base3(packed, n)
    raise ValueError(f"unknown ternary packing {packing!r}; choose one of {', '.join(PACKINGS)}")


def base3_to_2bit(packed: np.ndarray, n: int) -> np.ndarray:
    """Repack base-3 rows as 2-bit rows (done once at load: the kernels read 2-bit codes)."""
    return pack_ternary(unpack_ternary_base3(packed, n))


def ternarize_absmean(weight: np.ndarray, per_row: bool = True, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """BitNet b1.58's absmean ternarization: s = mean(|W|), t = clip(round(W / s), -1, 1).

    Returns (trits int8 [out, in], scale float32 [out] per row or [1] per tensor).
    Rows that are all zero get scale 1 and all-zero trits.
    """
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"ternarize a 2-D weight, got shape {w.shape}")
    s = np.abs(w).mean(axis=1) if per_row else np.abs(w).mean(keepdims=True).reshape(1)
    s = np.where(s > eps, s, np.float32(1.0)).astype(np.float32)
    t = np.clip(np.rint(w / s[:, None] if per_row else w / s[0]), -1, 1).astype(np.int8)
    return t, s
