"""The Mac path on any machine: paw's device predicates say Metal while MLX computes on the CPU.

``device_path("metal")`` replaces the device predicates of ``interp.device`` so every op
takes the branch it takes on an Apple-Silicon GPU (``mx.fast`` attention and RoPE, no
polynomial exp, no float32 BLAS detours, ternary layers on paw's Metal kernel), and
replaces ``mx.fast.metal_kernel`` with ``metal_kernel``, a stand-in that behaves like
MLX 0.32's as far as a caller can tell without a GPU:

- it writes the kernel source exactly as MLX would for each call (``tests/metal_check``:
  inputs under 8 elements in the ``constant`` address space) and compiles it with
  distinct address spaces, so a declaration that would not compile on a Mac fails here;
- it checks the call as MLX and Metal do (argument counts, a grid and threadgroup of
  three positive sizes, at most 1024 threads per threadgroup) and the launch against
  the kernel's own contract (``KERNELS``);
- it computes the result with MLX ops (a reference per kernel, in float32), so results
  differ from the CPU path's in the last bits as the real kernel's do;
- it has no VJP: differentiating through it raises MLX's error.

``device_path("cpu")`` forces the CPU answers (the real ones on this machine), so a
test can compare both paths in one process. On a real Mac ``device_path("metal")``
keeps MLX's real ``metal_kernel``, and ``device_path("cpu")`` takes the CPU branches
while MLX computes on the GPU. ``PAW_FAKE_MAC=1`` makes tests/conftest.py
install the Metal path for a whole run (docs/devices.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import mlx.core as mx

from interp import device
from interp.kernels import ternary_mlx
from tests.metal_check import address_space_errors, wrap_kernel

#: What each device predicate answers down each path (predicates about the platform,
#: such as ``is_macos`` or ``max_rss_bytes``, describe the process and are never faked).
PATHS: dict[str, dict[str, object]] = {
    "metal": {"on_cpu": False, "on_gpu": True, "has_metal": True, "has_cuda": False, "metal_kernels": True,
              "backend": "metal"},
    "cpu": {"on_cpu": True, "on_gpu": False, "has_metal": False, "has_cuda": False, "metal_kernels": False,
            "backend": "cpu"},
    # MLX's CUDA backend: the GPU branches, no Metal kernels (ternary layers on the affine path)
    "cuda": {"on_cpu": False, "on_gpu": True, "has_metal": False, "has_cuda": True, "metal_kernels": False,
             "backend": "cuda"},
}
#: Whether this test run goes down the Mac branches throughout (tests/conftest.py installs them).
FAKE_MAC_RUN = os.environ.get("PAW_FAKE_MAC", "").strip() not in ("", "0")
MAX_THREADS_PER_THREADGROUP = 1024  # Apple GPUs' maxTotalThreadsPerThreadgroup, at most
SIMD_WIDTH = 32
REAL_METAL_KERNEL = mx.fast.metal_kernel
#: What this machine really has, read when this module is imported (before tests/conftest.py
#: replaces any predicate), for tests that need the truth under any path.
REAL_METAL = device.has_metal()
REAL_CUDA = device.has_cuda()


@contextmanager
def device_path(path: str) -> Iterator[None]:
    """Within the block, paw's ops take the ``metal`` (stand-in kernels), ``cuda`` or ``cpu`` branches."""
    saved = {name: getattr(device, name) for name in PATHS[path]}
    saved_kernel = mx.fast.metal_kernel
    for name, answer in PATHS[path].items():
        setattr(device, name, lambda answer=answer: answer)
    # on a real Mac the real kernels run: MLX compiles and checks them itself
    stand_in = path == "metal" and not REAL_METAL
    mx.fast.metal_kernel = metal_kernel if stand_in else REAL_METAL_KERNEL
    ternary_mlx._metal_kernel.cache_clear()  # built by the factory in force at first use
    try:
        yield
    finally:
        for name, original in saved.items():
            setattr(device, name, original)
        mx.fast.metal_kernel = saved_kernel
        ternary_mlx._metal_kernel.cache_clear()


# ----------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class KernelCall:
    """One call of a kernel, as the stand-in receives it."""

    source: str
    inputs: list[mx.array]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    template: dict[str, object]


def _constant(source: str, name: str) -> int:
    """A ``constexpr uint NAME = value;`` of a kernel body (the body states its own launch)."""
    found = re.search(rf"constexpr\s+uint\s+{name}\s*=\s*(\d+)\s*;", source)
    assert found, f"the kernel body declares no constexpr {name}"
    return int(found.group(1))


