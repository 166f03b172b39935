"""The CPU's two few-row product forms, and the load-time choice between them
(`ops.CPU_FORMS`, `checkpoint/cpu_forms.py`).

The suite's tiny checkpoints stay below the timing threshold, so everything else
runs the default "rows" form; here the "columns" form (W @ x^T, experts as
left operands) runs a selection of the parity, rollback, batching and speculative
tests, and the choice itself is checked on timings we control.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import gemma4_mlx
from gemma4_mlx import ops
from gemma4_mlx.checkpoint import cpu_forms

import test_batch
import test_cache
import test_parity
import test_speculative
from helpers.checkpoints import W
from helpers.mtp_pairs import PAIRS


@pytest.fixture(params=["columns-copied", "columns"])
def columns(request, monkeypatch):
    """The columns form for one row, and each columns form for a few rows."""
    monkeypatch.setattr(ops, "_cpu_form", "columns")
    monkeypatch.setattr(ops, "_few_form", request.param)
    monkeypatch.setattr(ops, "_shape_forms", {})


@pytest.fixture
def undecided(monkeypatch):
    """A process that has not timed the forms yet; the form restored afterwards."""
    monkeypatch.setattr(cpu_forms, "_decided", None)
    monkeypatch.setattr(ops, "_shape_forms", {})
    monkeypatch.setattr(ops, "FIXED_CPU_FORM", None)
    monkeypatch.setattr(ops, "_cpu_form", "rows")
    monkeypatch.setattr(ops, "_few_form", "rows")


# -- the "columns" form through the model ------------------------------------------------
def test_columns_form_is_taken(columns, monkeypatch):
    ops._cpu_gather_mm(mx.float32)  # its one-time kernel probe calls gather_mm too
    calls = []
    real = mx.gather_mm
    monkeypatch.setattr(ops.mx, "gather_mm", lambda a, b, **kw: calls.append(sorted(kw)) or real(a, b, **kw))
    ops.gather_mm(mx.ones((1, 1, 1, 8)), mx.zeros((4, 8, 6)), mx.zeros((1, 2), mx.uint32), False)
    monkeypatch.setattr(ops, "_cpu_form", "rows")
    ops.gather_mm(mx.ones((1, 1, 1, 8)), mx.zeros((4, 8, 6)), mx.zeros((1, 2), mx.uint32), False)
    assert calls == [["lhs_indices"], ["rhs_indices", "sorted_indices"]]


def test_full_forward(columns, loaded):
    test_parity.test_full_forward(loaded)


def test_prefill_then_decode_past_window(columns, loaded):
    test_parity.test_prefill_then_decode_past_window(loaded)


def test_draft_trim_decode(columns, loaded):
    test_cache.test_draft_trim_decode(loaded[1], 3 * W + 2, 3)


def test_batched_greedy_equals_single(columns, loaded):
    test_batch.test_batched_greedy_equals_single(loaded[1])


@pytest.mark.parametrize("name", list(PAIRS))
def test_speculative_lossless(columns, pairs, name):
    test_speculative.test_real_drafter_and_auto_draft_length_are_lossless(pairs, name)


def test_forms_give_the_same_logits(loaded, monkeypatch):
    """One model, one and four prompts: decode-step logits of every form agree to
    float32 rounding."""
    _, model = loaded
    prompt = mx.array([[2, 5, 9, 14, 3, 7], [4, 4, 8, 1, 6, 2], [9, 3, 2, 2, 5, 1], [7, 7, 1, 3, 3, 8]])
    for rows in (1, 4):
        got = {}
        for form in ops.FEW_ROW_FORMS:
            monkeypatch.setattr(ops, "_cpu_form", "columns" if form.startswith("columns") else "rows")
            monkeypatch.setattr(ops, "_few_form", form)
            monkeypatch.setattr(ops, "_shape_forms", {})
            cache = model.make_cache()
            model(prompt[:rows, :-1], cache=cache)
            got[form] = np.array(model(prompt[:rows, -1:], cache=cache), np.float64)
        for form in ops.FEW_ROW_FORMS:
            np.testing.assert_allclose(got[form], got["rows"], rtol=1e-4, atol=1e-4)


# -- the choice -----------------------------------------------------------------------
def _shapes_apart_from(monkeypatch, floor: int, l3: int):
    """A model of any size is timed, and its shapes apart from `floor` bytes (or an L3 of `l3`)."""
    monkeypatch.setattr(cpu_forms, "MIN_BYTES", 0)
    monkeypatch.setattr(cpu_forms, "SHAPE_MIN_BYTES", floor)
    monkeypatch.setattr(cpu_forms, "_l3_bytes", lambda: l3)


def _big_enough(monkeypatch, times):
    monkeypatch.setattr(cpu_forms, "MIN_BYTES", 0)
    monkeypatch.setattr(cpu_forms, "time_forms", lambda weights: dict(times))


@pytest.mark.parametrize(
    "rows, columns_, want",
    [(1.0, 0.5, "columns"), (0.5, 1.0, "rows"), (1.0, 0.98, "rows")],  # a 2 % lead is a tie: rows
)
def test_the_faster_form_is_kept_for_one_row(undecided, monkeypatch, checkpoints, rows, columns_, want):
    """One row takes the faster form; a few rows keep rows either way (the columns
    forms' spells, docs/text-decoder.md §6.3)."""
    _big_enough(monkeypatch, {"rows": rows, "columns": columns_})
    monkeypatch.setattr(ops, "_few_form", "columns")  # (what a choice must reset)
    model = gemma4_mlx.load(checkpoints["dense"].path, dtype="float32")[0]  # load() decides
    assert (ops.cpu_form(1), ops.cpu_form(4)) == (want, "rows")
    assert cpu_forms._decided == {"rows": rows, "columns": columns_}
    assert cpu_forms.choose_cpu_form(model) is None  # once per process
    assert (ops.cpu_form(1), ops.cpu_form(4)) == (want, "rows")
    cpu_forms.forget()  # unless told to time again
    assert cpu_forms.choose_cpu_form(model) == {"rows": rows, "columns": columns_}


def test_each_big_shape_keeps_its_own_one_row_form(undecided, monkeypatch, checkpoints):
    """Shapes with SHAPE_MIN_BYTES of weights are timed apart; a shape whose faster
    form differs from the model's keeps its own for one row (a few rows: rows)."""
    model = gemma4_mlx.load(checkpoints["dense"].path, dtype="float32")[0]  # small: nothing decided
    shapes = sorted({tuple(w.shape) for w in cpu_forms.layer_weights(model)})
    assert len(shapes) > 2
    wide, tall = shapes[0], shapes[-1]
    timed = []

    def time_forms(weights):
        timed.append({tuple(w.shape) for w in weights})
        if len(timed[-1]) > 1:  # the model's sample: rows
            return {"rows": 1.0, "columns": 2.0}
        return {"rows": 1.0, "columns": 0.5 if timed[-1] == {wide} else 0.91}  # a 9 % lead: a tie

    _shapes_apart_from(monkeypatch, 0, 0)
    monkeypatch.setattr(cpu_forms, "time_forms", time_forms)
    assert cpu_forms.choose_cpu_form(model) == {"rows": 1.0, "columns": 2.0}
    assert all(len(t) == 1 for t in timed[1:])
    assert sorted(t.pop() for t in timed[1:]) == shapes  # not the head (embed_tokens)
    assert ops.cpu_shape_forms() == {wide: "columns"}
    assert ops.cpu_form(1, wide) == "columns" and ops.cpu_form(4, wide) == "rows"
    assert ops.cpu_form(1, tall) == ops.cpu_form(1) == "rows"
    ops.set_cpu_form("rows", "rows")  # a form set without shapes clears theirs
    assert ops.cpu_form(1, wide) == "rows"

    def time_forms(weights):  # now the model's sample runs faster as columns: a tie keeps columns
        shapes = {tuple(w.shape) for w in weights}
        if len(shapes) > 1:
            return {"rows": 2.0, "columns": 1.0}
        return {"rows": 0.5 if shapes == {tall} else 0.91, "columns": 1.0}

    monkeypatch.setattr(cpu_forms, "time_forms", time_forms)
    cpu_forms.forget()
    cpu_forms.choose_cpu_form(model)
    assert ops.cpu_form(1) == "columns" and ops.cpu_shape_forms() == {tall: "rows"}


@pytest.mark.parametrize("floor, l3", [(32 << 20, 0), (0, 32 << 20)])
def test_small_shapes_are_not_timed_apart(undecided, monkeypatch, checkpoints, floor, l3):
    """Below SHAPE_MIN_BYTES, or below the L3's size, a shape takes the model's form."""
    model = gemma4_mlx.load(checkpoints["dense"].path, dtype="float32")[0]
    timed = []
    _shapes_apart_from(monkeypatch, floor, l3)
    monkeypatch.setattr(cpu_forms, "time_forms", lambda ws: timed.append(ws) or {"rows": 2.0, "columns": 1.0})
    cpu_forms.choose_cpu_form(model)
    assert len(timed) == 1 and ops.cpu_shape_forms() == {} and ops.cpu_form(1) == "columns"


def test_a_sharded_model_takes_rank_0s_forms(undecided, monkeypatch, checkpoints):
    """Every choice travels as one bit of one integer from rank 0: here rank 0 chose
    the opposite of this rank everywhere."""
    model = gemma4_mlx.load(checkpoints["dense"].path, dtype="float32")[0]
    shapes = sorted({tuple(w.shape) for w in cpu_forms.layer_weights(model)})
    wide = shapes[0]
    sent = []

    def from_leader(word, tp):
        sent.append((word, tp))
        return ~word & ((1 << (1 + len(shapes))) - 1)  # every bit flipped

    _shapes_apart_from(monkeypatch, 0, 0)
    monkeypatch.setattr(cpu_forms.parallel, "from_leader", from_leader)

    def time_forms(weights):  # this rank: rows for the model and every shape but the wide one
        one = len({tuple(w.shape) for w in weights}) == 1
        return {"rows": 1.0, "columns": 0.5 if one and weights[0].shape == wide else 2.0}

    monkeypatch.setattr(cpu_forms, "time_forms", time_forms)
    monkeypatch.setattr(model, "tp", "a group", raising=False)
    cpu_forms.choose_cpu_form(model)
    assert len(sent) == 1 and sent[0][1] == "a group"
    assert ops.cpu_form(1) == "columns"  # rank 0: columns for the model,
    assert ops.cpu_shape_forms() == {wide: "rows"}  # rows for the wide shape, columns (its form) elsewhere
    cpu_forms.forget()
    monkeypatch.setattr(model, "tp", None)
    cpu_forms.choose_cpu_form(model)  # unsharded: this process's own choices, nothing sent
    assert len(sent) == 1 and ops.cpu_form(1) == "rows" and ops.cpu_shape_forms() == {wide: "columns"}


def test_forget_restores_the_default_forms(undecided, monkeypatch):
    ops.set_cpu_form("columns", "columns", {(4, 8): "rows"})
    cpu_forms.forget()
    assert cpu_forms._decided is None
    assert (ops.cpu_form(1), ops.cpu_form(4), ops.cpu_shape_forms()) == ("rows", "rows", {})
    monkeypatch.setattr(ops, "FIXED_CPU_FORM", ("columns", "rows"))
    cpu_forms.forget()
    assert (ops.cpu_form(1), ops.cpu_form(4)) == ("columns", "rows")


def test_nothing_timed_when_small_fixed_or_on_gpu_branches(undecided, monkeypatch, checkpoints):
    model = gemma4_mlx.load(checkpoints["dense"].path, dtype="float32")[0]
    assert cpu_forms._decided is None and ops.cpu_form() == "rows"  # below MIN_BYTES
    _big_enough(monkeypatch, {"rows": 1.0, "columns": 0.5})
    monkeypatch.setattr(ops, "FIXED_CPU_FORM", ("rows", "rows"))
    assert cpu_forms.choose_cpu_form(model) is None and ops.cpu_form() == "rows"
    monkeypatch.setattr(ops, "FIXED_CPU_FORM", None)
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", True)
    assert cpu_forms.choose_cpu_form(model) is None and ops.cpu_form() == "rows"
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", False)
    assert cpu_forms.choose_cpu_form(model) == {"rows": 1.0, "columns": 0.5}
    assert ops.cpu_form() == "columns" and ops.cpu_form(4) == "rows"


def test_timing_runs_both_forms_and_restores_the_form(undecided, checkpoints, monkeypatch):
    model = gemma4_mlx.load(checkpoints["moe"].path, dtype="float32")[0]
    weights = cpu_forms.layer_weights(model)
    assert weights and all(w.ndim == 2 for w in weights)
    seen = []
    real = ops.linear
    monkeypatch.setattr(ops, "linear", lambda x, w: seen.append((ops.cpu_form(x.shape[0]), x.shape[0])) or real(x, w))
    ops.set_cpu_form("rows", "rows", {tuple(weights[0].shape): "columns"})
    times = cpu_forms.time_forms(weights[:3])
    assert set(times) == set(ops.CPU_FORMS) and all(0 < t < 10 for t in times.values())
    assert set(seen) == {(f, 1) for f in ops.CPU_FORMS}
    assert ops.cpu_form(1) == ops.cpu_form(4) == "rows"
    assert ops.cpu_shape_forms() == {tuple(weights[0].shape): "columns"}  # the table too


def test_the_environment_fixes_the_form(monkeypatch):
    for value, want in (
        ("columns", ("columns", "columns-copied")),
        ("ROWS", ("rows", "rows")),
        ("columns, rows", ("columns", "rows")),
        ("rows,columns", ("rows", "columns")),
        ("auto", None),
        ("", None),
    ):
        monkeypatch.setenv(ops.CPU_FORM_ENV, value)
        assert ops._form_from_env() == want
    for value in ("diagonal", "columns,diagonal", "columns-copied"):
        monkeypatch.setenv(ops.CPU_FORM_ENV, value)
        with pytest.raises(ValueError, match=f"GEMMA4_MLX_CPU_FORM='{value}': expected rows, columns, ONE,FEW"):
            ops._form_from_env()
    with pytest.raises(ValueError, match="expected one of rows, columns"):
        ops.set_cpu_form("diagonal")


def test_a_bad_setting_stops_the_load_not_the_import(monkeypatch, checkpoints):
    said = "GEMMA4_MLX_CPU_FORM='diagonal': expected rows, columns, ONE,FEW (e.g. columns,rows) or auto"
    monkeypatch.setattr(ops, "CPU_FORM_ENV_ERROR", said)
    with pytest.raises(gemma4_mlx.LoadError) as e:
        gemma4_mlx.load(checkpoints["dense"].path, dtype="float32")
    assert str(e.value) == said
