"""Constrained decoding through the live server (real `openai` / `anthropic` clients,
demo model): `response_format` JSON schemas validate, `tool_choice` "required" or a
named function makes the model call a tool it would not have called, and a schema the
engine cannot compile is a 400 before any generation."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL

from helpers.live_server import live_server

NAME = "gemma4-demo"
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "country": {"enum": ["Japan", "Peru"]}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the local time in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
]


@pytest.fixture(scope="module")
def server():
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    with live_server(model, tok, model_name=NAME) as (url, _):
        yield url


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_response_format(oa, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    r = oa.chat.completions.create(
        model=NAME, messages=JAPAN, response_format=fmt, temperature=1.0, seed=seed, max_tokens=60
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_schema_streamed(oa):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    stream = oa.chat.completions.create(
        model=NAME, messages=JAPAN, response_format=fmt, temperature=0, max_tokens=60, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_tool_choice_required_and_named(oa):
    free = oa.chat.completions.create(model=NAME, messages=JAPAN, tools=TOOLS, temperature=0)
    assert not free.choices[0].message.tool_calls  # the demo answers this one itself
    r = oa.chat.completions.create(model=NAME, messages=JAPAN, tools=TOOLS, tool_choice="required", temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and r.choices[0].finish_reason == "tool_calls"
    assert calls[0].function.name in ("get_weather", "get_time") and "city" in json.loads(calls[0].function.arguments)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = oa.chat.completions.create(model=NAME, messages=JAPAN, tools=TOOLS, tool_choice=named, temperature=0)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]


def test_a_forced_call_is_made_even_when_the_model_would_end_inside_its_thought(oa, token_id):
    """With thinking on the grammar waits for the thought to close; a model that ended
    its turn inside the thought finished with no call although one was forced
    (Codex saw it once). There the model's score for ending now closes the thought,
    and the grammar then has its call. The end token is boosted to force the case."""
    end = token_id("<turn|>")
    r = oa.chat.completions.create(
        model=NAME,
        messages=JAPAN,
        tools=TOOLS,
        tool_choice="required",
        reasoning_effort="high",
        temperature=0,
        logit_bias={end: 30},
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice


@pytest.fixture(scope="module")
def token_id():
    tok = gemma4_mlx.load(DEMO_MODEL)[1]
    return lambda text: str(tok.convert_tokens_to_ids(text))


def _json_with_thinking(oa, token_id, messages, ban_thought: bool, **kw):
    """A JSON-schema reply with thinking on, greedy; ban_thought: `<|channel>` banned,
    so that the model opens no thought of its own."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    bias = {"logit_bias": {token_id("<|channel>"): -100}} if ban_thought else {}
    return oa.chat.completions.create(
        model=NAME, messages=messages, response_format=fmt, reasoning_effort="high", temperature=0, **bias, **kw
    )


def test_a_reply_that_skips_its_thought_still_follows_the_format(oa, token_id):
    """With thinking on the grammar used to wait for the thought's close, so a reply
    that opened no thought was never constrained (`The capital of Japan is Tokyo.`
    for a JSON format). The grammar now applies from the first token unless that
    token opens a thought. Banning `<|channel>` forces the case."""
    r = _json_with_thinking(oa, token_id, JAPAN, ban_thought=True, max_tokens=60)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    thought = _json_with_thinking(oa, token_id, JAPAN, ban_thought=False, max_tokens=120)
    assert thought.choices[0].message.reasoning_content
    jsonschema.validate(json.loads(thought.choices[0].message.content), SCHEMA)  # and after a thought