def _ternary_matmul(call: KernelCall) -> list[mx.array]:
    """paw_ternary_matmul (interp/kernels/ternary_matmul.metal): its launch contract, then
    ``out = (x @ t.T) * scale`` in float32 from the 2-bit words, in the template type."""
    x, codes, scale, dims = call.inputs
    rows, width = x.shape
    (_, out_features), = call.output_shapes
    per_simdgroup = _constant(call.source, "ROWS")
    assert width % 32 == 0 and codes.shape == (out_features, width // 16), "x and codes disagree"
    assert call.output_shapes == [(rows, out_features)] and call.output_dtypes == [x.dtype]
    assert call.template == {"T": x.dtype}, f"template {call.template} for x of {x.dtype}"
    assert dims.shape == (3,) and dims.dtype == mx.uint32 and scale.size in (1, out_features)
    lanes, row_blocks, tokens = call.grid
    assert lanes == SIMD_WIDTH and call.threadgroup[0] == SIMD_WIDTH and call.threadgroup[2] == 1, \
        f"grid {call.grid} / threadgroup {call.threadgroup}: x must be one simdgroup of lanes"
    assert tokens == rows, f"grid z {tokens} for {rows} rows of x"
    assert (row_blocks - 1) * per_simdgroup < out_features <= row_blocks * per_simdgroup, \
        f"grid y {row_blocks} blocks of {per_simdgroup} rows for {out_features} outputs"
    shifts = mx.arange(16, dtype=mx.uint32) * 2
    trits = ((codes[:, :, None] >> shifts) & 3).reshape(out_features, width).astype(mx.float32) - 1
    scales = mx.take(scale.astype(mx.float32), mx.arange(out_features, dtype=mx.uint32) * dims[2])
    return [((x.astype(mx.float32) @ trits.T) * scales).astype(x.dtype)]


#: Kernel name -> its reference: checks a call against the kernel's contract and computes
#: the outputs with MLX ops. A kernel paw adds gets an entry here.
KERNELS: dict[str, Callable[[KernelCall], list[mx.array]]] = {
    ternary_mlx.KERNEL_NAME: _ternary_matmul,
}


def _no_vjp(primals, cotangents, outputs):
    raise ValueError("[Primitive::vjp] Not implemented for CustomKernel.")  # what MLX says


def metal_kernel(name: str, input_names: list[str], output_names: list[str], source: str, header: str = "",
                 ensure_row_contiguous: bool = True, atomic_outputs: bool = False):
    """Stand-in for ``mx.fast.metal_kernel``: same arguments, same call, checked and computed on the CPU."""
    if not output_names:
        raise ValueError("[metal_kernel] Must specify at least one output.")
    if name not in KERNELS:
        raise AssertionError(f"no reference for Metal kernel {name!r}: add one to tests/fake_mac.py KERNELS")

    def call(*, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None, init_value=None,
             verbose=False, stream=None):
        for what, given in (("inputs", inputs), ("output_shapes", output_shapes), ("output_dtypes", output_dtypes)):
            expected = len(input_names) if what == "inputs" else len(output_names)
            if len(given) != expected:
                raise ValueError(f"[metal_kernel] Expected `{what}` to have size {expected} but got size {len(given)}.")
        for what, sizes in (("grid", grid), ("threadgroup", threadgroup)):
            assert len(sizes) == 3 and all(isinstance(s, int) and s >= 1 for s in sizes), f"{what} {sizes}"
        threads = threadgroup[0] * threadgroup[1] * threadgroup[2]
        if threads > MAX_THREADS_PER_THREADGROUP:
            raise ValueError(f"Thread group size ({threads}) is greater than  the maximum allowed threads per "
                             f"threadgroup ({MAX_THREADS_PER_THREADGROUP}).")
        arrays = [mx.array(a) if not isinstance(a, mx.array) else a for a in inputs]
        template = list(template or [])
        full = wrap_kernel(name, input_names, output_names, source, header, arrays, list(output_dtypes), template,
                           atomic_outputs)
        errors = address_space_errors(full)
        assert not errors, f"Metal kernel {name} would not compile:\n" + "\n".join(errors)
        kernel_call = KernelCall(source, arrays, [tuple(s) for s in output_shapes], list(output_dtypes),
                                 tuple(grid), tuple(threadgroup), dict(template))
        compute = mx.custom_function(lambda *xs: KERNELS[name](replace(kernel_call, inputs=list(xs))))
        compute.vjp(_no_vjp)
        return list(compute(*arrays))

    return call
