"""Shared fixtures (a tiny exported Llama with a real tokenizer and chat template) and the device path.

``PAW_FAKE_MAC=1`` runs the tests down the Mac (Metal) branches on this CPU
(tests/fake_mac.py, docs/devices.md). Tests marked ``cpu_path`` assert what only MLX's
CPU path does; they are skipped wherever paw's ops do not run on the CPU.
"""

from __future__ import annotations

import os

import pytest

import interp  # noqa: F401  (first: the fast BLAS must load before any test imports MLX)
from interp import device
from tests.fake_mac import FAKE_MAC_RUN, device_path
from tests.prefetch import REFERENCE_FILE, SMOLLM2, Prefetch, arch_build

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_fake_mac_path = None
_prefetch = Prefetch()


def pytest_configure(config):
    global _fake_mac_path
    if FAKE_MAC_RUN:
        _fake_mac_path = device_path("metal")
        _fake_mac_path.__enter__()


def pytest_unconfigure(config):
    _prefetch.stop()
    if _fake_mac_path is not None:
        _fake_mac_path.__exit__(None, None, None)


def pytest_report_header(config):
    if FAKE_MAC_RUN:
        return "paw: fake-Mac run (PAW_FAKE_MAC=1): Metal branches and stand-in kernels, MLX on the CPU"
    return f"paw: ops run on MLX's {device.backend()} path"


def pytest_collection_modifyitems(config, items):
    # A test that belongs to one of the two passes of .ci/run is deselected (not skipped) in the other.
    unwanted = "not_fake_mac_pass" if FAKE_MAC_RUN else "fake_mac_pass"
    left_out = [item for item in items if item.get_closest_marker(unwanted)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker(unwanted)]
    if device.on_cpu():
        return
    skip = pytest.mark.skip(reason=f"assumes MLX's CPU path; this run takes the {device.backend()} branches")
    for item in items:
        if item.get_closest_marker("cpu_path"):
            item.add_marker(skip)


def pytest_collection_finish(session):
    # after every deselection (-k, -m, the passes above): only what the tests that run will ask for
    _prefetch.start(_builds_wanted(session.items))


def _builds_wanted(items) -> dict[str, bool]:
    """The builds of tests/prefetch.py the selected tests will ask for, in the order they will (a tiny
    architecture's program, with transformers' results where ``arch_cases`` wants them; the real SmolLM2)."""
    from tests.archs import ARCHS

    builds: dict[str, bool] = {}
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "smollm2_program" in fixtures and not os.environ.get("PAW_SMOLLM2_PROGRAM"):
            builds.setdefault(SMOLLM2, False)
        arch = params.get("arch")
        if not isinstance(arch, str) or arch not in ARCHS:
            continue
        if "arch_cases" in fixtures:
            builds[arch_build(arch)] = True
        elif "arch_program" in fixtures:
            builds.setdefault(arch_build(arch, params.get("dtype", "float32")), False)
    return builds


