"""OpenAI's Responses API (`/v1/responses`) against a live server, driven by the real
`openai` client on the demo model: each answer equals the Chat Completions answer to
the same conversation (text, thinking, tool calls and results, JSON schemas), streamed
events build the same response in the SDK's own accumulator, and what is not served
is a 400 naming the field."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import openai
import pytest
from PIL import Image

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.arguments import ToolCall
from gemma4_mlx.server.errors import APIError
from gemma4_mlx.server.prompts import Prompter
from gemma4_mlx.server.responses_api import Kept, _call_item
from gemma4_mlx.server.responses_input import _messages

from helpers.live_server import live_server

NAME = "gemma4-demo"
JAPAN = "What is the capital of Japan?"
WEATHER = "What is the weather in Paris?"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CHAT_TOOL = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
MARKUP = ("<|channel>", "<channel|>", "<|turn>", "<turn|>", "<|tool_call>", "<tool_call|>")


@pytest.fixture(scope="module")
def oa():
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    with live_server(model, tok, model_name=NAME) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)


def _streamed(oa, **kw):
    """(the event types in order, their sequence numbers, the SDK's final response)."""
    with oa.responses.stream(model=NAME, temperature=0, **kw) as stream:
        events = list(stream)
        final = stream.get_final_response()
    return [e.type for e in events], [e.sequence_number for e in events], final


def test_text_equals_chat_completions(oa):
    chat = oa.chat.completions.create(model=NAME, messages=[{"role": "user", "content": JAPAN}], temperature=0)
    r = oa.responses.create(model=NAME, input=JAPAN, temperature=0)
    assert r.status == "completed" and r.output_text == chat.choices[0].message.content
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    kinds, numbers, final = _streamed(oa, input=JAPAN)
    assert final.output_text == r.output_text and final.status == "completed"
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and numbers == list(range(1, len(numbers) + 1))


def test_instructions_are_the_system_prompt(oa):
    system = "Answer in one word."
    chat = oa.chat.completions.create(
        model=NAME, messages=[{"role": "system", "content": system}, {"role": "user", "content": JAPAN}], temperature=0
    )
    r = oa.responses.create(model=NAME, instructions=system, input=JAPAN, temperature=0)
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_thinking_is_a_reasoning_item(oa):
    msgs = [{"role": "user", "content": JAPAN}]
    chat = oa.chat.completions.create(model=NAME, messages=msgs, temperature=0, reasoning_effort="high")
    thought = chat.choices[0].message.model_extra["reasoning_content"]
    for r in (
        oa.responses.create(model=NAME, input=JAPAN, temperature=0, reasoning={"effort": "high"}),
        _streamed(oa, input=JAPAN, reasoning={"effort": "high"})[2],
    ):
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == thought and r.output_text == chat.choices[0].message.content
        assert not any(m in r.output_text for m in MARKUP)
        assert 0 < r.usage.output_tokens_details.reasoning_tokens < r.usage.output_tokens


def test_tool_call_then_its_output_answered(oa):
    r = oa.responses.create(model=NAME, input=WEATHER, tools=[TOOL], temperature=0)
    assert [o.type for o in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    kinds, _, final = _streamed(oa, input=WEATHER, tools=[TOOL])
    assert "response.function_call_arguments.delta" in kinds
    assert [(o.type, o.name, o.arguments) for o in final.output] == [("function_call", call.name, call.arguments)]
    result = json.dumps({"temperature": 21, "condition": "sunny"})
    items = [
        {"role": "user", "content": WEATHER},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": result},
    ]
    answer = oa.responses.create(model=NAME, input=items, tools=[TOOL], temperature=0)
    output = {"type": "function_call_output", "call_id": call.call_id, "output": result}
    continued = oa.responses.create(model=NAME, previous_response_id=r.id, input=[output], tools=[TOOL], temperature=0)
    assert continued.output_text == answer.output_text  # the kept call, then its output
    function = {"name": call.name, "arguments": call.arguments}
    messages = [
        {"role": "user", "content": WEATHER},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": function}]},
        {"role": "tool", "tool_call_id": "c1", "content": result},
    ]
    chat = oa.chat.completions.create(model=NAME, messages=messages, tools=[CHAT_TOOL], temperature=0)
    assert answer.output_text == chat.choices[0].message.content and "Paris" in answer.output_text
    assert answer.usage.input_tokens_details.cached_tokens > 0  # the call's turn was cached


def test_json_schema_text_format(oa):
    capital = {"type": "string", "enum": ["Tokyo", "Kyoto"]}
    schema = {"type": "object", "properties": {"capital": capital}, "required": ["capital"]}
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    r = oa.responses.create(model=NAME, input=JAPAN, text=fmt, temperature=0, max_output_tokens=40)
    assert json.loads(r.output_text) == {"capital": "Tokyo"}
    chat = oa.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": JAPAN}],
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    )
    assert r.output_text == chat.choices[0].message.content


def test_max_output_tokens_is_incomplete(oa):
    r = oa.responses.create(model=NAME, input=JAPAN, temperature=0, max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [(o.type, o.status) for o in r.output] == [("message", "incomplete")]  # the item too, as OpenAI's
    # (the SDK's stream helper waits for response.completed, as it does with OpenAI's)
    events = list(oa.responses.create(model=NAME, input=JAPAN, temperature=0, max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.status == "incomplete"
    assert events[-1].response.output_text == r.output_text
    assert events[-1].response.output[0].status == "incomplete"
    done = [e.item.status for e in events if e.type == "response.output_item.done"]
    assert done == ["incomplete"]


@pytest.mark.parametrize(
    ("kw", "says"),
    [
        ({"previous_response_id": "resp_1"}, "no response 'resp_1' is kept here"),
        ({"tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}}, "tool_choice: unsupported type"),
        ({"input": [{"type": "file_search_call", "id": "x"}]}, "unsupported input item type"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
            "not fetched",
        ),
        ({"text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"model": "gpt-9"}, "not served here"),
    ],
)
def test_what_is_not_served_is_a_400(oa, kw, says):
    args = {"model": NAME, "input": JAPAN} | kw
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(**args)
    assert says in e.value.body["message"]


NAMESPACE = {"type": "namespace", "name": "weather", "description": "Weather tools.", "tools": [TOOL]}
HOSTED = {"type": "web_search", "external_web_access": False}  # Codex sends one in every request


def test_namespace_functions_and_hosted_tools_as_codex_sends_them(oa):
    """A namespace's functions are declared as `namespace.name` and their calls name
    the namespace apart; hosted tools, which nothing here runs, are left out."""
    plain = oa.responses.create(model=NAME, input=JAPAN, temperature=0)
    r = oa.responses.create(model=NAME, input=JAPAN, tools=[HOSTED], temperature=0)
    assert r.output_text == plain.output_text and r.usage.input_tokens == plain.usage.input_tokens
    forced = dict(model=NAME, input=WEATHER, tools=[NAMESPACE, HOSTED], tool_choice="required", temperature=0)
    r = oa.responses.create(**forced)
    (call,) = r.output
    assert (call.type, call.namespace, call.name) == ("function_call", "weather", "get_weather")
    kinds, _, final = _streamed(oa, **{k: v for k, v in forced.items() if k not in ("model", "temperature")})
    assert [(o.namespace, o.name) for o in final.output] == [("weather", "get_weather")]
    echoed = {"type": "function_call", "call_id": call.call_id, "namespace": "weather", "name": call.name}
    items = [{"role": "user", "content": WEATHER}, echoed | {"arguments": call.arguments}]
    items.append({"type": "function_call_output", "call_id": call.call_id, "output": "21 C"})
    answer = oa.responses.create(model=NAME, input=items, tools=[NAMESPACE, HOSTED], temperature=0)
    kept = oa.responses.create(model=NAME, previous_response_id=r.id, input=items[2:], tools=[NAMESPACE], temperature=0)
    assert answer.output_text == kept.output_text and answer.usage.input_tokens == kept.usage.input_tokens
    qualified = {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
    qualified["function"]["name"] = "weather.get_weather"
    function = {"name": "weather.get_weather", "arguments": call.arguments}
    messages = [
        {"role": "user", "content": WEATHER},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": function}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C"},
    ]
    chat = oa.chat.completions.create(model=NAME, messages=messages, tools=[qualified], temperature=0)
    assert answer.output_text == chat.choices[0].message.content
    assert answer.usage.input_tokens == chat.usage.prompt_tokens


CUSTOM = {  # a freeform tool, as Codex declares `apply_patch`
    "type": "custom",
    "name": "note",
    "description": "Write a note about the weather.",
    "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "Note: " /[^\\n]+/'},
}


def test_custom_tools_take_free_text(oa):
    """A custom tool is declared as a function of one string (`input`; its grammar is
    told to the model too); its call comes back as a custom_tool_call whose
    input is that string, streamed as custom_tool_call_input events, and a
    custom_tool_call with its output continues the conversation (also kept)."""
    forced = dict(input=WEATHER, tools=[CUSTOM], tool_choice={"type": "custom", "name": "note"}, max_output_tokens=60)
    r = oa.responses.create(model=NAME, temperature=0, **forced)
    call = r.output[-1]
    assert (call.type, call.name, r.status) == ("custom_tool_call", "note", "completed")
    assert isinstance(call.input, str) and call.input and not call.input.startswith("{")
    kinds, _, final = _streamed(oa, **forced)
    assert (
        kinds.count("response.custom_tool_call_input.delta") == 1
        and "response.function_call_arguments.delta" not in kinds
    )
    assert [(o.type, o.input) for o in final.output] == [("custom_tool_call", call.input)]
    result = {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "saved"}
    echoed = {"type": "custom_tool_call", "call_id": call.call_id, "name": "note", "input": call.input}
    answer = oa.responses.create(
        model=NAME, input=[{"role": "user", "content": WEATHER}, echoed, result], tools=[CUSTOM], temperature=0
    )
    kept = oa.responses.create(model=NAME, previous_response_id=r.id, input=[result], tools=[CUSTOM], temperature=0)
    assert answer.output_text == kept.output_text and answer.usage.input_tokens == kept.usage.input_tokens


CITY_SKY = 'start: city ": " sky\ncity: "Paris" | "Rome"\nsky: "sun" | "rain"'


@pytest.mark.parametrize(
    ("fmt", "pattern"),
    [
        ({"syntax": "lark", "definition": CITY_SKY}, r"(Paris|Rome): (sun|rain)"),
        ({"syntax": "regex", "definition": r"(sunny|rainy), [0-9]{1,2} degrees"}, r"(sunny|rainy), [0-9]{1,2} degrees"),
    ],
)
def test_custom_tool_grammars_are_enforced(oa, fmt, pattern):
    """A custom tool's Lark or regex grammar is what its input follows, forced or not
    (left free, the demo model writes `}_ 16 degrees and 10. ...`); a grammar the
    engine cannot compile, or another syntax, is a 400 naming the tool's format."""
    tool = CUSTOM | {"format": {"type": "grammar", **fmt}}
    for choice in ({"type": "custom", "name": "note"}, "auto"):
        r = oa.responses.create(
            model=NAME, input=WEATHER, tools=[tool], tool_choice=choice, temperature=0, max_output_tokens=60
        )
        calls = [o for o in r.output if o.type == "custom_tool_call"]
        assert calls and all(re.fullmatch(pattern, c.input) for c in calls), (choice, r.output)
    for bad, says in (
        ({"syntax": "lark", "definition": "start: x y"}, 'tools.note.format: at 1(8): unknown name: "x"'),
        ({"syntax": "ebnf", "definition": "x"}, "tools.note.format.syntax: expected 'lark' or 'regex', got 'ebnf'"),
        ({"syntax": "regex"}, "tools.note.format: expected a grammar definition (text)"),
        ({"syntax": "lark", "definition": "start: start"}, "tools.note.format: "),  # found at the first mask
        ({"type": "json"}, "tools.note.format.type: expected 'text' or 'grammar', got 'json'"),
        ({"syntax": "lark", "definition": 'start: "a" <[49]>'}, "tools.note.format: the grammar names a token"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            oa.responses.create(model=NAME, input=WEATHER, tools=[CUSTOM | {"format": {"type": "grammar", **bad}}])
        assert says in e.value.body["message"] and e.value.body["param"] == "tools"


# Codex CLI 0.171.0's own `apply_patch` declaration, captured from its request
CODEX_APPLY_PATCH = json.loads((Path(__file__).parent / "captured" / "codex_apply_patch_tool.json").read_text())


def test_a_thought_the_model_opens_itself_stays_free_beside_a_custom_grammar(oa):
    """With thinking off, a request with a custom grammar tool is constrained from the
    first token; the demo model still opens a thought on its own for Codex's
    `apply_patch` beside a function. The grammar allows that thought and applies
    after it (it used to mask `<|channel>`, and the reply became
    `_weather{city:get_weather{city: 10 degrees ...`)."""
    r = oa.responses.create(
        model=NAME, input="Weather in Paris?", tools=[CODEX_APPLY_PATCH, TOOL], temperature=0, max_output_tokens=60
    )
    assert [o.type for o in r.output] == ["reasoning", "function_call"], r.output
    assert (r.output[1].name, json.loads(r.output[1].arguments)) == ("get_weather", {"city": "Paris"})


def test_custom_tools_on_chat_completions(oa):
    """Chat Completions' custom tools (their format nested as `grammar`): the call is a
    `custom` tool call whose input follows the grammar and equals the Responses call,
    streamed as a start and the whole input at its end; a past custom call and its
    result continue the conversation as on Responses; malformed ones are a 400."""
    grammar = {"type": "grammar", "grammar": {"syntax": "lark", "definition": CITY_SKY}}
    chat_tool = {"type": "custom", "custom": {"name": "note", "description": CUSTOM["description"], "format": grammar}}
    tool = CUSTOM | {"format": {"type": "grammar", "syntax": "lark", "definition": CITY_SKY}}
    ask = dict(model=NAME, messages=[{"role": "user", "content": WEATHER}], tools=[chat_tool], temperature=0)
    forced = ask | dict(tool_choice={"type": "custom", "custom": {"name": "note"}})
    r = oa.chat.completions.create(**forced)
    (call,) = r.choices[0].message.tool_calls
    assert (call.type, call.custom.name, r.choices[0].finish_reason) == ("custom", "note", "tool_calls")
    assert re.fullmatch(r"(Paris|Rome): (sun|rain)", call.custom.input)
    resp = oa.responses.create(
        model=NAME, input=WEATHER, tools=[tool], tool_choice={"type": "custom", "name": "note"}, temperature=0
    )
    assert resp.output[-1].input == call.custom.input and resp.usage.input_tokens == r.usage.prompt_tokens
    pieces = [c.choices[0].delta.tool_calls for c in oa.chat.completions.create(**forced, stream=True) if c.choices]
    pieces = [p.model_dump(exclude_none=True) for ps in pieces if ps for p in ps]
    assert pieces[0] == {"index": 0, "id": pieces[0]["id"], "type": "custom", "custom": {"name": "note", "input": ""}}
    assert pieces[1:] == [{"index": 0, "custom": {"input": call.custom.input}}]
    past = {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]}
    result = {"role": "tool", "tool_call_id": call.id, "content": "saved"}
    answer = oa.chat.completions.create(**ask | {"messages": ask["messages"] + [past, result]})
    echoed = {"type": "custom_tool_call", "call_id": call.id, "name": "note", "input": call.custom.input}
    output = {"type": "custom_tool_call_output", "call_id": call.id, "output": "saved"}
    again = oa.responses.create(
        model=NAME, input=[{"role": "user", "content": WEATHER}, echoed, output], tools=[tool], temperature=0
    )
    assert answer.choices[0].message.content == again.output_text
    assert answer.usage.prompt_tokens == again.usage.input_tokens
    # a function's own `input_format` (what the server sets for custom tools) is not the client's to set
    smuggled = TOOL | {"input_format": {"syntax": "regex", "definition": "ZZZ[0-9]+"}}
    for tool in (smuggled, {"type": "function", "function": {k: v for k, v in smuggled.items() if k != "type"}}):
        r = oa.chat.completions.create(**ask | {"tools": [tool], "tool_choice": "required"})
        assert all("ZZZ" not in c.function.arguments for c in r.choices[0].message.tool_calls), tool
    bad_past = past | {"tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "note", "input": 5}}]}
    for args, says in (
        (dict(tools=[{"type": "custom", "custom": {"description": "x"}}]), "tools[0].custom: expected an object with"),
        (dict(tools=[{"type": "custom", "custom": {"name": "n", "format": "lark"}}]), "tools.n.format: expected an"),
        (dict(messages=ask["messages"] + [bad_past, result]), "messages[1].tool_calls[0].custom: expected a name"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(**ask | args)
        assert says in e.value.body["message"], args


def test_custom_tools_in_namespaces_and_what_is_refused(oa):
    """A namespace's custom tool is declared `namespace.name` and its call names the
    namespace apart; a name declared twice, a forced tool no one declared and a tool
    output of the wrong type are one-line 400s naming the field."""
    spaced = {"type": "namespace", "name": "ns", "description": "Notes.", "tools": [CUSTOM]}
    r = oa.responses.create(
        model=NAME, input=WEATHER, tools=[spaced], tool_choice={"type": "custom", "name": "ns.note"}, temperature=0
    )
    assert [(o.type, o.namespace, o.name) for o in r.output] == [("custom_tool_call", "ns", "note")]
    twice = [CUSTOM, {"type": "function", "name": "note", "parameters": {"type": "object"}}]
    cases = [
        (dict(tools=twice), "tools[1]: the name 'note' is declared twice (also tools[0])"),
        (dict(tool_choice={"type": "custom", "name": "note"}), "tool_choice names 'note', but the request declares no"),
        (dict(input=[{"type": "custom_tool_call_output", "call_id": "c", "output": 5}]), "input[0].output: expected"),
        (dict(input=[{"type": "function_call_output", "call_id": ["c"], "output": "x"}]), "input[0].call_id: expected"),
    ]
    for args, says in cases:
        with pytest.raises(openai.BadRequestError) as e:
            oa.responses.create(**({"model": NAME, "input": WEATHER} | args))
        assert says in e.value.body["message"], args


def test_a_custom_call_s_input_when_the_model_strays():
    """The one string argument is the input whatever the model named it; nothing
    written yet is empty; anything else stays as its JSON."""
    tools = [CUSTOM]
    for arguments, expected in (
        ({"input": "Note: sunny"}, "Note: sunny"),
        ({"text": "Note: rain"}, "Note: rain"),
        ({}, ""),
        ({"in": None}, ""),
        ({"input": 5}, '{"input": 5}'),
    ):
        item = _call_item(ToolCall("note", arguments), tools)
        assert (item["type"], item["input"]) == ("custom_tool_call", expected), arguments


def test_previous_response_id_continues_the_conversation(oa):
    first = oa.responses.create(model=NAME, input=JAPAN, temperature=0, instructions="Be brief.")
    again = "And what is the capital of France?"
    second = oa.responses.create(model=NAME, previous_response_id=first.id, input=again, temperature=0)
    messages = [
        {"role": "user", "content": JAPAN},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": again},
    ]
    chat = oa.chat.completions.create(model=NAME, messages=messages, temperature=0)
    assert second.output_text == chat.choices[0].message.content  # instructions are not carried over
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0
    _, _, streamed = _streamed(oa, previous_response_id=second.id, input="Thanks!")
    third = oa.responses.create(model=NAME, previous_response_id=second.id, input="Thanks!", temperature=0)
    assert streamed.output_text == third.output_text
    unkept = oa.responses.create(model=NAME, input=JAPAN, temperature=0, store=False)
    with pytest.raises(openai.BadRequestError, match="is kept here"):
        oa.responses.create(model=NAME, previous_response_id=unkept.id, input=again)


def _png_uri() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_input_items_as_clients_send_them():
    """Shapes real clients send: llm's empty user turn before a tool result, the Agents
    SDK's image returned by a tool (a user turn after the results: tool results are
    text), an assistant refusal part from OpenAI history."""
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    prompter, media = Prompter(model, tok), []
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    image_output = [{"type": "input_text", "text": "a chart"}, {"type": "input_image", "image_url": _png_uri()}]
    items = [
        {"role": "user", "content": WEATHER},
        call,
        {"role": "user", "content": ""},
        {"type": "function_call_output", "call_id": "c1", "output": image_output},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
    ]
    msgs = _messages(items, prompter, media)
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "user", "assistant"]
    assert msgs[2]["content"] == "a chart" and msgs[3]["content"] == [{"type": "image"}] and len(media) == 1
    assert msgs[4]["content"] == "I cannot."


def test_llm_style_tool_loop_is_answered(oa):
    r = oa.responses.create(model=NAME, input=WEATHER, tools=[TOOL], temperature=0)
    call = r.output[0]
    items = [
        {"role": "user", "content": WEATHER},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"role": "user", "content": ""},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 22C in Paris"},
    ]
    assert "Paris" in oa.responses.create(model=NAME, input=items, tools=[TOOL], temperature=0).output_text


def test_reasoning_summary_when_asked(oa):
    kw = dict(model=NAME, input=JAPAN, temperature=0, reasoning={"effort": "high", "summary": "auto"})
    r = oa.responses.create(**kw)
    assert r.output[0].summary[0].text == r.output[0].content[0].text
    assert _streamed(oa, input=JAPAN, reasoning={"effort": "high", "summary": "auto"})[2].output[0].summary
    plain = oa.responses.create(**(kw | {"reasoning": {"effort": "high"}}))
    assert plain.output[0].summary == []


@pytest.mark.parametrize(
    ("kw", "says", "param"),
    [
        ({"extra_body": {"conversation": "conv_1"}}, "Conversations API is not served", "conversation"),
        (
            {"input": [{"type": "function_call_output", "call_id": "x", "output": "1"}]},
            "read as a conversation",
            "input",
        ),
    ],
)
def test_what_cannot_be_followed_names_its_field(oa, kw, says, param):
    args = {"model": NAME, "input": JAPAN} | kw
    with pytest.raises(openai.BadRequestError) as e:
        oa.responses.create(**args)
    assert says in e.value.body["message"] and e.value.body["param"] == param


def test_only_reasoning_items_is_400_and_the_chain_is_echoed(oa):
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "x"}]}
    with pytest.raises(openai.BadRequestError, match="no message to answer"):
        oa.responses.create(model=NAME, input=[thought])
    first = oa.responses.create(model=NAME, input=JAPAN, temperature=0)
    assert (
        oa.responses.create(model=NAME, previous_response_id=first.id, input="Thanks").previous_response_id == first.id
    )


def test_logit_bias_is_openai_chat_and_completions_only(oa):
    """Other bodies accept unknown fields: a logit_bias there is ignored, never a 500."""
    for bias in ([1, 2], "x", {"5": "a"}, {"5": 50}):
        r = oa.responses.create(model=NAME, input=JAPAN, temperature=0, extra_body={"logit_bias": bias})
        assert r.output_text == oa.responses.create(model=NAME, input=JAPAN, temperature=0).output_text


def test_kept_media_and_text_are_bounded():
    """Kept conversations hold decoded images and text (reasoning items too, which the
    prompt never shows): they leave, oldest first, past the byte budget."""
    kept = Kept(size=8, budget=3 * (100 * 100 * 3 + 100))
    image = ("image", Image.new("RGB", (100, 100)))
    for i in range(5):
        kept.put(f"r{i}", [{"role": "user", "content": "hi"}], [image])
    assert list(kept.items) == ["r2", "r3", "r4"]
    kept.put("big", [], [("image", Image.new("RGB", (200, 200)))])  # over the whole budget: not kept
    assert "big" not in kept.items and list(kept.items) == ["r2", "r3", "r4"]
    thought = {"role": "assistant", "content": "A", "reasoning_content": "x" * (100 * 100 * 3)}
    kept.put("long", [{"role": "user", "content": "hi"}, thought], [])
    assert list(kept.items) == ["r3", "r4", "long"]
    with pytest.raises(APIError, match="no response 'r0' is kept here"):
        kept.get("r0")
