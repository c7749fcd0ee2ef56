"""The ternary Metal kernel compiles as MLX wraps it, whatever the sizes and dtypes of its inputs.

MLX passes an input with fewer than 8 elements as ``const constant T*`` and a larger one
as ``const device T*`` (tests/metal_check.py writes the source exactly as MLX 0.32
does). The kernel is compiled with libclang, ``device`` and ``constant`` kept as
distinct address spaces, for the very inputs ``TernaryWeight`` passes it, above and
below 8 elements, in float32, float16 and bfloat16. The kernel paw shipped before
(tests/interp/data/ternary_matmul_v1.metal, kept as the negative case) declared
``const device`` pointers to its inputs and fails the check for tiny shapes, as it
failed to compile on a Mac; g++ through metal_shim.h (address spaces defined away)
never saw it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from interp.kernels import ternary as tp
from interp.kernels import ternary_mlx
from interp.kernels.ternary_mlx import KERNEL_HEADER, KERNEL_NAME, KERNEL_SOURCE, TernaryWeight
from tests.fake_mac import device_path
from tests.metal_check import address_space_errors, type_name, wrap_kernel

OLD_KERNEL = Path(__file__).parent / "data" / "ternary_matmul_v1.metal"
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
#: (tokens, out_features, in_features): the first two give inputs under 8 elements
#: (codes of one row, a one-entry scale); the last is a real layer's size.
SHAPES = [(1, 1, 3), (2, 8, 3), (1, 96, 576)]


def _recorded_call(monkeypatch, m: int, n: int, k: int, dtype) -> dict:
    """The arguments ``TernaryWeight`` gives mx.fast.metal_kernel and its kernel for one product."""
    calls: dict = {}

    def recording_metal_kernel(**made):
        def run(**call):
            calls.update(made, **call)
            return [mx.zeros(call["output_shapes"][0], dtype=call["output_dtypes"][0])]

        return run

    rng = np.random.default_rng(0)
    scale = np.ones(1 if n == 1 else n, np.float32)
    with device_path("metal"):
        weight = TernaryWeight.prepare(tp.pack_ternary(rng.integers(-1, 2, (n, k))), scale, k, n)
        monkeypatch.setattr(mx.fast, "metal_kernel", recording_metal_kernel)
        ternary_mlx._metal_kernel.cache_clear()
        mx.eval(weight(mx.zeros((m, k), dtype=dtype)))
    return calls


def _source(call: dict, source: str | None = None) -> str:
    return wrap_kernel(call["name"], call["input_names"], call["output_names"], source or call["source"],
                       call["header"], call["inputs"], call["output_dtypes"], call["template"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_kernel_compiles_with_distinct_address_spaces(monkeypatch, m, n, k, dtype):
    call = _recorded_call(monkeypatch, m, n, k, dtype)
    assert call["name"] == KERNEL_NAME and call["source"] == KERNEL_SOURCE.read_text(encoding="utf-8")
    source = _source(call)
    tiny = n == 1  # codes of one 32-trit row (2 words) and a single scale: MLX's constant space
    assert ("const constant uint32_t* codes" in source) == tiny
    assert ("const constant float* scale" in source) == tiny
    assert "const constant uint32_t* dims" in source  # 3 entries: always constant
    assert f"const device {type_name(dtype)}* x" in source  # padded to 32 columns: always device
    assert address_space_errors(source) == ()


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_old_kernel_fails_for_inputs_under_8_elements(dtype):
    """The negative case: the old kernel text, called as it was (x [M, K], uint8 rows, dims of 4)."""
    old = OLD_KERNEL.read_text(encoding="utf-8")

    def errors(m: int, n: int, k: int) -> tuple[str, ...]:
        inputs = [mx.zeros((m, k), dtype=dtype), mx.zeros((n, -(-k // 4)), dtype=mx.uint8),
                  mx.ones((n,), dtype=dtype), mx.zeros((4,), dtype=mx.uint32)]
        return address_space_errors(wrap_kernel("paw_ternary_matmul", ["x", "packed", "scale", "dims"], ["out"], old,
                                                "", inputs, [dtype], [("T", dtype)]))

    small = errors(2, 8, 3)  # the shape the old test suite used: x has 6 elements
    assert small and any("constant" in line and "xrow" in line for line in small), small
    assert any("constant" in line for line in errors(1, 1, 3))  # and its packed row of one byte
    if dtype != mx.bfloat16:  # (bfloat16 also fails for large shapes: the old text had no conversion for it)
        assert errors(1, 96, 576) == ()  # real model shapes were not affected


def test_the_check_sees_a_device_pointer_to_a_constant_input():
    """A body that names the address space of an input compiles only while the input is large."""
    body = KERNEL_SOURCE.read_text(encoding="utf-8").replace(
        "acc[r] += dot_codes(codes[row_start[r] + w], xs);",
        "const device uint32_t* row = codes + row_start[r];\n    acc[r] += dot_codes(row[w], xs);")
    assert body != KERNEL_SOURCE.read_text(encoding="utf-8")

    def errors(rows: int) -> tuple[str, ...]:
        inputs = [mx.zeros((1, 32)), mx.zeros((rows, 2), dtype=mx.uint32), mx.ones((1,)),
                  mx.zeros((3,), dtype=mx.uint32)]
        return address_space_errors(wrap_kernel(KERNEL_NAME, ["x", "codes", "scale", "dims"], ["out"], body,
                                                KERNEL_HEADER.read_text(encoding="utf-8"), inputs, [mx.float32],
                                                [("T", mx.float32)]))

    assert errors(4) == ()  # 8 words: device
    assert any("address_space(2)" in line for line in errors(1))  # 2 words: constant


def test_signature_is_written_as_mlx_does():
    """MLX's own example (docs/src/dev/custom_metal_kernels.rst, ``myexp``), with the kernel name
    MLX 0.32's code gives it (custom_kernel_<name>_<template hash>_<input and output types>)."""
    body = "\n    uint elem = thread_position_in_grid.x;\n    T tmp = inp[elem];\n    out[elem] = metal::exp(tmp);\n"
    a = mx.zeros((4, 16), dtype=mx.float16)
    got = wrap_kernel("myexp", ["inp"], ["out"], body, "", [a], [mx.float16], [("T", mx.float32)])
    name = "custom_kernel_myexp__float_float16_t_float16_t"
    assert got == (f"template <typename T>\n[[kernel]] void {name}(\n"
                   "  const device float16_t* inp [[buffer(0)]],\n"
                   "  device float16_t* out [[buffer(1)]],\n"
                   "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n"
                   f"{body}\n}}\n\n"
                   f'template [[host_name("{name}")]] [[kernel]] decltype({name}<float>) {name}<float>;\n')
    tiny = wrap_kernel("k", ["a", "s"], ["o"], "o[0] = a[0] + s + a_shape[0];", "",
                       [mx.zeros((7,)), mx.array(2.0)], [mx.float32], [])
    assert "  const constant float* a [[buffer(0)]],\n  const constant int* a_shape [[buffer(1)]]," in tiny
    assert "  const constant float& s [[buffer(2)]],\n  device float* o [[buffer(3)]]) {" in tiny
