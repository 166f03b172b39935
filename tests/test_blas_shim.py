"""Our cblas_sgemm (gemma4_mlx/_blas_shim.py, _sgemm_shim.c): 1-32 rows times a big
transposed weight (from 9 rows in blocks of up to 8 over weight blocks in L2), 1-8
rows times a big weight as stored, and a big weight times one column, go to our kernel and equal a
float64 product up to float32 rounding for every row count, leading dimension,
tail, thread share, alpha and beta (NaN in C with beta 0 must not leak); every other
product is OpenBLAS's sgemm, bit for bit; MLX's products go through it; without a
compiler it stays out of the way, saying why.  A counter in the shim tells the route."""

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
    why = str(_blas.shim_off)
    environment = "AVX2" in why or why.startswith("could not compile")  # the CPU, an unwritable cache
    if shutil.which(os.environ.get("CC") or "cc") and not environment:
        assert _blas.shim, why  # a compiler is here: the shim must be in use (a compile error fails here)
    if not _blas.shim:
        pytest.skip(f"no BLAS shim: {_blas.shim_off}")
    shim, blas = ctypes.CDLL(_blas.shim), ctypes.CDLL(_blas.loaded_from)
    shim.cblas_sgemm.argtypes = blas.cblas_sgemm.argtypes = [I, I, I, I, I, I, F, P, I, P, I, F, P, I]
    return shim, blas.cblas_sgemm


def compiled(path, *extra: str) -> None:
    """A variant build of the shim's source at `path`; the compiler's own words if it fails."""
    done = _blas_shim.compile_to(path, *extra)
    assert done.returncode == 0, f"cc {' '.join(extra)}: {done.stderr[-2000:]}"


@pytest.fixture(scope="module", params=["native", "avx2"])
def kernels(libs, request, tmp_path_factory):
    """(shim, OpenBLAS's sgemm): the shim in use, and on an AVX-512 CPU one built without
    AVX-512, whose kernels take 8 lanes and AVX2's masked loads."""
    if request.param == "native":
        return libs
    if ctypes.CDLL(_blas.shim).sgemm_shim_lanes() != 16:
        pytest.skip("the shim in use is the AVX2 build")
    path = tmp_path_factory.mktemp("avx2") / "shim.so"
    compiled(path, "-mno-avx512f")
    shim = ctypes.CDLL(str(path))
    assert shim.sgemm_shim_lanes() == 8  # the variant it claims to be
    shim.sgemm_shim_bind.argtypes = [P]
    assert shim.sgemm_shim_bind(ctypes.CDLL(_blas.loaded_from)._handle) == 1
    shim.cblas_sgemm.argtypes = [I, I, I, I, I, I, F, P, I, P, I, F, P, I]
    return shim, libs[1]


def routed(shim) -> int:
    shim.sgemm_shim_routed.restype = ctypes.c_ulong
    return shim.sgemm_shim_routed()


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


@pytest.mark.parametrize("shape,ta,tb", [((1, 1100, 1000), NO, T), ((1100, 1, 1000), NO, T), ((1100, 1, 1000), NO, NO)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 2.0)])
def test_one_row_or_column_of_a_big_weight_takes_our_kernel(libs, shape, ta, tb, alpha, beta):
    """x @ W^T and W @ x (x as a row or as a column with stride 1: a leading
    dimension of 1 is what [K, 1] has)."""
    shim, _ = libs
    M, N, K = shape
    before = routed(shim)
    rng = np.random.default_rng(M + N)
    w = rng.standard_normal((max(M, N), K)).astype(np.float32)
    x = rng.standard_normal(K).astype(np.float32)
    fill = np.nan if beta == 0 else 1.5
    c = np.full((M, N + 2) if M == 1 else (M, 3), fill, np.float32)  # C inside a wider buffer
    out = c[0, :N] if M == 1 else c[:, 0]
    want = alpha * (w.astype(np.float64) @ x) + (beta * out if beta else 0)
    if M == 1:  # x [1, K] @ (W [N, K])^T
        args = (x.ctypes.data, K, w.ctypes.data, K, beta, c.ctypes.data, N + 2)
    else:  # W [M, K] @ x [K, 1] (x's leading dimension 1, or x^T [1, K] transposed), into a column of C
        args = (w.ctypes.data, K, x.ctypes.data, 1 if tb == NO else K, beta, c.ctypes.data, 3)
    shim.cblas_sgemm(ROW, ta, tb, M, N, K, alpha, *args)
    assert routed(shim) == before + 1
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=2e-6 * K)
    rest = c[0, N:] if M == 1 else c[:, 1:]  # nothing written beside C
    assert np.isnan(rest).all() if beta == 0 else (rest == 1.5).all()


