"""OpenAI's `n` (several choices per request) and `logit_bias` through the live server
(real `openai` client, demo model): each choice is the generation the same request
with n = 1 (and the choice's seed) gives; a bias moves the text exactly as
`generate_tokens` with the same bias does; bad values are 400s naming the field."""

from __future__ import annotations

import time
from types import SimpleNamespace

import openai
import pytest

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.tokens import encode_prompt
from gemma4_mlx.runtime.generate import SamplingOptions, generate_tokens
from gemma4_mlx.server.app import ServerState
from gemma4_mlx.server.errors import APIError
from gemma4_mlx.server.handle import Request, RequestHandle
from gemma4_mlx.server.prompts import choices

from helpers.live_server import live_server, wait_idle

NAME = "gemma4-demo"
PROMPT = "<|turn>user\nWhat is the capital of Peru?<turn|>\n<|turn>model\n"
PERU = [{"role": "user", "content": "What is the capital of Peru?"}]


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


@pytest.fixture(scope="module")
def server(demo):
    model, tok = demo
    with live_server(model, tok, model_name=NAME, max_queue=4) as (url, api):
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60), api


@pytest.fixture(scope="module")
def oa(server):
    return server[0]


def test_n_choices_are_what_each_seed_gives_alone(oa):
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=20, temperature=1.5, extra_body={"ignore_eos": True})
    many = oa.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [oa.completions.create(seed=s, **kw).choices[0].text for s in (7, 8, 9)]
    assert [c.text for c in many.choices] == alone
    assert len(set(alone)) > 1  # the seeds do differ on this prompt
    single = oa.completions.create(seed=7, **kw)
    assert many.usage.prompt_tokens == single.usage.prompt_tokens
    assert many.usage.completion_tokens == sum(
        oa.completions.create(seed=s, **kw).usage.completion_tokens for s in (7, 8, 9)
    )


def test_n_chat_streamed_equals_whole(oa):
    kw = dict(model=NAME, messages=PERU, max_tokens=16, temperature=1.5, seed=3, n=2)
    whole = oa.chat.completions.create(**kw)
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for c in oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if c.usage:
            usage = c.usage
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_greedy_choices_are_equal(oa):
    r = oa.chat.completions.create(model=NAME, messages=PERU, max_tokens=10, temperature=0, n=3)
    assert len(r.choices) == 3 and len({c.message.content for c in r.choices}) == 1


def test_n_out_of_range_is_400(oa):
    for n in (0, 17):
        with pytest.raises(openai.BadRequestError, match="n"):
            oa.chat.completions.create(model=NAME, messages=PERU, n=n)


def test_n_more_than_the_queue_holds_is_400(oa):
    with pytest.raises(openai.BadRequestError) as e:  # a 429 would be retried forever
        oa.chat.completions.create(model=NAME, messages=PERU, n=5, max_tokens=4)  # max_queue is 4
    assert e.value.body["param"] == "n"


def test_n_over_the_free_queue_is_429(server):
    oa, api = server
    engine = api.state.server.engine
    busy = oa.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=2000, n=2, stream=True, extra_body={"ignore_eos": True}
    )  # two rows generating until closed
    next(iter(busy))
    try:
        with pytest.raises(openai.RateLimitError):
            oa.chat.completions.create(model=NAME, messages=PERU, n=3, max_tokens=4)  # 2 + 3 > max_queue 4
    finally:
        busy.close()
    assert wait_idle(engine) == 0  # the refused request's queued choices leave too
    r = oa.chat.completions.create(model=NAME, messages=PERU, n=4, max_tokens=4, temperature=0)
    assert len(r.choices) == 4


def test_submit_all_cancels_what_it_queued_when_one_is_refused():
    class Engine:
        def __init__(self):
            self.handles, self.engine = [], SimpleNamespace(max_queue=10)

        def submit(self, request):
            if len(self.handles) == 2:
                raise APIError(429, "server busy")
            self.handles.append(RequestHandle(request, None))
            return self.handles[-1]

    state = Engine()
    requests = choices(Request(ids=[1, 2], keys=[1, 2]), 3)
    with pytest.raises(APIError):
        ServerState.submit_all(state, requests)
    assert [r.cancelled.is_set() for r in requests] == [True, True, False]


