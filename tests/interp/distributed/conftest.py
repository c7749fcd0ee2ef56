"""Tiny programs deep enough to split: llama, gemma3_text (sliding window) and qwen2_moe, four layers each."""

from __future__ import annotations

import pytest

LAYERED = ("llama", "gemma3_text", "qwen2_moe")
LAYERS = 4


@pytest.fixture(scope="session")
def layered_programs(tmp_path_factory, tiny_tokenizer) -> dict:
    """model_type -> directory of an exported tiny random model with LAYERS layers (llama's has a tokenizer)."""
    from exporter.export import export_model
    from tests.archs import arch_config
    from tests.tiny import tiny_model

    root = tmp_path_factory.mktemp("layered")
    found = {}
    for arch in LAYERED:
        config = arch_config(arch)
        config.num_hidden_layers = LAYERS
        if getattr(config, "layer_types", None):
            config.layer_types = (config.layer_types * LAYERS)[:LAYERS]
        tokenizer = tiny_tokenizer if arch == "llama" else None
        found[arch] = export_model(tiny_model(config), tokenizer, root / arch, source_info={"id": f"tiny-{arch}"})
    return found


@pytest.fixture(scope="session")
def quantized_program(tmp_path_factory) -> object:
    """A tiny llama with 4-bit affine weights in groups of 32 (two heads' worth of o_proj inputs)."""
    from exporter.export import export_model
    from tests.archs import arch_config
    from tests.tiny import tiny_model

    out = tmp_path_factory.mktemp("quantized") / "llama-q4"
    return export_model(tiny_model(arch_config("llama")), None, out, source_info={"id": "tiny-llama-q4"},
                        quantize=4, group_size=32)