@pytest.mark.parametrize("N,K", [(300, 230), (1100, 1000)])
def test_one_row_handed_as_a_transposed_column_takes_our_kernels(libs, N, K):
    """x^T stored [K, 1] with lda 1 is one contiguous row: MLX hands over an MoE pair's
    gathered row so.  With lda > 1 (a real column of a wider matrix) it stays."""
    shim, sgemm = libs
    rng = np.random.default_rng(N)
    w = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((K, 3)).astype(np.float32)
    want = x[:, 0].astype(np.float64) @ w.T
    stored = np.ascontiguousarray(w.T)  # the same weight as stored, [K, N]
    for lda, route in ((1, 1), (3, 0)):
        col = np.ascontiguousarray(x[:, 0]) if lda == 1 else x
        for tb, weight, ldb in ((T, w, K), (NO, stored, N)):
            c = np.full(N + 2, np.nan, np.float32)
            before = routed(shim)
            shim.cblas_sgemm(ROW, T, tb, 1, N, K, 1.0, col.ctypes.data, lda, weight.ctypes.data, ldb, 0.0,
                             c.ctypes.data, N)  # fmt: skip
            assert routed(shim) == before + route * (tb == T or N * K >= 2**17)
            np.testing.assert_allclose(c[:N], want, rtol=1e-5, atol=2e-6 * K)
            assert np.isnan(c[N:]).all()


def _ours(ta, tb, M, N, K) -> bool:
    """Whether our kernel takes gemm()'s product (its x as a column has stride N + 2)."""
    if ta == NO and M <= 8 and tb == NO:  # x @ W as stored ([K, N]), N past a vector
        return N >= 16 and N * K >= 2**17
    return ta == NO and tb == T and (M <= 8 or N == 1) and (N if M <= 8 else M) * K >= 2**16


OTHER_ONE_ROW = [
    (ta, tb, shape)
    for ta in (NO, T)
    for tb in (NO, T)
    for shape in ((1, 37, 19), (41, 1, 23), (1, 1100, 1000), (1100, 1, 1000))
    if not _ours(ta, tb, *shape)
]


@pytest.mark.parametrize("ta,tb,shape", OTHER_ONE_ROW)
def test_other_one_row_products_stay_with_sgemm(libs, ta, tb, shape):
    """Small weights, and the layouts our kernel does not read."""
    shim, sgemm = libs
    M, N, K = shape
    before = routed(shim)
    ours, want = gemm(shim.cblas_sgemm, ta, tb, M, N, K, 0.5, 2.0, M * 100 + N, 1.5)
    assert routed(shim) == before
    theirs, _ = gemm(sgemm, ta, tb, M, N, K, 0.5, 2.0, M * 100 + N, 1.5)
    assert np.array_equal(ours, theirs)
    np.testing.assert_allclose(ours[:, :N], want, rtol=1e-5, atol=2e-6 * K)


FEW_ROWS = [(T, N, K) for N, K in ((1100, 1000), (17, 61703), (515, 2050), (300, 230))]  # from 2**16 floats
FEW_ROWS += [(NO, N, K) for N, K in ((1100, 1000), (17, 8000), (300, 440))]  # as stored: from 2**17 floats


@pytest.mark.parametrize("R", range(1, 9))
@pytest.mark.parametrize("tb,N,K", FEW_ROWS)
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 2.0)])
def test_a_few_rows_times_a_big_weight_take_our_kernels(kernels, R, tb, N, K, alpha, beta):
    """Every row count, W transposed ([N, K]: a linear layer's x @ W^T) or as stored
    ([K, N]: attention's probabilities times V); shares per thread that end mid-group
    or mid-block, single vectors and scalar columns at the end (N = 1100, 17, 515,
    300), K past the vectors' multiple of 8 or 16 (tails); AVX-512's and AVX2's kernels."""
    shim, _ = kernels
    before = routed(shim)
    c_fill = np.nan if beta == 0 else 1.5
    c, want = gemm(shim.cblas_sgemm, NO, tb, R, N, K, alpha, beta, R * 7 + N + tb, c_fill)
    assert routed(shim) == before + 1
    np.testing.assert_allclose(c[:, :N], want, rtol=1e-5, atol=2e-6 * K)
    past = c[:, N:]
    assert np.isnan(past).all() if beta == 0 else (past == 1.5).all()


