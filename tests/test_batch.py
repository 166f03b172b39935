"""Left-padded batches give each row exactly what it gets alone."""

import mlx.core as mx
import pytest

import gemma4_mlx
from gemma4_mlx.runtime.generate import batch_generate, generate_tokens, prefill

from helpers.checkpoints import max_diff, random_ids


@pytest.fixture
def model(ref):
    return gemma4_mlx.load(ref.path, dtype="float32")[0]


PROMPTS = [random_ids(n, seed=n) for n in (3, 11, 6, 17)]


def test_batched_greedy_equals_single(model):
    batched = batch_generate(model, PROMPTS, max_tokens=24, prefill_chunk=5)
    for prompt, got in zip(PROMPTS, batched):
        assert got == list(generate_tokens(model, prompt, max_tokens=24))


def test_batched_logits_equal_single(model):
    pads = [17 - len(p) for p in PROMPTS]
    ids = mx.array([[0] * n + p for n, p in zip(pads, PROMPTS)])
    cache = model.make_cache(left_pad=pads)
    last = prefill(model, ids, cache, chunk_size=4)
    step = model(mx.array([[9]] * 4), cache)[:, -1]
    for row, p in enumerate(PROMPTS):
        assert max_diff(last[row], model(mx.array([p]))[0, -1]) < 1e-4
        assert max_diff(step[row], model(mx.array([p + [9]]))[0, -1]) < 1e-4


def test_rows_leave_the_batch(model):
    """A row that stops early leaves; the others go on unchanged."""
    alone = [list(generate_tokens(model, p, max_tokens=12)) for p in PROMPTS]
    stop = alone[1][3]  # makes row 1 stop at its 4th token
    batched = batch_generate(model, PROMPTS, max_tokens=12, stop_ids=[stop])
    for a, b in zip(alone, batched):
        cut = a.index(stop) + 1 if stop in a else len(a)
        assert b == a[:cut]
    assert len(batched[1]) == 4
