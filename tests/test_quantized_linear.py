"""ops_quantized.quantized_linear: MLX's quantized kernel, or on the CPU from CPU_DEQUANT_ROWS
rows on, the weight dequantized in row blocks and multiplied in float32."""

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import ops, ops_quantized

MODES = [("affine", 64, 4), ("affine", 32, 8), ("mxfp8", 32, 8), ("mxfp4", 32, 4), ("nvfp4", 16, 4)]
OUT, IN = 37, 128  # 37 rows: blocks of 5 leave a short last block


def quantized(mode, group, bits, seed=0):
    w = mx.random.normal((OUT, IN), key=mx.random.key(seed))
    codes, scales, *b = mx.quantize(w, group_size=group, bits=bits, mode=mode)
    return codes, scales, (b[0] if b else None)


def reference(x, q, mode, group, bits):
    """x @ W.T in float64 over the exactly dequantized weight."""
    w = np.array(mx.dequantize(*q, group_size=group, bits=bits, mode=mode, dtype=mx.float32), np.float64)
    return np.array(x.astype(mx.float32), np.float64) @ w.T


@pytest.mark.parametrize("mode,group,bits", MODES)
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_equals_the_product_of_the_dequantized_weight(monkeypatch, mode, group, bits, rows):
    monkeypatch.setattr(ops_quantized, "DEQUANT_BLOCK", IN * 5)  # blocks of 5 weight rows, joined
    q = quantized(mode, group, bits)
    x = mx.random.normal((2, rows, IN), key=mx.random.key(1))
    want = reference(x, q, mode, group, bits)
    got = np.array(ops_quantized.quantized_linear(x, *q, group, bits, mode), np.float64)
    assert got.shape == (2, rows, OUT)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    kernel = mx.quantized_matmul(x, *q, transpose=True, group_size=group, bits=bits, mode=mode)
    np.testing.assert_allclose(got, np.array(kernel, np.float64), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode,group,bits,scales", [(*m, mx.float32) for m in MODES] + [("affine", 64, 4, mx.bfloat16)])
def test_the_row_count_picks_the_path(monkeypatch, mode, group, bits, scales):
    calls = []
    real = ops_quantized._dequantized_linear
    monkeypatch.setattr(ops_quantized, "_dequantized_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    q = quantized(mode, group, bits)
    if scales != mx.float32 and mode == "affine":  # bf16 scales: mx.dequantize, the later crossover
        q = (q[0], q[1].astype(scales), q[2].astype(scales))
    unpacked = mode == "affine" and scales == mx.float32
    first = ops_quantized.UNPACKED_DEQUANT_ROWS if unpacked else ops_quantized.CPU_DEQUANT_ROWS[mode]
    for rows in (first - 1, first):
        ops_quantized.quantized_linear(mx.ones((rows, IN)), *q, group, bits, mode)
    assert calls == [(first, IN)]
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", True)  # a GPU always runs the kernel
    ops_quantized.quantized_linear(mx.ones((64, IN)), *q, group, bits, mode)
    assert calls == [(first, IN)]


def test_bf16_rows_accumulate_in_float32():
    """bf16 activations: the dequantized path returns float32 (callers cast), within
    bf16 input rounding of the float64 product, not bf16 accumulation's error."""
    q = quantized("affine", 64, 4)
    x = mx.random.normal((16, IN), key=mx.random.key(2)).astype(mx.bfloat16)
    got = ops_quantized.quantized_linear(x, *q, 64, 4, "affine")
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got, np.float64), reference(x, q, "affine", 64, 4), rtol=1e-5, atol=1e-4)


def test_blocks_are_dequantized_one_after_another(monkeypatch):
    """Each block's dequantization waits for the previous block's product, so only one
    block's float32 copy is alive (the whole copy of a 262K-row head is 1 GiB)."""
    monkeypatch.setattr(ops_quantized, "DEQUANT_BLOCK", IN * 5)
    waits = []
    real = mx.depends
    monkeypatch.setattr(ops.mx, "depends", lambda a, b: waits.append(b.shape) or real(a, b))
    q = quantized("affine", 64, 4)
    ops_quantized.quantized_linear(mx.ones((8, IN)), *q, 64, 4, "affine")
    assert waits == [(8, 5)] * 7  # 8 blocks of <= 5 rows: every block after the first waits


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_unpacked_affine_weights_equal_mlx_dequantize(bits, group, dtype):
    """The whole-array unpack of affine codes gives mx.dequantize's float32 values bit
    for bit; bf16/fp16 scales and biases are widened first (the values q * s + b in
    float32, as the one-row kernel computes them, not each weight rounded to their dtype)."""
    w = mx.random.normal((OUT, 256), key=mx.random.key(3)).astype(dtype)
    codes, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    got = ops_quantized._dequantize_f32(codes, scales, biases, group, bits, "affine")
    s, b = scales.astype(mx.float32), biases.astype(mx.float32)
    want = mx.dequantize(codes, s, b, group_size=group, bits=bits, dtype=mx.float32)
    assert got.dtype == mx.float32 and got.shape == want.shape == (OUT, 256)
    assert mx.array_equal(got, want).item()