MANY_ROWS = [9, 12, 13, 16, 17, 23, 25, 31, 32]  # even blocks (12 = 6 + 6), uneven (13 = 7 + 6, 25 = 7 x 3 + 4)


@pytest.mark.parametrize("R", MANY_ROWS)
@pytest.mark.parametrize("N,K", [(1100, 1000), (40, 6000), (515, 2050), (3000, 90)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (0.5, 2.0)])
def test_9_to_32_rows_times_a_transposed_weight_take_our_kernels(kernels, R, N, K, alpha, beta):
    """Rows in blocks of up to 8, the weight in blocks of rows that fit L2: blocks of
    12 weight rows where 256 KB holds 10 (K = 6000 at 9 rows: both row blocks' groups
    must divide it), blocks of many (K = 90) ending mid-share, weights whose last
    block is short; every row's C written once, with alpha and beta."""
    shim, _ = kernels
    before = routed(shim)
    c_fill = np.nan if beta == 0 else 1.5
    c, want = gemm(shim.cblas_sgemm, NO, T, R, N, K, alpha, beta, R * 5 + N, c_fill)
    assert routed(shim) == before + 1
    np.testing.assert_allclose(c[:, :N], want, rtol=1e-5, atol=2e-6 * K)
    past = c[:, N:]
    assert np.isnan(past).all() if beta == 0 else (past == 1.5).all()


def matrix_at(rng, N, K, ldw, offset):
    """[N, K] with leading dimension ldw, starting `offset` floats past a 64-byte
    boundary (MLX's arrays start 8 bytes past one); Inf before it and in the spare
    columns, so a product that reads outside its rows is Inf or NaN."""
    buf = np.full(N * ldw + 32, np.inf, np.float32)
    start = (-buf.ctypes.data % 64) // 4 + offset
    w = buf[start : start + N * ldw].reshape(N, ldw)
    w[:, :K] = rng.standard_normal((N, K))
    return w, buf


@pytest.mark.parametrize("R", [*range(1, 10), 25])  # 9 and 25: a last block of 4 rows, aligned steps
@pytest.mark.parametrize("offset", [0, 1, 2, 7, 15])
def test_weight_rows_at_any_offset_from_a_vector_boundary(kernels, R, offset):
    """With ldw a multiple of 16 every weight row starts at the same offset, and up to
    4 rows the kernel's vectors start at the aligned one: its first step begins below
    k = 0, its last may end past K, both masked.  K past and below the vectors'
    multiple; a K of 17 (first and last step one) and of 9 (below the lead); shares
    that start mid-matrix; one row also as W @ x (a column of C)."""
    shim, _ = kernels
    rng = np.random.default_rng(R * 16 + offset)
    for N, K, ldw in ((1100, 1000, 1008), (515, 2050, 2064), (40, 4096, 4096), (5000, 17, 32), (8000, 9, 16)):
        w, _buf = matrix_at(rng, N, K, ldw, offset)
        x, _xbuf = matrix_at(rng, R, K, K + 16, 16)  # Inf around x's rows too: its masked lanes must be 0
        for alpha, beta in ((1.0, 0.0), (0.5, 2.0)):
            fill = np.nan if beta == 0 else 1.5
            c = np.full((R, N + 3), fill, np.float32)  # 3 spare columns: nothing may be written there
            want = alpha * (x[:, :K].astype(np.float64) @ w[:, :K].T.astype(np.float64))
            want += beta * c[:, :N] if beta else 0
            before = routed(shim)
            shim.cblas_sgemm(
                ROW, NO, T, R, N, K, alpha, x.ctypes.data, K + 16, w.ctypes.data, ldw, beta, c.ctypes.data, N + 3
            )
            assert routed(shim) == before + 1
            np.testing.assert_allclose(c[:, :N], want, rtol=1e-5, atol=2e-6 * K, err_msg=f"N={N} K={K} beta={beta}")
            assert np.isnan(c[:, N:]).all() if beta == 0 else (c[:, N:] == 1.5).all()
            if R == 1:  # W [N, K] @ x [K, 1], into C's first column
                col = np.full((N, 2), fill, np.float32)
                shim.cblas_sgemm(
                    ROW, NO, NO, N, 1, K, alpha, w.ctypes.data, ldw, x.ctypes.data, 1, beta, col.ctypes.data, 2
                )
                assert routed(shim) == before + 2
                np.testing.assert_allclose(col[:, 0], want[0], rtol=1e-5, atol=2e-6 * K, err_msg=f"W @ x, K={K}")


