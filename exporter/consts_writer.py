"""Write a program's consts one tensor at a time: one safetensors file, or shards and an index.

``safetensors.torch.save_file`` needs every tensor in memory and copies each into one
bytes buffer before writing. Here the header is computed from shapes and dtypes alone,
then each const is materialized (``exporter.lazy``), written and dropped, in file order,
the next one computed on a worker thread while the current one is written.
The bytes are exactly ``save_file``'s: the same header JSON (tensors sorted by dtype as
safetensors orders them, then by name; padded with spaces to 8 bytes) and the same data
order. Above ``max_shard_bytes`` the consts go into ``consts-0000K-of-0000N.safetensors``
files plus ``consts.safetensors.index.json``, named and laid out as Hugging Face and
mlx-lm shard checkpoints.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from exporter.lazy import LazyTensor, clear_cache, materialize, nbytes
from interp.errors import ExportError
from interp.program import CONSTS_FILE, CONSTS_INDEX_FILE, shard_file_name

#: torch dtype -> (safetensors name, rank in safetensors' own dtype order, lowest first)
ST_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 4), torch.int8: ("I8", 5), torch.int16: ("I16", 9),
    torch.uint16: ("U16", 10), torch.float16: ("F16", 11), torch.bfloat16: ("BF16", 12), torch.int32: ("I32", 13),
    torch.uint32: ("U32", 14), torch.float32: ("F32", 15), torch.float64: ("F64", 17), torch.int64: ("I64", 18),
    torch.uint64: ("U64", 19),
}

#: Default largest consts file: mlx-lm's and Hugging Face's 5 GB shards.
DEFAULT_SHARD_BYTES = 5 * 10**9

Consts = dict[str, "torch.Tensor | LazyTensor"]
Progress = Callable[[int, int], None]  # (bytes written so far, total bytes)


def _st_dtype(value) -> tuple[str, int]:
    try:
        return ST_DTYPES[value.dtype]
    except KeyError:
        raise ExportError(f"dtype {value.dtype} cannot be stored in safetensors") from None


def file_order(tensors: Consts) -> list[str]:
    """Names in the order safetensors lays tensors out: dtype (widest rank first), then name."""
    return sorted(tensors, key=lambda name: (-_st_dtype(tensors[name])[1], name))


def header_bytes(tensors: Consts, order: list[str], metadata: dict[str, str] | None) -> bytes:
    """The length-prefixed, space-padded JSON header ``save_file`` writes for these tensors."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in order:
        size = nbytes(tensors[name])
        header[name] = {"dtype": _st_dtype(tensors[name])[0], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(path: Path, tensors: Consts, metadata: dict[str, str] | None = None,
                      progress: Progress | None = None, done: int = 0, total: int = 0,
                      worker: ThreadPoolExecutor | None = None) -> int:
    """Write ``tensors`` to ``path`` materializing them in order; returns bytes of tensor data written.

    The next tensor is computed on ``worker`` (one thread, the same for every tensor) while
    this one is written: at most two are alive at a time.
    """
    order = file_order(tensors)
    own = worker is None
    worker = worker or ThreadPoolExecutor(max_workers=1, thread_name_prefix="paw-consts")
    written = 0
    try:
        with path.open("wb") as fh:
            fh.write(header_bytes(tensors, order, metadata))
            ahead = worker.submit(materialize, tensors[order[0]]) if order else None
            for position, name in enumerate(order):
                tensor = ahead.result()
                following = order[position + 1] if position + 1 < len(order) else None
                ahead = worker.submit(materialize, tensors[following]) if following is not None else None
                _refuse_nan(name, tensor)
                promised = nbytes(tensors[name])
                data = _raw_bytes(tensor)
                if data.nbytes != promised:
                    raise ExportError(f"internal: const {name!r} has {data.nbytes} bytes, its header says {promised}")
                fh.write(data)
                written += promised
                del tensor, data
                if progress is not None:
                    progress(done + written, total)
    finally:
        if own:
            worker.shutdown(wait=True, cancel_futures=True)
    return written


def _refuse_nan(name: str, tensor: torch.Tensor) -> None:
    """ExportError when a floating-point const holds NaN: every load of the program would refuse it
    (``interp.program.find_nan``). One sum finds candidates without a tensor-sized temporary; ``isnan``
    confirms (a sum is NaN where +inf meets -inf too)."""
    if tensor.is_floating_point() and math.isnan(tensor.sum(dtype=torch.float32).item()) \
            and bool(torch.isnan(tensor).any()):
        raise ExportError(f"the weight {name!r} holds NaN values: the source's weights are corrupted")


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order, without a copy when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def shard_names(tensors: Consts, max_shard_bytes: int) -> list[list[str]]:
    """Consts split into files of at most ``max_shard_bytes`` (one file when they fit).

    Names are taken in natural order (layer 2 before layer 10), so a layer's consts sit
    together and a process that needs a few layers opens few files. A tensor larger than
    the limit gets a file of its own.
    """
    names = sorted(tensors, key=_natural_key)
    total = sum(nbytes(tensors[n]) for n in names)
    if max_shard_bytes <= 0 or total <= max_shard_bytes:
        return [names]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        weight = nbytes(tensors[name])
        if shards[-1] and size + weight > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += weight
    return shards


def _natural_key(name: str) -> list:
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def write_consts(directory: Path, tensors: Consts, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 progress: Progress | None = None) -> list[str]:
    """Write the consts into ``directory``; returns the file names written, index last if sharded."""
    shards = shard_names(tensors, max_shard_bytes)
    total = sum(nbytes(t) for t in tensors.values())
    metadata = {"format": "pt"}
    done = 0
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paw-consts")  # one thread computes every const
    try:
        if len(shards) == 1:
            write_safetensors(directory / CONSTS_FILE, tensors, metadata, progress, done, total, worker)
            return [CONSTS_FILE]
        files = []
        weight_map = {}
        for index, names in enumerate(shards, start=1):
            name = shard_file_name(index, len(shards))
            done += write_safetensors(directory / name, {n: tensors[n] for n in names}, metadata, progress, done,
                                      total, worker)
            files.append(name)
            weight_map.update(dict.fromkeys(names, name))
        index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / CONSTS_INDEX_FILE).write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")
        return [*files, CONSTS_INDEX_FILE]
    finally:
        worker.shutdown(wait=True, cancel_futures=True)
        clear_cache()


def parse_size(text: str) -> int:
    """Bytes from '5GB', '500MB', '2GiB', '0' (never shard) or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE | re.ASCII)
    if not match:
        raise ExportError(f"cannot read {text!r} as a size: write it like 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    if number * scale >= 2**63:  # a float of 309 digits or more is inf, which int() refuses
        raise ExportError(f"--max-shard-size is too large: {text[:40]!r}")
    return int(number * scale)
