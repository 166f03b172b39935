"""`cpu_exp`: exp and what is built on it as compiled arithmetic for MLX's CPU backend.

Accuracy against float64 NumPy on dense grids (edges included: -inf, NaN, values
past the float32 exponent range, tiny tanh arguments), the choice `ops` makes
(from `ops.CPU_EXP_MIN` elements, CPU branches only), and the parity, rollback,
speculative and low-precision tests run again with the threshold at 0, so that
the tiny test models take these kernels everywhere."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import cpu_exp, ops
from gemma4_mlx.checkpoint.load import load_model

import test_audio
import test_dtypes
import test_multimodal
import test_parity
import test_speculative
from helpers.mtp_pairs import PAIRS
from test_audio import ckpt  # noqa: F401  (fixture)
from test_multimodal import inputs  # noqa: F401  (fixture)

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
    """Exactly 0 from the exponent range's end down and at -inf; 1 at 0; NaN stays NaN."""
    x = mx.array([-math.inf, -1e30, -200.0, -87.8, 0.0, -0.0, math.nan])
    got = f64(cpu_exp.exp(x))
    assert (got[:4] == 0).all() and got[4] == got[5] == 1.0 and math.isnan(got[6])


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
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_gelu_and_geglu_match_float64():
    x = mx.linspace(-30.0, 30.0, 600_001)
    ref = gelu64(f64(x))
    got = f64(cpu_exp.gelu_tanh(x))
    assert np.abs(got - ref).max() < 1e-6 * np.abs(ref).max()
    big = np.abs(ref) > 1e-3
    assert (np.abs(got - ref)[big] / np.abs(ref[big])).max() < 2e-6
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


def test_ops_take_these_kernels_from_the_threshold_on_the_cpu(monkeypatch):
    calls = []
    for name in ("geglu", "gelu_tanh", "softcap", "softmax", "logsumexp", "sigmoid", "silu"):
        real = getattr(cpu_exp, name)
        monkeypatch.setattr(cpu_exp, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    n = ops.CPU_EXP_MIN
    big, small = mx.ones((1, n)), mx.ones((1, n - 1))
    for x in (small, big):
        ops.geglu(x, x), ops.gelu_tanh(x), ops.softcap(x, 30.0), ops.softmax(x), ops.logsumexp(x)
        ops.sigmoid(x), ops.silu(x)
    assert calls == ["geglu", "gelu_tanh", "softcap", "softmax", "logsumexp", "sigmoid", "silu"]
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", True)
    ops.geglu(big, big), ops.softmax(big)
    assert len(calls) == 7
    # and the results agree with MLX's own ops on either side
    x = mx.random.normal((2, n), key=mx.random.key(5)) * 4
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", False)
    fast = [ops.geglu(x, x), ops.softcap(x, 30.0), ops.softmax(x), ops.logsumexp(x), ops.sigmoid(x), ops.silu(x)]
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", True)
    slow = [ops.geglu(x, x), ops.softcap(x, 30.0), ops.softmax(x), ops.logsumexp(x), ops.sigmoid(x), ops.silu(x)]
    for a, b in zip(fast, slow):
        np.testing.assert_allclose(f64(a), f64(b), rtol=3e-6, atol=1e-7)


# -- the model tests again, these kernels at every size ---------------------------------
@pytest.fixture
def everywhere(monkeypatch):
    monkeypatch.setattr(ops, "CPU_EXP_MIN", 0)


def test_full_forward(everywhere, loaded):
    test_parity.test_full_forward(loaded)


def test_prefill_then_decode_past_window(everywhere, loaded):
    test_parity.test_prefill_then_decode_past_window(loaded)


def test_greedy_64_tokens_identical(everywhere, loaded):
    test_parity.test_greedy_64_tokens_identical(loaded)


@pytest.mark.parametrize("name", list(PAIRS))
def test_speculative_lossless(everywhere, pairs, name):
    test_speculative.test_real_drafter_and_auto_draft_length_are_lossless(pairs, name)


@pytest.mark.parametrize("dtype", test_dtypes.LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("family", ["dense", "moe"])
def test_low_precision_forward(everywhere, dtype, family):
    test_dtypes.test_forward_matches_float32(dtype, family)


@pytest.fixture(scope="module", params=["bidir_w16"])
def case(request, tmp_path_factory):
    return test_multimodal.Case(request.param, tmp_path_factory.mktemp(request.param))


def test_multimodal_logits(everywhere, case, inputs):  # noqa: F811
    test_multimodal.test_logits_parity(case, inputs)


def test_audio_tower(everywhere, ckpt):  # noqa: F811
    test_audio.test_padded_batch_parity(ckpt, load_model(ckpt[1], dtype="float32")[0].audio)
