"""The OpenBLAS shim under MLX: in use on Linux, and every gemm it forwards is right."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from interp import blas, device
from tests.child_env import child_env

# No test here reaches a device predicate (interp/device.py), checked by instrumenting them
# (docs/devices.md): the fake-Mac pass would run the same branches again, so it leaves them out.
pytestmark = pytest.mark.not_fake_mac_pass

ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not device.needs_blas_shim(), reason="the shim is for MLX's Linux CPU wheel")


@pytest.fixture(autouse=True)
def on_the_cpu():
    """The shim serves MLX's CPU backend: products here run there also on a GPU machine."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


def _status_in_fresh_process(code: str, **env: str) -> str:
    """Run ``code`` in a new interpreter (the shim must load before MLX) and return its last line."""
    full_env = child_env(**env)
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


@linux_only
def test_openblas_is_in_use_under_this_test_process():
    assert blas.status().startswith("OpenBLAS"), blas.status()


@linux_only
@pytest.mark.parametrize("dtype", [mx.float32, mx.float64, mx.complex64])
@pytest.mark.parametrize("shape", [(1, 37, 53), (29, 41, 1), (1, 23, 1), (16, 64, 96), (130, 77, 190)])
def test_forwarded_gemm_matches_numpy(dtype, shape):
    """sgemm/dgemm/cgemm with every transpose combination MLX passes (row-major, strided).

    One-row and one-column shapes take the shim's gemv route for float32 and float64.
    """
    m, k, n = shape
    rng = np.random.default_rng(m * k + n)
    a_np = rng.standard_normal((m, k))
    b_np = rng.standard_normal((k, n))
    if dtype == mx.complex64:
        a_np = a_np + 1j * rng.standard_normal((m, k))
        b_np = b_np + 1j * rng.standard_normal((k, n))
    a = mx.array(a_np).astype(dtype)
    b = mx.array(b_np).astype(dtype)
    at = mx.array(np.ascontiguousarray(a_np.T)).astype(dtype)  # a stored transposed
    bt = mx.array(np.ascontiguousarray(b_np.T)).astype(dtype)
    # the values MLX holds (it may round on the way in), multiplied in double precision
    want = np.array(a).astype(np.complex128) @ np.array(b).astype(np.complex128)
    if dtype != mx.complex64:
        want = want.real
    tol = 1e-10 if dtype == mx.float64 else 1e-4
    for got in (a @ b, at.T @ b, a @ bt.T, at.T @ bt.T):
        np.testing.assert_allclose(np.array(got), want, rtol=tol, atol=tol * np.sqrt(k))


@linux_only
@pytest.mark.parametrize("m", [2, 3, 5, 8, 23, 24, 25])
@pytest.mark.parametrize(("k", "n"), [(1, 5), (7, 2), (13, 100), (576, 961), (1536, 64)])
def test_few_row_products_match_numpy(m, k, n):
    """``x @ w.T`` with 2-24 rows takes the shim's own kernel (25 rows: OpenBLAS's gemm): row
    groups of 4, 2 and 1, weight rows in threes with a ragged end, k not a multiple of the
    vector width, one thread for small weights and several for large ones; strided rows
    (a column slice of a wider x); ``addmm``'s alpha and beta."""
    rng = np.random.default_rng(1000 * m + n + k)
    wide = rng.standard_normal((m, k + 3), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    bias = rng.standard_normal((m, n), dtype=np.float32)
    x = mx.array(wide)[:, 1:k + 1]  # rows k + 3 apart
    want = wide[:, 1:k + 1].astype(np.float64) @ w.T.astype(np.float64)
    atol = 1e-4 * np.sqrt(k)
    np.testing.assert_allclose(np.array(x @ mx.array(w).T), want, rtol=1e-4, atol=atol)
    got = mx.addmm(mx.array(bias), x, mx.array(w).T, alpha=0.5, beta=2.0)
    np.testing.assert_allclose(np.array(got), 0.5 * want + 2.0 * bias, rtol=1e-4, atol=atol)



@linux_only
def test_few_row_products_split_between_more_threads_than_cores():
    """Five threads (OMP_NUM_THREADS) on a weight big enough for each: ragged shares of the
    weight's rows, every column written once and right."""
    code = ("import interp, mlx.core as mx, numpy as np; mx.set_default_device(mx.cpu); "
            "rng = np.random.default_rng(0); "
            "x = rng.standard_normal((6, 577), dtype=np.float32); "
            "w = rng.standard_normal((1001, 577), dtype=np.float32); "
            "got = np.array(mx.array(x) @ mx.array(w).T); want = x.astype(np.float64) @ w.T.astype(np.float64); "
            "print(float(np.abs(got - want).max()))")
    assert float(_status_in_fresh_process(code, OMP_NUM_THREADS="5")) < 1e-3

@linux_only
@pytest.mark.parametrize(("value", "seen", "warned"), [("off", "0", False), (" No ", "0", False), ("ON", "1", False),
                                                       ("maybe", "1", True)])
def test_few_rows_switch_takes_words_and_names_a_bad_one(value, seen, warned):
    code = ("import warnings, os; warnings.simplefilter('always'); import interp, interp.blas as b; "
            "print(b.status(), os.environ['PAW_BLAS_FEW_ROWS'])")
    full_env = child_env(PAW_BLAS_FEW_ROWS=value)
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip().startswith("OpenBLAS") and out.stdout.strip().endswith(f" {seen}")
    assert ("PAW_BLAS_FEW_ROWS='maybe' is not 0/1" in out.stderr) == warned, out.stderr

@linux_only
def test_batched_matmul_through_the_shim():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5, 8, 16), dtype=np.float32), rng.standard_normal((3, 5, 16, 4), dtype=np.float32)
    np.testing.assert_allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)


