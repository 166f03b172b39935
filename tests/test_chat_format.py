"""Gemma 4 chat format: renderer goldens and tolerant-parser fixtures (docs/chat-format.md)."""

from __future__ import annotations

import datetime
import json
import random
from typing import Literal

import pytest

from gemma4_mlx.prompt import (
    CTRL_RE,
    ChatTemplateError,
    StreamParser,
    coalesce,
    format_declaration,
    parse,
    parser_for_prompt,
    render,
    render_with_checkpoint_template,
    template_info,
    tool_schema,
)

Q = '<|"|>'

# ----------------------------------------------------------------- docs/chat-format.md §7 worked example
EXCHANGE = {
    "type": "function",
    "function": {
        "name": "get_exchange_rate",
        "description": "Returns the latest exchange rate between two currencies.",
        "parameters": {
            "type": "object",
            "required": ["base", "quote"],
            "properties": {
                "base": {"type": "string", "description": "ISO 4217 code of the currency to convert from"},
                "quote": {"type": "string", "description": "ISO 4217 code of the currency to convert to"},
                "source": {"type": "string", "enum": ["ecb", "fed"], "description": "Publisher of the reference rate"},
            },
        },
    },
}
DECL = (
    '<|tool>declaration:get_exchange_rate{description:<|"|>Returns the latest exchange rate between two '
    'currencies.<|"|>,parameters:{properties:{base:{description:<|"|>ISO 4217 code of the currency to '
    'convert from<|"|>,type:<|"|>STRING<|"|>},quote:{description:<|"|>ISO 4217 code of the currency to '
    'convert to<|"|>,type:<|"|>STRING<|"|>},source:{description:<|"|>Publisher of the reference rate<|"|>,'
    'enum:[<|"|>ecb<|"|>,<|"|>fed<|"|>],type:<|"|>STRING<|"|>}},required:[<|"|>base<|"|>,<|"|>quote<|"|>],'
    'type:<|"|>OBJECT<|"|>}}<tool|>'
)
SYS = "You are a travel assistant. Answer briefly."
M1 = {"role": "system", "content": SYS}
M3 = {"role": "user", "content": "How many yen is one euro today?"}
M4 = {
    "role": "assistant",
    "content": "",
    "reasoning_content": "The user needs the EUR to JPY rate; call the tool.",
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_exchange_rate", "arguments": {"base": "EUR", "quote": "JPY"}},
        }
    ],
}
M5 = {"role": "tool", "tool_call_id": "call_1", "content": '{"rate": 162.4}'}
M6 = {"role": "assistant", "content": "One euro is about 162 yen today."}
M7 = {"role": "user", "content": "And in US dollars?"}

HEAD_THINK = f"<bos><|turn>system\n<|think|>\n{SYS}{DECL}<turn|>\n"
HEAD = f"<bos><|turn>system\n{SYS}{DECL}<turn|>\n"
U1 = "<|turn>user\nHow many yen is one euro today?<turn|>\n"
THOUGHT = "<|channel>thought\nThe user needs the EUR to JPY rate; call the tool.\n<channel|>"
CALL = '<|tool_call>call:get_exchange_rate{base:<|"|>EUR<|"|>,quote:<|"|>JPY<|"|>}<tool_call|>'
RESP = '<|tool_response>response:get_exchange_rate{value:<|"|>{"rate": 162.4}<|"|>}<tool_response|>'
TAIL_C = "One euro is about 162 yen today.<turn|>\n<|turn>user\nAnd in US dollars?<turn|>\n<|turn>model\n"
GEN, PREFILL = "<|turn>model\n", "<|channel>thought\n<channel|>"
HELLO = [{"role": "user", "content": "Hello"}]

