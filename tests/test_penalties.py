"""Penalties (`runtime.processors`): presence and frequency count the output only, as
OpenAI defines them; the repetition penalty reads prompt and output alike.  Checked
against a NumPy reading of those definitions, and through generation on the demo."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.tokens import encode_prompt
from gemma4_mlx.runtime.generate import SamplingOptions, batch_generate, generate_tokens
from gemma4_mlx.runtime.processors import History, Penalties

PROMPT = "<|turn>user\nWhat is the capital of Peru?<turn|>\n<|turn>model\n"


def _reference(logits, tokens, start, repetition, rep_window, presence, frequency, window):
    out = np.array(logits, dtype=np.float64)
    if repetition is not None:
        for t in set(tokens[-rep_window:]):
            out[t] = out[t] * repetition if out[t] < 0 else out[t] / repetition
    output = tokens[start:]
    for t in set(output[-window:] if window else output):
        n = (output[-window:] if window else output).count(t)
        out[t] -= presence + frequency * n
    return out


@pytest.mark.parametrize(
    "repetition, rep_window, presence, frequency, window",
    [(1.3, 64, 0.0, 0.0, None), (None, 64, 0.7, 0.0, None), (None, 64, 0.0, 0.4, None), (1.5, 3, 0.5, 0.25, 4)],
)
def test_penalties_follow_their_definitions(repetition, rep_window, presence, frequency, window):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, 40).astype(np.float32)
    prompt, output = [5, 6, 7, 7, 9, 30], [7, 11, 11, 12, 5, 11, 30]
    history = History(prompt) + output  # what a verify position sees: drafts are output
    assert history.start == len(prompt) and history.output == output
    got = Penalties(repetition, rep_window, presence, frequency, window)(history, mx.array(logits[None]))
    want = _reference(logits, prompt + output, len(prompt), repetition, rep_window, presence, frequency, window)
    np.testing.assert_allclose(np.array(got[0]), want, rtol=1e-6, atol=1e-6)
    # A repetition penalty of 0 is off (mlx-lm reads it so); it used to divide by 0.
    off = Penalties(0.0, 64, 0.0, 0.0)(History(prompt) + output, mx.array(logits[None]))
    np.testing.assert_array_equal(np.array(off[0]), logits)
    # With no output yet, presence and frequency leave every logit alone.
    untouched = Penalties(None, 64, presence, frequency, window)(History(prompt), mx.array(logits[None]))
    np.testing.assert_array_equal(np.array(untouched[0]), logits)


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


def test_a_token_of_the_prompt_is_not_penalised(demo):
    """A prompt that stops mid-answer: its next greedy token is already in it.  A
    presence penalty twice the softcap (every logit lies in (-30, 30)) leaves that
    first token alone, and then no output token may repeat."""
    model, tok = demo
    ids = encode_prompt(tok, PROMPT, chat=False)
    answer = list(generate_tokens(model, ids, max_tokens=10))
    prompt = ids + answer[:10]
    first = next(generate_tokens(model, prompt, max_tokens=1))
    assert first in prompt  # (what makes the check below mean something)
    strict = SamplingOptions(presence_penalty=60.0, frequency_penalty=1.0)
    alone = list(generate_tokens(model, prompt, max_tokens=12, options=strict))
    batched = batch_generate(model, [prompt, ids], max_tokens=12, options=strict)
    assert alone[0] == first and batched[0] == alone
    for out in (alone, *batched):
        assert len(set(out)) == len(out), out


def test_a_prompt_as_an_array_is_read_as_its_ids(demo):
    """`generate_tokens` takes a list, an mx.array or a NumPy row alike (the penalties
    count Python ints; a NumPy row used to fail where the ids became an array)."""
    model, _ = demo
    ids, options = [2, 5, 9, 14, 3, 7], SamplingOptions(frequency_penalty=1.0, repetition_penalty=1.1)
    want = list(generate_tokens(model, ids, max_tokens=8, options=options))
    for prompt in (mx.array(ids), np.array(ids)):
        assert list(generate_tokens(model, prompt, max_tokens=8, options=options)) == want
