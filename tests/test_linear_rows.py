"""ops.linear's CPU branches by row count: one row as a column, a few rows as
W @ x^T (contiguous from 4 rows, except for head-shaped matrices), more as x @ W^T."""

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import ops

LAYER = (96, 64)  # out, in
HEAD = (64 * (ops.FEW_ROWS_MAX_ASPECT + 1), 64)  # far taller than wide: a vocabulary head


@pytest.mark.parametrize("shape", [LAYER, HEAD])
@pytest.mark.parametrize("lead", [(), (2,)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9])
def test_equals_x_times_w_transposed(shape, lead, rows):
    w = mx.random.normal(shape, key=mx.random.key(0))
    x = mx.random.normal((*lead, rows, shape[1]), key=mx.random.key(1))
    got = ops.linear(x, w)
    assert got.shape == (*lead, rows, shape[0])
    want = np.array(x, np.float64) @ np.array(w, np.float64).T
    np.testing.assert_allclose(np.array(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_four_to_eight_rows_copy_x_transposed_contiguous(monkeypatch):
    copies = []
    real = mx.contiguous
    monkeypatch.setattr(ops.mx, "contiguous", lambda a, *k: copies.append(a.shape) or real(a, *k))
    layer, head = mx.zeros(LAYER), mx.zeros(HEAD)
    for rows in range(1, 11):
        ops.linear(mx.ones((rows, 64)), layer)
        ops.linear(mx.ones((rows, 64)), head)
    assert copies == [(64, rows) for rows in range(ops.GEMV_MAX_ROWS + 1, ops.FEW_ROWS_MAX + 1)]
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", True)
    ops.linear(mx.ones((5, 64)), layer)
    assert len(copies) == ops.FEW_ROWS_MAX - ops.GEMV_MAX_ROWS