# (id, messages, render kwargs, expected) — expected strings written from docs/chat-format.md §2-§7.
MATRIX = [
    ("plain", HELLO, {}, "<bos><|turn>user\nHello<turn|>\n<|turn>model\n"),
    (
        "plain_think",
        HELLO,
        {"thinking": True},
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n",
    ),
    (
        "system",
        [{"role": "system", "content": "  Be terse.\n"}, {"role": "user", "content": " Hi \n"}],
        {},
        "<bos><|turn>system\nBe terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n",
    ),
    (
        "system_think",
        [{"role": "system", "content": "Be terse."}, *HELLO],
        {"thinking": True},
        "<bos><|turn>system\n<|think|>\nBe terse.<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n",
    ),
    (
        "developer_hoisted",
        [{"role": "developer", "content": "Be terse."}, *HELLO],
        {},
        "<bos><|turn>system\nBe terse.<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n",
    ),
    (
        "prefill_31b_off",
        HELLO,
        {"empty_thought_prefill": True},
        "<bos><|turn>user\nHello<turn|>\n<|turn>model\n" + PREFILL,
    ),
    (
        "prefill_31b_on",
        HELLO,
        {"empty_thought_prefill": True, "thinking": True},
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n",
    ),
    ("no_generation_prompt", HELLO, {"add_generation_prompt": False}, "<bos><|turn>user\nHello<turn|>\n"),
    (
        "multi_turn",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<|channel>thought\nGreet back.<channel|>Hello! "},
            {"role": "user", "content": "Bye"},
        ],
        {},
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n<|turn>model\n",
    ),
    (
        "later_system",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hey"},
            {"role": "system", "content": "Now in French."},
            {"role": "user", "content": "Bye"},
        ],
        {},
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHey<turn|>\n<|turn>system\nNow in French.<turn|>\n"
        "<|turn>user\nBye<turn|>\n<|turn>model\n",
    ),
    (
        "tools_only",
        HELLO,
        {"tools": [EXCHANGE]},
        f"<bos><|turn>system\n{DECL}<turn|>\n<|turn>user\nHello<turn|>\n<|turn>model\n",
    ),
    ("worked_a", [M1, M3], {"tools": [EXCHANGE], "thinking": True}, HEAD_THINK + U1 + GEN),
    ("worked_a_off", [M1, M3], {"tools": [EXCHANGE]}, HEAD + U1 + GEN),
    ("worked_a_31b_off", [M1, M3], {"tools": [EXCHANGE], "empty_thought_prefill": True}, HEAD + U1 + GEN + PREFILL),
    (
        "worked_b",
        [M1, M3, M4, M5],
        {"tools": [EXCHANGE], "thinking": True},
        HEAD_THINK + U1 + GEN + THOUGHT + CALL + RESP + "<|channel>thought\n",
    ),
    ("worked_b_off", [M1, M3, M4, M5], {"tools": [EXCHANGE]}, HEAD + U1 + GEN + THOUGHT + CALL + RESP),
    (
        "worked_b_31b_off",
        [M1, M3, M4, M5],
        {"tools": [EXCHANGE], "empty_thought_prefill": True},
        HEAD + U1 + GEN + THOUGHT + CALL + RESP,
    ),
    (
        "worked_c",
        [M1, M3, M4, M5, M6, M7],
        {"tools": [EXCHANGE], "thinking": True},
        HEAD_THINK + U1 + GEN + CALL + RESP + TAIL_C,
    ),
    (
        "worked_c_31b_off",
        [M1, M3, M4, M5, M6, M7],
        {"tools": [EXCHANGE], "empty_thought_prefill": True},
        HEAD + U1 + GEN + CALL + RESP + TAIL_C + PREFILL,
    ),
    (
        "mapping_result",
        [M1, M3, M4, {"role": "tool", "tool_call_id": "call_1", "content": {"rate": 162.4, "date": "2026-07-10"}}],
        {"tools": [EXCHANGE]},
        # a structured result is stored as JSON (what checkpoint templates accept), not a mapping
        HEAD + U1 + GEN + THOUGHT + CALL + '<|tool_response>response:get_exchange_rate{value:<|"|>'
        '{"rate": 162.4, "date": "2026-07-10"}<|"|>}<tool_response|>',
    ),
    (
        "string_arguments",
        [
            M3,
            {
                **M4,
                "reasoning_content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "function": {"name": "get_exchange_rate", "arguments": '{"quote": "JPY", "base": "EUR"}'},
                    }
                ],
            },
            M5,
            M6,
        ],
        {},
        "<bos>" + U1 + GEN + CALL + RESP + "One euro is about 162 yen today.<turn|>\n" + GEN,
    ),
    (
        "unanswered_call",
        [M3, {**M4, "reasoning_content": None}],
        {"tools": [EXCHANGE]},
        f"<bos><|turn>system\n{DECL}<turn|>\n" + U1 + GEN + CALL + "<|tool_response>",
    ),
    (
        "legacy_tool_responses",
        [
            M3,
            {
                "role": "assistant",
                "tool_calls": M4["tool_calls"],
                "tool_responses": [{"name": "get_exchange_rate", "response": {"rate": 162.4}}],
            },
        ],
        {},
        "<bos>" + U1 + GEN + CALL + "<|tool_response>response:get_exchange_rate{rate:162.4}<tool_response|>",
    ),
    (
        "two_calls_two_results",
        [
            M3,
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "a", "function": {"name": "f", "arguments": {"x": 1, "B": [True, None], "a": {"k": "v"}}}},
                    {"id": "b", "function": {"name": "g", "arguments": {}}},
                ],
            },
            {"role": "tool", "tool_call_id": "b", "content": "ok"},
            {"role": "tool", "tool_call_id": "a", "content": 3},
        ],
        {},
        "<bos>" + U1 + GEN + '<|tool_call>call:f{a:{k:<|"|>v<|"|>},B:[true,null],x:1}<tool_call|>'
        '<|tool_call>call:g{}<tool_call|><|tool_response>response:g{value:<|"|>ok<|"|>}<tool_response|>'
        '<|tool_response>response:f{value:<|"|>3<|"|>}<tool_response|>',
    ),  # results are strings (JSON)
    (
        "media",
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "url": "x.png"},
                    {"type": "audio"},
                    {"type": "text", "text": " Describe both. "},
                ],
            }
        ],
        {},
        "<bos><|turn>user\n<|image|><|audio|>Describe both.<turn|>\n<|turn>model\n",
    ),
    (
        "model_role_alias",
        [{"role": "user", "content": "Hi"}, {"role": "model", "content": "Hey"}],
        {"add_generation_prompt": False},
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHey<turn|>\n",
    ),
]


