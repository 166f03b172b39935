"""ops.linear's CPU branches by row count and form (ops.CPU_FORMS for one row,
ops.FEW_ROW_FORMS for a few): one row as a column in "columns"; a few rows as
W @ x^T in "columns" (x^T a transposed view) and "columns-copied" (x^T copied
contiguous from 4 rows), except for head-shaped matrices; more rows, and the "rows"
form, as x @ W^T."""

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import ops

LAYER = (96, 64)  # out, in
HEAD = (64 * (ops.FEW_ROWS_MAX_ASPECT + 1), 64)  # far taller than wide: a vocabulary head


FORM_PAIRS = [("rows", "rows"), ("columns", "columns-copied"), ("columns", "columns"), ("columns", "rows")]


@pytest.fixture(params=FORM_PAIRS, ids=["/".join(p) for p in FORM_PAIRS])
def form(request, monkeypatch):
    """The one-row form, with the few-row form of the pair set too."""
    monkeypatch.setattr(ops, "_cpu_form", request.param[0])
    monkeypatch.setattr(ops, "_few_form", request.param[1])
    monkeypatch.setattr(ops, "_shape_forms", {})
    return request.param[0]


@pytest.fixture
def columns(monkeypatch):
    monkeypatch.setattr(ops, "_cpu_form", "columns")
    monkeypatch.setattr(ops, "_few_form", "columns-copied")
    monkeypatch.setattr(ops, "_shape_forms", {})


@pytest.mark.parametrize("shape", [LAYER, HEAD])
@pytest.mark.parametrize("lead", [(), (2,)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9])
def test_equals_x_times_w_transposed(form, shape, lead, rows):
    w = mx.random.normal(shape, key=mx.random.key(0))
    x = mx.random.normal((*lead, rows, shape[1]), key=mx.random.key(1))
    got = ops.linear(x, w)
    assert got.shape == (*lead, rows, shape[0])
    want = np.array(x, np.float64) @ np.array(w, np.float64).T
    np.testing.assert_allclose(np.array(got, np.float64), want, rtol=1e-5, atol=1e-5)


def test_four_to_eight_rows_copy_x_transposed_contiguous(columns, monkeypatch):
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
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", False)
    for few in ("rows", "columns"):  # x @ W^T, and W @ x^T with the transposed view
        monkeypatch.setattr(ops, "_few_form", few)
        ops.linear(mx.ones((5, 64)), layer)
    assert len(copies) == ops.FEW_ROWS_MAX - ops.GEMV_MAX_ROWS


def test_each_row_count_takes_its_own_form(monkeypatch):
    """One row follows the one-row form, 2 to FEW_ROWS_MAX the few-row form."""
    products = []
    real = ops.mx.matmul

    def matmul(a, b):
        products.append("W @ x" if a.shape == LAYER else "x @ W^T")
        return real(a, b)

    monkeypatch.setattr(ops.mx, "matmul", matmul)
    monkeypatch.setattr(mx.array, "__matmul__", lambda a, b: matmul(a, b))
    monkeypatch.setattr(ops, "_shape_forms", {})
    layer = mx.zeros(LAYER)
    for one, few in (("columns", "rows"), ("rows", "columns"), ("rows", "columns-copied")):
        monkeypatch.setattr(ops, "_cpu_form", one)
        monkeypatch.setattr(ops, "_few_form", few)
        products.clear()
        for rows in (1, 2, 4, ops.FEW_ROWS_MAX, ops.FEW_ROWS_MAX + 1):
            ops.linear(mx.ones((rows, 64)), layer)
        as_few = "x @ W^T" if few == "rows" else "W @ x"
        want = ["W @ x" if one == "columns" else "x @ W^T"] + [as_few] * 3 + ["x @ W^T"]
        assert products == want, (one, few)


