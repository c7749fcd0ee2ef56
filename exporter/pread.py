"""Read safetensors files with ``preadv`` straight into each tensor's memory: no memory map, one copy.

``safetensors.safe_open`` memory-maps a file by default, and every page a tensor was
read from stays resident until the file is closed: loading a sharded checkpoint that
way keeps all of it in memory. Its ``pread`` backend does not, but copies each tensor
more than once and is slower (docs/bigmodels.md). ``SafetensorsFile`` offers the part
of ``safe_open``'s interface transformers' loader uses (``keys``, ``get_slice`` with
``get_shape``/``get_dtype`` and a full ``[...]`` read, ``get_tensor``, ``metadata``),
reading each tensor with one ``preadv`` into a freshly allocated tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from interp.errors import WeightsError
from interp.program import read_safetensors_header

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}

ELEMENT_BYTES = {code: torch.empty(0, dtype=dtype).element_size() for code, dtype in TORCH_DTYPES.items()}


class SafetensorsFile:
    """A safetensors file opened for ``preadv`` reads (a stand-in for ``safe_open(..., framework="pt")``)."""

    def __init__(self, filename: str | os.PathLike, framework: str = "pt", device: str = "cpu", **_ignored):
        self.path = Path(filename)
        self._header = read_safetensors_header(self.path, element_bytes=ELEMENT_BYTES)
        with self.path.open("rb") as fh:
            self._data_start = 8 + int.from_bytes(fh.read(8), "little")

    # The file is opened for each read, so slices stay readable after the loader "closes" it.
    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def keys(self) -> list[str]:
        return list(self._header)

    def metadata(self) -> dict[str, str]:
        with self.path.open("rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            return dict(json.loads(fh.read(length)).get("__metadata__") or {})

    def get_slice(self, name: str) -> TensorSlice:
        return TensorSlice(self, name)

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.read(name)

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, read with one ``preadv``."""
        meta = self._header[name]
        dtype = TORCH_DTYPES.get(meta["dtype"])
        if dtype is None:
            raise WeightsError(f"{self.path.name}: tensor {name!r} has dtype {meta['dtype']}, which paw cannot read")
        start, end = meta["data_offsets"]
        tensor = torch.empty(meta["shape"], dtype=dtype)
        if end > start:
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
            fd = os.open(self.path, os.O_RDONLY)
            try:
                done = os.preadv(fd, [buffer], self._data_start + start)
            finally:
                os.close(fd)
            if done != end - start:
                raise WeightsError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file")
        return tensor


class TensorSlice:
    """``safe_open``'s lazy slice: shape and dtype now, values when indexed."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name

    def get_shape(self) -> list[int]:
        return list(self.file._header[self.name]["shape"])

    def get_dtype(self) -> str:
        return self.file._header[self.name]["dtype"]

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self.file.read(self.name)
        return tensor if index is Ellipsis or index == slice(None) else tensor[index]
