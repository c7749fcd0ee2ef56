"""GGUF block layouts read as MLX affine weights: integer codes, a scale and a bias per 32 weights.

Each format below stores every group of 32 weights as ``w = code * scale + bias`` with one
scale and one bias per group, which is MLX's affine layout with ``group_size`` 32:

| GGUF | block (bytes) | MLX bits | code | scale | bias |
| --- | --- | --- | --- | --- | --- |
| Q4_0 | d, 16 of nibbles (18) | 4 | q | d | -8 d |
| Q4_1 | d, m, 16 of nibbles (20) | 4 | q | d | m |
| Q5_0 | d, 4 of high bits, 16 of nibbles (22) | 5 | q | d | -16 d |
| Q5_1 | d, m, 4 of high bits, 16 of nibbles (24) | 5 | q | d | m |
| Q8_0 | d, 32 signed bytes (34) | 8 | q + 128 | d | -128 d |
| Q4_K | d, dmin, 12 of 6-bit sc/m, 128 of nibbles (144 for 256) | 4 | q | d sc_j | -dmin m_j |
| Q5_K | as Q4_K, plus 32 of high bits (176 for 256) | 5 | q | d sc_j | -dmin m_j |

d, m and dmin are float16; a K-quant super-block holds 8 groups of 32, group j with its
own 6-bit sc_j and m_j. Codes are read as ``gguf.quants`` reads them and packed as MLX
packs them: consecutive codes from the lowest bit of the first word up, so a 5-bit code
may straddle two words.

Exactness, checked against ``gguf``'s dequantization: in float32 every scale and bias is
exact (``8 d``, ``16 d``, ``128 d`` are exact; ``d sc_j`` and ``dmin m_j`` are an
11-bit float16 significand times a 6-bit integer), ``code * scale`` is exact, and the one
rounding left is the sum, as in gguf's own ``d * q - dmin * m``: every weight is gguf's
float32 value (a zero may be +0 where gguf writes -0). In float16 the types without a
super-block stay exact (their constants are float16 already) while ``d sc_j`` and
``dmin m_j`` round to float16; bfloat16 rounds every scale and bias to bfloat16.

Q6_K is not here: its 16 scales per super-block each cover 16 weights, and MLX's smallest
group is 32, so no exact affine form exists (one scale and bias per 32 cannot express two
different int8 scales); it is dequantized as any other type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

GROUP_SIZE = 32
SUPER_BLOCK = 256  # weights in a K-quant block


@dataclass(frozen=True)
class BlockFormat:
    """A GGUF block type kept as MLX affine codes: its name, code bits, block size and decoder.

    ``decode`` maps uint8 blocks [..., block_bytes] to (codes uint8 [..., elements],
    scales float32 [..., elements / 32], biases float32 [..., elements / 32]).
    """

    name: str
    bits: int
    block_bytes: int
    elements: int
    decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _float16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte ``offset`` of each block, as float32 [..., 1]."""
    return blocks[..., offset:offset + 2].copy().view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray, span: int) -> np.ndarray:
    """Codes in element order from bytes whose low nibbles hold ``span`` elements, then their high nibbles."""
    chunks = packed.reshape(*packed.shape[:-1], -1, span)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=-2).reshape(packed.shape[:-1] + (-1,))


def _q4_0(blocks):
    d = _float16(blocks, 0)
    return _nibbles(blocks[..., 2:], 16), d, -8 * d


def _q4_1(blocks):
    return _nibbles(blocks[..., 4:], 16), _float16(blocks, 0), _float16(blocks, 2)


def _five_bit(blocks: np.ndarray, start: int) -> np.ndarray:
    """Q5_0/Q5_1 codes: 4 bytes of fifth bits (element i at bit i, little-endian), then 16 of nibbles."""
    high = np.unpackbits(blocks[..., start:start + 4], axis=-1, bitorder="little")
    return _nibbles(blocks[..., start + 4:], 16) | (high << 4)


