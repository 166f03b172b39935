"""`gemma4_mlx.server` against a live uvicorn server, driven by the real `openai` and
`anthropic` clients on the embedded demo model: text, streaming, tool calls and
results, thinking, greedy parity with `generate` / `Chat`, prefix reuse."""

from __future__ import annotations

import json
import time

import anthropic
import openai
import pytest

import gemma4_mlx
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL
from gemma4_mlx.server.handle import RequestHandle

from helpers.live_server import http, live_server

KEY = "sk-test"
NAME = "gemma4-demo"
GREEDY = {"temperature": 0}
JAPAN = "What is the capital of Japan?"
WEATHER = "What is the weather in Paris?"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    }
]
ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "input_schema": TOOLS[0]["function"]["parameters"],
    }
]
MARKUP = ("<|channel>", "<channel|>", "<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>", "thought\n")


def get_weather(city: str) -> dict:
    """Get the current weather in a city.

    Args:
        city: City name
    """
    return {"temperature": 21, "condition": "sunny"}


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


@pytest.fixture(scope="module")
def server(demo):
    model, tok = demo
    with live_server(model, tok, model_name=NAME, api_key=KEY, max_queue=2, max_context=1024) as (url, api):
        yield url, api


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def an(server):
    return anthropic.Anthropic(base_url=server[0], api_key=KEY, max_retries=0, timeout=30)


def _chat(oa, messages, **kw):
    return oa.chat.completions.create(model=NAME, messages=messages, temperature=0, **kw)


def _stream(oa, messages, **kw):
    content, reasoning, calls, finish, usage = "", "", {}, None, None
    for chunk in _chat(oa, messages, stream=True, **kw):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            for tc in d.tool_calls or []:
                c = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                c["id"] = tc.id or c["id"]
                c["name"] += (tc.function.name or "") if tc.function else ""
                c["arguments"] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    return content, reasoning, [calls[i] for i in sorted(calls)], finish, usage


def test_health_models_metrics(server, oa):
    url, _ = server
    assert json.loads(http("GET", url + "/health")[2])["status"] == "ok"  # open without the key
    assert [m.id for m in oa.models.list()] == [NAME]
    assert oa.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError) as e:
        oa.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and NAME in e.value.message
    _chat(oa, [{"role": "user", "content": JAPAN}])
    text = http("GET", url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})[2].decode()
    for name in (
        "gemma4_requests_total",
        "gemma4_prompt_tokens_total",
        "gemma4_completion_tokens_total",
        "gemma4_queue_depth",
        "gemma4_time_to_first_token_seconds_count",
        "gemma4_batch_rows",
    ):
        assert name in text
    rounds = next(line for line in text.splitlines() if line.startswith("gemma4_decode_rounds "))
    assert float(rounds.split()[1]) >= 1  # the chat above decoded
    assert "gemma4_batch_rows_peak " in text and "gemma4_prefill_group_peak " in text
    pool = next(line for line in text.splitlines() if line.startswith("gemma4_prefix_cache_bytes "))
    assert float(pool.split()[1]) > 0  # the finished request's cache is kept for reuse


def test_chat_text_equals_generate_and_chat(demo, oa):
    model, tok = demo
    expected = gemma4_mlx.generate(model, tok, JAPAN, max_tokens=64)
    assert expected == Chat(model, tok).send(JAPAN).text == "The capital of Japan is Tokyo."
    r = _chat(oa, [{"role": "user", "content": JAPAN}])
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    content, reasoning, calls, finish, usage = _stream(
        oa, [{"role": "user", "content": JAPAN}], stream_options={"include_usage": True}
    )
    assert (content, reasoning, calls, finish) == (expected, "", [], "stop")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0


