"""`cpu_exp`: exp and what is built on it as compiled arithmetic for MLX's CPU backend.

Accuracy against float64 NumPy on dense grids (edges included: -inf, NaN, values
past the float32 exponent range, tiny tanh arguments), gradients, and the choice
`ops` makes (rows of `ops.CPU_EXP_MIN_ROW` elements, CPU branches, x86-64 Linux).
The model tests rerun with these kernels everywhere: tests/test_cpu_exp_models.py."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import cpu_exp, ops

EPS32 = 2.0**-24  # float32 unit roundoff


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def test_exp_error_bound_on_its_whole_range():
    """Relative error <= 3e-7 + |x| 2^-23: the polynomial's own error, and x log2(e)
    in float32 (log2(e) and the product each rounded; MLX's exp pays the same),
    on 2M points of [-87, 88]."""
    x = mx.linspace(-87.0, 88.0, 2_000_001)
    ref = np.exp(f64(x))
    err = np.abs(f64(cpu_exp.exp(x)) - ref) / ref
    bound = 3e-7 + 2 * np.abs(f64(x)) * EPS32
    assert (err <= bound).all(), (f64(x)[np.argmax(err / bound)], err.max())
    small = np.abs(f64(x)) < 1  # where the rounding of x log2(e) does not matter
    assert err[small].max() < 3e-7


def test_exp_edges():
    """Exactly 0 from the exponent range's end down and at -inf; 1 at 0; NaN stays
    NaN; inf past 88.72 (from 88.03 up to there it stays at 2^127)."""
    x = mx.array([-math.inf, -1e30, -200.0, -87.8, 0.0, -0.0, math.nan, 88.5, 88.8, 1e30, math.inf])
    got = f64(cpu_exp.exp(x))
    assert (got[:4] == 0).all() and got[4] == got[5] == 1.0 and math.isnan(got[6])
    assert got[7] == 2.0**127 and (got[8:] == math.inf).all()


def test_softcap_is_tanh_to_a_few_ulps_even_near_zero():
    """tanh near 0 by expm1 (no cancellation): relative error < 6e-7 everywhere,
    odd, and exact at 0 and past saturation."""
    y = np.concatenate([np.linspace(-40, 40, 800_001), [1e-30, -1e-30, 1e-12, 3e-8, 0.0, 1e4, -1e4]])
    x = mx.array(y.astype(np.float32)) * 30.0  # the logit softcap's 30
    got = f64(cpu_exp.softcap(x, 30.0)) / 30.0
    ref = np.tanh(f64(x) / 30.0)
    nz = ref != 0
    assert (np.abs(got - ref)[nz] / np.abs(ref[nz])).max() < 6e-7
    assert (got[~nz] == 0).all() and (got[-2:] == [1.0, -1.0]).all()
    np.testing.assert_array_equal(f64(cpu_exp.softcap(-x, 30.0)), -f64(cpu_exp.softcap(x, 30.0)))


def gelu64(x: np.ndarray) -> np.ndarray:
    """0.5 x (1 + tanh(z)) as x / (1 + e^-2z): the same function, without the
    cancellation of 1 + tanh(z) for large negative z in float64 too."""
    z = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    with np.errstate(over="ignore"):
        return x / (1 + np.exp(-2 * z))


def test_gelu_and_geglu_match_float64():
    x = mx.linspace(-30.0, 30.0, 600_001)
    x64 = f64(x)
    ref = gelu64(x64)
    got = f64(cpu_exp.gelu_tanh(x))
    # relative, as exp's: x / (1 + e^-2z) carries e's error, 3e-7 plus |t| times a
    # few float32 roundings (t = -2z log2(e) itself takes four here; capped at
    # 80 log2(e), where the formula leaves x e^-80 for ~0)
    t = np.minimum(1.5957691216057308 * np.abs(x64 + 0.044715 * x64**3), 80) * math.log2(math.e)
    capped = (x64 < 0) & (t >= 80 * math.log2(math.e))
    live = (np.abs(ref) > 1e-30) & ~capped
    assert (np.abs(got - ref)[live] <= (4e-7 + 4 * t[live] * EPS32) * np.abs(ref[live])).all()
    np.testing.assert_allclose(got[capped], x64[capped] / (1 + math.exp(80)), rtol=2e-5)
    u = mx.random.normal(x.shape, key=mx.random.key(0))
    np.testing.assert_allclose(f64(cpu_exp.geglu(x, u)), got * f64(u), rtol=EPS32, atol=1e-37)  # one rounding more
    # large |x|: no overflow; x itself, or x / (1 + e^80) past the exponent's cap (as MLX's path)
    edge = f64(cpu_exp.gelu_tanh(mx.array([1e6, -1e6, 1e30, -1e30])))
    assert edge[0] == 1e6 and edge[2] == np.float32(1e30)
    np.testing.assert_allclose(edge[[1, 3]], [-1e6 / (1 + math.exp(80)), -1e30 / (1 + math.exp(80))], rtol=1e-5)


def test_geglu_rounds_once_to_the_inputs_dtype():
    """bf16 in: computed in float32 (the float32 kernel's result to the bit), rounded once."""
    g = mx.random.normal((3, 4096), key=mx.random.key(1)).astype(mx.bfloat16)
    u = mx.random.normal((3, 4096), key=mx.random.key(2)).astype(mx.bfloat16)
    out = cpu_exp.geglu(g, u)
    assert out.dtype == mx.bfloat16
    wide = cpu_exp.geglu(g.astype(mx.float32), u.astype(mx.float32))
    assert mx.array_equal(out, wide.astype(mx.bfloat16)).item()
    assert np.abs(f64(wide) - gelu64(f64(g)) * f64(u)).max() < 1e-5


def test_sigmoid_and_silu_match_float64():
    x = mx.concatenate([mx.linspace(-100.0, 100.0, 400_001), mx.array([1e4, -1e4, math.inf, math.nan])])
    x64 = f64(x)[:-4]
    ref = 1 / (1 + np.exp(-x64))
    sig, silu = f64(cpu_exp.sigmoid(x)), f64(cpu_exp.silu(x))
    rel = np.abs(sig[:-4] - ref) / ref
    assert rel[x64 > -80].max() < 3e-7 + 2 * 80 * EPS32 and np.abs(sig[:-4] - ref).max() < 1e-7
    # below x = -88 the exponent's clamp leaves x / (1 + 2^127) where x e^x is smaller still
    bound = (4e-7 + 2 * np.abs(x64) * EPS32) * np.abs(x64 * ref) + np.abs(x64) * 6e-39
    assert (np.abs(silu[:-4] - x64 * ref) <= bound).all()
    assert sig[-4] == 1.0 and sig[-3] < 1e-38 and sig[-2] == 1.0 and math.isnan(sig[-1])
    assert silu[-4] == 1e4 and silu[-2] == math.inf


def test_softmax_matches_float64_and_masks_exactly():
    s = mx.random.normal((4, 8, 3000), key=mx.random.key(3)) * 8
    masked = mx.where(mx.random.uniform(shape=s.shape, key=mx.random.key(4)) < 0.3, -math.inf, s)
    got = f64(cpu_exp.softmax(masked))
    x = f64(masked)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    ref = e / e.sum(axis=-1, keepdims=True)
    assert np.abs(got - ref).max() < 5e-6  # the float32 sum of 3000 terms (mx.softmax: 2.3e-6 here too)
    assert (got[np.isinf(x)] == 0).all()
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=5e-6)
    assert np.isnan(f64(cpu_exp.softmax(mx.full((1, 5), -math.inf)))).all()  # as mx.softmax


def test_logsumexp_matches_float64_with_masked_and_empty_rows():
    x = mx.random.normal((3, 262144), key=mx.random.key(6)) * 6
    x = mx.concatenate([x, mx.full((1, 262144), -math.inf)])
    x = mx.where(mx.arange(262144) % 3 == 0, -math.inf, x)  # a grammar's mask
    got = f64(cpu_exp.logsumexp(x))
    x64 = f64(x)[:3]
    m = x64.max(axis=-1, keepdims=True)
    ref = m + np.log(np.exp(x64 - m).sum(axis=-1, keepdims=True))
    # float32 sums of 175K terms: 3e-5-6e-5 off here, to the digit what mx.logsumexp gives
    assert got.shape == (4, 1) and np.abs(got[:3] - ref).max() < 1e-4 and got[3, 0] == -math.inf


@pytest.mark.skipif(not ops.CPU_EXP_PLATFORM, reason="cpu_exp is taken on x86-64 Linux only")
def test_ops_take_these_kernels_from_the_row_length_on_the_cpu(monkeypatch):
    """By the row (last axis) length, not the element count: a batch of short rows
    keeps MLX's ops (a row is computed alike alone, batched, or in a verify block);
    float64 and the GPU branches keep them too."""
    calls = []
    for name in ("geglu", "gelu_tanh", "softcap", "softmax", "logsumexp", "sigmoid", "silu"):
        real = getattr(cpu_exp, name)
        monkeypatch.setattr(cpu_exp, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))

    def all_ops(x):
        ops.geglu(x, x), ops.gelu_tanh(x), ops.softcap(x, 30.0), ops.softmax(x), ops.logsumexp(x)
        ops.sigmoid(x), ops.silu(x)

    n = ops.CPU_EXP_MIN_ROW
    for x in (mx.ones((64, n - 1)), mx.ones((1, n), mx.float64)):
        all_ops(x)
    assert calls == []
    all_ops(mx.ones((1, n)))
    assert calls == ["geglu", "gelu_tanh", "softcap", "softmax", "logsumexp", "sigmoid", "silu"]
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", True)
    all_ops(mx.ones((1, n)))
    assert len(calls) == 7
    # the results, and their gradients, agree with MLX's own ops on either side
    x = mx.random.normal((2, n), key=mx.random.key(5)) * 4
    w = mx.random.normal((2, n), key=mx.random.key(6))
    fns = [
        lambda x: ops.geglu(x, w),
        lambda x: ops.softcap(x, 3.0),
        lambda x: ops.softmax(x) * w,
        ops.logsumexp,
        ops.sigmoid,
        lambda x: ops.silu(x) * w,
    ]
    results = {}
    for gpu in (False, True):
        monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", gpu)
        results[gpu] = [(f(x), mx.grad(lambda x, f=f: f(x).sum())(x)) for f in fns]
    for (a, da), (b, db) in zip(results[False], results[True]):
        np.testing.assert_allclose(f64(a), f64(b), rtol=3e-6, atol=1e-7)
        np.testing.assert_allclose(f64(da), f64(db), rtol=1e-5, atol=1e-6)


def test_exp_gradient_is_exp():
    x = mx.linspace(-80.0, 80.0, 10_001)
    d = mx.grad(lambda x: cpu_exp.exp(x).sum())(x)
    np.testing.assert_allclose(f64(d), f64(cpu_exp.exp(x)), rtol=2e-6)


def test_one_trace_for_every_shape():
    """The kernels are compiled shapeless: a decode step's scores grow by a key every
    token, and a trace per shape (kept for the process's life) cost ~0.7-4 ms a
    token, growing.  A compiled function's Python body runs once per trace."""
    traces = []

    def body(x):
        traces.append(x.shape)
        return x * 2 + 1

    kernel = cpu_exp._kernel(body)
    for S in range(500, 540):
        mx.eval(kernel(mx.ones((1, 8, 1, S))))
    assert len(traces) == 1
    mx.eval(cpu_exp.exp_rows(mx.ones((1, 8, 1, 777))), cpu_exp.geglu(mx.ones((3, 999)), mx.ones((3, 999))))
