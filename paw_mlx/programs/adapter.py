"""A program's LoRA adapter: low-rank updates of the base model's linear layers.

Stored next to ``program.json`` as ``adapter.safetensors``: for each Hugging Face module
name, ``<module>.lora_a`` [rank, in] and ``<module>.lora_b`` [out, rank]; the metadata
holds ``alpha``. The update of a module's weight is ``alpha / rank * b @ a`` (llama.cpp's
convention, so a ``.paw`` bundle's GGUF adapter maps one to one). The base program's
files never change: ``interp/lora.py`` adds the update at load time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from interp.errors import ArtifactError

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FORMAT = "paw.lora"


@dataclass
class LoraAdapter:
    """LoRA weights by module name: (a [rank, in], b [out, rank]), scale alpha / rank."""

    modules: dict[str, tuple[np.ndarray, np.ndarray]]
    alpha: float

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)

    def scale(self, module: str) -> float:
        rank = self.modules[module][0].shape[0]
        return self.alpha / rank if self.alpha else 1.0

    def scaled(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The run-time form (interp/lora.py): the scale folded into b."""
        return {m: (a, b * np.float32(self.scale(m))) for m, (a, b) in self.modules.items()}

    def summary(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "modules": len(self.modules),
                "parameters": int(sum(a.size + b.size for a, b in self.modules.values()))}


#: the highest rank ``mean_adapter`` writes exactly; above it the mean is truncated (SVD)
MAX_MEAN_RANK = 64


def mean_adapter(adapters: Sequence[LoraAdapter], max_rank: int = MAX_MEAN_RANK) -> LoraAdapter:
    """One adapter whose update is the mean of ``adapters``' updates (a bagged adapter).

    The mean of k rank-r updates is itself a LoRA of rank k*r: the ``a`` matrices stacked,
    the ``b`` matrices side by side, each scaled by its own ``alpha / rank`` and by 1/k; so
    the result is exact, with ``alpha`` equal to its rank (scale 1). Where k*r would exceed
    ``max_rank``, each module's mean update is truncated to its ``max_rank`` largest
    singular directions instead (the best approximation of that rank).
    """
    if not adapters:
        raise ValueError("mean_adapter needs at least one adapter")
    names = set(adapters[0].modules)
    if any(set(a.modules) != names for a in adapters):
        raise ValueError("the adapters to average must adapt the same modules")
    k = len(adapters)
    stacked = {}
    for module in adapters[0].modules:
        a = np.concatenate([ad.modules[module][0] for ad in adapters], axis=0).astype(np.float32)
        b = np.concatenate([ad.modules[module][1] * np.float32(ad.scale(module) / k) for ad in adapters],
                           axis=1).astype(np.float32)
        stacked[module] = _truncated(a, b, max_rank) if a.shape[0] > max_rank else (a, b)
    rank = max(a.shape[0] for a, _ in stacked.values())
    if any(a.shape[0] != rank for a, _ in stacked.values()):  # a module of lower rank: pad with zeros
        stacked = {m: (np.pad(a, ((0, rank - a.shape[0]), (0, 0))), np.pad(b, ((0, 0), (0, rank - b.shape[1]))))
                   for m, (a, b) in stacked.items()}
    return LoraAdapter(stacked, float(rank))


def _truncated(a: np.ndarray, b: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank-``rank`` truncation of the update ``b @ a``, as a new (a, b), without forming it."""
    qb, rb = np.linalg.qr(b.astype(np.float64))  # b = qb rb, a.T = qa ra: b @ a = qb (rb ra.T) qa.T
    qa, ra = np.linalg.qr(a.T.astype(np.float64))
    u, s, vt = np.linalg.svd(rb @ ra.T, full_matrices=False)
    rank = min(rank, s.size)
    new_b = (qb @ u[:, :rank]) * s[:rank]
    new_a = vt[:rank] @ qa.T
    return new_a.astype(np.float32), new_b.astype(np.float32)


def write_adapter(adapter: LoraAdapter, directory: Path) -> None:
    tensors = {}
    for module, (a, b) in adapter.modules.items():
        tensors[f"{module}.lora_a"] = mx.array(np.ascontiguousarray(a, dtype=np.float32))
        tensors[f"{module}.lora_b"] = mx.array(np.ascontiguousarray(b, dtype=np.float32))
    mx.save_safetensors(str(directory / ADAPTER_FILE), tensors,
                        metadata={"format": ADAPTER_FORMAT, "alpha": repr(float(adapter.alpha))})


def read_adapter(directory: Path) -> LoraAdapter:
    path = directory / ADAPTER_FILE
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError for bad files
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    if metadata.get("format") != ADAPTER_FORMAT:
        raise ArtifactError(f"{path} is not a {ADAPTER_FORMAT} file")
    try:
        alpha = float(metadata.get("alpha", "0"))
    except ValueError:
        raise ArtifactError(f"{path}: alpha {metadata.get('alpha')!r} is not a number") from None
    modules = {}
    for name in tensors:
        if name.endswith(".lora_a"):
            module = name.removesuffix(".lora_a")
            if f"{module}.lora_b" not in tensors:
                raise ArtifactError(f"{path} has {name} but no {module}.lora_b")
            modules[module] = (np.array(tensors[name].astype(mx.float32)),
                               np.array(tensors[f"{module}.lora_b"].astype(mx.float32)))
        elif not name.endswith(".lora_b"):
            raise ArtifactError(f"{path}: unexpected tensor {name}")
    if len(modules) * 2 != len(tensors):
        raise ArtifactError(f"{path}: a lora_b without its lora_a")
    return LoraAdapter(modules, alpha)