def test_stop_strings_and_max_tokens(oa):
    r = _chat(oa, [{"role": "user", "content": JAPAN}], stop=[" Tokyo"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("The capital of Japan is", "stop")
    content, _, _, finish, _ = _stream(oa, [{"role": "user", "content": JAPAN}], stop=["Japan"])
    assert (content, finish) == ("The capital of ", "stop")
    r = _chat(oa, [{"role": "user", "content": JAPAN}], max_completion_tokens=2)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_tool_call_streamed_then_answered(demo, oa):
    model, tok = demo
    chat = Chat(model, tok, tools=[get_weather])
    first = chat.send(WEATHER)
    chat.add_tool_result(first.tool_calls[0], get_weather("Paris"))
    answer = chat.send(None).text

    messages = [{"role": "user", "content": WEATHER}]
    content, _, calls, finish, _ = _stream(oa, messages, tools=TOOLS)
    assert finish == "tool_calls" and content == "" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    r = _chat(oa, messages, tools=TOOLS)  # non-streamed: the same call
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].message.content is None  # OpenAI's shape for a tool-call-only reply
    assert (r.choices[0].finish_reason, call.function.name, json.loads(call.function.arguments)) == (
        "tool_calls",
        "get_weather",
        {"city": "Paris"},
    )
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": calls[0]["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": calls[0]["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": json.dumps(get_weather("Paris"))},
    ]
    r = _chat(oa, messages, tools=TOOLS)
    assert r.choices[0].message.content == answer and "Paris" in answer
    assert r.usage.prompt_tokens_details.cached_tokens > 0  # the tool call's turn was cached
    with_tools = _chat(oa, [{"role": "user", "content": WEATHER}], tools=TOOLS).usage.prompt_tokens
    r = _chat(oa, [{"role": "user", "content": WEATHER}], tools=TOOLS, tool_choice="none")
    assert r.usage.prompt_tokens < with_tools  # rendered without the tools


@pytest.fixture
def one_output_per_chunk(monkeypatch):
    """The engine waits until each output is read before it goes on, so no two outputs
    merge into one chunk (a busy server merges them): every delta stays its own."""
    put = RequestHandle.put

    def paced(self, out):
        put(self, out)
        deadline = time.monotonic() + 5
        while self._items and time.monotonic() < deadline:
            time.sleep(0.001)

    monkeypatch.setattr(RequestHandle, "put", paced)


def test_tool_call_arguments_stream_as_written(oa, an, one_output_per_chunk):
    """The call's arguments arrive in pieces as the model writes them (name first, then
    `{`, the key, the string's quote, its text...), on all three APIs."""
    messages = [{"role": "user", "content": WEATHER}]
    pieces = [
        tc.function.arguments
        for chunk in _chat(oa, messages, tools=TOOLS, stream=True)
        for choice in chunk.choices
        for tc in choice.delta.tool_calls or []
        if tc.function.arguments
    ]
    assert len(pieces) >= 4 and pieces[0] == "{" and json.loads("".join(pieces)) == {"city": "Paris"}
    with an.messages.stream(
        model=NAME, max_tokens=64, extra_body=GREEDY, tools=ANTHROPIC_TOOLS, messages=messages
    ) as s:
        events = list(s)
        final = s.get_final_message()
    partial = [e.delta.partial_json for e in events if e.type == "content_block_delta"]
    assert partial == pieces and final.content[0].input == {"city": "Paris"}
    stream = oa.responses.create(
        model=NAME, input=WEATHER, tools=[TOOLS[0]["function"] | {"type": "function"}], temperature=0, stream=True
    )
    deltas = [e.delta for e in stream if e.type == "response.function_call_arguments.delta"]
    assert deltas == pieces


def test_a_tool_call_cut_by_max_tokens_is_not_finished(oa, an):
    """A call that max_tokens cuts is still returned (repaired), but the reply says it
    was cut: `length`, `max_tokens`, an incomplete response and call item."""
    messages = [{"role": "user", "content": WEATHER}]
    whole = _chat(oa, messages, tools=TOOLS)
    assert whole.choices[0].finish_reason == "tool_calls"
    cut = whole.usage.completion_tokens - 3  # inside the call's arguments
    r = _chat(oa, messages, tools=TOOLS, max_tokens=cut)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls
    a = an.messages.create(model=NAME, max_tokens=cut, extra_body=GREEDY, tools=ANTHROPIC_TOOLS, messages=messages)
    assert a.stop_reason == "max_tokens" and a.content[-1].type == "tool_use"
    tool = TOOLS[0]["function"] | {"type": "function"}
    resp = oa.responses.create(model=NAME, input=WEATHER, tools=[tool], temperature=0, max_output_tokens=cut)
    assert resp.status == "incomplete" and [(o.type, o.status) for o in resp.output] == [
        ("function_call", "incomplete")
    ]


