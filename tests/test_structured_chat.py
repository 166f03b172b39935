"""Structured outputs in chat sessions (docs/structured-output.md §4, §5): the
answer follows `response_format` (after the thought when thinking), and strict tool
calls name declared tools only, with arguments valid under their schemas."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest

import gemma4_mlx
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.constrain import ConstraintError, bind
from gemma4_mlx.constrain.tools import INPUT_FORMAT, tool_call_grammar
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL
from gemma4_mlx.prompt.parser import parse
from gemma4_mlx.prompt.tokens import encode_prompt
from gemma4_mlx.prompt.tool_schema import tool_schema
from gemma4_mlx.runtime.generate import SamplingOptions, batch_generate

from test_structured import random_model

ANSWER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "sure": {"type": "boolean"}},
    "required": ["city", "sure"],
    "additionalProperties": False,
}
RF = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER}}


def get_weather(city: str) -> dict:
    """Get the current weather in a city."""
    return {"temperature": 20, "condition": "sunny"}


def get_time(zone: Literal["utc", "cet", "jst"], seconds: bool = False) -> str:
    """The time in a zone."""
    return "12:00"


def set_alarm(hour: int, days: list[Literal["mon", "tue", "wed"]], label: Literal["gym", "work"] | None = None) -> str:
    """Set an alarm."""
    return "ok"


def params(fn) -> dict:
    """The tool's parameter schema for jsonschema: "nullable" (OpenAPI, what
    `tool_schema` writes) as JSON Schema's null alternative."""

    def fix(x):
        if isinstance(x, dict):
            x = {k: fix(v) for k, v in x.items()}
            if x.pop("nullable", False):
                x = {"anyOf": [x, {"type": "null"}]}
        return x

    return fix(tool_schema(fn)["function"]["parameters"])


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_answer_follows_response_format(demo, thinking):
    model, tok = demo
    chat = Chat(model, tok, thinking=thinking, max_tokens=120)
    reply = chat.send("What is the capital of Japan?", response_format=RF)
    jsonschema.validate(json.loads(reply.text), ANSWER)
    if thinking:  # the thought stayed free: words, not JSON
        assert reply.thinking and not reply.thinking.lstrip().startswith("{")
    free = chat.send("What is the capital of Peru?")  # the format was for one turn
    assert not free.text.startswith("{")


def test_chat_reply_that_skips_its_thought_still_follows_the_format(demo):
    """Chat with thinking on: a reply that opens no thought (`<|channel>` banned here)
    is constrained from its first token (it was free text: the grammar waited for a
    close that never came)."""
    model, tok = demo
    ban = SamplingOptions(logit_bias={tok.convert_tokens_to_ids("<|channel>"): -100})
    reply = Chat(model, tok, thinking=True, max_tokens=60, options=ban).send(
        "What is the capital of Japan?", response_format=RF
    )
    assert not reply.thinking
    jsonschema.validate(json.loads(reply.text), ANSWER)


def test_chat_after_a_tool_result_keeps_the_primed_thought_free(demo):
    """After a tool result with thinking on, the prompt ends in a thought the template
    opened; the format applies after its close (it was applied at once: the JSON went
    into the thought and the answer was free text)."""
    model, tok = demo
    ban = SamplingOptions(logit_bias={tok.convert_tokens_to_ids("<|channel>"): -100})  # no second thought inside
    chat = Chat(model, tok, thinking=True, tools=[get_weather], max_tokens=80, options=ban)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    chat.messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": json.dumps({"temperature": 20})},
    ]
    reply = chat.send(None, response_format=RF)
    assert reply.thinking and not reply.thinking.lstrip().startswith("{")
    jsonschema.validate(json.loads(reply.text), ANSWER)


def test_chat_default_response_format_and_early_refusal(demo):
    model, tok = demo
    chat = Chat(model, tok, response_format=RF, max_tokens=60)
    jsonschema.validate(json.loads(chat.send("Hello!").text), ANSWER)
    with pytest.raises(ConstraintError, match=r"^response_format.json_schema.schema: "):
        Chat(model, tok, response_format={"type": "json_schema", "json_schema": {"schema": {"type": 3}}})
    with pytest.raises(ConstraintError):
        chat.send("Hi", response_format={"type": "regex", "regex": "("})
    assert len(chat.messages) == 2  # the refused turn left no trace


def test_strict_tools_cannot_call_an_undeclared_tool(demo):
    """The demo calls get_weather when asked about weather; with only get_time
    declared, strict mode keeps it from naming get_weather."""
    model, tok = demo
    loose = Chat(model, tok, tools=[get_time], max_tokens=60).send("What's the weather in Paris?")
    assert [c.name for c in loose.tool_calls] == ["get_weather"]  # what strict mode must prevent
    strict = Chat(model, tok, tools=[get_time], strict_tools=True, max_tokens=60).send("What's the weather in Paris?")
    assert all(c.name == "get_time" for c in strict.tool_calls)
    for c in strict.tool_calls:
        jsonschema.validate(c.arguments, params(get_time))


