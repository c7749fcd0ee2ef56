"""Every device and platform decision paw makes, as named predicates.

Op implementations ask these questions instead of comparing ``mx.default_device()``
themselves, so one module says what "on the CPU" or "has Metal" means for paw, and the
test suite can take the Mac branches on any machine: ``tests/fake_mac.py`` replaces the
device predicates here (``PAW_FAKE_MAC=1``, see docs/devices.md). Callers therefore look
them up when they decide (``device.on_cpu()``), never bind them at import
(``from interp.device import on_cpu`` would keep the real one).

Two kinds of question live here:

- where MLX computes now (``on_cpu``, ``on_gpu``, ``has_metal``, ``has_cuda``,
  ``metal_kernels``): they decide which op branch runs;
- what the platform is (``is_macos``, ``needs_blas_shim``, ``max_rss_bytes``): they
  describe the process and are not faked.

This module must not import ``mlx.core`` at import time: ``interp.blas`` asks
``needs_blas_shim()`` before MLX may be loaded, and MLX must load after the shim.
"""

from __future__ import annotations

import os
import re
import sys

from interp.errors import PawError

DEVICES = ("cpu", "gpu")


# ----------------------------------------------------------------------------- where MLX computes


def on_cpu() -> bool:
    """Whether MLX's default device (where paw's ops run) is the CPU."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def computes_on_cpu() -> bool:
    """Whether MLX's kernels run on the CPU: for what a backend's kernels can take (the CPU
    ``gather_mm`` takes float32 only), not which of paw's branches to follow (``on_cpu``).
    A fact of the kernels that run, so the fake-Mac test mode leaves it real."""
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def on_gpu() -> bool:
    """Whether MLX's default device is a GPU (Metal on a Mac, CUDA on an NVIDIA machine)."""
    return not on_cpu()


def has_metal() -> bool:
    """Whether this MLX has a working Metal backend (an Apple-Silicon Mac)."""
    import mlx.core as mx

    try:
        return bool(mx.metal.is_available())
    except (AttributeError, RuntimeError):  # a build without the metal module
        return False


def has_cuda() -> bool:
    """Whether this MLX has a working CUDA backend (``pip install -e '.[cuda]'`` on Linux)."""
    import mlx.core as mx

    try:
        return bool(mx.cuda.is_available())
    except (AttributeError, RuntimeError):  # older MLX without the cuda module
        return False


def metal_kernels() -> bool:
    """Whether paw's own Metal kernels run: Metal exists and ops run on the GPU.

    On MLX's CUDA backend this is False, so ternary layers take MLX's 2-bit affine path.
    """
    return has_metal() and on_gpu()


def backend() -> str:
    """Where paw's ops run now, in one word: ``metal``, ``cuda`` or ``cpu``."""
    if on_cpu():
        return "cpu"
    return "metal" if has_metal() else "cuda" if has_cuda() else "gpu"


def describe() -> str:
    """Where paw's ops run now, for a person: ``the CPU``, ``the GPU (Metal)``, ``the GPU (CUDA)``."""
    where = backend()
    return "the CPU" if where == "cpu" else f"the GPU ({where.upper() if where == 'cuda' else where.title()})"


def use_device(name: str) -> None:
    """Make ``name`` (``cpu``, ``gpu``, or ``auto``: MLX's own default) MLX's default device, or say why not."""
    import mlx.core as mx

    if name == "auto":
        return
    if name not in DEVICES:
        raise PawError(f"unknown device {name!r}; choose one of auto, {', '.join(DEVICES)}")
    if name == "gpu" and not mx.is_available(mx.gpu):
        raise PawError("no GPU: this MLX has neither Metal (Apple-Silicon Macs) nor CUDA "
                       "(install paw with the 'cuda' extra on an NVIDIA machine); use --device cpu")
    mx.set_default_device(mx.gpu if name == "gpu" else mx.cpu)


# ----------------------------------------------------------------------------- the platform


#: What to install when MLX has no backend (Linux wheels ship it as an extra).
MISSING_BACKEND = ("MLX is installed without a backend: install paw with one, "
                   "pip install -e '.[cpu]' (MLX on the CPU) or -e '.[cuda]' (NVIDIA GPUs, Linux)")


#: MLX's switch for TF32-class float32 products (CUDA on Ampere and later, the M5's neural
#: accelerators); read once, at MLX's first matmul.
TF32_SWITCH = "MLX_ENABLE_TF32"


def keep_float32_exact() -> str:
    """Turn MLX's TF32 float32 products off unless the user set ``MLX_ENABLE_TF32``; return it.

    MLX multiplies float32 with 10-bit mantissas by default on CUDA GPUs and M5 Macs, so a
    float32 program would not compute what its export did (greedy tokens drift, parity
    tests fail; measured in docs/devices.md). paw's float32 means float32; bfloat16 and
    quantized programs are unaffected. ``MLX_ENABLE_TF32=1`` keeps MLX's faster default.
    Called when ``interp`` is imported, before any product can run.
    """
    return os.environ.setdefault(TF32_SWITCH, "0")


def float32_in_tf32() -> bool:
    """Whether MLX's GPU float32 products run in TF32 in this process, read as MLX reads
    ``MLX_ENABLE_TF32`` (C's ``atoi``: a leading integer, anything else 0; unset is on);
    for reports such as the bench's."""
    value = os.environ.get(TF32_SWITCH)
    if value is None:
        return True
    number = re.match(r"\s*[+-]?\d+", value)
    return number is not None and int(number.group()) != 0


def require_mlx() -> None:
    """Import MLX, or say which extra brings its backend (on Linux ``mlx`` alone has none)."""
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{MISSING_BACKEND} ({exc})") from exc


def is_macos() -> bool:
    """Whether this process runs on macOS."""
    return sys.platform == "darwin"


def needs_blas_shim() -> bool:
    """Whether MLX's CPU backend here comes with netlib's reference BLAS (the Linux wheels),
    so that ``interp.blas`` should put OpenBLAS under it. macOS MLX uses Accelerate."""
    return sys.platform == "linux"


def is_linux() -> bool:
    """Whether this process runs on Linux (glibc's heap, /proc)."""
    return sys.platform == "linux"


def max_rss_bytes(children: bool = False) -> int:
    """The process's peak resident memory in bytes, or with ``children`` the largest of its
    finished children's (``ru_maxrss`` is bytes on macOS, KiB on Linux)."""
    import resource  # POSIX only; imported where it is needed

    peak = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if is_macos() else int(peak) * 1024


def return_freed_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    MLX's CPU buffers come from malloc, and glibc keeps freed mid-sized blocks in its heap,
    so an idle server would otherwise keep a burst's memory resident (docs/serve.md).
    """
    if not is_linux():
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def resident_bytes() -> int:
    """This process's resident set size now, in bytes (0 when the platform will not say).

    Not ``max_rss_bytes``: on Linux a process started from a large one (a test runner)
    inherits its peak across exec.
    """
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    import subprocess

    try:  # macOS and the BSDs
        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip()) * 1024
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0
