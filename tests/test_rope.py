"""RoPE's CPU branch (`ops.rope`): angles computed once per forward and shared by
the layers, the rotation in one compiled kernel — bit-identical to MLX's own
`fast.rope` in float32, which the GPU branch calls."""

from __future__ import annotations

import mlx.core as mx
import pytest

from gemma4_mlx import ops
from gemma4_mlx.models.rope import RoPE

ROPES = {
    "default": (256, {"rope_type": "default", "rope_theta": 10000.0}),
    "proportional": (512, {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25}),
}


def _reference(rope: RoPE, x, offset):
    return mx.fast.rope(x, rope.dims, traditional=False, base=rope.base, scale=1.0, offset=offset, freqs=rope._freqs)


@pytest.mark.parametrize("kind", list(ROPES))
@pytest.mark.parametrize("offset", [0, 37, "scalar", "rows"])
@pytest.mark.parametrize("T", [1, 5, 70])
def test_cpu_rope_equals_mlx_rope(kind, offset, T):
    assert ops.cpu_branches()
    d, params = ROPES[kind]
    rope = RoPE(d, params)
    offset = {"rows": mx.array([3, 100, 0]), "scalar": mx.array(37)}.get(offset, offset)
    x = mx.random.normal((3, 4, T, d))
    assert mx.array_equal(rope(x, offset), _reference(rope, x, offset))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_low_precision_rounds_once(dtype):
    """bf16/f16 input: rotated in float32 and rounded once — equal to the float32
    rotation rounded, and never further from it than MLX's own CPU fallback (which
    rounds the angles and products to the input's dtype: up to 0.016 apart in bf16)."""
    d, params = ROPES["default"]
    rope = RoPE(d, params)
    x = mx.random.normal((1, 2, 3, d)).astype(dtype)
    got = rope(x, 1001)
    exact = rope(x.astype(mx.float32), 1001)
    assert got.dtype == dtype
    assert mx.array_equal(got, exact.astype(dtype))
    theirs = _reference(rope, x, 1001).astype(mx.float32)
    assert mx.abs(got.astype(mx.float32) - exact).max() <= mx.abs(theirs - exact).max()


def test_angles_shared_within_a_forward_and_renewed_after():
    d, params = ROPES["proportional"]
    rope = RoPE(d, params)
    x = mx.random.normal((2, 4, 1, d))
    rows = mx.array([5, 8])
    rope(x, rows)
    memo = rope._memo
    rope(x, rows)  # the next layer: same offset object
    assert rope._memo is memo
    for offset in (mx.array([5, 8]), 6):  # the next forward: a new offset
        rope(x, offset)
        assert rope._memo is not memo
        assert mx.array_equal(rope(x, offset), _reference(rope, x, offset))
        memo = rope._memo
    rope._freqs = rope._freqs * 2  # changed frequencies are noticed
    assert mx.array_equal(rope(x, 6), _reference(rope, x, 6))