def test_strict_tool_call_of_a_declared_tool_validates(demo):
    model, tok = demo
    reply = Chat(model, tok, tools=[get_weather], strict_tools=True, max_tokens=60).send("What's the weather in Paris?")
    assert [c.name for c in reply.tool_calls] == ["get_weather"]
    jsonschema.validate(reply.tool_calls[0].arguments, params(get_weather))


def test_sampled_strict_calls_parse_and_validate(demo):
    """A random model made to call (start: call+): every sample is one or more calls
    of the declared tools, parsed by the chat parser, arguments valid."""
    model, tok = demo
    rnd = random_model(model.config.vocab_size, seed=3)
    tools = [get_time, set_alarm]
    grammar = tool_call_grammar(tools, tok.convert_tokens_to_ids, require_call=True)
    stops = sorted(set(model.config.eos_ids) | {tok.convert_tokens_to_ids("<|tool_response>")})
    c = bind(grammar, tok, model.config.vocab_size, stops)
    prompts = [encode_prompt(tok, "Call a tool.")] * 48
    outs = batch_generate(
        rnd, prompts, max_tokens=64, options=SamplingOptions(1.0, seed=2, constraint=c), stop_ids=stops
    )
    schemas = {f.__name__: params(f) for f in tools}
    finished = [o for o in outs if o[-1] in stops]
    assert len(finished) >= 36  # calls repeat at random (call+): a few run past max_tokens
    for out in outs:  # ... and those are prefixes of valid call lists
        assert c.valid_prefix(out) == len(out)
    for out in finished:
        result = parse(tok.decode(out[:-1]), tools=tools)
        assert result.tool_calls and not result.content.strip()
        for call in result.tool_calls:
            assert call.name in schemas and not call.error and not call.truncated, call
            jsonschema.validate(call.arguments, schemas[call.name])


def test_tool_schemas_the_grammar_cannot_enforce_are_refused(demo):
    _, tok = demo
    bad = {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}
    with pytest.raises(ConstraintError, match=r"tools.f.parameters.x: strict tool calls cannot enforce \['pattern'\]"):
        tool_call_grammar([bad], tok.convert_tokens_to_ids)


def test_a_custom_input_grammar_and_loose_schemas(demo):
    """A declaration's INPUT_FORMAT makes its `input` string a sentence of that Lark or
    regex grammar; `loose` frees the arguments of a tool not declared strict whose
    schema has what the grammar cannot enforce (and only then)."""
    model, tok = demo
    string = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}
    note = {"name": "note", "parameters": string}
    loose = _fn(_obj({"type": "integer", "minimum": 0}))
    stops = sorted(set(model.config.eos_ids))

    def allowed(fmt, text) -> bool:
        g = tool_call_grammar([note | {INPUT_FORMAT: fmt}, loose], tok.convert_tokens_to_ids, loose=True)
        ids = tok.encode(f"<|tool_call>call:{text}<tool_call|>", add_special_tokens=False)
        return bind(g, tok, model.config.vocab_size, stops).valid_prefix(ids) == len(ids)

    lark = {"syntax": "lark", "definition": 'start: "Note: " /[a-z]+/'}
    assert allowed(lark, 'note{input:<|"|>Note: sunny<|"|>}')
    assert not allowed(lark, 'note{input:<|"|>Note: Sunny<|"|>}')
    assert not allowed(lark, 'note{text:<|"|>Note: sunny<|"|>}')
    regex = {"syntax": "regex", "definition": "[0-9]{2} degrees"}
    assert allowed(regex, 'note{input:<|"|>21 degrees<|"|>}')
    assert not allowed(regex, 'note{input:<|"|>210 degrees<|"|>}')
    assert allowed(lark, 'f{x:-5,y:<|"|>free<|"|>}')  # `minimum` is not enforced: the arguments are free
    with pytest.raises(ConstraintError, match=r"tools.f.parameters.x: strict tool calls cannot enforce \['minimum'\]"):
        tool_call_grammar([loose | {"strict": True}], tok.convert_tokens_to_ids, loose=True)
    quoted = _fn({"type": "object", "properties": {"first-name": {"type": "string", "pattern": "^A"}}})
    g = tool_call_grammar([quoted], tok.convert_tokens_to_ids, loose=True)  # free arguments, keys quoted or not
    ids = tok.encode('<|tool_call>call:f{<|"|>first-name<|"|>:<|"|>Al<|"|>}<tool_call|>', add_special_tokens=False)
    assert bind(g, tok, model.config.vocab_size, stops).valid_prefix(ids) == len(ids)
    # a value without a schema writes the "any value" rules before the next one fails: they are written once
    first_any = _fn({"type": "object", "properties": {"a": {}, "z": {"type": "integer", "minimum": 1}}})
    bind(tool_call_grammar([first_any], tok.convert_tokens_to_ids, loose=True), tok, model.config.vocab_size, stops)
    looping = note | {INPUT_FORMAT: {"syntax": "lark", "definition": "start: start"}}
    with pytest.raises(ConstraintError, match=r"tools.note.format: no text can start a sentence of this grammar"):
        bind(tool_call_grammar([looping], tok.convert_tokens_to_ids), tok, model.config.vocab_size, stops)
    with pytest.raises(ConstraintError, match=r"tools.note.format: at 1\(8\): unknown name"):
        bad = {"syntax": "lark", "definition": "start: x"}
        tool_call_grammar([note | {INPUT_FORMAT: bad}], tok.convert_tokens_to_ids)
    named_ones = ('start: "a" <[8]> "b"', 'start: "a" <tool_call|>', "start: !<[3]>+", 'start: /a\n"/ <[8]> /"/')
    for named in named_ones:  # such tokens would end the call (the last: a regex spans lines, as llguidance reads it)
        with pytest.raises(ConstraintError, match=r"tools.note.format: the grammar names a token \(<...>\)"):
            fmt = {"syntax": "lark", "definition": named}
            tool_call_grammar([note | {INPUT_FORMAT: fmt}], tok.convert_tokens_to_ids)
    angles = {"syntax": "lark", "definition": 'start: "<" /[<>]+/ x  // <not a token>\nx: "\\"<" # <nor this>'}
    assert allowed(angles, 'note{input:<|"|><<>"<<|"|>}')  # "<" in strings, regexes and comments is text