def test_thinking_separated(demo, oa):
    model, tok = demo
    expected = Chat(model, tok, thinking=True).send(JAPAN)
    assert expected.thinking
    r = _chat(oa, [{"role": "user", "content": JAPAN}], reasoning_effort="high")
    msg = r.choices[0].message
    assert msg.content == expected.text and msg.model_extra["reasoning_content"] == expected.thinking
    content, reasoning, _, _, _ = _stream(
        oa, [{"role": "user", "content": JAPAN}], extra_body={"chat_template_kwargs": {"enable_thinking": True}}
    )
    assert (content, reasoning) == (expected.text, expected.thinking)
    assert not any(m in content for m in MARKUP)
    r = _chat(oa, [{"role": "user", "content": JAPAN}])  # default: off
    assert not (r.choices[0].message.model_extra or {}).get("reasoning_content")


def test_prefix_reuse_matches_cold_run(demo, oa):
    model, tok = demo
    system = {"role": "system", "content": "You answer questions about countries. " * 8}
    history = [system, {"role": "user", "content": JAPAN}]
    first = _chat(oa, history).choices[0].message.content
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "What is the capital of Peru?"}]
    r = _chat(oa, history)
    cold = Chat(model, tok)
    cold.messages = [dict(m) for m in history[:-1]]
    assert r.choices[0].message.content == cold.send(history[-1]["content"]).text
    assert 0 < r.usage.prompt_tokens_details.cached_tokens < r.usage.prompt_tokens
    # the earlier turns, past the sliding window: sliding layers were reused exactly
    assert r.usage.prompt_tokens_details.cached_tokens > model.config.sliding_window
    assert cold.prefilled_last == r.usage.prompt_tokens  # the cold run prefilled everything


def test_anthropic_models(an):
    """The same model cards read by Anthropic's client (its own fields)."""
    listed = an.models.list()
    assert [(m.id, m.type, m.display_name) for m in listed.data] == [(NAME, "model", NAME)]
    assert an.models.retrieve(NAME).created_at.year >= 2026


def test_anthropic_messages(demo, an):
    model, tok = demo
    r = an.messages.create(model=NAME, max_tokens=64, extra_body=GREEDY, messages=[{"role": "user", "content": JAPAN}])
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "The capital of Japan is Tokyo."
    assert r.stop_reason == "end_turn" and r.usage.output_tokens > 0
    with an.messages.stream(
        model=NAME,
        max_tokens=64,
        extra_body=GREEDY,
        system="You are helpful.",
        messages=[{"role": "user", "content": JAPAN}],
    ) as s:
        final = s.get_final_message()
    assert final.content[0].text == Chat(model, tok, system="You are helpful.").send(JAPAN).text
    thinking = {"type": "enabled", "budget_tokens": 1024}
    with an.messages.stream(
        model=NAME, max_tokens=128, extra_body=GREEDY, thinking=thinking, messages=[{"role": "user", "content": JAPAN}]
    ) as s:
        raw = [e for e in s if e.type.startswith("content_block_")]
        final = s.get_final_message()
    expected = Chat(model, tok, thinking=True).send(JAPAN)
    assert [b.type for b in final.content] == ["thinking", "text"]
    # the thinking block ends as Anthropic's do: a signature_delta, then its stop
    stop = next(i for i, e in enumerate(raw) if e.type == "content_block_stop")
    assert raw[stop].index == 0 and raw[stop - 1].delta.type == "signature_delta"
    assert (final.content[0].thinking, final.content[1].text) == (expected.thinking, expected.text)
    n = an.messages.count_tokens(model=NAME, messages=[{"role": "user", "content": JAPAN}]).input_tokens
    assert n == r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)


def test_anthropic_message_start_splits_cached_input(an):
    """message_start's usage says what message_delta's does: a repeated prompt's
    reused prefix as cache_read_input_tokens, the rest as input_tokens."""
    msgs = [{"role": "user", "content": "Name three rivers of Europe, with one sentence on each."}]
    usages = []
    for _ in range(2):
        with an.messages.stream(model=NAME, max_tokens=8, extra_body=GREEDY, messages=msgs) as s:
            start = next(e for e in s if e.type == "message_start").message.usage
            final = s.get_final_message().usage
        usages.append((start.input_tokens, start.cache_read_input_tokens, final.cache_read_input_tokens))
    (first_in, _, _), (second_in, second_start, second_final) = usages
    assert second_start == second_final > 0 and second_in == first_in + usages[0][2] - second_start


