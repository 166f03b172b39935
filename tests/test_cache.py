"""Cache rollback exactness: draft k tokens, trim j, decode on — also after the
sliding window wrapped — must equal a no-cache forward of the committed sequence."""

import mlx.core as mx
import numpy as np
import pytest

import gemma4_mlx
from gemma4_mlx.cache import LayerCaches, SlidingKVCache

from helpers.checkpoints import W, max_diff, random_ids

TOL = 1e-4


@pytest.fixture
def model(ref):
    return gemma4_mlx.load(ref.path, dtype="float32")[0]


@pytest.mark.parametrize("prompt_len", [W - 1, W, W + 1, 3 * W + 2])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_draft_trim_decode(model, prompt_len, k):
    ids = random_ids(prompt_len + k + 1, seed=prompt_len * 10 + k)
    for j in range(0, k + 1):  # reject j of the k drafts
        cache = model.make_cache(max_rollback=8)
        model(mx.array([ids[:prompt_len]]), cache)
        model(mx.array([ids[prompt_len : prompt_len + k]]), cache)  # verify block
        cache.trim(j)
        committed = ids[: prompt_len + k - j]
        nxt = 7 + j  # any next token
        got = model(mx.array([[nxt]]), cache)[0, -1]
        want = model(mx.array([committed + [nxt]]))[0, -1]
        assert max_diff(got, want) < TOL, (prompt_len, k, j)


def test_many_rounds_after_wrapping(model):
    """Speculative-style rounds far past the window, each rejecting some drafts."""
    rng = np.random.default_rng(0)
    seq = random_ids(5, seed=9)
    cache = model.make_cache(max_rollback=8)
    model(mx.array([seq]), cache)
    for _ in range(12):
        k = int(rng.integers(1, 7))
        drafts = rng.integers(3, 256, size=k).tolist()
        logits = model(mx.array([drafts]), cache)[0]
        j = int(rng.integers(0, k + 1))
        cache.trim(j)
        kept = drafts[: k - j]
        want = model(mx.array([seq + kept]))[0, -len(kept) :] if kept else None
        if kept:
            assert max_diff(logits[: len(kept)], want) < TOL
        seq += kept
    nxt = model(mx.array([[5]]), cache)[0, -1]
    assert max_diff(nxt, model(mx.array([seq + [5]]))[0, -1]) < TOL
    assert len(seq) > 3 * W


def test_rollback_beyond_slack_is_refused():
    c = SlidingKVCache(window=4, max_rollback=2)
    k = mx.zeros((1, 1, 10, 8))
    c.update_and_fetch(k, k)
    c.trim(2)  # within the slack
    with pytest.raises(ValueError, match="max_rollback"):
        c.trim(1)


def test_sliding_cache_stays_bounded():
    c = SlidingKVCache(window=4, max_rollback=2)
    one = mx.zeros((1, 1, 1, 8))
    for _ in range(600):
        c.update_and_fetch(one, one)
    assert c.size == 4 - 1 + 2 and c.offset == 600
    assert c.keys.shape[2] <= 256 + 8


def test_snapshot_restore(model):
    ids = random_ids(14, seed=11)
    cache = model.make_cache()
    model(mx.array([ids[:9]]), cache)
    snaps = [c.snapshot() if c is not None else None for c in cache]
    model(mx.array([ids[9:12]]), cache)
    model(mx.array([[40, 41]]), cache)
    for c, s in zip(cache, snaps):
        if c is not None:
            c.restore(s)
    got = model(mx.array([ids[9:14]]), cache)[0]
    want = model(mx.array([ids]))[0, 9:]
    assert max_diff(got, want) < TOL


def test_ragged_commit_refuses_rows_that_lose_window_keys():

    c = SlidingKVCache(window=4, max_rollback=2)
    k = mx.random.normal((2, 1, 12, 8))
    c.update_and_fetch(k, k)
    LayerCaches([c]).commit(accepted=[3, 2], drafted=3)  # shift 1 of row 1: within the slack
    c.update_and_fetch(k[:, :, :4], k[:, :, :4])
    with pytest.raises(ValueError, match="raise max_rollback"):
        LayerCaches([c]).commit(accepted=[3, 0], drafted=3)  # row 1 would keep too few keys
