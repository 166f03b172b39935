"""The keyed sampler (`runtime.sampling`) on Gemma's 262,144-token vocabulary:
its uniforms stay inside (0, 1), so a masked token is never drawn, and a draw among
the top-k candidates or among a top-p nucleus's picks what the draw over the whole
vocabulary picks."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.runtime.sampling import SHORTLIST_MAX, PositionedSampler, _best, _normalised, stream_key, unit_floats

V = 262144


def test_unit_floats_stay_strictly_inside_zero_and_one():
    """The extreme hashes map inside (0, 1), so the Gumbel noise is finite."""
    u = unit_floats(mx.array([0, 1, 0x1FF, 0x200, 0xFFFFFE00, 0xFFFFFFFF], mx.uint32))
    g = -mx.log(-mx.log(u))
    assert mx.all((u > 0) & (u < 1)).item() and mx.all(mx.isfinite(g)).item()
    assert u.tolist()[0] < u.tolist()[3] and u.tolist()[-1] == u.tolist()[-2]  # 23 bits: the low 9 do not count


@pytest.mark.parametrize("top_k", [0, 64], ids=["whole vocabulary", "top-k shortlist"])
def test_a_masked_token_is_never_drawn(top_k):
    """Three tokens allowed (as a grammar's mask leaves them), 400 draws at
    temperature 1: each pick is one of them.  With 24-bit uniforms ~1.7 % of draws
    over this vocabulary had a u of exactly 1.0, and picked a masked token."""
    allowed = [7, 131072, V - 1]
    row = np.full(V, -math.inf, np.float32)
    row[allowed] = [0.0, 1.0, -0.5]
    sampler = PositionedSampler(temperature=1.0, top_k=top_k, seed=0)
    picks = []
    for start in range(0, 400, 50):
        logits = mx.broadcast_to(mx.array(row), (50, V))
        picks += sampler(logits, [0] * 50, range(start, start + 50)).tolist()
    assert set(picks) <= set(allowed), sorted(set(picks) - set(allowed))
    assert set(picks) == set(allowed)  # and each is drawn


@pytest.mark.parametrize(
    "temperature, top_p, top_k, min_p",
    [(1.0, 0.95, 64, 0.0), (0.7, 0.9, 40, 0.05), (1.3, 0.0, 64, 0.0), (1.0, 0.5, 200, 0.1), (1.0, 1.0, 5, 0.0)],
)
def test_a_top_k_draw_among_its_candidates_is_the_whole_vocabularys_draw(temperature, top_p, top_k, min_p):
    """`_shortlist` (the k candidates, their own noise) picks what `_full` (every
    filter and the noise over the whole vocabulary) picks: on flat and on peaked
    rows, where top-p and min-p cut inside the k; on rows a grammar masked to a few
    tokens (fewer or more than k); and on bfloat16 rows, full of ties.  (The two
    can differ only where the mass above a token is within float rounding of
    top-p: `_full` sums the whole vocabulary's mass, `_shortlist` takes it as 1.)"""
    rng = np.random.default_rng(1)
    sampler = PositionedSampler(temperature, top_p, top_k, min_p, seed=3)
    rows_of = {}
    for width, n in ((1000, 300), (V, 6)):
        for scale in (0.5, 3.0, 8.0):
            rows_of[width, scale] = mx.array(rng.normal(size=(n, width)).astype(np.float32) * scale)
    for allowed in (3, 64, 65, 500):  # the rest -inf, as a grammar's mask leaves a row
        x = np.full((40, 1000), -np.inf, np.float32)
        for r in range(40):
            x[r, rng.choice(1000, allowed, replace=False)] = rng.normal(size=allowed) * 3
        rows_of["masked", allowed] = mx.array(x)
    rows_of["bfloat16", 2.0] = (mx.array(rng.normal(size=(300, 1000)).astype(np.float32)) * 2).astype(mx.bfloat16)
    for what, logits in rows_of.items():
        keys, lp = [stream_key(3, r, 11) for r in range(logits.shape[0])], _normalised(logits)
        assert sampler._shortlist(keys, *_best(lp, top_k)).tolist() == sampler._full(lp, keys).tolist(), what


@pytest.mark.parametrize("temperature, top_p, min_p", [(1.0, 0.95, 0.0), (0.7, 0.9, 0.0), (1.0, 0.5, 0.05)])
def test_a_top_p_draw_within_its_nucleus_is_the_whole_vocabularys_draw(temperature, top_p, min_p):
    """Top-p without top-k: where the nucleus lies within the SHORTLIST_MAX best
    tokens (peaked rows, masked rows), the draw among those picks what `_full`
    picks; where it does not (flat rows), `_full` draws, row by row in a batch that
    holds both.  Both ways are taken."""
    rng = np.random.default_rng(2)
    sampler = PositionedSampler(temperature, top_p, 0, min_p, seed=3)
    shortlisted = []
    shortlist = sampler._shortlist
    sampler._shortlist = lambda *a: shortlisted.append(True) or shortlist(*a)
    # Tied at the cut: one token at top_p - 0.03, the other 8,191 alike; the best
    # 4,096 hold top_p, but the mass strictly above their lowest value does not, so
    # every copy of that value is kept, most of them outside the candidates.
    p0 = top_p - 0.03
    tied = np.zeros((64, 8192), np.float32)
    tied[:, 0] = math.log(8191 * p0 / (1 - p0))
    masked = np.full((20, 8192), -np.inf, np.float32)
    for r in range(20):
        masked[r, rng.choice(8192, 300, replace=False)] = rng.normal(size=300) * 3
    flat = mx.array(rng.normal(size=(6, V)).astype(np.float32) * 0.5)
    peaked = mx.array(rng.normal(size=(6, V)).astype(np.float32) * 8)
    taken = {}
    for what, logits in {
        "flat": flat,
        "peaked": peaked,
        "both in one batch": mx.concatenate([flat[:2], peaked[:3], flat[2:3]]),
        "peaked, 8192": mx.array(rng.normal(size=(200, 8192)).astype(np.float32) * 6),
        "masked": mx.array(masked),
        "tied at the cut": mx.array(tied),
    }.items():
        n, before = logits.shape[0], len(shortlisted)
        want = sampler._full(_normalised(logits), [stream_key(3, r, 11) for r in range(n)])
        assert sampler(logits, range(n), [11] * n).tolist() == want.tolist(), what
        taken[what] = len(shortlisted) > before
    assert taken == {
        "flat": False,
        "peaked": True,
        "both in one batch": True,
        "peaked, 8192": True,
        "masked": True,
        "tied at the cut": False,
    }
    assert SHORTLIST_MAX < 8192


def test_unseeded_sampling_draws_a_seed_mlx_can_repeat():
    """Sampling without a seed is keyed too, with a seed drawn from MLX's generator:
    `mx.random.seed` repeats a run, and two runs without it differ."""
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    run = lambda: gemma4_mlx.generate(model, tok, "Once upon a time", temperature=1.5, max_tokens=24)  # noqa: E731
    mx.random.seed(5)
    first = run()
    mx.random.seed(5)
    assert run() == first
    assert len({run() for _ in range(3)}) > 1