@pytest.fixture
def on_mac_path():
    """The test body runs down the Mac (Metal) branches, with the stand-in Metal kernels."""
    with device_path("metal"):
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tests.tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf_folder(tmp_path_factory, tiny_tokenizer):
    """A Hugging Face folder (weights, config, tokenizer) of a tiny random Llama: tests copy it
    before changing anything."""
    from tests.tiny import tiny_llama_config, tiny_model

    folder = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_model(tiny_llama_config()).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_program(tmp_path_factory, tiny_tokenizer):
    """Directory of an exported tiny random Llama (float32) with tokenizer files."""
    from tests.tiny import export_tiny, tiny_llama_config

    out = tmp_path_factory.mktemp("programs") / "tiny-llama"
    return export_tiny(tiny_llama_config(), out, tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def hybrid_program(tmp_path_factory, tiny_tokenizer):
    """Directory of the tiny LFM2 of tests/archs.py (conv state beside the KV cache) with tokenizer files."""
    from tests.archs import arch_config
    from tests.tiny import export_tiny

    return export_tiny(arch_config("lfm2"), tmp_path_factory.mktemp("programs") / "tiny-lfm2", tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def gated_delta_program(tmp_path_factory, tiny_tokenizer):
    """Directory of the tiny Qwen3.5 text model of tests/archs.py (Gated DeltaNet layers: conv and delta
    states beside the KV cache) with tokenizer files."""
    from tests.archs import arch_config
    from tests.tiny import export_tiny

    return export_tiny(arch_config("qwen3_5_text"), tmp_path_factory.mktemp("programs") / "tiny-qwen3_5",
                       tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def ssm_program(tmp_path_factory, tiny_tokenizer):
    """Directory of the tiny Mamba2 of tests/archs.py (conv and SSM states, no attention) with tokenizer files."""
    from tests.archs import arch_config
    from tests.tiny import export_tiny

    return export_tiny(arch_config("mamba2"), tmp_path_factory.mktemp("programs") / "tiny-mamba2",
                       tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def jamba_program(tmp_path_factory, tiny_tokenizer):
    """Directory of the tiny Jamba of tests/archs.py (Mamba 1 layers: conv and SSM states beside the KV cache,
    routed experts) with tokenizer files."""
    from tests.archs import arch_config
    from tests.tiny import export_tiny

    return export_tiny(arch_config("jamba"), tmp_path_factory.mktemp("programs") / "tiny-jamba",
                       tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def recurrent_gemma_program(tmp_path_factory, tiny_tokenizer):
    """Directory of the tiny RecurrentGemma of tests/archs.py (RG-LRU blocks: conv and LRU states beside
    the KV cache of its local attention) with tokenizer files."""
    from tests.archs import arch_config
    from tests.tiny import export_tiny

    return export_tiny(arch_config("recurrent_gemma"), tmp_path_factory.mktemp("programs") / "tiny-recurrent_gemma",
                       tokenizer=tiny_tokenizer)


@pytest.fixture(scope="session")
def arch_program(tmp_path_factory):
    """``arch_program(model_type, dtype="float32")``: the directory of that tiny architecture's
    program (tests/archs.py), exported once per session (by tests/prefetch.py's worker where the
    collected tests asked for it) and shared by every test module."""
    from tests.archs import export_arch

    root = tmp_path_factory.mktemp("arch-programs")
    made: dict[tuple[str, str], object] = {}

    def get(model_type: str, dtype: str = "float32"):
        if (model_type, dtype) not in made:
            built = _prefetch.take(arch_build(model_type, dtype))
            made[model_type, dtype] = (built / "prog" if built is not None
                                       else export_arch(model_type, dtype, root / f"{model_type}-{dtype}"))
        return made[model_type, dtype]

    return get


@pytest.fixture(scope="session")
def arch_cases(arch_program):
    """``get(arch)``: the tiny export of ``arch`` with transformers' results (tests/archs.py),
    built once per session (by tests/prefetch.py's worker where the collected tests asked for it)."""
    from tests.archs import ArchCase

    built: dict = {}

    def get(arch: str) -> ArchCase:
        if arch not in built:
            program = arch_program(arch)
            prefetched = _prefetch.take(arch_build(arch))
            reference = None
            if prefetched is not None and (prefetched / REFERENCE_FILE).exists():
                import numpy as np

                with np.load(prefetched / REFERENCE_FILE) as saved:
                    reference = saved["ids"], saved["logits"], saved["greedy"].tolist()
            built[arch] = ArchCase(arch, program, reference=reference)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_program(tmp_path_factory):
    """The real default model as a program: $PAW_SMOLLM2_PROGRAM, or exported here (about a minute; by
    tests/prefetch.py's worker, beside the first tests)."""
    from pathlib import Path

    given = os.environ.get("PAW_SMOLLM2_PROGRAM")
    if given:
        return Path(given)
    built = _prefetch.take(SMOLLM2)
    if built is not None:
        return built / "prog"
    from exporter.export import export_source

    return export_source("smollm2", tmp_path_factory.mktemp("smollm2") / "prog")
