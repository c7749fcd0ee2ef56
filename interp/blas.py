"""A fast BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel (``mlx[cpu]``) bundles netlib's *reference* BLAS, and every float32
matmul MLX runs on the CPU is a ``cblas_sgemm`` call into it. OpenBLAS does the same
products many times faster, a matrix-vector product as much as a prefill (docs/speed.md).

OpenBLAS comes from PyPI as ``scipy-openblas32``, whose symbols carry a ``scipy_`` prefix,
so it cannot stand in for the reference library by itself. ``install()`` builds (once,
cached, with the system C compiler, as MLX itself does for compiled CPU kernels) a tiny
shared library that exports the three CBLAS gemm entry points MLX calls and forwards them
to OpenBLAS, and loads it with ``RTLD_GLOBAL``. The dynamic linker then resolves MLX's
``cblas_sgemm`` to the shim, because the global scope is searched before a library's own
dependencies. That only works if it happens before ``mlx.core`` is first imported, which is
why ``interp/__init__.py`` calls ``install()`` and why every paw package imports ``interp``
first.

The compiled shim is cached in ``$PAW_CACHE/blas`` (a directory only its user may write)
with its sha256 beside it; a cached file that does not match, or does not load, is
rebuilt rather than trusted.

``PAW_BLAS=reference`` keeps MLX's own BLAS; ``PAW_BLAS=/path/libopenblas.so`` loads a
library that already exports the standard CBLAS names (a system OpenBLAS or MKL). On macOS
MLX uses Accelerate and nothing happens here. Whatever happens, failure only means the
reference BLAS stays: ``status()`` says which one is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from interp import device
from interp.paths import cache_dir

# The gemm entry points libmlx.so imports (float32, float64, complex64). CBLAS enums are
# int-sized, so they pass as int. MLX calls gemm for every product, matrix-vector ones
# included (a decode step is all one-row products); OpenBLAS's gemm kernels handle one row
# several times slower than its gemv (docs/speed.md), so the shim sends real one-row or
# one-column row-major products to gemv. For C = op(A) op(B): one row of C is op(B)^T
# times A's row; one column is op(A) times B's column.
_SHIM_SOURCE = """\
#define GEMM_ARGS(T, S) int order, int ta, int tb, int m, int n, int k, S alpha, const T *a, \\
    int lda, const T *b, int ldb, S beta, T *c, int ldc
#define GEMM_CALL order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
#define GEMV_ARGS(T) int order, int trans, int rows, int cols, T alpha, const T *w, int ldw, \\
    const T *x, int incx, T beta, T *y, int incy
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
void scipy_cblas_sgemm(GEMM_ARGS(float, float));
void scipy_cblas_dgemm(GEMM_ARGS(double, double));
void scipy_cblas_cgemm(GEMM_ARGS(void, const void *));
void scipy_cblas_sgemv(GEMV_ARGS(float));
void scipy_cblas_dgemv(GEMV_ARGS(double));
#define REAL_GEMM(P, T) \\
void cblas_##P##gemm(GEMM_ARGS(T, T)) { \\
    int plain = order == ROW_MAJOR && (ta == NO_TRANS || ta == TRANS) && (tb == NO_TRANS || tb == TRANS); \\
    if (plain && m == 1) { \\
        int inc_a = ta == NO_TRANS ? 1 : lda; \\
        if (tb == TRANS) scipy_cblas_##P##gemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1); \\
        else scipy_cblas_##P##gemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1); \\
    } else if (plain && n == 1) { \\
        int inc_b = tb == NO_TRANS ? ldb : 1; \\
        if (ta == NO_TRANS) scipy_cblas_##P##gemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc); \\
        else scipy_cblas_##P##gemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc); \\
    } else { \\
        scipy_cblas_##P##gemm(GEMM_CALL); \\
    } \\
}
REAL_GEMM(s, float)
REAL_GEMM(d, double)
void cblas_cgemm(GEMM_ARGS(void, const void *)) { scipy_cblas_cgemm(GEMM_CALL); }
"""

_status = "not installed"
_fast = False  # an optimized BLAS now serves MLX's CPU gemm calls
_handles: list[ctypes.CDLL] = []  # kept alive for the life of the process


def status() -> str:
    """Which BLAS MLX's CPU matmuls use in this process, in a few words."""
    return _status


def fast_cpu_gemm() -> bool:
    """Whether float32 matmuls on MLX's CPU go through an optimized BLAS in this process.

    Then a many-row product is faster in float32 through BLAS than in MLX's own CPU
    kernels for bfloat16, float16 and quantized weights (``interp.ops`` uses this).
    """
    return _fast


