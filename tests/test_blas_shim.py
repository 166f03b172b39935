"""The one-row GEMV shim (gemma4_mlx/_blas_shim.py, _gemv_shim.c): every product
with one row or one column gives what OpenBLAS's sgemv gives for it, bit for bit
(the route), and what numpy gives up to rounding (the arithmetic), for every
transpose, leading dimension, alpha and beta; products with more rows are OpenBLAS's
sgemm, bit for bit; MLX's own products go through it; without a compiler it stays
out of the way, saying why."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import _blas, _blas_shim

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim is for Linux's OpenBLAS")
ROW, NO, T = 101, 111, 112
P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


@pytest.fixture(scope="module")
def libs():
    if not _blas.loaded_from:
        pytest.skip("Debian's OpenBLAS is not installed")
    if shutil.which(os.environ.get("CC") or "cc"):
        assert _blas.gemv_shim, _blas.gemv_shim_off  # a compiler is here: the shim must be in use
    if not _blas.gemv_shim:
        pytest.skip(f"no GEMV shim: {_blas.gemv_shim_off}")
    shim, blas = ctypes.CDLL(_blas.gemv_shim), ctypes.CDLL(_blas.loaded_from)
    shim.cblas_sgemm.argtypes = blas.cblas_sgemm.argtypes = [I, I, I, I, I, I, F, P, I, P, I, F, P, I]
    return shim, blas.cblas_sgemm


def routed(shim) -> int:
    return ctypes.c_ulong.in_dll(shim, "gemv_shim_routed").value


def gemm(fn, ta, tb, M, N, K, alpha, beta, seed, c_fill):
    """fn's product of operands stored with spare columns (leading dimensions past
    their widths), into C inside a wider buffer: (C's buffer, the float64 reference)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, M + 3) if ta == T else (M, K + 3)).astype(np.float32)
    b = rng.standard_normal((N, K + 2) if tb == T else (K, N + 2)).astype(np.float32)
    c = np.full((M, N + 5), c_fill, np.float32)
    op_a = a[:, :M].T if ta == T else a[:, :K]
    op_b = b[:, :K].T if tb == T else b[:, :N]
    want = alpha * (op_a.astype(np.float64) @ op_b) + (beta * c[:, :N] if beta else 0)
    fn(ROW, ta, tb, M, N, K, alpha, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], beta, c.ctypes.data,
       c.shape[1])  # fmt: skip
    return c, want


@pytest.mark.parametrize("ta", [NO, T])
@pytest.mark.parametrize("tb", [NO, T])
@pytest.mark.parametrize("shape", [(1, 37, 19), (41, 1, 23), (1, 1, 7)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 2.0)])
def test_one_row_or_column_goes_through_sgemv(libs, ta, tb, shape, alpha, beta):
    shim, _ = libs
    M, N, K = shape
    before = routed(shim)
    c_fill = np.nan if beta == 0 else 1.5  # gemm ignores C when beta is 0: NaN there must not leak
    c, want = gemm(shim.cblas_sgemm, ta, tb, M, N, K, alpha, beta, M * 100 + N, c_fill)
    assert routed(shim) == before + 1
    np.testing.assert_allclose(c[:, :N], want, rtol=1e-5, atol=1e-5)
    past = c[:, N:]  # nothing written past C's columns
    assert np.isnan(past).all() if beta == 0 else (past == 1.5).all()


@pytest.mark.parametrize("ta,tb", [(NO, NO), (NO, T), (T, NO), (T, T)])
def test_more_rows_stay_with_sgemm(libs, ta, tb):
    shim, sgemm = libs
    before = routed(shim)
    ours, want = gemm(shim.cblas_sgemm, ta, tb, 3, 5, 9, 0.5, 2.0, 1, 1.5)
    assert routed(shim) == before
    theirs, _ = gemm(sgemm, ta, tb, 3, 5, 9, 0.5, 2.0, 1, 1.5)
    assert np.array_equal(ours, theirs)
    np.testing.assert_allclose(ours[:, :5], want, rtol=1e-5, atol=1e-5)


def test_mlx_products_go_through_it(libs):
    """MLX's own one-row products (batched, and against a transposed weight) are routed."""
    shim, _ = libs
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 64, 48)).astype(np.float32)
    x = rng.standard_normal((48,)).astype(np.float32)
    before = routed(shim)
    cols = np.array(mx.array(w) @ mx.array(x)[:, None])[..., 0]  # MLX may fold the batch into one product
    assert routed(shim) > before
    before = routed(shim)
    rows = np.array(mx.array(x)[None] @ mx.array(w[0]).T)[0]
    assert routed(shim) == before + 1
    np.testing.assert_allclose(cols, w @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows, w[0] @ x, rtol=1e-5, atol=1e-5)


def test_without_a_compiler_it_says_why(tmp_path, monkeypatch):
    path, why = _blas_shim.build(cc=str(tmp_path / "no-cc"), folder=tmp_path / "c")
    assert path is None and "could not compile _gemv_shim.c with" in why and str(tmp_path / "no-cc") in why
    blocked = tmp_path / "file"
    blocked.write_text("")  # the cache "folder" is a file
    path, why = _blas_shim.build(folder=blocked / "c")
    assert path is None and str(blocked / "c") in why
    assert not list(tmp_path.glob("**/.gemv_shim*"))  # no temporary left behind


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler")
def test_a_built_shim_is_reused(tmp_path):
    first, why = _blas_shim.build(cc="cc", folder=tmp_path)
    assert first is not None and first.exists(), why
    again, _ = _blas_shim.build(cc=str(tmp_path / "no-cc"), folder=tmp_path)  # no compile needed
    assert again == first


def test_the_switch_turns_it_off():
    code = "import gemma4_mlx, gemma4_mlx._blas as b; print(b.describe())"
    env = {**os.environ, "GEMMA4_MLX_NO_GEMV_SHIM": "1"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if _blas.loaded_from:
        assert off.stdout.strip().endswith("sgemm only (no GEMV shim: GEMMA4_MLX_NO_GEMV_SHIM is set)"), off.stderr
    else:
        assert off.stdout.startswith("MLX default")
