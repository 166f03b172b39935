"""Per-request sampling options through the live server (real `openai` client on the
demo model): log-probabilities equal the model's own, streamed or not; presence /
frequency penalties give what `generate_tokens` gives with the same options."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import openai
import pytest

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt import output_text
from gemma4_mlx.prompt.tokens import encode_prompt
from gemma4_mlx.runtime.generate import SamplingOptions, generate_tokens

from helpers.live_server import http, live_server

NAME = "gemma4-demo"
PROMPT = "<|turn>user\nWhat is the capital of Peru?<turn|>\n<|turn>model\n"


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


@pytest.fixture(scope="module")
def live(demo):
    model, tok = demo
    with live_server(model, tok, model_name=NAME) as (url, _):
        yield url


@pytest.fixture(scope="module")
def server_url(live):
    return live


@pytest.fixture(scope="module")
def oa(live):
    return openai.OpenAI(base_url=live + "/v1", api_key="x", max_retries=0, timeout=30)


def test_completion_logprobs_are_the_models(demo, oa):
    model, tok = demo
    r = oa.completions.create(model=NAME, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.tokens) == 6
    ids = encode_prompt(tok, PROMPT, chat=False)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        logits = model(mx.array([ids]))[0, -1]
        want = logits - mx.logsumexp(logits)
        best = int(mx.argmax(want).item())
        assert tok.decode([best]) == token
        assert math.isclose(value, want[best].item(), abs_tol=1e-4)
        assert len(top) == 3 and math.isclose(max(top.values()), value, abs_tol=1e-6)
        best3 = sorted(want.tolist(), reverse=True)[:3]  # the three most likely, not any three
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(sorted(top.values(), reverse=True), best3))
        ids.append(best)
    assert lp.text_offset[1] == len(lp.tokens[0])


def test_chat_logprobs_streamed_equal_whole(oa):
    msgs = [{"role": "user", "content": "What is the capital of Japan?"}]
    whole = oa.chat.completions.create(model=NAME, messages=msgs, temperature=0, logprobs=True, top_logprobs=2)
    entries = whole.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == whole.choices[0].message.content
    assert all(e.logprob <= 0 and len(e.top_logprobs) == 2 for e in entries)
    assert all(e.top_logprobs[0].token == e.token for e in entries)  # greedy: the most likely
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)  # best first
    assert b"".join(bytes(e.bytes) for e in entries).decode() == whole.choices[0].message.content
    stream = oa.chat.completions.create(
        model=NAME, messages=msgs, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
    plain = oa.chat.completions.create(model=NAME, messages=msgs, temperature=0)
    assert plain.choices[0].logprobs is None


def test_presence_and_frequency_penalties(demo, oa):
    """Past the end of its answer (ignore_eos) the demo model repeats itself: there the
    penalties change the text, exactly as `generate_tokens` with them does."""
    model, tok = demo
    options = SamplingOptions(presence_penalty=2.0, frequency_penalty=1.0)
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    r = oa.completions.create(presence_penalty=2.0, frequency_penalty=1.0, **kw)
    ids = encode_prompt(tok, PROMPT, chat=False)
    want = list(generate_tokens(model, ids, max_tokens=30, options=options))
    assert r.choices[0].text == tok.decode(want)
    assert oa.completions.create(**kw).choices[0].text != r.choices[0].text  # the penalties did something


def test_logprobs_follow_the_text_a_stop_string_cuts(oa):
    """Tokens after a stop string are not reported; the ones before it all are."""
    msgs = [{"role": "user", "content": "What is the capital of Peru?"}]
    full = oa.chat.completions.create(model=NAME, messages=msgs, temperature=0, logprobs=True)
    text = full.choices[0].message.content
    stop = text[text.index(" is") :]  # cut after "The capital of Peru"
    r = oa.chat.completions.create(model=NAME, messages=msgs, temperature=0, logprobs=True, stop=[stop])
    entries = r.choices[0].logprobs.content
    assert r.choices[0].message.content == text[: text.index(" is")]
    assert "".join(e.token for e in entries) == r.choices[0].message.content
    stream = oa.chat.completions.create(
        model=NAME, messages=msgs, temperature=0, logprobs=True, stop=[stop], stream=True
    )
    streamed = [e.token for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in entries]


def test_top_logprobs_without_logprobs_is_a_400(oa):
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        oa.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], top_logprobs=2)


def test_chat_logprobs_after_a_thought_are_the_contents(oa):
    """The thought's markup (its close, the newline before it) is not content: every
    content token has its entry, and nothing else does."""
    msgs = [{"role": "user", "content": "What is 11 plus 11?"}]
    r = oa.chat.completions.create(
        model=NAME, messages=msgs, temperature=0, logprobs=True, reasoning_effort="high", max_tokens=40
    )
    choice = r.choices[0]
    assert choice.message.reasoning_content  # the demo thinks first
    assert "".join(e.token for e in choice.logprobs.content) == choice.message.content


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_top_logprobs_under_a_grammar_are_finite(oa, server_url):
    """Fewer tokens than top_logprobs asks for are allowed by the schema: the masked
    ones are left out (JSON has no -Infinity), streamed or not."""
    schema = {"type": "object", "properties": {"capital": {"type": "string"}}, "required": ["capital"]}
    body = {
        "model": NAME,
        "messages": [{"role": "user", "content": "Give me a JSON object with the capital of Japan."}],
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    status, _, raw = http("POST", server_url + "/v1/chat/completions", body)
    assert status == 200
    entries = _strict_json(raw)["choices"][0]["logprobs"]["content"]
    assert entries[0]["token"].startswith("{") and len(entries[0]["top_logprobs"]) < 20
    status, _, raw = http("POST", server_url + "/v1/chat/completions", dict(body, stream=True))
    chunks = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: {")]
    assert status == 200 and chunks and all(_strict_json(c) for c in chunks)


def test_raw_completion_keeps_its_first_space(demo, oa):
    """A raw completion goes on from its prompt's text: " Paris", not "Paris" (the
    first space is dropped only where a reply starts a turn); its log-probabilities
    cover every token and their offsets are where each token's text starts."""
    r = oa.completions.create(model=NAME, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=0)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text.startswith(" Paris")
    assert gemma4_mlx.generate(*demo, "The capital of France is", chat=False, max_tokens=8) == text
    assert "".join(lp.tokens) == text
    assert all(text.startswith(t, at) for t, at in zip(lp.tokens, lp.text_offset))


def test_streamed_text_offsets_count_from_the_completions_start(oa):
    kw = dict(model=NAME, prompt="Hello", max_tokens=8, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    whole = oa.completions.create(**kw).choices[0].logprobs.text_offset
    streamed = [
        o
        for c in oa.completions.create(stream=True, **kw)
        if c.choices[0].logprobs
        for o in c.choices[0].logprobs.text_offset
    ]
    assert streamed == whole and whole == sorted(whole) and whole[-1] > 0


def test_a_failure_finishing_the_text_is_a_500_not_a_hang(oa, monkeypatch):
    def broken(self):
        raise RuntimeError("finalize failed")

    monkeypatch.setattr(output_text.OutputText, "finalize", broken)
    with pytest.raises(openai.InternalServerError):
        oa.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0, timeout=20)
    monkeypatch.undo()
    assert oa.completions.create(model=NAME, prompt="Hello", max_tokens=4, temperature=0).choices[0].text