def test_a_shape_timed_apart_takes_its_own_one_row_form(monkeypatch):
    """A weight shape the load timed on its own (ops.set_cpu_form's `shapes`) takes
    its form for one row; other shapes, and a few rows of it, do not."""
    products = []
    real = ops.mx.matmul
    other = (LAYER[0] + 8, LAYER[1])

    def matmul(a, b):
        products.append("W @ x" if a.shape in (LAYER, other) else "x @ W^T")
        return real(a, b)

    monkeypatch.setattr(ops.mx, "matmul", matmul)
    monkeypatch.setattr(mx.array, "__matmul__", lambda a, b: matmul(a, b))
    monkeypatch.setattr(ops, "_cpu_form", "rows")
    monkeypatch.setattr(ops, "_few_form", "rows")
    monkeypatch.setattr(ops, "_shape_forms", {LAYER: "columns"})
    for shape in (LAYER, other):
        for rows in (1, 2):
            ops.linear(mx.ones((rows, 64)), mx.zeros(shape))
    assert products == ["W @ x", "x @ W^T", "x @ W^T", "x @ W^T"]
    monkeypatch.setattr(ops, "_cpu_form", "columns")
    monkeypatch.setattr(ops, "_shape_forms", {LAYER: "rows"})
    products.clear()
    for shape in (LAYER, other):
        ops.linear(mx.ones((1, 64)), mx.zeros(shape))
    assert products == ["x @ W^T", "W @ x"]


# -- MoE experts: one GEMV per (token, expert) pair ---------------------------------
@pytest.mark.parametrize("tokens, k", [(1, 4), (3, 2)])
@pytest.mark.parametrize("rows_per_pair", [True, False])
def test_expert_columns_equal_the_gather_kernel(form, tokens, k, rows_per_pair):
    """`ops.gather_mm` of one row per pair (x broadcast over a token's experts, or one
    row per pair as the down projection reads it) equals MLX's kernel and float64."""
    E, d_in, d_out = 6, 48, 40
    stored = mx.random.normal((E, d_out, d_in), key=mx.random.key(2))
    idx = mx.random.randint(0, E, (tokens, k), key=mx.random.key(3)).astype(mx.uint32)
    x = mx.random.normal((tokens, k if rows_per_pair else 1, 1, d_in), key=mx.random.key(4))
    got = ops.gather_mm(x, stored.swapaxes(-1, -2), idx, False)
    kernel = mx.gather_mm(x, stored.swapaxes(-1, -2), rhs_indices=idx)
    assert got.shape == kernel.shape == (tokens, k, 1, d_out)
    want = np.einsum(
        "tkri,tkoi->tkro",
        np.array(mx.broadcast_to(x, (tokens, k, 1, d_in)), np.float64),
        np.array(stored, np.float64)[np.array(idx)],
    )
    np.testing.assert_allclose(np.array(got, np.float64), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(got), np.array(kernel), rtol=1e-5, atol=1e-6)


def test_expert_columns_run_on_cpu_branches_only(columns, monkeypatch):
    ops._cpu_gather_mm(mx.float32)  # its one-time kernel probe calls gather_mm too
    calls = []
    real = mx.gather_mm
    monkeypatch.setattr(ops.mx, "gather_mm", lambda a, b, **kw: calls.append(sorted(kw)) or real(a, b, **kw))
    w, idx = mx.zeros((4, 8, 6)), mx.zeros((1, 2), mx.uint32)
    ops.gather_mm(mx.ones((1, 1, 1, 8)), w, idx, False)
    ops.gather_mm(mx.ones((1, 1, 3, 8)), w, idx, False)  # several rows per pair: the kernel
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", True)
    ops.gather_mm(mx.ones((1, 1, 1, 8)), w, idx, False)
    assert calls == [["lhs_indices"], ["rhs_indices", "sorted_indices"], ["rhs_indices", "sorted_indices"]]


def test_cpu_expert_strategy_by_tokens_and_pairs_per_expert(form):
    n = ops.CPU_SEGMENTS_PAIRS_PER_EXPERT[form]
    for experts in (8, 32, 128):
        assert ops.moe_strategy(8, 1, experts) == "gather"  # one token: distinct experts
        assert ops.moe_strategy(experts, 2, experts) == "sorted"  # a pair per expert
        assert ops.moe_strategy(n * experts - 1, n * experts, experts) == "sorted"
        assert ops.moe_strategy(n * experts, n * experts, experts) == "segments"
