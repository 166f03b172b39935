"""`generate_tokens` with a caller's cache: afterwards the cache holds the prompt and
every yielded token but the last — after a stop token, at max_tokens, and when the
caller stops early — although each step is queued before its token is read."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx.checkpoint.load import load_model
from gemma4_mlx.runtime.generate import SamplingOptions, generate_tokens

from helpers.checkpoints import W, random_ids

PROMPT = random_ids(W + 3, seed=7)


@pytest.fixture(scope="module")
def model(checkpoints):
    return load_model(checkpoints["e2b_like"].path, "float32")[0]


def next_logits(model, cache, token: int) -> np.ndarray:
    return np.array(model(mx.array([[token]]), cache)[0, -1])


def fresh_logits(model, tokens: list[int]) -> np.ndarray:
    return np.array(model(mx.array([tokens]), model.make_cache())[0, -1])


def run(model, cache, stop_after: int | None = None, **kw) -> list[int]:
    out = []
    for tok in generate_tokens(model, PROMPT, cache=cache, **kw):
        out.append(tok)
        if stop_after is not None and len(out) == stop_after:
            break  # the caller leaves: the generator is closed here
    return out


@pytest.mark.parametrize("ending", ["stop token", "max_tokens", "caller leaves"])
@pytest.mark.parametrize("rollback", [32, 0])
@pytest.mark.parametrize(
    "extra", [{}, {"repetition_penalty": 1.1}, {"logit_bias": {5: 0.5}}], ids=["plain", "penalty", "logit bias"]
)
def test_cache_holds_prompt_and_yielded_but_last(model, ending, rollback, extra):
    """With a processor that reads the history (a penalty) each token is read before
    its step is built; a logit bias reads none and queues ahead as plain decoding
    does; without rollback room the step waits for the caller to ask for more."""
    options = SamplingOptions(**extra)
    plain = run(model, model.make_cache(), max_tokens=2 * W + 2, options=options)
    kw = {"max_tokens": 2 * W + 2, "options": options}
    if ending == "stop token":
        kw["stop_ids"] = [plain[W + 1]]  # a token past the window
    elif ending == "max_tokens":
        kw["max_tokens"] = W + 3
    cache = model.make_cache(max_rollback=rollback)
    got = run(model, cache, stop_after=W + 2 if ending == "caller leaves" else None, **kw)
    assert got == plain[: len(got)] and len(got) > W
    assert got[-1] in kw.get("stop_ids", [got[-1]])
    held = len(PROMPT) + len(got) - 1
    assert cache.offset == held
    # What the cache holds is exact: the next logits equal a fresh run over the same tokens.
    seq = PROMPT + plain  # got is its prefix
    want = fresh_logits(model, seq[: held + 1])
    np.testing.assert_allclose(next_logits(model, cache, seq[held]), want, rtol=1e-4, atol=1e-4)