@pytest.mark.parametrize(
    "ta,tb,M,N,K",
    [(NO, NO, 3, 5, 9), (NO, T, 3, 5, 9), (T, NO, 3, 5, 9), (T, T, 3, 5, 9)]  # small
    + [(T, NO, 4, 1100, 1000), (T, T, 4, 1100, 1000), (NO, T, 33, 1100, 1000), (NO, NO, 9, 1100, 1000)]  # too many
    + [(NO, T, 4, 255, 256), (NO, NO, 4, 255, 512)]  # below 2**16 floats (2**17 as stored)
    + [(NO, T, 16, 300, 12289), (NO, T, 32, 300, 6145)]  # 9-32 rows of over 3 * 2**16 floats
    + [(NO, NO, 4, 7, 20000)],  # x @ W as stored, narrower than a vector
)
def test_the_rest_stays_with_sgemm(libs, ta, tb, M, N, K):
    shim, sgemm = libs
    before = routed(shim)
    ours, want = gemm(shim.cblas_sgemm, ta, tb, M, N, K, 0.5, 2.0, 1, 1.5)
    assert routed(shim) == before
    theirs, _ = gemm(sgemm, ta, tb, M, N, K, 0.5, 2.0, 1, 1.5)
    assert np.array_equal(ours, theirs)
    np.testing.assert_allclose(ours[:, :N], want, rtol=1e-5, atol=2e-6 * K)


def test_alpha_0_stays_with_sgemm(libs):
    """BLAS reads neither operand when alpha is 0 (0 * Inf would be NaN)."""
    shim, sgemm = libs
    before = routed(shim)
    ours, _ = gemm(shim.cblas_sgemm, NO, T, 4, 1100, 1000, 0.0, 2.0, 5, 1.5)
    assert routed(shim) == before
    theirs, _ = gemm(sgemm, NO, T, 4, 1100, 1000, 0.0, 2.0, 5, 1.5)
    assert np.array_equal(ours, theirs)


def test_mlx_products_go_through_it(libs):
    """MLX's own products of a big weight: one row and a few (a linear layer's
    x @ W.T), and the weight times a column (W @ x); a small one stays with sgemm."""
    shim, _ = libs
    rng = np.random.default_rng(3)
    big = rng.standard_normal((2048, 512)).astype(np.float32)  # 2**20 floats
    for rows in (1, 5):
        xs = rng.standard_normal((rows, 512)).astype(np.float32)
        before = routed(shim)
        out = np.array(mx.array(xs) @ mx.array(big).T)
        assert routed(shim) == before + 1
        np.testing.assert_allclose(out, xs @ big.T, rtol=1e-5, atol=1e-3)
    v = rng.standard_normal((512, 256)).astype(np.float32)  # x @ W as stored (attention's p @ V)
    before = routed(shim)
    np.testing.assert_allclose(np.array(mx.array(xs) @ mx.array(v)), xs @ v, rtol=1e-5, atol=1e-3)
    assert routed(shim) == before + 1
    x = rng.standard_normal((512, 1)).astype(np.float32)
    before = routed(shim)
    np.testing.assert_allclose(np.array(mx.array(big) @ mx.array(x)), big @ x, rtol=1e-5, atol=1e-3)
    assert routed(shim) == before + 1
    before = routed(shim)
    np.array(mx.array(big[:100]) @ mx.array(x))
    assert routed(shim) == before