@pytest.mark.parametrize("case", MATRIX, ids=[c[0] for c in MATRIX])
def test_render_matrix(case):
    _, messages, kw, expected = case
    assert render(messages, **kw) == expected


PLAN_TRIP = {
    "name": "plan_trip",
    "description": "Plan a trip.",
    "response": {"description": "Itinerary", "type": "object"},
    "parameters": {
        "type": "object",
        "required": ["stops"],
        "properties": {
            "stops": {
                "type": "array",
                "description": "Cities",
                "items": {
                    "type": "object",
                    "required": ["city"],
                    "properties": {"nights": {"type": "integer"}, "city": {"type": "string"}},
                },
            },
            "traveller": {
                "type": "object",
                "description": "Who",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            },
            "mode": {"type": "string", "enum": ["rail", "air"]},
            "budget": {"type": "number", "nullable": True, "description": "Max spend"},
        },
    },
}


def test_declaration_nested_schema_order():
    """docs/chat-format.md §5.2: sorted properties; description, enum/items, nullable, properties, required, type."""
    tool = PLAN_TRIP
    expected = (
        '<|tool>declaration:plan_trip{description:<|"|>Plan a trip.<|"|>,parameters:{properties:{'
        'budget:{description:<|"|>Max spend<|"|>,nullable:true,type:<|"|>NUMBER<|"|>},'
        'mode:{enum:[<|"|>rail<|"|>,<|"|>air<|"|>],type:<|"|>STRING<|"|>},'
        'stops:{description:<|"|>Cities<|"|>,items:{properties:{city:{type:<|"|>STRING<|"|>},'
        'nights:{type:<|"|>INTEGER<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>},type:<|"|>ARRAY<|"|>},'
        'traveller:{description:<|"|>Who<|"|>,properties:{age:{type:<|"|>INTEGER<|"|>},name:{type:<|"|>STRING'
        '<|"|>}},required:[<|"|>name<|"|>],type:<|"|>OBJECT<|"|>}},required:[<|"|>stops<|"|>],'
        'type:<|"|>OBJECT<|"|>},response:{description:<|"|>Itinerary<|"|>,type:<|"|>OBJECT<|"|>}}<tool|>'
    )
    assert format_declaration(tool) == expected
    assert format_declaration({"type": "function", "function": tool}) == expected


def test_string_arguments_must_be_json_objects():
    bad = [M3, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "not json"}}]}]
    with pytest.raises(ChatTemplateError):
        render(bad)
    with pytest.raises(ChatTemplateError):
        render([M3, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}])


def get_weather(
    city: str,
    unit: Literal["celsius", "fahrenheit"] = "celsius",
    days: int | None = None,
    tags: list[str] | None = None,
) -> dict:
    """Get the weather forecast.

    Args:
        city: City name, e.g.
            Paris.
        unit (str): Temperature unit.
        days: Number of days.

    Returns:
        The forecast.
    """
    return {}


def test_tool_schema_from_function():
    assert tool_schema(get_weather) == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather forecast.",
            "parameters": {
                "type": "object",
                "required": ["city"],
                "properties": {
                    "city": {"description": "City name, e.g. Paris.", "type": "string"},
                    "unit": {"description": "Temperature unit.", "type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"description": "Number of days.", "type": "integer", "nullable": True},
                    "tags": {"type": "array", "items": {"type": "string"}, "nullable": True},
                },
            },
        },
    }
    # callables are accepted wherever tools are
    assert render(HELLO, tools=[get_weather]) == render(HELLO, tools=[tool_schema(get_weather)])
    with pytest.raises(TypeError):
        tool_schema(lambda x: x)