@linux_only
def test_paw_blas_reference_keeps_mlx_own_blas():
    code = "import interp, interp.blas as b; print(b.status())"
    assert _status_in_fresh_process(code, PAW_BLAS="reference") == "reference (PAW_BLAS=reference)"


@linux_only
def test_unusable_library_falls_back_with_the_reason(tmp_path):
    missing = tmp_path / "libnothing.so"
    code = ("import interp, interp.blas as b, mlx.core as mx; mx.set_default_device(mx.cpu); "
            "print(b.status(), (mx.ones((2, 3)) @ mx.ones((3, 2))).sum().item())")
    line = _status_in_fresh_process(code, PAW_BLAS=str(missing))
    assert line.startswith(f"reference (PAW_BLAS={missing} unusable") and line.endswith(" 12.0")


@linux_only
def test_mlx_imported_first_is_reported_not_hidden():
    code = "import mlx.core, interp.blas as b; print(b.install())"
    assert _status_in_fresh_process(code) == "reference (mlx was imported before paw)"


@linux_only
def test_shim_is_cached_and_rebuilt_into_a_fresh_cache(tmp_path):
    code = "import interp, interp.blas as b; print(b.status())"
    assert _status_in_fresh_process(code, PAW_CACHE=str(tmp_path)).startswith("OpenBLAS")
    built = list((tmp_path / "blas").glob("libpaw_cblas_*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "blas").iterdir() if p.is_dir()]
    assert _status_in_fresh_process(code, PAW_CACHE=str(tmp_path)).startswith("OpenBLAS")
    assert list((tmp_path / "blas").glob("libpaw_cblas_*.so")) == built


@linux_only
def test_shim_cache_is_private_and_a_bad_cached_file_is_rebuilt(tmp_path):
    """A garbage file in the cache fell back to the slow BLAS for good; a planted library was loaded."""
    code = "import interp, interp.blas as b; print(b.status())"
    assert _status_in_fresh_process(code, PAW_CACHE=str(tmp_path)).startswith("OpenBLAS")
    cache = tmp_path / "blas"
    assert cache.stat().st_mode & 0o777 == 0o700
    shim = next(cache.glob("*.so"))
    for planted in (b"garbage", Path(sys.executable).read_bytes()):
        shim.write_bytes(planted)
        os.chmod(cache, 0o777)
        assert _status_in_fresh_process(code, PAW_CACHE=str(tmp_path)).startswith("OpenBLAS")
        assert shim.read_bytes() != planted and shim.read_bytes()[:4] == b"\x7fELF"
        assert cache.stat().st_mode & 0o777 == 0o700


def _shim_built_by(tmp_path, name: str, script: str) -> bytes:
    """Build the shim in a fresh cache with ``script`` as the C compiler (``$CC`` in it: the
    real one); check that the BLAS is OpenBLAS and a few-row product is right; the library."""
    compiler = tmp_path / name
    compiler.write_text("#!/bin/sh\n" + script.replace("$CC", shutil.which("cc") or shutil.which("gcc")) + "\n")
    compiler.chmod(0o755)
    code = ("import interp, interp.blas as b, mlx.core as mx, numpy as np; mx.set_default_device(mx.cpu); "
            "x = np.arange(12, dtype=np.float32).reshape(3, 4); w = np.ones((5, 4), np.float32); "
            "print(b.status(), np.array_equal(np.array(mx.array(x) @ mx.array(w).T), x @ w.T))")
    line = _status_in_fresh_process(code, PAW_CACHE=str(tmp_path / "cache"), CC=str(compiler))
    assert line.startswith("OpenBLAS") and line.endswith(" True"), line
    return next((tmp_path / "cache" / "blas").glob("*.so")).read_bytes()


@linux_only
def test_a_compiler_without_the_kernel_s_builtins_keeps_the_rest_of_the_shim(tmp_path):
    """GCC before 12 lacks ``__builtin_shufflevector``: the shim is built without the few-row
    kernel (as ``FEW_ROWS_KERNEL=0`` does here), few-row products go to OpenBLAS, right."""
    shim = _shim_built_by(tmp_path, "cc-older", 'exec $CC -DFEW_ROWS_KERNEL=0 "$@"')
    assert b"GOMP" not in shim and b"few_rows_nt" not in shim


@linux_only
def test_a_compiler_without_openmp_still_builds_the_shim(tmp_path):
    """The few-row kernel's threads are OpenMP; a compiler that refuses ``-fopenmp`` gets the
    shim built without them (the kernel on one thread), not the slow reference BLAS."""
    shim = _shim_built_by(tmp_path, "cc-without-openmp",
                          'for a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec $CC "$@"')
    assert b"GOMP" not in shim and b"few_rows_nt" in shim
