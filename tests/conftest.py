"""Shared fixtures: a tiny exported Llama with a real tokenizer and chat template."""

from __future__ import annotations

import os

import pytest

import interp  # noqa: F401  (first: the fast BLAS must load before any test imports MLX)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_program(tmp_path_factory, tiny_tokenizer):
    """Directory of an exported tiny random Llama (float32) with tokenizer files."""
    from tests.tiny import export_tiny, tiny_llama_config

    out = tmp_path_factory.mktemp("programs") / "tiny-llama"
    return export_tiny(tiny_llama_config(), out, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def smollm2_program(tmp_path_factory):
    """The real default model as a program: $PAW_SMOLLM2_PROGRAM, or exported here (about a minute)."""
    from pathlib import Path

    given = os.environ.get("PAW_SMOLLM2_PROGRAM")
    if given:
        return Path(given)
    from exporter.export import export_source

    return export_source("smollm2", tmp_path_factory.mktemp("smollm2") / "prog")


@pytest.fixture(scope="session")
def arch_cases(tmp_path_factory):
    """``get(arch)``: the tiny export of ``arch`` from tests/archs.py, built once per session."""
    from tests.archs import ArchCase

    root = tmp_path_factory.mktemp("archs")
    built: dict = {}

    def get(arch: str) -> ArchCase:
        if arch not in built:
            built[arch] = ArchCase(arch, root)
        return built[arch]

    return get