def test_without_a_compiler_it_says_why(tmp_path, monkeypatch):
    path, why = _blas_shim.build(cc=str(tmp_path / "no-cc"), folder=tmp_path / "c")
    assert path is None and "could not compile _sgemm_shim.c with" in why and str(tmp_path / "no-cc") in why
    blocked = tmp_path / "file"
    blocked.write_text("")  # the cache "folder" is a file
    path, why = _blas_shim.build(folder=blocked / "c")
    assert path is None and str(blocked / "c") in why
    assert not list(tmp_path.glob("**/.sgemm_shim*"))  # no temporary left behind


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler")
def test_a_built_shim_is_reused_if_it_is_the_users_own(tmp_path):
    folder = tmp_path / "cache"
    first, why = _blas_shim.build(cc="cc", folder=folder)
    assert first is not None and first.exists(), why
    again, _ = _blas_shim.build(cc=str(tmp_path / "no-cc"), folder=folder)  # no compile needed
    assert again == first
    first.chmod(0o777)  # anyone could have written it
    path, why = _blas_shim.build(folder=folder)
    assert path is None and why == f"{first} is not the user's own file; not loaded"


@pytest.mark.skipif(not shutil.which("cc") or not _blas.loaded_from, reason="no C compiler or OpenBLAS")
def test_a_cached_shim_that_does_not_load_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path, _ = _blas_shim.build()
    path.write_bytes(b"not a shared object")
    loaded, why = _blas_shim.load(_blas.loaded_from)
    assert loaded == str(path) and why is None and path.read_bytes()[:4] == b"\x7fELF"


def test_the_switch_turns_it_off():
    code = "import gemma4_mlx, gemma4_mlx._blas as b; print(b.describe())"
    env = {**os.environ, "GEMMA4_MLX_NO_BLAS_SHIM": "1"}
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if _blas.loaded_from:
        assert off.stdout.strip().endswith("its sgemm for every product (no shim: GEMMA4_MLX_NO_BLAS_SHIM is set)")
    else:
        assert off.stdout.startswith("MLX default")


# The pool (_sgemm_shim.c, "the pool"): its workers stay between products, sleep when
# idle, are the parent's alone after a fork, and serve one caller at a time.  Each case
# runs in its own process, so that a hang fails the case instead of the suite.
POOL = r"""
import ctypes, os, sys, threading, time
import numpy as np
from gemma4_mlx import _blas

P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
shim = ctypes.CDLL(sys.argv[1])  # the loaded shim, or one built to sleep at once
shim.sgemm_shim_bind.argtypes = [P]
assert shim.sgemm_shim_bind(ctypes.CDLL(_blas.loaded_from)._handle) == 1
shim.cblas_sgemm.argtypes = [I, I, I, I, I, I, F, P, I, P, I, F, P, I]
rng = np.random.default_rng(0)
W = rng.standard_normal((1100, 512)).astype(np.float32)  # shares for two threads or more
X = rng.standard_normal((3, 512)).astype(np.float32)
WANT = X.astype(np.float64) @ W.T.astype(np.float64)


def product():
    c = np.full((3, 1100), np.nan, np.float32)
    shim.cblas_sgemm(101, 111, 112, 3, 1100, 512, 1.0, X.ctypes.data, 512, W.ctypes.data, 512, 0.0,
                     c.ctypes.data, 1100)
    return bool(np.abs(c - WANT).max() < 1e-3)


def workers():
    return shim.sgemm_shim_workers()
"""


def pool_threads() -> int:
    """The threads the shim's products use (OpenBLAS's count, at most the shim's
    MAX_THREADS); skips where that is one: no pool is started."""
    n = min(ctypes.CDLL(_blas.loaded_from).openblas_get_num_threads(), 64)
    if n < 2:
        pytest.skip("OpenBLAS runs one thread here: the shim starts no pool")
    return n


@pytest.fixture(scope="module", params=["spinning", "sleeping"])
def pool(libs, request, tmp_path_factory):
    """(the shim to load, OpenBLAS's thread count): the one in use, whose waits spin
    first, and one built with SPIN_NS 0, whose every wait sleeps on the futex."""
    n = pool_threads()
    if request.param == "spinning":
        return _blas.shim, n
    path = tmp_path_factory.mktemp("spin0") / "shim.so"
    compiled(path, "-DSPIN_NS=0")
    return str(path), n