def test_choices_are_copies_with_their_own_seed_and_cancel_flag():
    first = Request(ids=[1, 2], keys=[1, 2], options=SamplingOptions(temperature=1.0, seed=2**64 - 1))
    out = choices(first, 3)
    assert out[0] is first and [r.options.seed for r in out] == [2**64 - 1, 0, 1]
    assert len({id(r.cancelled) for r in out}) == 3 and len({id(r.ids) for r in out}) == 3
    unseeded = choices(Request(ids=[1], keys=[1]), 2)
    assert [r.options.seed for r in unseeded] == [None, None]


def test_a_client_leaving_cancels_every_choice(server):
    oa, api = server
    engine = api.state.server.engine
    stream = oa.completions.create(
        model=NAME, prompt=PROMPT, max_tokens=2000, n=3, stream=True, extra_body={"ignore_eos": True}
    )  # ~20 s of tokens if nobody stops them
    chunks = iter(stream)
    for _ in range(6):
        next(chunks)
    stream.close()
    assert wait_idle(engine) == 0
    assert all(len(e.keys) < 1000 for e in engine.scheduler.pool.entries[-3:])


def test_logit_bias_moves_the_text_as_generate_does(demo, oa):
    model, tok = demo
    ids = encode_prompt(tok, PROMPT, chat=False)
    plain = list(generate_tokens(model, ids, max_tokens=8))
    bias = {plain[0]: -100.0, plain[1]: 5.0}
    want = list(generate_tokens(model, ids, max_tokens=8, options=SamplingOptions(logit_bias=bias)))
    assert want[0] != plain[0]
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    r = oa.completions.create(logit_bias={str(k): v for k, v in bias.items()}, **kw)
    assert r.choices[0].text == tok.decode(want)
    assert oa.completions.create(**kw).choices[0].text == tok.decode(plain)


@pytest.mark.parametrize(
    ("bias", "says"),
    [({"abc": 1}, "is not a token id"), ({"99999999": 1}, "is not a token id"), ({"5": 101}, "outside [-100, 100]")],
)
def test_bad_logit_bias_is_400(oa, bias, says):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=NAME, messages=PERU, logit_bias=bias)
    assert says in e.value.body["message"] and e.value.body["param"] == "logit_bias"


def test_logit_bias_in_the_python_api_is_checked():
    with pytest.raises(ValueError, match="logit_bias: key 'x'"):
        SamplingOptions(logit_bias={"x": 1.0})
    with pytest.raises(ValueError, match=r"logit_bias\[3\] nan"):
        SamplingOptions(logit_bias={3: float("nan")})


def test_logit_bias_out_of_vocabulary_in_the_python_api(demo):
    model, tok = demo
    ids = encode_prompt(tok, PROMPT, chat=False)
    options = SamplingOptions(logit_bias={model.config.vocab_size: 1.0})
    with pytest.raises(ValueError, match="is not in the vocabulary"):
        list(generate_tokens(model, ids, max_tokens=2, options=options))


def test_stream_generate_takes_logit_bias_and_checks_it_at_the_call(demo):
    model, tok = demo
    plain = gemma4_mlx.generate(model, tok, "What is the capital of Peru?", max_tokens=6)
    first = tok.encode(plain, add_special_tokens=False)[0]
    biased = gemma4_mlx.generate(model, tok, "What is the capital of Peru?", max_tokens=6, logit_bias={first: -100})
    assert biased != plain and not biased.startswith(tok.decode([first]))
    with pytest.raises(ValueError, match="is not in the vocabulary"):
        gemma4_mlx.stream_generate(model, tok, "hi", logit_bias={model.config.vocab_size: 1.0})  # no next()


def test_streamed_choices_start_before_all_have_rows(demo):
    """With more choices than batch rows, the stream starts with the first choice's
    tokens: later choices join when earlier ones free their rows (they used to hold
    back the whole stream until then)."""
    model, tok = demo
    with live_server(model, tok, model_name=NAME, max_batch=2) as (url, _):
        oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        kw = dict(model=NAME, prompt=PROMPT, max_tokens=300, temperature=0, extra_body={"ignore_eos": True})
        start = time.monotonic()
        stream = oa.completions.create(n=3, stream=True, **kw)
        first = next(iter(stream))
        waited = time.monotonic() - start
        seen = {first.choices[0].index} | {c.choices[0].index for c in stream if c.choices}
        alone = time.monotonic()
        oa.completions.create(**kw)
        one_choice = time.monotonic() - alone
    assert seen == {0, 1, 2} and waited < one_choice / 2, (waited, one_choice)
