"""A ternary base is trained on (prefix and LoRA) down the Mac path, through the Metal kernel that has no VJP
of its own.

The tiny Llama is exported with ternary weights; down the Mac path (tests/fake_mac.py)
every ternary product runs the Metal kernel stand-in (``PAW_TERNARY_KERNEL=paw``, so the
many-row products of training take it too), which, like MLX's custom kernels, cannot be
differentiated: the gradient goes through the layer's custom VJP (the affine path). The
same tuning down the CPU path is the reference.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from interp.kernels import ternary_mlx
from paw_mlx.programs.artifact import GenerationSettings
from paw_mlx.programs.interpreter import forget_interpreters, interpreter
from paw_mlx.programs.select import Builder
from paw_mlx.programs.train import TrainOptions
from tests.fake_mac import device_path
from tests.tiny import export_tiny, tiny_llama_config

SPEC = "Upper."
ROWS = [{"input": w, "output": w.upper()} for w in ["cat", "dog", "sun", "red", "hat", "pen"]]


@pytest.fixture(scope="module")
def ternary_program(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("programs") / "tiny-ternary"
    return export_tiny(tiny_llama_config(), out, tokenizer=tiny_tokenizer, weights="ternary")


def train_on(path, method: str):
    forget_interpreters()  # a base is laid out for the path it was loaded on
    builder = Builder(interpreter(path), SPEC, str(path), GenerationSettings(max_new_tokens=8))
    options = TrainOptions(method=method, steps=4, layers=0, rank=2, learning_rate=5e-2)
    artifact, result = builder.build(method, ROWS, options)
    forget_interpreters()
    return artifact, result


@pytest.mark.parametrize("method", ["prefix", "lora"])
def test_ternary_base_is_trained_down_the_mac_path(ternary_program, monkeypatch, method):
    monkeypatch.setenv("PAW_TERNARY_KERNEL", "paw")
    launches = []
    real = ternary_mlx.metal_matmul
    monkeypatch.setattr(ternary_mlx, "metal_matmul",
                        lambda x, *a: launches.append(x.size // x.shape[-1]) or real(x, *a))
    with device_path("metal"):
        mac, mac_result = train_on(ternary_program, method)
    assert max(launches) > ternary_mlx.KERNEL_MAX_ROWS  # training-sized products took the kernel too
    launches.clear()
    with device_path("cpu"):
        cpu, cpu_result = train_on(ternary_program, method)
    assert not launches
    # The same descent down both paths, up to the kernel's float32 summation order.
    np.testing.assert_allclose(mac_result.losses, cpu_result.losses, rtol=1e-3)
    if method == "prefix":
        for (mac_keys, mac_values), (cpu_keys, cpu_values) in zip(mac.prefix, cpu.prefix, strict=True):
            assert mx.allclose(mac_keys, cpu_keys, atol=1e-3).item()
            assert mx.allclose(mac_values, cpu_values, atol=1e-3).item()
    else:  # Adam turns float32 summation-order noise in near-zero gradients into visible steps:
        # the weights are compared through the losses above, the layout here
        assert set(mac.adapter.modules) == set(cpu.adapter.modules) and mac.adapter.rank == cpu.adapter.rank
