"""The CPU's per-expert GEMMs (`segments`) read each expert's weights where they lie.

MLX's integer index (`w[e]`) is a gather that copies: on 26B-A4B's experts the copy
took longer than the product (1.05 against 0.29 ms), and with 64 experts of one
layer in flight at once their copies made segments 5x slower than the sorted
gather.  Peak memory tells a copy from a view without timing anything."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx.models.moe import ExpertLinear
from gemma4_mlx.models.quantized import entry

E, OUT, IN = 8, 512, 1024  # 2 MB per float32 expert


def extra_bytes(fn) -> int:
    """Peak memory over what was allocated before, while fn's result is evaluated."""
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = fn()
    mx.eval(out)
    return mx.get_peak_memory() - base


@pytest.mark.parametrize("quantized", [False, True])
def test_a_segment_reads_its_expert_in_place(quantized):
    lin = ExpertLinear(E, IN, OUT)
    if quantized:
        lin = lin.to_quantized(group_size=64, bits=8)
    mx.eval(lin.parameters())
    x = mx.random.normal((2, IN))
    mx.eval(x)
    smallest = min(v.nbytes for v in lin.parameters().values()) // E  # one expert's scales when quantized
    out_bytes = 2 * OUT * 4
    assert extra_bytes(lambda: lin.segment(x, 3)) < out_bytes + smallest // 2  # the product's output only
    dense = lin.weight if not quantized else mx.dequantize(lin.weight, lin.scales, lin.biases, 64, 8)
    want = np.asarray(x) @ np.asarray(dense[3]).T
    np.testing.assert_allclose(np.asarray(lin.segment(x, 3)), want, rtol=1e-4, atol=1e-4)


def test_entry_is_the_indexed_entry():
    a = mx.arange(2 * 3 * 4).reshape(2, 3, 4)
    for i in range(-2, 2):
        assert entry(a, i).shape == (3, 4) and mx.array_equal(entry(a, i), a[i])
