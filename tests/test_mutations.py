"""The parity check must see the classic Gemma 4 porting bugs (docs/text-decoder.md §9.3).

Each test re-introduces one bug into a loaded model and asserts that the logits
then miss transformers' by far more than the parity tolerance.
"""

import mlx.core as mx
import pytest

import gemma4_mlx
from gemma4_mlx import ops
from gemma4_mlx.config import FULL

from helpers.checkpoints import max_diff, random_ids

TOL = 1e-4


def error(ref, model):
    ids = random_ids(20, seed=1)
    return max_diff(model(mx.array([ids])), ref.logits(ids))


@pytest.fixture(params=["dense", "e2b_like", "moe"])
def pair(request, checkpoints):
    ref = checkpoints[request.param]
    model = gemma4_mlx.load(ref.path, dtype="float32")[0]
    assert error(ref, model) < TOL  # sound before the mutation
    return ref, model


def test_one_plus_w_norms(pair, monkeypatch):
    ref, model = pair
    real = ops.rms_norm
    monkeypatch.setattr(ops, "rms_norm", lambda x, w, eps: real(x, None if w is None else 1 + w, eps))
    assert error(ref, model) > 100 * TOL


def test_sliding_window_off_by_one(pair):
    ref, model = pair
    model.config.sliding_window += 1
    assert error(ref, model) > 100 * TOL


def test_proportional_rope_wrong_denominator(pair):
    ref, model = pair
    for layer in model.layers:
        if layer.spec.type == FULL:
            rope = layer.self_attn.rope
            d = rope.dims
            i = mx.arange(d // 2, dtype=mx.float32)
            n_rot = d // 8  # partial_rotary_factor 0.25
            wrong = mx.power(1e6, 2 * i / (2 * n_rot))  # "a 128-dim RoPE" scaled down
            rope._freqs = mx.where(i < n_rot, wrong, mx.inf)
    assert error(ref, model) > 100 * TOL


def test_layer_scalar_ignored(pair):
    ref, model = pair
    for layer in model.layers:
        layer.layer_scalar = mx.ones((1,))
    assert error(ref, model) > 100 * TOL


def test_k_eq_v_value_from_normed_k(checkpoints):
    """K = V must take V from the *raw* k_proj output (dense family has K = V full layers)."""
    ref = checkpoints["dense"]
    model = gemma4_mlx.load(ref.path, dtype="float32", fuse=False)[0]  # k_proj on its own, to break
    for layer in model.layers:
        attn = layer.self_attn
        if attn.k_eq_v:
            attn.k_eq_v = False
            attn.v_proj = attn.k_proj  # V from k_proj is the same; now break the norm order:
            real_norm = attn.k_norm
            attn.v_proj = lambda x, p=attn.k_proj, n=real_norm, a=attn: n(
                p(x).reshape(*x.shape[:2], a.n_kv, a.head_dim)
            ).reshape(*x.shape[:2], -1)
    assert error(ref, model) > 100 * TOL
