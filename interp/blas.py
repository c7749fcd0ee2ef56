"""A fast BLAS under MLX's CPU backend on Linux.

MLX's Linux CPU wheel (``mlx[cpu]``) bundles netlib's *reference* BLAS, and every float32
matmul MLX runs on the CPU is a ``cblas_sgemm`` call into it. OpenBLAS does the same
products many times faster, a matrix-vector product as much as a prefill (docs/speed.md).

OpenBLAS comes from PyPI as ``scipy-openblas32``, whose symbols carry a ``scipy_`` prefix,
so it cannot stand in for the reference library by itself. ``install()`` builds (once,
cached, with the system C compiler, as MLX itself does for compiled CPU kernels) a small
shared library that exports the three CBLAS gemm entry points MLX calls and forwards them
to OpenBLAS (one-row products to its gemv; products of a few rows by a weight to a kernel
of its own, below), and loads it with ``RTLD_GLOBAL``. The dynamic linker then resolves MLX's
``cblas_sgemm`` to the shim, because the global scope is searched before a library's own
dependencies. That only works if it happens before ``mlx.core`` is first imported, which is
why ``interp/__init__.py`` calls ``install()`` and why every paw package imports ``interp``
first.

The compiled shim is cached in ``$PAW_CACHE/blas`` (a directory only its user may write)
with its sha256 beside it; a cached file that does not match, or does not load, is
rebuilt rather than trusted.

``PAW_BLAS=reference`` keeps MLX's own BLAS; ``PAW_BLAS_FEW_ROWS=0`` keeps the shim but
sends few-row products to OpenBLAS's gemm; ``PAW_BLAS=/path/libopenblas.so`` loads a
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
#
# Products of a few rows (2 to SMALL_ROWS, 24) by a weight stored [out, in] (``x @ w.T``: a
# short prompt, a call after a cached prefix, a batched decode step) go to the shim's own
# kernel: OpenBLAS's gemm copies ("packs") the weight before using it and runs such a
# product on one thread, so reading a weight that is not in cache costs it about twice a
# gemv's time. The kernel streams each weight once, three rows at a time, prefetching the
# next three, and takes the rows of x four at a time against them (12 vector
# accumulators); the output columns are split between OpenMP threads, one per 65,536
# weight elements at most, so tiny products (attention's per-head ones) stay on one
# thread and a many-core machine does not wake every core for a small weight.
_SHIM_SOURCE = """\
#include <stddef.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#define GEMM_ARGS(T, S) int order, int ta, int tb, int m, int n, int k, S alpha, const T *a, \\
    int lda, const T *b, int ldb, S beta, T *c, int ldc
#define GEMM_CALL order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
#define GEMV_ARGS(T) int order, int trans, int rows, int cols, T alpha, const T *w, int ldw, \\
    const T *x, int incx, T beta, T *y, int incy
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { SMALL_ROWS = 24, THREADED_SIZE = 1 << 16 };
void scipy_cblas_sgemm(GEMM_ARGS(float, float));
void scipy_cblas_dgemm(GEMM_ARGS(double, double));
void scipy_cblas_cgemm(GEMM_ARGS(void, const void *));
void scipy_cblas_sgemv(GEMV_ARGS(float));
void scipy_cblas_dgemv(GEMV_ARGS(double));

/* The kernel needs __builtin_shufflevector (GCC 12+, clang); an older compiler builds the
   shim without it, and these products stay with OpenBLAS's gemm. */
#ifndef FEW_ROWS_KERNEL
#if defined(__clang__) || __GNUC__ >= 12
#define FEW_ROWS_KERNEL 1
#else
#define FEW_ROWS_KERNEL 0
#endif
#endif
#if FEW_ROWS_KERNEL
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef float v4 __attribute__((vector_size(16)));
#define LOAD(p) (*(const v8 *)(p))
#define HALVES(v) (__builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7))
/* {sum(a), sum(b), sum(c), 0} of three 8-lane accumulators */
#define SUMS3(a, b, c) ({ v4 a4 = HALVES(a), b4 = HALVES(b), c4 = HALVES(c), z4 = {0, 0, 0, 0}; \\
    v4 u0 = __builtin_shufflevector(a4, b4, 0, 4, 2, 6) + __builtin_shufflevector(a4, b4, 1, 5, 3, 7); \\
    v4 u1 = __builtin_shufflevector(c4, z4, 0, 4, 2, 6) + __builtin_shufflevector(c4, z4, 1, 5, 3, 7); \\
    __builtin_shufflevector(u0, u1, 0, 1, 4, 5) + __builtin_shufflevector(u0, u1, 2, 3, 6, 7); })