def _q5_0(blocks):
    d = _float16(blocks, 0)
    return _five_bit(blocks, 2), d, -16 * d


def _q5_1(blocks):
    return _five_bit(blocks, 4), _float16(blocks, 0), _float16(blocks, 2)


def _q8_0(blocks):
    d = _float16(blocks, 0)
    return (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scale, min) float32 [..., 8] of each K-quant group of 32: d sc_j and dmin m_j.

    12 bytes at offset 4: bytes 0-3 hold sc_0..3 in their low 6 bits, 4-7 m_0..3; the
    low 4 bits of sc_4..7 and m_4..7 are the nibbles of bytes 8-11, their top 2 bits the
    top 2 bits of bytes 0-3 and 4-7.
    """
    packed = blocks[..., 4:16]
    low_sc, low_m, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low_sc & 0x3F, (rest & 0x0F) | ((low_sc >> 6) << 4)], axis=-1)
    m = np.concatenate([low_m & 0x3F, (rest >> 4) | ((low_m >> 6) << 4)], axis=-1)
    return _float16(blocks, 0) * sc, _float16(blocks, 2) * m


def _q4_k(blocks):
    scales, mins = _k_scales(blocks)
    return _nibbles(blocks[..., 16:], 32), scales, -mins


def _q5_k(blocks):
    scales, mins = _k_scales(blocks)
    # fifth bits: element i of group j is bit j of byte i of the 32
    high = (blocks[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # [..., 32 elements, 8 groups]
    high = np.swapaxes(high, -1, -2).reshape(blocks.shape[:-1] + (SUPER_BLOCK,))
    return _nibbles(blocks[..., 48:], 32) | (high << 4), scales, -mins


#: ggml type id -> format; the ids are ggml's (gguf.GGMLQuantizationType)
FORMATS = {
    2: BlockFormat("Q4_0", 4, 18, GROUP_SIZE, _q4_0),
    3: BlockFormat("Q4_1", 4, 20, GROUP_SIZE, _q4_1),
    6: BlockFormat("Q5_0", 5, 22, GROUP_SIZE, _q5_0),
    7: BlockFormat("Q5_1", 5, 24, GROUP_SIZE, _q5_1),
    8: BlockFormat("Q8_0", 8, 34, GROUP_SIZE, _q8_0),
    12: BlockFormat("Q4_K", 4, 144, SUPER_BLOCK, _q4_k),
    13: BlockFormat("Q5_K", 5, 176, SUPER_BLOCK, _q5_k),
}


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing of ``bits``-bit codes uint8 [rows, n] (n a multiple of 32): uint32 [rows, n * bits / 32].

    A little-endian bit stream: code i occupies bits ``i * bits`` to ``(i + 1) * bits``;
    8 codes fill exactly ``bits`` bytes.
    """
    rows = codes.shape[0]
    octets = codes.reshape(rows, -1, 8)
    stream = np.zeros(octets.shape[:2], dtype="<u8")
    for k in range(8):  # one code at a time: a byte of temporaries per code, not 8
        stream |= octets[..., k].astype(np.uint64) << np.uint64(k * bits)
    return np.ascontiguousarray(stream.view(np.uint8).reshape(rows, -1, 8)[..., :bits]).reshape(rows, -1).view("<u4")


def affine_from_blocks(raw: np.ndarray, ggml_type: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint32 [rows, cols * bits / 32], scales float32 [rows, cols / 32], biases float32) of raw blocks.

    ``raw``: uint8 [rows, blocks * block bytes], as the file stores the tensor.
    """
    fmt = FORMATS[ggml_type]
    rows = raw.shape[0]
    codes, scales, biases = fmt.decode(raw.reshape(rows, -1, fmt.block_bytes))
    return (pack_codes(codes.reshape(rows, -1), fmt.bits),
            np.ascontiguousarray(scales.reshape(rows, -1)), np.ascontiguousarray(biases.reshape(rows, -1)))
