"""A ternary base is prefix-tuned down the Mac path, through the Metal kernel that has no VJP of its own.

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

import paw_mlx
from interp.kernels import ternary_mlx
from paw_mlx.programs.interpreter import forget_interpreters
from tests.fake_mac import device_path
from tests.paw_mlx.test_tune import EXAMPLES
from tests.tiny import export_tiny, tiny_llama_config

SPEC = "Parse the options into a JSON list."
OPTIONS = {"steps": 4, "layers": 0, "holdout": 0.34, "learning_rate": 5e-2}


@pytest.fixture(scope="module")
def ternary_program(tmp_path_factory, tiny_tokenizer):
    out = tmp_path_factory.mktemp("programs") / "tiny-ternary"
    return export_tiny(tiny_llama_config(), out, tokenizer=tiny_tokenizer, weights="ternary")


def test_ternary_base_is_prefix_tuned_down_the_mac_path(ternary_program, monkeypatch):
    monkeypatch.setenv("PAW_TERNARY_KERNEL", "paw")
    launches = []
    real = ternary_mlx.metal_matmul
    monkeypatch.setattr(ternary_mlx, "metal_matmul", lambda x, *a: launches.append(x.size // x.shape[-1]) or real(x, *a))
    forget_interpreters()  # a base is laid out for the path it was loaded on
    with device_path("metal"):
        mac = paw_mlx.compile(SPEC, base=ternary_program, examples=EXAMPLES, tune_options=OPTIONS)
    assert max(launches) > ternary_mlx.KERNEL_MAX_ROWS  # training-sized products took the kernel too
    losses = mac.tuning["first_batch_loss"]
    assert losses[1] < losses[0]  # the loss falls
    launches.clear()
    forget_interpreters()
    with device_path("cpu"):
        cpu = paw_mlx.compile(SPEC, base=ternary_program, examples=EXAMPLES, tune_options=OPTIONS)
    forget_interpreters()
    assert not launches
    # The same descent down both paths, up to the kernel's float32 summation order.
    np.testing.assert_allclose(losses, cpu.tuning["first_batch_loss"], rtol=1e-4)
    for (mac_keys, mac_values), (cpu_keys, cpu_values) in zip(mac.prefix, cpu.prefix, strict=True):
        assert mx.allclose(mac_keys, cpu_keys, atol=1e-3).item() and mx.allclose(mac_values, cpu_values, atol=1e-3).item()