#if defined(__x86_64__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

/* dots[i][j] = x[i] . w[j] over k, for MR rows of x and 3 rows of w; prefetch (or NULL)
   holds the next three rows of w, read into cache while these are used. */
#define TILE(MR) \\
static inline void tile##MR(int k, const float *const *x, const float *const *w, \\
                            const float *const *prefetch, float dots[][3]) { \\
    v8 s[MR][3]; \\
    for (int i = 0; i < MR; ++i) s[i][0] = s[i][1] = s[i][2] = (v8){0}; \\
    int p = 0; \\
    for (; p + 8 <= k; p += 8) { \\
        if (prefetch && !(p & 15)) for (int j = 0; j < 3; ++j) __builtin_prefetch(prefetch[j] + p, 0, 0); \\
        v8 w0 = LOAD(w[0] + p), w1 = LOAD(w[1] + p), w2 = LOAD(w[2] + p); \\
        for (int i = 0; i < MR; ++i) { \\
            v8 u = LOAD(x[i] + p); \\
            s[i][0] += u * w0; s[i][1] += u * w1; s[i][2] += u * w2; \\
        } \\
    } \\
    for (int i = 0; i < MR; ++i) { \\
        v4 t = SUMS3(s[i][0], s[i][1], s[i][2]); \\
        for (int j = 0; j < 3; ++j) { \\
            float e = t[j]; \\
            for (int q = p; q < k; ++q) e += x[i][q] * w[j][q]; \\
            dots[i][j] = e; \\
        } \\
    } \\
}
TILE(4)
TILE(2)
TILE(1)

/* Columns j0..j1 of C = alpha * A W^T + beta * C; A [m, k] (lda), W [n, k] (ldw). */
VECTOR_CLONES
static void few_rows_nt(int m, int j0, int j1, int k, float alpha, const float *a, int lda,
                        const float *w, int ldw, float beta, float *c, int ldc) {
    float dots[4][3];
    for (int j = j0; j < j1; j += 3) {
        const float *rows[3], *next[3];
        for (int q = 0; q < 3; ++q) {
            rows[q] = w + (size_t)(j + q < j1 ? j + q : j1 - 1) * ldw;
            next[q] = w + (size_t)(j + 3 + q < j1 ? j + 3 + q : j1 - 1) * ldw;
        }
        int cols = j1 - j < 3 ? j1 - j : 3;
        for (int i = 0; i < m;) {
            int mr = m - i >= 4 ? 4 : m - i >= 2 ? 2 : 1;
            const float *x[4];
            for (int q = 0; q < mr; ++q) x[q] = a + (size_t)(i + q) * lda;
            const float *const *prefetch = i == 0 && j + 3 < j1 ? next : NULL;
            if (mr == 4) tile4(k, x, rows, prefetch, dots);
            else if (mr == 2) tile2(k, x, rows, prefetch, dots);
            else tile1(k, x, rows, prefetch, dots);
            for (int q = 0; q < mr; ++q)
                for (int jj = 0; jj < cols; ++jj) {
                    float *out = c + (size_t)(i + q) * ldc + j + jj;
                    *out = alpha * dots[q][jj] + (beta == 0 ? 0 : beta * *out);  /* beta 0: C unread */
                }
            i += mr;
        }
    }
}

