"""Stacked projections (`models/fuse.py`): q/k/v and gate/up as one product each.

The loader stacks them when `ops.stack_projections()` says so (the default;
GEMMA4_MLX_STACK_PROJECTIONS=0 turns it off).  A stacked module's output must be the
concatenation of its parts' outputs for every weight format, and a whole model
must compute what the unstacked one does, on the CPU branches (per-expert GEMMs
for prefill) and on the GPU ones (sorted gathers, fused attention).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

import gemma4_mlx
from gemma4_mlx import ops
from gemma4_mlx.models import fuse
from gemma4_mlx.models.layers import Linear
from gemma4_mlx.models.moe import ExpertLinear
from gemma4_mlx.models.quantized import QLinear

from test_convert import converted, tempered  # noqa: F401  (fixtures)

RECIPES = ["q4", "q8", "q4_0", "sfp8", "mxfp4"]


def _pair(make):
    mx.random.seed(3)
    return [make(o) for o in (96, 32)]


def _check_stacked(parts, axis, call):
    fused = fuse.stack_outputs(parts, axis)
    assert fused is not None
    want = mx.concatenate([call(p) for p in parts], axis=-1)
    got = call(fused)
    assert got.shape == want.shape
    assert mx.array_equal(got, want), float(mx.abs(got - want).max())


def test_float_linears_stack_exactly():
    parts = _pair(lambda o: Linear(128, o))
    x = mx.random.normal((3, 128))
    _check_stacked(parts, 0, lambda m: m(x))


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 64), ("affine", 8, 32), ("mxfp8", 8, 32), ("mxfp4", 4, 32)])
def test_quantized_linears_stack_exactly(mode, bits, group):
    def make(out):
        q = QLinear(128, out, group, bits, mode, tensor_scale=mode == "mxfp8")
        w = mx.random.normal((out, 128)) * 0.05
        q.weight, q.scales, *b = mx.quantize(w, group, bits, mode=mode)
        if b:
            q.biases = b[0]
        if "tensor_scale" in q:
            q.tensor_scale = mx.array([0.5 + out / 100], mx.float32)  # differs per part
        return q

    parts = _pair(make)
    x = mx.random.normal((2, 128))
    _check_stacked(parts, 0, lambda m: m(x))


def test_q4_0_derived_biases_stack_exactly():
    def make(out):
        q = QLinear(128, out, 32, 4, "affine", derive_biases=True)
        q.weight, q.scales, _ = mx.quantize(mx.random.normal((out, 128)), 32, 4)
        return q

    x = mx.random.normal((1, 128))
    _check_stacked(_pair(make), 0, lambda m: m(x))


@pytest.mark.parametrize("quantized", [False, True])
def test_experts_stack_exactly(quantized):
    def make(out):
        e = ExpertLinear(4, 64, out)
        return e.to_quantized(32, 4) if quantized else e

    parts = _pair(make)
    x = mx.random.normal((5, 1, 1, 64))
    idx = mx.array([[0], [3], [1], [3], [2]])
    _check_stacked(parts, 1, lambda m: m(x, idx, False))


def test_unlike_parts_are_left_alone():
    """A mixed-precision checkpoint (one part kept wider, or in another dtype) is not stacked."""
    four = QLinear(128, 32, 64, 4)
    eight = QLinear(128, 32, 64, 8)
    assert fuse.stack_outputs([four, eight], 0) is None
    assert fuse.stack_outputs([Linear(128, 32), four], 0) is None
    wide, narrow = Linear(128, 32), Linear(128, 32)
    narrow.weight = narrow.weight.astype(mx.bfloat16)
    assert fuse.stack_outputs([wide, narrow], 0) is None
    holder = nn.Module()
    holder.a, holder.b = four, eight
    assert not fuse.fuse(holder, ("a", "b"), "ab") and "a" in holder and "ab" not in holder


def _logits(model, ids):
    cache = model.make_cache()
    first = model(ids, cache)
    return first, model(ids[:, -1:], cache)  # prefill, then one decode step


# float32 for every family; each quantized recipe on the family whose every matrix quantizes
CASES = [(name, None) for name in ("dense", "e2b_like", "moe", "moe64")] + [("moe64", r) for r in RECIPES]
IDS = [(7 * i + 2) % 250 + 3 for i in range(40)]  # MoE: 40 tokens x top-2 = 80 pairs, the CPU's per-expert GEMMs


@pytest.mark.parametrize("gpu_branches", [False, True], ids=["cpu", "gpu-branches"])
@pytest.mark.parametrize("name,recipe", CASES)
def test_stacked_model_computes_the_same(tempered, converted, monkeypatch, name, recipe, gpu_branches):  # noqa: F811
    """Loaded stacked vs not: the same logits, prefill and decode."""
    path = tempered[name] if recipe is None else converted(tempered[name], recipe, keep=False)[0]
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", gpu_branches)
    monkeypatch.setattr(ops, "STACK_PROJECTIONS", True)
    stacked = gemma4_mlx.load(path, dtype=None if recipe else "float32")[0]
    plain = gemma4_mlx.load(path, dtype=None if recipe else "float32", fuse=False)[0]
    layer = stacked.layers[0]
    assert "gate_up_proj" in layer.mlp and "gate_proj" not in layer.mlp
    assert "qkv_proj" in layer.self_attn and "q_proj" not in layer.self_attn
    if stacked.config.enable_moe_block:
        assert "gate_up_proj" in layer.experts
    ids = mx.array([IDS])
    for got, want in zip(_logits(stacked, ids), _logits(plain, ids)):
        assert mx.allclose(got, want, rtol=1e-5, atol=1e-5), float(mx.abs(got - want).max())
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_stacking_is_the_default(tempered, monkeypatch):  # noqa: F811
    """By default the loader stacks (measured faster or equal on the CPU); turned off,
    and with fuse=False, it keeps the checkpoint's modules."""
    assert ops.stack_projections()
    model = gemma4_mlx.load(tempered["dense"], dtype="float32")[0]
    assert "qkv_proj" in model.layers[0].self_attn and "gate_up_proj" in model.layers[0].mlp
    monkeypatch.setattr(ops, "STACK_PROJECTIONS", False)
    model = gemma4_mlx.load(tempered["dense"], dtype="float32")[0]
    assert "q_proj" in model.layers[0].self_attn and "gate_proj" in model.layers[0].mlp