def _fn(parameters, name="f") -> dict:
    return {"name": name, "parameters": parameters}


def _obj(x: dict, **kw) -> dict:
    return {"type": "object", "properties": {"x": x}, **kw}


@pytest.mark.parametrize(
    ("tool", "says"),
    [  # each escaped as a TypeError / ValueError / OverflowError (a 500 over HTTP) or compiled wrongly
        (_fn(_obj({"type": "string", "maxLength": "abc"})), r"tools.f.parameters.x.maxLength: expected an integer"),
        (_fn(_obj({"type": "string", "maxLength": [1]})), r"x.maxLength: expected an integer"),
        (_fn(_obj({"type": "string", "maxLength": float("inf")})), r"x.maxLength: expected an integer"),
        (_fn(_obj({"enum": None})), r"tools.f.parameters.x.enum: expected a non-empty list"),
        (_fn(_obj({"enum": []})), r"x.enum: expected a non-empty list"),
        (_fn(_obj({"enum": "abc"})), r"x.enum: expected a non-empty list"),  # was the alternatives a, b, c
        (_fn(_obj({"type": "string"}, required=[{}])), r"tools.f.parameters.required: expected a list of names"),
        (_fn(_obj({"type": "string"}, required=["y"])), r"required: expected a list of names from properties"),
        (_fn({"type": "object", "properties": ["x"]}), r"tools.f.parameters.properties: expected an object"),
        (_fn("x"), r"tools.f.parameters: expected an object"),
        (_fn(_obj({"type": "string"}), name="get weather"), r"'get weather' is not a name a tool call can carry"),
    ],
)
def test_malformed_strict_tool_schemas_are_one_line(demo, tool, says):
    _, tok = demo
    with pytest.raises(ConstraintError, match=says):
        tool_call_grammar([tool], tok.convert_tokens_to_ids)


def test_strict_text_answers_cannot_spell_a_bare_call(demo):
    """The free-text branch took `call:get_weather{city:12345,evil:"x"}` as text, which the
    parser then read as a call (a bare call, docs/chat-format.md §10 #1) no schema checked."""
    model, tok = demo
    stops = sorted(set(model.config.eos_ids))
    c = bind(tool_call_grammar([get_weather], tok.convert_tokens_to_ids), tok, model.config.vocab_size, stops)
    for text in ('call:get_weather{city:12345,evil:"x"}', "  call:get_weather{city:1}", "call:x"):
        ids = tok.encode(text, add_special_tokens=False)
        assert c.valid_prefix(ids) < len(ids), text
    for text in ("It is sunny.", "calling you later", "cal", "  c", "\n"):
        ids = tok.encode(text, add_special_tokens=False)
        assert c.valid_prefix(ids) == len(ids), text


def test_grammar_engine_failure_mid_output_raises(demo):
    """The engine hits a limit only while decoding this pattern; the reply used to end
    as "stop" with text no schema accepts."""
    model, tok = demo
    code = {"type": "string", "pattern": "^(ab{1000}){1000}$"}
    schema = {"type": "object", "properties": {"code": code}, "required": ["code"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with pytest.raises(ValueError, match=r"the output grammar failed while decoding \(.*too many"):
        Chat(model, tok, max_tokens=40).send("Give JSON.", response_format=fmt)
    drafter = gemma4_mlx.load_drafter(DEMO_DRAFTER)  # the speculative loop checks too (it ended quietly)
    with pytest.raises(ValueError, match=r"the output grammar failed while decoding"):
        Chat(model, tok, drafter=drafter, max_tokens=40).send("Give JSON.", response_format=fmt)
    with pytest.raises(ConstraintError, match=r"json_schema.schema"):  # a `$ref` loop: at bind, nothing runs
        Chat(model, tok, max_tokens=40).send(
            "Give JSON.", response_format={**fmt, "json_schema": {"schema": {"$ref": "#"}}}
        )