static void few_rows_sgemm(int m, int n, int k, float alpha, const float *a, int lda, const float *w,
                           int ldw, float beta, float *c, int ldc) {
    int blocks = (n + 2) / 3;
#ifdef _OPENMP
    size_t share = (size_t)n * k / THREADED_SIZE;  /* a thread per 65,536 weight elements at most */
    int threads = omp_get_max_threads();
    if ((size_t)threads > share) threads = share > 0 ? (int)share : 1;
    if (threads > blocks) threads = blocks;
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int j0 = 3 * (blocks * t / nt), j1 = 3 * (blocks * (t + 1) / nt);
        if (j1 > n) j1 = n;
        if (j0 < j1) few_rows_nt(m, j0, j1, k, alpha, a, lda, w, ldw, beta, c, ldc);
    }
#else
    few_rows_nt(m, 0, n, k, alpha, a, lda, w, ldw, beta, c, ldc);
#endif
}

/* PAW_BLAS_FEW_ROWS=0 sends these products to OpenBLAS's gemm (to measure the kernel) */
static int few_rows_on(void) {
    static int on = -1;
    if (on < 0) { const char *e = getenv("PAW_BLAS_FEW_ROWS"); on = !(e && e[0] == '0'); }
    return on;
}
#else
static int few_rows_on(void) { return 0; }
static void few_rows_sgemm(int m, int n, int k, float alpha, const float *a, int lda, const float *w,
                           int ldw, float beta, float *c, int ldc) {
    scipy_cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, alpha, a, lda, w, ldw, beta, c, ldc);
}
#endif

/* what the kernel takes: x @ w.T, x row-major with 2 to SMALL_ROWS rows */
#define FEW_ROWS_FIT (ta == NO_TRANS && tb == TRANS && m > 1 && m <= SMALL_ROWS && n > 1 && k > 0 && few_rows_on())

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
    } else if (FEW_ROWS_##P && plain && FEW_ROWS_FIT) { \\
        few_rows_sgemm(m, n, k, alpha, (const float *)a, lda, (const float *)b, ldb, beta, (float *)c, ldc); \\
    } else { \\
        scipy_cblas_##P##gemm(GEMM_CALL); \\
    } \\
}
#define FEW_ROWS_s 1
#define FEW_ROWS_d 0
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


_SWITCH_WORDS = {"0": "0", "off": "0", "false": "0", "no": "0", "1": "1", "on": "1", "true": "1", "yes": "1"}


def _normalize_few_rows_switch() -> None:
    """``PAW_BLAS_FEW_ROWS`` as the shim reads it (``0`` or ``1``); another word is named in
    a warning and leaves the kernel on, rather than meaning something by accident."""
    value = os.environ.get("PAW_BLAS_FEW_ROWS")
    if value is None:
        return
    word = _SWITCH_WORDS.get(value.strip().lower())
    if word is None:
        warnings.warn(f"PAW_BLAS_FEW_ROWS={value!r} is not 0/1 (off/on); the few-row kernel stays on",
                      stacklevel=3)
        word = "1"
    os.environ["PAW_BLAS_FEW_ROWS"] = word


def _load_openblas_shim() -> str:
    # OpenBLAS's idle workers spin for 2**28 cycles after each call by default, which on a
    # small machine takes a core away from MLX's own thread between matmuls; 2**4 cycles is
    # the least it accepts (docs/speed.md). Read when the library loads: set before the import.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    _normalize_few_rows_switch()
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
        command = [compiler, "-O3", "-shared", "-fPIC", str(source), "-o", str(built),
                   f"-L{library.parent}", f"-l:{library.name}", f"-Wl,-rpath,{library.parent}"]
        try:
            subprocess.run([*command, "-fopenmp"], check=True, capture_output=True, timeout=120)
        except subprocess.CalledProcessError:  # a compiler without OpenMP: the kernel runs on one thread
            subprocess.run(command, check=True, capture_output=True, timeout=120)
        os.chmod(built, 0o700)
        recorded = Path(tmp) / _hash_file(shim).name
        recorded.write_text(hashlib.sha256(built.read_bytes()).hexdigest() + "\n", encoding="ascii")
        # atomic renames: concurrent first imports never see half a file; a reader that
        # sees the new library with the old hash rebuilds rather than trusting it
        os.replace(built, shim)
        os.replace(recorded, _hash_file(shim))