def test_a_prefill_names_what_constrains_the_reply(oa):
    """A reply that continues an assistant message cannot start a grammar; the 400
    names the cause (a strict tool was refused as "a response format or forced tools")."""
    prefilled = JAPAN + [{"role": "assistant", "content": "The capital"}]
    strict = [TOOLS[0] | {"function": TOOLS[0]["function"] | {"strict": True}}]
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    for args, says in (
        (dict(tools=strict), "cannot take a strict tool or a custom tool's grammar"),
        (dict(response_format=fmt), "cannot take a response format"),
        (dict(tools=TOOLS, tool_choice="required"), "cannot take a forced tool choice"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model=NAME, messages=prefilled, **args)
        assert says in e.value.body["message"], args


AFTER_A_TOOL = JAPAN + [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Tokyo"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"time": "10:00"}'},
]


@pytest.mark.parametrize("budget", [None, 3])
def test_after_a_tool_result_the_thought_the_template_opened_stays_free(oa, token_id, budget):
    """With thinking on, the prompt after a tool result ends inside a thought the
    template opened (`<|channel>thought`). The grammar must wait for its close: it
    was applied at once, so the JSON went into the reasoning and the content was
    empty, and with a thinking budget the forced close broke the grammar and the
    answer came back unconstrained. `<|channel>` is banned so that the model does
    not open a second thought inside the first."""
    extra = {} if budget is None else {"thinking_token_budget": budget}
    r = _json_with_thinking(oa, token_id, AFTER_A_TOOL, ban_thought=True, tools=TOOLS, max_tokens=80, extra_body=extra)
    message = r.choices[0].message
    assert message.reasoning_content and not message.reasoning_content.lstrip().startswith("{")
    jsonschema.validate(json.loads(message.content), SCHEMA)


def test_anthropic_tool_choice_any(server):
    an = anthropic.Anthropic(base_url=server, api_key="x", max_retries=0, timeout=60)
    tools = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]
    r = an.messages.create(
        model=NAME,
        messages=JAPAN,
        tools=tools,
        tool_choice={"type": "any"},
        max_tokens=60,
        extra_body={"temperature": 0},
    )
    assert r.stop_reason == "tool_use" and any(b.type == "tool_use" for b in r.content)


def test_uncompilable_schema_is_a_400(oa):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=NAME, messages=JAPAN, response_format=bad)
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        oa.chat.completions.create(model=NAME, messages=JAPAN, response_format={"type": "yaml"})


def test_malformed_tool_declarations_are_a_400(oa):
    """A string for `parameters` crashed the chat template (a 500); a strict tool's bad
    maxLength escaped the grammar writer as a TypeError (a 500)."""
    for tool, says in (
        ({"type": "function", "function": {"name": "f", "parameters": "x"}}, "tools[0].parameters: expected an object"),
        ({"type": "function", "function": {"parameters": {}}}, "tools[0]: expected a function with a name"),
        (
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "strict": True,
                    "parameters": {"type": "object", "properties": {"x": {"type": "string", "maxLength": [1]}}},
                },
            },
            "maxLength: expected an integer",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model=NAME, messages=JAPAN, tools=[tool])
        assert says in e.value.body["message"], e.value.body


def test_a_schema_the_grammar_cannot_enforce_frees_only_a_tool_that_is_not_strict(oa):
    """A forced tool whose schema has keywords the call grammar cannot enforce
    (`minimum`, `pattern`) is still called, its arguments free (this was a 400 that
    OpenAI does not give); declared `strict`, the same tool is a 400 naming them."""
    props = {"city": {"type": "string", "pattern": "^[A-Z]"}, "days": {"type": "integer", "minimum": 1}}
    fn = {"name": "forecast", "description": "Forecast a city's weather.", "parameters": {"type": "object"}}
    fn["parameters"]["properties"] = props
    named = {"type": "function", "function": {"name": "forecast"}}
    for choice in (named, "required"):
        r = oa.chat.completions.create(
            model=NAME, messages=JAPAN, tools=[{"type": "function", "function": fn}], tool_choice=choice, temperature=0
        )
        calls = r.choices[0].message.tool_calls
        assert calls and {c.function.name for c in calls} == {"forecast"}, choice
        assert all(isinstance(json.loads(c.function.arguments), dict) for c in calls)
    strict = [{"type": "function", "function": fn | {"strict": True}}]
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=NAME, messages=JAPAN, tools=strict, tool_choice=named)
    assert "tools.forecast.parameters.city: strict tool calls cannot enforce ['pattern']" in e.value.body["message"]
    # a strict tool beside it constrains the request; the loose one is still callable
    beside = [{"type": "function", "function": fn}, TOOLS[0] | {"function": TOOLS[0]["function"] | {"strict": True}}]
    r = oa.chat.completions.create(model=NAME, messages=JAPAN, tools=beside, tool_choice=named, temperature=0)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["forecast"]


def test_grammar_engine_failures_are_a_400_not_a_finished_answer(oa):
    """A `$ref` loop fails at the engine's first mask (now before anything runs); a
    pattern past the engine's limits failed only mid-output, and the reply used to end
    as a normal "stop" with broken JSON."""
    loop = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=NAME, messages=JAPAN, response_format=loop)
    assert e.value.body["param"] == "response_format"
    code = {"type": "string", "pattern": "^(ab{1000}){1000}$"}
    schema = {"type": "object", "properties": {"code": code}, "required": ["code"]}
    huge = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=NAME, messages=JAPAN, response_format=huge, max_tokens=40)
    assert "the output grammar failed while decoding" in e.value.body["message"], e.value.body
    assert oa.chat.completions.create(model=NAME, messages=JAPAN, max_tokens=8).choices[0].message.content
