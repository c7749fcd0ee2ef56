"""Build every engine's copy of the same weights, once, in a cache directory.

The Hugging Face folder is the common root: a GGUF source is dequantized by
transformers and saved as an HF folder; mlx-lm converts that folder, paw exports it,
and transformers loads it. So all three engines run the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from exporter.sources import cache_dir, resolve_source
from interp.atomic import atomic_directory
from interp.errors import PawError

Say = Callable[[str], None]


def bench_dir() -> Path:
    """Where the benchmark caches converted weights: $PAW_BENCH_CACHE or <paw cache>/bench."""
    root = os.environ.get("PAW_BENCH_CACHE")
    return Path(root) if root else cache_dir() / "bench"


def source_key(src: str) -> str:
    """A short stable name for a source (its resolved location)."""
    source = resolve_source(src, progress=False)
    where = str(Path(source.location) / (source.gguf_file or ""))
    stem = Path(source.gguf_file or source.location).stem.replace(" ", "_")
    return f"{stem}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


class _BuiltMeanwhile(PawError):
    """Another process published the same cached folder first."""


def _publish(build: Callable[[Path], None], target: Path) -> Path:
    """Run ``build`` into a temp dir and rename it to ``target`` (nothing half-made).

    A cache: an existing ``target`` is used as it is, also one another run finished first.
    """
    if target.is_dir():
        return target
    try:
        with atomic_directory(target, error=_BuiltMeanwhile) as tmp:
            build(tmp)
    except _BuiltMeanwhile:
        if not target.is_dir():
            raise
    return target


def hf_folder(src: str, root: Path, say: Say) -> Path:
    """The source as a float32 Hugging Face folder (a folder source is used as is)."""
    source = resolve_source(src, progress=True)
    if source.kind == "folder":
        return Path(source.location)

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        say(f"converting {src} to a Hugging Face folder (float32)")
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
        # GGUF tensors arrive dequantized; drop the GGUF "quantizer" so the model saves
        # as the plain float32 checkpoint it now is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return _publish(build, root / "hf")


def mlx_lm_model(hf: Path, root: Path, dtype: str, quant_bits: int, group_size: int, say: Say) -> Path:
    """mlx_lm.convert of the HF folder in ``dtype`` (and affine ``quant_bits`` if > 0)."""
    name = f"mlx-lm-{dtype}" + (f"-q{quant_bits}g{group_size}" if quant_bits else "")

    def build(tmp: Path) -> None:
        from mlx_lm import convert

        say(f"mlx_lm.convert -> {name}")
        shutil.rmtree(tmp)  # convert insists on creating the folder itself
        convert(str(hf), str(tmp), dtype=dtype, quantize=bool(quant_bits),
                q_group_size=group_size if quant_bits else None, q_bits=quant_bits or None)
        _hoist_rope_parameters(tmp / "config.json")

    return _publish(build, root / name)


def _hoist_rope_parameters(config_path: Path) -> None:
    """transformers 5 writes ``rope_parameters``; mlx-lm 0.32 reads ``rope_theta``/``rope_scaling``.

    Without this mlx-lm silently falls back to theta 10000 and runs a different model.
    """
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config:
        config["rope_theta"] = rope.get("rope_theta", 10000.0)
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        config_path.write_text(json.dumps(config, indent=2))


def paw_program(hf: Path, root: Path, dtype: str, quant_bits: int, group_size: int, say: Say,
                fuse: bool = True) -> Path:
    """paw's export of the HF folder (same dtype / quantization as the mlx-lm copy)."""
    name = f"paw-{dtype}" + (f"-q{quant_bits}g{group_size}" if quant_bits else "") + ("" if fuse else "-nofuse")
    target = root / name
    if target.is_dir():
        return target
    from exporter.export import export_source

    say(f"paw export -> {name}")
    opts = {}
    if quant_bits:
        opts.update(quantize=quant_bits, group_size=group_size)
    if not fuse:
        opts.update(fuse=False)
    export_source(str(hf), target, dtype=dtype, progress=say, **opts)
    return target