def install() -> str:
    """Put a fast BLAS under MLX if this platform needs one; return ``status()``."""
    global _status, _fast
    if _status != "not installed":
        return _status
    choice = os.environ.get("PAW_BLAS", "auto").strip()
    if not device.needs_blas_shim():
        _status = "platform default"
    elif "mlx.core" in sys.modules:
        _status = "reference (mlx was imported before paw)"
        warnings.warn("mlx.core was imported before paw, so MLX's CPU matmuls keep the slow reference "
                      "BLAS of MLX's Linux wheel; import paw_mlx (or interp) first", stacklevel=2)
    elif choice == "reference":
        _status = "reference (PAW_BLAS=reference)"
    elif choice not in ("", "auto"):
        _status = _load_standard_library(choice)
    else:
        _status = _load_openblas_shim()
    _fast = not _status.startswith(("reference", "platform"))
    return _status


def _load_standard_library(path: str) -> str:
    """Load a library that exports the standard CBLAS names itself."""
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        lib.cblas_sgemm  # noqa: B018 - fails if the symbol is missing
    except (OSError, AttributeError) as exc:
        return f"reference (PAW_BLAS={path} unusable: {exc})"
    _handles.append(lib)
    return f"{Path(path).name} (PAW_BLAS)"


def _load_openblas_shim() -> str:
    # OpenBLAS's idle workers spin for 2**28 cycles after each call by default, which on a
    # small machine takes a core away from MLX's own thread between matmuls; 2**4 cycles is
    # the least it accepts (docs/speed.md). Read when the library loads: set before the import.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        import scipy_openblas32
    except ImportError:
        return "reference (scipy-openblas32 not installed)"
    libdir = Path(scipy_openblas32.get_lib_dir())
    library = libdir / f"lib{scipy_openblas32.get_library()}.so"
    if not library.exists():
        return f"reference ({library} missing)"
    try:
        _handles.append(_load_shim(library))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"reference (could not build the OpenBLAS shim: {exc})"
    return f"OpenBLAS {scipy_openblas32.__version__}"


def _load_shim(library: Path) -> ctypes.CDLL:
    """The shim for ``library``, from the cache when the cached file is ours and intact.

    The cache holds the compiled library and its sha256 beside it, in a directory only
    this user may write. A cached file that is not ours, is writable by others, does not
    match its recorded hash or fails to load is rebuilt, never trusted.
    """
    key = hashlib.sha256(f"{_SHIM_SOURCE}\0{library}".encode()).hexdigest()[:16]
    directory = _private_directory(cache_dir() / "blas")
    shim = directory / f"libpaw_cblas_{key}.so"
    if _trusted(shim):
        try:
            return ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass  # corrupt in a way the hash could not tell (or a foreign machine's build): rebuild
    _build_shim(library, shim)
    return ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)


def _private_directory(path: Path) -> Path:
    """``path`` created 0700 (or made so) if this user owns it; else a new private temporary one."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
            if info.st_mode & 0o077:
                os.chmod(path, 0o700)
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="paw-blas-"))


def _hash_file(shim: Path) -> Path:
    return shim.with_name(shim.name + ".sha256")


def _trusted(shim: Path) -> bool:
    """Whether the cached ``shim`` is a file of ours, writable only by us, matching its recorded sha256."""
    try:
        info = shim.lstat()
        recorded = _hash_file(shim).read_text(encoding="ascii").strip()
        digest = hashlib.sha256(shim.read_bytes()).hexdigest()
    except (OSError, UnicodeDecodeError):
        return False
    return (stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022
            and digest == recorded)


def _build_shim(library: Path, shim: Path) -> None:
    """Compile the shim for ``library`` to ``shim`` and record its sha256 beside it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    with tempfile.TemporaryDirectory(dir=shim.parent) as tmp:
        source = Path(tmp) / "shim.c"
        source.write_text(_SHIM_SOURCE, encoding="utf-8")
        built = Path(tmp) / shim.name
        subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(built),
             f"-L{library.parent}", f"-l:{library.name}", f"-Wl,-rpath,{library.parent}"],
            check=True, capture_output=True, timeout=120,
        )
        os.chmod(built, 0o700)
        recorded = Path(tmp) / _hash_file(shim).name
        recorded.write_text(hashlib.sha256(built.read_bytes()).hexdigest() + "\n", encoding="ascii")
        # atomic renames: concurrent first imports never see half a file; a reader that
        # sees the new library with the old hash rebuilds rather than trusting it
        os.replace(built, shim)
        os.replace(recorded, _hash_file(shim))