def run_pool(pool, case: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", POOL + case, pool[0]], capture_output=True, text=True, timeout=120, cwd=os.getcwd()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_pool_stays_between_products_and_wakes_from_sleep(pool):
    """Idle past its spin (3 ms), a worker sleeps on its futex; the next product must
    wake it.  The same workers serve every product."""
    out = run_pool(
        pool,
        """
results = []
for pause in (0, 0.01, 0, 0.05, 0.002) * 4:
    results.append(product())
    time.sleep(pause)
print(all(results), workers())
""",
    )
    assert out == f"True {pool[1] - 1}"


def test_a_forked_child_starts_its_own_pool(pool):
    """The parent's workers do not exist in a forked child: its first product must start
    new ones instead of waiting for the parent's."""
    out = run_pool(
        pool,
        """
assert product() and workers() > 0
started = workers()
pid = os.fork()
if pid == 0:
    os._exit(0 if product() and product() and workers() == started else 1)
for _ in range(600):
    got, status = os.waitpid(pid, os.WNOHANG)
    if got:
        print("child", os.waitstatus_to_exitcode(status), "parent", product())
        break
    time.sleep(0.05)
else:
    os.kill(pid, 9)
    print("the child hung")
""",
    )
    assert out == "child 0 parent True"


def test_callers_on_several_threads_share_it(pool):
    """One caller owns the pool at a time; the others run their products alone."""
    out = run_pool(
        pool,
        """
bad = []
def caller():
    bad.extend(i for i in range(150) if not product())
threads = [threading.Thread(target=caller, daemon=True) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join(timeout=60)
print("hung" if any(t.is_alive() for t in threads) else f"wrong {len(bad)}")
""",
    )
    assert out == "wrong 0"


def test_a_big_openblas_product_sends_spinning_workers_to_sleep(libs, tmp_path):
    """An idle worker spins (here: 10 s) until a product big enough for OpenBLAS's own
    threads starts; then it sleeps at once instead of taking a core from them.  A small
    OpenBLAS product (one thread) leaves it spinning.  A spin set to 0 at run time
    (`sgemm_shim_set_spin_ns`) sends it to sleep after the next product."""
    n = pool_threads()
    path = tmp_path / "shim.so"
    compiled(path, "-DSPIN_NS=10000000000LL")
    out = run_pool(
        (str(path), n),
        """
shim.sgemm_shim_sleeps.restype = ctypes.c_ulong

def openblas(M, N, K):  # M > 8 rows: never one of the shim's routes
    a, b = np.ones((M, K), np.float32), np.ones((N, K), np.float32)
    c = np.zeros((M, N), np.float32)
    shim.cblas_sgemm(101, 111, 112, M, N, K, 1.0, a.ctypes.data, K, b.ctypes.data, K, 0.0, c.ctypes.data, N)
    assert c[0, 0] == K

def asleep_after(wait):
    time.sleep(wait)
    return shim.sgemm_shim_sleeps()

assert product()
spinning = asleep_after(0.05)
openblas(16, 16, 16)  # 4,096 multiply-adds
after_small = asleep_after(0.05)
openblas(64, 512, 512)
for _ in range(200):
    if asleep_after(0.01) - after_small >= workers():
        break
parked = asleep_after(0) - after_small == workers()
shim.sgemm_shim_set_spin_ns.argtypes = [ctypes.c_longlong]
shim.sgemm_shim_set_spin_ns(0)  # as `_blas.short_spin` sets it, shorter: no spin at all
before = asleep_after(0)
assert product()
for _ in range(200):
    if asleep_after(0.01) - before >= workers():
        break
print(spinning, after_small, parked, asleep_after(0) - before >= workers())
""",
    )
    assert out == "0 0 True True"


def test_a_distributed_rank_spins_briefly():
    """Ranks may share the cores: `_blas.short_spin` (called by `ranks.start`) sets the
    shim's spin from its default to SHARED_CORES_SPIN_NS."""
    code = """
import ctypes
from gemma4_mlx import _blas
lib = ctypes.CDLL(_blas.shim)
lib.sgemm_shim_spin_ns.restype = ctypes.c_longlong
before = lib.sgemm_shim_spin_ns()
_blas.short_spin()
print(before, lib.sgemm_shim_spin_ns())
"""
    if not _blas.shim:
        pytest.skip("no shim here")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["3000000", str(_blas.SHARED_CORES_SPIN_NS)], done.stderr[-2000:]
