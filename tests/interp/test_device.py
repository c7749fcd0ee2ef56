"""interp/device.py owns every device and platform decision, and the ops follow its answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import pytest

from interp import device
from interp.errors import PawError
from tests.child_env import child_env
from tests.fake_mac import device_path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("interp", "paw_mlx", "apps", "exporter", "scripts")
#: What only interp/device.py may ask MLX or Python about the device or the platform.
DEVICE_QUESTIONS = re.compile(r"default_device|set_default_device|mx\.metal\.|mx\.cuda\.|is_available\("
                              r"|sys\.platform|ru_maxrss|\bmx\.(cpu|gpu)\b")


def test_no_device_decision_outside_the_device_module():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "interp" / "device.py":
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if DEVICE_QUESTIONS.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "ask interp/device.py instead:\n" + "\n".join(found)


@pytest.mark.parametrize(("macos", "expected"), [(True, 3_000_000), (False, 3_000_000 * 1024)])
def test_peak_rss_is_bytes_on_macos_and_kib_on_linux(monkeypatch, macos, expected):
    import resource

    monkeypatch.setattr(device, "is_macos", lambda: macos)
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=3_000_000))
    assert device.max_rss_bytes() == expected


def test_peak_rss_of_this_process_is_plausible():
    # this process has MLX and numpy loaded: between 50 MB and the machine's memory
    assert 50e6 < device.max_rss_bytes() < 1e12


def test_use_device_checks_its_argument_and_the_machine():
    with pytest.raises(PawError, match="unknown device 'tpu'"):
        device.use_device("tpu")
    before = mx.default_device()
    try:
        device.use_device("cpu")
        assert mx.default_device() == mx.cpu
        device.use_device("auto")  # leaves MLX's choice alone
        assert mx.default_device() == mx.cpu
        if not mx.is_available(mx.gpu):
            with pytest.raises(PawError, match="no GPU.*--device cpu"):
                device.use_device("gpu")
    finally:
        mx.set_default_device(before)


@pytest.mark.parametrize(("path", "backend", "described"), [("cpu", "cpu", "the CPU"),
                                                             ("metal", "metal", "the GPU (Metal)"),
                                                             ("cuda", "cuda", "the GPU (CUDA)")])
def test_paths_answer_every_predicate_consistently(path, backend, described):
    before = device.on_cpu
    with device_path(path):
        assert device.backend() == backend and device.describe() == described
        assert device.on_cpu() == (path == "cpu") != device.on_gpu()
        assert device.metal_kernels() == device.has_metal() == (path == "metal")
    assert device.on_cpu is before  # and everything is put back


def test_cuda_takes_the_gpu_branches_and_the_affine_ternary_path():
    import numpy as np

    from interp.kernels import ternary as tp
    from interp.kernels.ternary_mlx import TernaryWeight
    from interp.ops import fastmath

    t = np.random.default_rng(0).integers(-1, 2, size=(8, 64))
    with device_path("cuda"):
        weight = TernaryWeight.prepare(tp.pack_ternary(t), np.ones(8, np.float32), 64, 8)
        assert weight.path == "affine" and weight.affine is not None
        assert not fastmath.use_fast_math(mx.zeros((fastmath.MIN_ELEMENTS,)))


@pytest.mark.parametrize("path", ["cpu", "metal", "cuda"])
def test_ops_follow_the_predicates_at_call_time(tiny_program, monkeypatch, path):
    """On a GPU (Metal or CUDA) attention and RoPE are mx.fast kernels; down the CPU path never."""
    from interp.graph import GraphModel
    from interp.program import read_program

    calls = {"sdpa": 0, "rope": 0}
    for name, key in (("scaled_dot_product_attention", "sdpa"), ("rope", "rope")):
        original = getattr(mx.fast, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(mx.fast, name, counted)
    with device_path(path):
        model = GraphModel.from_program(read_program(tiny_program))
        mx.eval(model(mx.array([[5, 9, 33, 70]]), cache=model.make_cache()))
    layers = model.num_layers
    assert calls == ({"sdpa": 0, "rope": 0} if path == "cpu" else {"sdpa": layers, "rope": 2 * layers})


@pytest.mark.parametrize("chosen", [None, "1", "0"])
def test_importing_paw_turns_tf32_off_unless_the_user_chose(chosen):
    """MLX multiplies float32 in TF32 on CUDA and M5 GPUs unless MLX_ENABLE_TF32=0, which
    it reads once: importing interp (first, as every paw entry point does) sets it to 0
    when unset, and leaves a value the user set alone."""
    env = child_env()
    env.pop(device.TF32_SWITCH, None)
    if chosen is not None:
        env[device.TF32_SWITCH] = chosen
    code = "import os, interp, mlx.core as mx; mx.eval(mx.ones((2, 2)) @ mx.ones((2, 2))); print(os.environ['%s'])"
    out = subprocess.run([sys.executable, "-c", code % device.TF32_SWITCH], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == (chosen or "0")


@pytest.mark.parametrize("value, tf32", [(None, True), ("0", False), (" 0 ", False), ("1", True), ("2", True),
                                         ("false", False), ("", False), (" 1x", True)])
def test_reports_say_whether_float32_runs_in_tf32(monkeypatch, value, tf32):
    """Unset means MLX's default (TF32 on GPUs); a value means what MLX's atoi makes of it."""
    if value is None:
        monkeypatch.delenv(device.TF32_SWITCH, raising=False)
    else:
        monkeypatch.setenv(device.TF32_SWITCH, value)
    assert device.float32_in_tf32() is tf32
