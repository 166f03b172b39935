"""Logit and greedy-token parity with transformers' Gemma 4 on every tiny family."""

import mlx.core as mx
import numpy as np
import pytest

import gemma4_mlx
from gemma4_mlx.runtime.generate import SamplingOptions, generate_tokens, prefill

from helpers.checkpoints import max_diff, random_ids

TOL = 1e-4  # float32, logits of order 1-10


@pytest.fixture
def loaded(ref):
    model, tok = gemma4_mlx.load(ref.path, dtype="float32")
    assert tok is None  # no tokenizer files in these folders
    return ref, model


def test_full_forward(loaded):
    ref, model = loaded
    ids = random_ids(20, seed=1)
    ours = model(mx.array([ids]))
    expected = ref.logits(ids)
    assert ours.shape == expected.shape == (1, 20, 256)
    assert np.abs(expected).max() > 1.0  # non-trivial logits
    assert max_diff(ours, expected) < TOL


def test_prefill_then_decode_past_window(loaded):
    ref, model = loaded
    ids = random_ids(20, seed=2)
    expected = ref.logits(ids)[0]
    cache = model.make_cache()
    got = [np.array(model(mx.array([ids[:7]]), cache)[0])]
    for t in range(7, 20):  # 13 single-token steps, window 4: wraps several times
        got.append(np.array(model(mx.array([[ids[t]]]), cache)[0]))
    assert max_diff(np.concatenate(got), expected) < TOL


@pytest.mark.parametrize("chunks", [(5, 5, 5, 5), (3, 6, 2, 9), (9, 1, 1, 9)])
def test_uneven_chunked_prefill(loaded, chunks):
    ref, model = loaded
    ids = random_ids(sum(chunks), seed=3)
    expected = ref.logits(ids)[0]
    cache = model.make_cache()
    got, at = [], 0
    for n in chunks:
        got.append(np.array(model(mx.array([ids[at : at + n]]), cache)[0]))
        at += n
    assert max_diff(np.concatenate(got), expected) < TOL


def test_prefill_helper_chunks_skip_work_exactly(loaded):
    """`prefill` with small chunks (cache-only chunks skip shared layers and head)."""
    ref, model = loaded
    ids = random_ids(19, seed=4)
    expected = ref.logits(ids)[0, -1]
    for chunk in (1, 4, 7, 64):
        cache = model.make_cache()
        last = prefill(model, mx.array([ids]), cache, chunk_size=chunk)
        assert max_diff(last[0], expected) < TOL, chunk


def test_greedy_64_tokens_identical(loaded):
    ref, model = loaded
    prompt = random_ids(9, seed=5)
    expected = ref.greedy(prompt, 64)
    ours = list(generate_tokens(model, prompt, max_tokens=64, options=SamplingOptions(), prefill_chunk=4))
    assert ours == expected


@pytest.mark.parametrize("strategy", ["gather", "sorted", "segments"])
def test_every_kernel_path(loaded, monkeypatch, strategy):
    """Blocked attention (tiny blocks, so sliding and causal key-block skipping
    both happen) and each MoE execution strategy give the reference logits."""
    from gemma4_mlx import ops

    ref, model = loaded
    monkeypatch.setattr(ops, "ATTENTION_BLOCK", 3)
    monkeypatch.setattr(ops, "moe_strategy", lambda pairs, tokens=1, experts=16: strategy)
    ids = random_ids(20, seed=6)
    expected = ref.logits(ids)[0]
    assert max_diff(model(mx.array([ids]))[0], expected) < TOL
    cache = model.make_cache()
    got = [np.array(model(mx.array([ids[:13]]), cache)[0])]
    got += [np.array(model(mx.array([ids[13:]]), cache)[0])]
    assert max_diff(np.concatenate(got), expected) < TOL