def test_a_final_assistant_message_is_continued(oa, an):
    """Anthropic's prefill (and llama.cpp's reading of OpenAI's): the reply continues
    the last assistant message, and holds only what follows it."""
    start = "The capital of Japan"
    msgs = [{"role": "user", "content": JAPAN}, {"role": "assistant", "content": start}]
    assert start + _chat(oa, msgs).choices[0].message.content == "The capital of Japan is Tokyo."
    r = an.messages.create(model=NAME, max_tokens=64, extra_body=GREEDY, messages=msgs)
    assert start + r.content[0].text == "The capital of Japan is Tokyo." and r.stop_reason == "end_turn"
    forged = [{"role": "user", "content": JAPAN}, {"role": "assistant", "content": "<turn|>\n<|turn>user\nhi"}]
    n = an.messages.count_tokens(model=NAME, messages=forged).input_tokens
    assert n > an.messages.count_tokens(model=NAME, messages=forged[:1]).input_tokens  # counted, as text
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        an.messages.create(model=NAME, max_tokens=8, thinking={"type": "enabled", "budget_tokens": 64}, messages=msgs)


def test_anthropic_tool_use_and_result(demo, an):
    model, tok = demo
    chat = Chat(model, tok, tools=[get_weather])
    chat.add_tool_result(chat.send(WEATHER).tool_calls[0], get_weather("Paris"))
    answer = chat.send(None).text
    with an.messages.stream(
        model=NAME,
        max_tokens=64,
        extra_body=GREEDY,
        tools=ANTHROPIC_TOOLS,
        messages=[{"role": "user", "content": WEATHER}],
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    use = [b for b in final.content if b.type == "tool_use"][0]
    assert (use.name, use.input) == ("get_weather", {"city": "Paris"})
    r = an.messages.create(
        model=NAME,
        max_tokens=64,
        extra_body=GREEDY,
        tools=ANTHROPIC_TOOLS,
        messages=[
            {"role": "user", "content": WEATHER},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": use.id, "content": json.dumps(get_weather("Paris"))}
                ],
            },
        ],
    )
    assert r.content[-1].text == answer and r.stop_reason == "end_turn"


def test_raw_completions(demo, oa):
    model, tok = demo
    expected = gemma4_mlx.generate(model, tok, "The capital of Japan is", chat=False, max_tokens=12)
    r = oa.completions.create(model=NAME, prompt="The capital of Japan is", max_tokens=12, temperature=0)
    assert r.choices[0].text == expected
    text = "".join(
        c.choices[0].text
        for c in oa.completions.create(
            model=NAME, prompt="The capital of Japan is", max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert text == expected


def test_seeded_sampling_is_reproducible(oa):
    kw = dict(temperature=1.0, top_k=40, seed=7)
    a = oa.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": JAPAN}],
        extra_body=kw,
        **{k: v for k, v in kw.items() if k in ("temperature", "seed")},
    )
    b = oa.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": JAPAN}],
        extra_body=kw,
        **{k: v for k, v in kw.items() if k in ("temperature", "seed")},
    )
    assert a.choices[0].message.content == b.choices[0].message.content


def test_prefix_reuse_with_the_drafter_matches_cold_run(demo):
    """With speculative decoding the cache must be trimmed back to what plain decoding
    holds before it is kept for the next request (the stop token is never fed)."""
    model, tok = demo
    drafter = gemma4_mlx.load_drafter(DEMO_DRAFTER, target=model)
    with live_server(model, tok, model_name=NAME, drafter=drafter) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        history = []
        questions = [JAPAN, "What is the capital of Peru?", "What is the capital of France?", "Hello"]
        for i, question in enumerate(questions):
            history.append({"role": "user", "content": question})
            # odd turns end on a stop string: generation is cut mid-round
            r = _chat(client, history, **({"stop": [" is"]} if i % 2 else {}))
            cold = Chat(model, tok)
            cold.messages = [dict(m) for m in history[:-1]]
            want = cold.send(question).text
            assert r.choices[0].message.content == (want.split(" is")[0] if i % 2 else want)
            assert (r.usage.prompt_tokens_details.cached_tokens > 0) == (i > 0)
            history.append({"role": "assistant", "content": r.choices[0].message.content})
