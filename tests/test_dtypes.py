"""bfloat16 and float16 models on the CPU backend (docs/text-decoder.md §6.1).

MLX's CPU `gather_mm` is float32 only; there `ops.gather_mm` gathers the selected
experts and runs them through MLX's CPU matmul (float32 accumulation, one
rounding).  Each low-precision model is compared with a float32 model
holding *the same* (rounded) weights, so the only differences are the roundings
of activations the low-precision model does on the way.

Tolerances are relative RMS errors in units of the dtype's unit roundoff u
(2^-8 for bfloat16, 2^-11 for float16):
- one expert block: 4 u.  Its float32 twin differs by the roundings of x@W_gate,
  x@W_up, the GeGLU product and the output (measured 0.9-1.0 u);
- a 4-layer forward (prefill and decode, logits): 8 u.  Every layer rounds the
  residual stream, norms, attention and MLP outputs (measured 3.2-4.6 u).
Feeding an expert block the wrong experts costs 24 u (bfloat16) and 190 u
(float16) at the logits; without the fallback the CPU raises (both checked by hand).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

from gemma4_mlx import ops
from gemma4_mlx.config import FULL, SLIDING, TextConfig
from gemma4_mlx.models.moe import Experts
from gemma4_mlx.models.text import Model

from helpers.random_net import random_weights

UNIT_ROUNDOFF = {mx.bfloat16: 2.0**-8, mx.float16: 2.0**-11}
LOW = list(UNIT_ROUNDOFF)

S, F = SLIDING, FULL
DENSE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=4,
    layer_types=[S, S, S, F],
    num_attention_heads=4,
    num_key_value_heads=2,
    num_global_key_value_heads=1,
    attention_k_eq_v=True,
    head_dim=16,
    global_head_dim=32,
    intermediate_size=128,
    sliding_window=8,
    hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=256,
    num_kv_shared_layers=0,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    model_type="gemma4_text",
)
MOE = dict(DENSE, intermediate_size=64, enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32)


def rel_rms(a, b) -> float:
    a, b = np.asarray(a.astype(mx.float32), np.float64), np.asarray(b.astype(mx.float32), np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


def twins(make, weights, dtype):
    """(model in dtype, float32 model of the same dtype-rounded weights)."""
    low, ref = make(), make()
    low.update(tree_unflatten([(k, w.astype(dtype)) for k, w in weights]))
    ref.update(tree_unflatten([(k, w.astype(dtype).astype(mx.float32)) for k, w in weights]))
    return low, ref


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("strategy", ["gather", "sorted", "segments", "gather-unwidened"])
def test_expert_block_matches_float32(monkeypatch, dtype, strategy):
    if strategy == "gather-unwidened":  # large experts: MLX's low-precision matmul
        monkeypatch.setattr(ops, "WIDEN_MAX_ELEMENTS", 0)
        strategy = "gather"
    monkeypatch.setattr(ops, "moe_strategy", lambda pairs, tokens=1, experts=16: strategy)
    E, H, inner, n, k = 8, 64, 32, 5, 2

    def make():
        return Experts(E, H, inner)

    low, ref = twins(make, random_weights(make(), seed=1), dtype)
    mx.random.seed(2)
    h = mx.random.normal((1, n, H)).astype(dtype)
    idx = mx.stack([mx.random.permutation(E)[:k] for _ in range(n)])[None]
    w = mx.softmax(mx.random.normal((1, n, k)), axis=-1)
    got, want = low(h, w, idx), ref(h.astype(mx.float32), w, idx)
    assert got.dtype == dtype and want.dtype == mx.float32
    assert rel_rms(got, want) < 4 * UNIT_ROUNDOFF[dtype]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "f16"])
@pytest.mark.parametrize("family", ["dense", "moe"])
def test_forward_matches_float32(dtype, family):
    """Prefill (12 tokens: 24 expert pairs, the CPU's gather path) and 8 decode
    steps past the sliding window, logits compared at every position."""
    cfg = TextConfig.from_dict(dict(MOE if family == "moe" else DENSE), family)

    def make():
        return Model(cfg)

    low, ref = twins(make, random_weights(make(), seed=3), dtype)
    ids = [2] + np.random.default_rng(5).integers(3, cfg.vocab_size, 19).tolist()

    def run(model):
        cache = model.make_cache()
        out = [model(mx.array([ids[:12]]), cache)[0]]
        out += [model(mx.array([[t]]), cache)[0] for t in ids[12:]]
        return mx.concatenate(out)

    got, want = run(low), run(ref)
    assert np.abs(np.array(want)).max() > 1.0  # non-trivial logits
    assert rel_rms(got, want) < 8 * UNIT_ROUNDOFF[dtype]