# -------------------------------------------------- checkpoint-template rendering
# docs/chat-format.md §3 quotes no full template text, so this is our own minimal Jinja template of
# the same grammar (system hoisting, <|think|>, turns, history thought stripping, the
# 31B-style prefill switch). It checks the sandbox set-up (trim_blocks/lstrip_blocks,
# bos_token, enable_thinking, raise_exception) and that our renderer agrees with it.
MINI_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(msgs=messages) -%}
{%- if enable_thinking or tools or (messages and messages[0].role in ['system', 'developer']) %}
<|turn>system
{% if enable_thinking %}
<|think|>
{% endif %}
{% if messages and messages[0].role in ['system', 'developer'] %}
{{- messages[0].content | trim -}}
{%- set ns.msgs = messages[1:] -%}
{% endif %}
<turn|>
{% endif %}
{% for m in ns.msgs %}
    {% if m.role not in ['user', 'assistant', 'system'] %}
{{- raise_exception('unsupported role: ' ~ m.role) -}}
    {% endif %}
<|turn>{{ 'model' if m.role == 'assistant' else m.role }}
{% if m.role == 'assistant' %}
{{- (m.content.split('<channel|>') | last) | trim -}}
{% else %}
{{- m.content | trim -}}
{% endif %}
<turn|>
{% endfor %}
{% if add_generation_prompt %}
<|turn>model
{% if not enable_thinking and prefill_empty_thought | default(false) %}
<|channel>thought
<channel|>
{%- endif %}
{% endif %}"""
SIMPLE = [
    "plain",
    "plain_think",
    "system",
    "system_think",
    "developer_hoisted",
    "no_generation_prompt",
    "multi_turn",
    "later_system",
    "model_role_alias",
]


@pytest.mark.parametrize(
    "case",
    [c for c in MATRIX if c[0] in SIMPLE]
    + [
        ("prefill", HELLO, {"empty_thought_prefill": True}, None),
        ("prefill_think", HELLO, {"empty_thought_prefill": True, "thinking": True}, None),
    ],
    ids=lambda c: c[0],
)
def test_checkpoint_template_agrees(case):
    _, messages, kw, _ = case
    kw = dict(kw)
    prefill = kw.pop("empty_thought_prefill", False)
    ours = render(messages, empty_thought_prefill=prefill, **kw)
    assert render_with_checkpoint_template(MINI_TEMPLATE, messages, prefill_empty_thought=prefill, **kw) == ours


def test_checkpoint_template_helpers():
    with pytest.raises(ChatTemplateError, match="unsupported role: tool"):
        render_with_checkpoint_template(MINI_TEMPLATE, [M3, {"role": "tool", "content": "x"}])
    out = render_with_checkpoint_template("{{ strftime_now('%Y') }}|{{ tools | tojson }}", HELLO, tools=[EXCHANGE])
    year, tools = out.split("|", 1)
    assert year == str(datetime.date.today().year)
    assert json.loads(tools) == [EXCHANGE]
    # OpenAI string arguments reach the checkpoint template as mappings (docs/chat-format.md §5.4)
    out = render_with_checkpoint_template(
        "{{ messages[0].tool_calls[0].function.arguments.base }}",
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"base": "EUR"}'}}]}],
    )
    assert out == "EUR"
    info = template_info(MINI_TEMPLATE)
    assert info["revision"] == "release" and len(info["sha256"]) == 64


# ------------------------------------------------------------------- parser fixtures
def T(name, *params, required=None):
    props = {p: {"type": "string"} for p in params}
    return {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": props,
                "required": list(params if required is None else required),
            },
        },
    }


GET_X = T("get_x", "city", "unit", required=["city"])
EXCHANGE_TOOLS = [EXCHANGE]
PDF = T("create-pdf-file", "title", "pages")
RUN, NEWFILE = T("run_terminal_command", "command"), T("create_new_file", "filepath", "contents")
FENCE = '<|tool_call>call:get_x{city:<|"|>Oslo<|"|>}<tool_call|>'
CODE = 'def f(x):\n    return {"a": \'}\', "b": [1, 2]}  # <b>not markup</b>\n'


def args(r, i=0):
    return r.tool_calls[i].arguments


# (id, raw output, parser kwargs, check on the one-piece result)
FIXTURES = [
    (
        "worked_example_a",
        "<|channel>thought\nThe user needs the EUR to JPY rate; call the tool.\n<channel|>" + CALL + "<|tool_response>",
        {"tools": EXCHANGE_TOOLS},
        lambda r: (
            r.reasoning == "The user needs the EUR to JPY rate; call the tool."
            and r.content == ""
            and args(r) == {"base": "EUR", "quote": "JPY"}
            and r.finish_reason == "tool_calls"
            and r.stop_token == "<|tool_response>"
        ),
    ),
    (
        "01_bare_call_after_thought",
        '<|channel>thought\nNeed data.\n<channel|>call:get_x{city:<|"|>Paris<|"|>}<turn|>',
        {"tools": [GET_X]},
        lambda r: r.reasoning == "Need data." and args(r) == {"city": "Paris"} and r.content == "",
    ),
    (
        "01_bare_call_at_start",
        'call:get_x{city:<|"|>Paris<|"|>}',
        {"tools": [GET_X]},
        lambda r: args(r) == {"city": "Paris"} and not r.tool_calls[0].truncated and r.content == "",
    ),
    (
        "01_bare_undeclared_stays_content",
        '<|channel>thought\nx\n<channel|>call:other{city:<|"|>Paris<|"|>}<turn|>',
        {"tools": [GET_X]},
        lambda r: r.tool_calls == [] and r.content == "call:other{city:Paris}",
    ),
    (
        "01_bare_without_tools_stays_content",
        "call:get_x{a:1}<turn|>",
        {},
        lambda r: r.tool_calls == [] and r.content == "call:get_x{a:1}" and r.finish_reason == "stop",
    ),
    (
        "01_call_word_is_content",
        "<|channel>thought\nx<channel|>calling you back: yes<turn|>",
        {"tools": [GET_X]},
        lambda r: r.content == "calling you back: yes" and not r.tool_calls,
    ),
    (
        "02_call_inside_thinking",
        "<|channel>thought\nLet's go.<|tool_call>call:editor{end_line:91,path:<|\"|>m.html"
        '<|"|>,start_line:91}<tool_call|><|tool_response>',
        {"tools": [T("editor", "path")]},
        lambda r: (
            r.reasoning == "Let's go."
            and args(r) == {"end_line": 91, "path": "m.html", "start_line": 91}
            and r.finish_reason == "tool_calls"
        ),
    ),
    (
        "03_begin_arg_and_channel_loop",
        "<|channel>thought\nrun ls\n<channel|>call:run_terminal_command:\nBEGIN_ARG:\n"
        "<|channel>thought\n<channel|>ls\nEND_ARG\n<|channel>thought\n<channel|><|tool_call>call:create_new_file:\n"
        "BEGIN_ARG:\nparser.py\nEND_ARG\nBEGIN_ARG:\nimport re\nEND_ARG\n" + "<|channel>thought\n<channel|>" * 6,
        {"tools": [RUN, NEWFILE]},
        lambda r: (
            args(r, 0) == {"command": "ls"}
            and args(r, 1) == {"filepath": "parser.py", "contents": "import re"}
            and r.tool_calls[1].truncated
            and r.finish_reason == "degenerate_output"
            and r.content == ""
        ),
    ),
    (
        "03_begin_arg_unknown_is_malformed",
        "<|tool_call>call:mystery:\nBEGIN_ARG:\nx\nEND_ARG<tool_call|>",
        {"tools": [GET_X]},
        lambda r: (
            r.tool_calls[0].error == "malformed_tool_call"
            and r.tool_calls[0].unknown_tool
            and args(r) == {"_positional": ["x"]}
        ),
    ),
    (
        "04_parentheses",
        '<|tool_call>call:search(query=<|"|>gemma 4<|"|>, limit=5)<tool_call|>',
        {"tools": [T("search", "query", "limit")]},
        lambda r: args(r) == {"query": "gemma 4", "limit": 5},
    ),
    (
        "04_bare_parentheses",
        "<|channel>thought\nx<channel|>call:search(query: 'mlx', 2)<turn|>",
        {"tools": [T("search", "query", "limit")]},
        lambda r: args(r) == {"query": "mlx", "limit": 2},
    ),
    (
        "05_namespaced",
        '<|tool_call>call:google:mcp:files:create-pdf-file{title:<|"|>Report<|"|>}<tool_call|>',
        {"tools": [PDF]},
        lambda r: (
            r.tool_calls[0].name == "create-pdf-file"
            and not r.tool_calls[0].unknown_tool
            and r.tool_calls[0].raw_name == "google:mcp:files:create-pdf-file"
        ),
    ),
    (
        "05_namespaced_unresolved_kept",
        "<|tool_call>call:a:b.c-d{}<tool_call|>",
        {"tools": [PDF]},
        lambda r: r.tool_calls[0].name == "a:b.c-d" and r.tool_calls[0].unknown_tool and args(r) == {},
    ),
    (
        "06_single_quotes",
        "<|tool_call>call:create-pdf-file{title:'Report: Q3 \"final\"',pages:3}<tool_call|>",
        {"tools": [PDF]},
        lambda r: args(r) == {"title": 'Report: Q3 "final"', "pages": 3},
    ),
    (
        "07_stray_duplicate_close",
        FENCE + "<tool_call|><tool_call|><|tool_response>",
        {"tools": [GET_X]},
        lambda r: len(r.tool_calls) == 1 and args(r) == {"city": "Oslo"} and r.content == "",
    ),
    (
        "08_unclosed_string_eos",
        '<|tool_call>call:get_x{city:<|"|>Par',
        {"tools": [GET_X]},
        lambda r: args(r) == {"city": "Par"} and r.tool_calls[0].truncated,
    ),
    (
        "08_unclosed_string_closed_call",
        '<|tool_call>call:get_x{city:<|"|>Paris}<tool_call|>',
        {"tools": [GET_X]},
        lambda r: args(r) == {"city": "Paris}"} and r.tool_calls[0].truncated,
    ),
    (
        "09_nested",
        '<|tool_call>call:plan{stops:[{city:<|"|>Rome<|"|>,nights:2},{city:<|"|>Pisa<|"|>,nights:1}],'
        'opts:{rail:true,budget:{max:500.5,currency:<|"|>EUR<|"|>},tags:[]}}<tool_call|>',
        {},
        lambda r: (
            args(r)
            == {
                "stops": [{"city": "Rome", "nights": 2}, {"city": "Pisa", "nights": 1}],
                "opts": {"rail": True, "budget": {"max": 500.5, "currency": "EUR"}, "tags": []},
            }
        ),
    ),
    (
        "10_consecutive_calls",
        FENCE + '<|tool_call>call:get_x{city:<|"|>Rome<|"|>,unit:<|"|>C<|"|>}<tool_call|><|tool_response>',
        {"tools": [GET_X]},
        lambda r: (
            [c.arguments for c in r.tool_calls] == [{"city": "Oslo"}, {"city": "Rome", "unit": "C"}]
            and [c.id for c in r.tool_calls] == ["call_0", "call_1"]
        ),
    ),
    (
        "11_whitespace_around_keys",
        '<|tool_call>call:get_exchange_rate{ base: <|"|>EUR<|"|> ,\n quote : <|"|>JPY<|"|> }<tool_call|>',
        {"tools": EXCHANGE_TOOLS},
        lambda r: args(r) == {"base": "EUR", "quote": "JPY"},
    ),
    (
        "12_bare_values",
        "<|tool_call>call:get_x{unit:celsius,city:New York,n:-3,f:1e3,ok:false}<tool_call|>",
        {"tools": [GET_X]},
        lambda r: (
            args(r) == {"unit": "celsius", "city": "New York", "n": -3, "f": 1000.0, "ok": False}
            and any("bare value" in w for w in r.tool_calls[0].warnings)
        ),
    ),
    (
        "13_leaked_channel_name",
        "thought\nThe answer is 4.<turn|>",
        {},
        lambda r: r.content == "The answer is 4." and r.reasoning == "",
    ),
    (
        "13_prefilled_repeated_header",
        "thought\nChecking.\n<channel|>It is 162.<turn|>",
        {"start_in_thought": True},
        lambda r: r.reasoning == "Checking." and r.content == "It is 162.",
    ),
    (
        "13_prefilled_no_header",
        "Checking the rate.<channel|>It is 162.<turn|>",
        {"start_in_thought": True},
        lambda r: r.reasoning == "Checking the rate." and r.content == "It is 162.",
    ),
    (
        "14_reasoning_only_stop",
        "<|channel>thought\nStill thinking about it<turn|>",
        {},
        lambda r: (
            r.reasoning == "Still thinking about it"
            and r.content == ""
            and r.finish_reason == "stop"
            and r.degenerate is None
        ),
    ),
    (
        "14_reasoning_only_length",
        "<|channel>thought\nStill thinking",
        {},
        lambda r: r.reasoning == "Still thinking" and r.content == "" and r.finish_reason == "length",
    ),
    (
        "15_empty_thought_block",
        "<|channel>thought\n<channel|>Hello there.<turn|>",
        {},
        lambda r: r.reasoning == "" and r.content == "Hello there." and r.finish_reason == "stop",
    ),
    (
        "16_pad_collapse",
        "<|channel>thought\n" + "<pad>" * 20,
        {},
        lambda r: r.finish_reason == "degenerate_output" and "<pad>" in r.degenerate and r.content == "",
    ),
    (
        "17_unused_tokens",
        "Sure." + "<unused49>\n" * 12,
        {},
        lambda r: r.finish_reason == "degenerate_output" and r.content == "Sure.",
    ),
    (
        "18_fake_result_after_stop",
        FENCE + "<|tool_response>response:get_x{temp:20}<tool_response|>It is 20.<turn|>",
        {"tools": [GET_X]},
        lambda r: (
            r.content == ""
            and len(r.tool_calls) == 1
            and r.stop_token == "<|tool_response>"
            and r.trailing.startswith("response:get_x")
            and r.finish_reason == "tool_calls"
        ),
    ),
    (
        "19_missing_call_prefix",
        '<|tool_call>get_x{city:<|"|>Rome<|"|>}<tool_call|>',
        {"tools": [GET_X]},
        lambda r: args(r) == {"city": "Rome"} and not r.tool_calls[0].truncated,
    ),
    (
        "20_verbatim_string",
        '<|tool_call>call:write{path:<|"|>a.py<|"|>,text:<|"|>' + CODE + '<|"|>}<tool_call|>',
        {},
        lambda r: args(r) == {"path": "a.py", "text": CODE},
    ),
    (
        "20_verbatim_string_bare",
        '<|channel>thought\nx<channel|>call:write{text:<|"|>' + CODE + '<|"|>}Done.<turn|>',
        {"tools": [T("write", "text")]},
        lambda r: args(r) == {"text": CODE} and r.content == "Done.",
    ),
    (
        "21_null",
        '<|tool_call>call:get_x{city:<|"|>Rome<|"|>,unit:null}<tool_call|>',
        {"tools": [GET_X]},
        lambda r: (
            args(r) == {"city": "Rome", "unit": None}
            and r.tool_calls[0].arguments_json == '{"city": "Rome", "unit": null}'
        ),
    ),
    (
        "22_turn_end_inside_call",
        '<|tool_call>call:get_x{city:<|"|>Rome<|"|><turn|>ignored',
        {"tools": [GET_X]},
        lambda r: (
            args(r) == {"city": "Rome"}
            and r.tool_calls[0].truncated
            and r.stop_token == "<turn|>"
            and r.trailing == "ignored"
        ),
    ),
    (
        "unknown_tool_never_dropped",
        "<|tool_call>call:nope{}<tool_call|>",
        {"tools": [GET_X]},
        lambda r: r.tool_calls[0].name == "nope" and r.tool_calls[0].unknown_tool,
    ),
    (
        "empty_call_never_dropped",
        "<|tool_call><tool_call|>",
        {"tools": [GET_X]},
        lambda r: len(r.tool_calls) == 1 and r.tool_calls[0].error == "malformed_tool_call",
    ),
    (
        "nameless_call_keeps_the_calls_after_it",  # the whole block was one malformed call
        '<|tool_call>call:{city:<|"|>}x<|"|>}call:get_x{city:<|"|>Oslo<|"|>}<tool_call|>'
        '<|tool_call>call:(1),call:get_x{city:<|"|>Rome<|"|>}<tool_call|>',
        {"tools": [GET_X]},
        lambda r: (
            [(c.name, c.error) for c in r.tool_calls]
            == [("", "malformed_tool_call"), ("get_x", None), ("", "malformed_tool_call"), ("get_x", None)]
            and args(r, 1) == {"city": "Oslo"}
            and args(r, 3) == {"city": "Rome"}
        ),
    ),
    (
        "text_then_call",
        "Let me check. " + FENCE + "<|tool_response>",
        {"tools": [GET_X]},
        lambda r: r.content == "Let me check." and args(r) == {"city": "Oslo"},
    ),
    (
        "control_tokens_hidden",
        'A <|image|>b<bos> and <b>c</b> x<y <|"|>q<|"|><|tool>z<tool|><|think|>!<eos>',
        {},
        lambda r: r.content == "A b and <b>c</b> x<y qz!" and r.stop_token == "<eos>",
    ),
    (
        "turn_open_stops",
        "Answer.<|turn>user\nmore",
        {},
        lambda r: r.content == "Answer." and r.stop_token == "<|turn>" and r.trailing == "user\nmore",
    ),
    (
        "two_thought_blocks",
        "<|channel>thought\nA<channel|><|channel>thought\nB<channel|>C<turn|>",
        {},
        lambda r: r.reasoning == "A\nB" and r.content == "C",
    ),
    (
        "thinking_budget",
        "<|channel>thought\n" + "abcdefghij" * 5 + "\n<channel|>Answer<turn|>",
        {"thinking_budget": 20},
        lambda r: r.reasoning == "abcdefghij" * 2 and r.thinking_truncated and r.content == "Answer",
    ),
    (
        "text_loop_detector",
        "Sure: " + "la " * 500,
        {"loop_min_chars": 120},
        lambda r: r.finish_reason == "degenerate_output" and len(r.content) < 140,
    ),
    (
        "unicode",
        "<|channel>thought\nGrüße 🌍\n<channel|>日本語 — ok<turn|>",
        {},
        lambda r: r.reasoning == "Grüße 🌍" and r.content == "日本語 — ok",
    ),
]


def _run(text, kw, pieces):
    p = StreamParser(**kw)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    return p.result, coalesce(events)


def _random_pieces(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, max(1, len(text) // 3)))))
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("fx", FIXTURES, ids=[f[0] for f in FIXTURES])
def test_parser_fixture(fx):
    _, text, kw, check = fx
    whole, whole_events = _run(text, kw, [text])
    assert check(whole), whole
    assert parse(text, **kw) == whole
    # never a raw control token or string delimiter in visible text or reasoning
    assert not CTRL_RE.search(whole.content) and not CTRL_RE.search(whole.reasoning)
    # events carry exactly what the result holds
    assert "".join(e.text for e in whole_events if e.type == "content") == whole.content
    assert [e.call for e in whole_events if e.type == "tool_call"] == whole.tool_calls
    assert whole_events[-1].type == "done" and whole_events[-1].text == whole.finish_reason
    # char by char, random split points, and UTF-8 bytes split anywhere: identical results
    assert _run(text, kw, list(text)) == (whole, whole_events)
    for seed in range(8):
        assert _run(text, kw, _random_pieces(text, random.Random(seed))) == (whole, whole_events), seed
    data = text.encode()
    assert _run(text, kw, [data[i : i + 1] for i in range(len(data))]) == (whole, whole_events)


def test_stream_is_incremental_and_stops():
    p = StreamParser(tools=[GET_X])
    out = []
    for ch in "<|channel>thought\nHmm.<channel|>Hello world, friend.":
        out += [e for e in p.feed(ch) if e.type == "content"]
    assert "".join(e.text for e in out) == "Hello world, friend."  # visible before the end
    assert len(out) > 3 and not p.done
    p.feed("<turn|>")
    assert p.done
    assert p.feed("more") == [] and p.result.trailing == "more"


def test_parser_for_prompt_start_state():
    prompt = render([M1, M3, M4, M5], tools=[EXCHANGE], thinking=True)
    p = parser_for_prompt(prompt, tools=[EXCHANGE])
    p.feed("The rate is 162.4.\n<channel|>About 162 yen.<turn|>")
    p.finish()
    assert p.result.reasoning == "The rate is 162.4." and p.result.content == "About 162 yen."
    q = parser_for_prompt(render(HELLO, empty_thought_prefill=True))  # closed block: content
    q.feed("Hi!<turn|>")
    assert q.result.content == "Hi!"


def test_tool_call_openai_shape():
    r = parse(FENCE, tools=[GET_X])
    assert r.tool_calls[0].to_openai() == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "get_x", "arguments": '{"city": "Oslo"}'},
    }


ALPHABET = [
    "<|channel>",
    "<channel|>",
    "thought",
    "\n",
    " ",
    "<|tool_call>",
    "<tool_call|>",
    "call:",
    "get_x",
    "BEGIN_ARG",
    "END_ARG",
    ":",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    "=",
    "city",
    Q,
    "'",
    '"',
    "\\",
    "Paris",
    "<pad>",
    "<|image|>",
    "<",
    "|",
    ">",
    "x",
    "7",
    "true",
    "<turn|>",
    "<|tool_response>",
    "é",
    "🌍",
]


@pytest.mark.parametrize("seed", range(60))
def test_parser_split_invariance_on_random_markup(seed):
    """Random soup of markers and fragments: any split gives the same result, no markup leaks."""
    rng = random.Random(seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(5, 60)))
    for kw in ({"tools": [GET_X]}, {"start_in_thought": True, "thinking_budget": 9, "max_control_repeat": 3}):
        whole = _run(text, kw, [text])
        r = whole[0]
        assert not CTRL_RE.search(r.content) and not CTRL_RE.search(r.reasoning) and Q not in r.content
        assert _run(text, kw, list(text)) == whole, text
        assert _run(text, kw, _random_pieces(text, rng)) == whole, text
