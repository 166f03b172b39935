"""Fuzzing the chat format (docs/hardening.md §4): the output parser on arbitrary text and
arbitrary splits, the renderer (built-in grammar and the shipped jinja template through
`PromptCodec`) on arbitrary conversations and tool schemas."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemma4_mlx.checkpoint.load import load_tokenizer
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt import ChatTemplateError, StreamParser, coalesce, render, render_with_checkpoint_template
from gemma4_mlx.prompt.template import CHAT_TEMPLATE
from gemma4_mlx.prompt.tokens import PromptCodec

from helpers.fuzz import fuzz_settings, one_line

# Pieces Gemma 4 output is made of, so random text reaches every parser state.
FRAGMENTS = [
    "<|tool_call>",
    "<tool_call|>",
    "<|channel>",
    "<channel|>",
    "thought\n",
    "call:",
    "get_weather",
    "{",
    "}",
    '<|"|>',
    ":",
    ",",
    "[",
    "]",
    "city",
    "true",
    "-1.5e3",
    "<turn|>",
    "<|turn>",
    "<eos>",
    "<|tool_response>",
    "<|image|>",
    "<|think|>",
    "\n",
    " ",
    "<",
    "|",
    "<|",
    "é",
    "\u2028",
    "🙂",
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]

output_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=6), max_size=40).map("".join)


def _run(pieces, tools, **kw):
    p = StreamParser(tools, **kw)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    return coalesce(events), p.result


def _cuts(draw, n: int) -> list[int]:
    return sorted(set(draw(st.lists(st.integers(0, n), max_size=8))))


@given(data=st.data(), tools=st.sampled_from([None, TOOLS, ["get_weather"]]), thought=st.booleans())
@fuzz_settings(150)
def test_parser_split_invariant(data, tools, thought):
    text = data.draw(output_text)
    whole_events, whole = _run([text], tools, start_in_thought=thought)
    cuts = _cuts(data.draw, len(text))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    events, result = _run(pieces, tools, start_in_thought=thought)
    assert events == whole_events and result == whole
    for call in result.tool_calls:  # arguments parsed, or the call reported malformed
        assert isinstance(call.arguments, dict) and call.error in (None, "malformed_tool_call")
    # byte-fallback pieces, cut inside multi-byte characters, give the same
    raw = text.encode()
    bcuts = _cuts(data.draw, len(raw))
    bytes_events, bytes_result = _run(
        [raw[a:b] for a, b in zip([0, *bcuts], [*bcuts, len(raw)])], tools, start_in_thought=thought
    )
    assert bytes_events == whole_events and bytes_result == whole


# -- the renderer -------------------------------------------------------------------

# names (tools, parameters, argument keys) from a safe alphabet; every text can carry control strings
names = st.text(
    st.characters(categories=["L", "N"]) | st.sampled_from("_-. "), min_size=1, max_size=8
) | st.sampled_from(["get_weather", "名前", "a-b.c", "x y"])
scalar_schema = st.fixed_dictionaries(
    {"type": st.sampled_from(["string", "integer", "number", "boolean", "null", ["string", "null"]])},
    optional={"description": st.text(max_size=10), "enum": st.lists(st.text(max_size=4) | st.integers(), max_size=3)},
)
schemas = st.recursive(
    scalar_schema,
    lambda kids: (
        st.fixed_dictionaries({"type": st.just("array"), "items": kids})
        | st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(names, kids, max_size=3)})
        | st.fixed_dictionaries({"anyOf": st.lists(kids, min_size=1, max_size=3)})
    ),
    max_leaves=6,
)
tools = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.just("function"),
            "function": st.fixed_dictionaries(
                {"name": names},
                optional={
                    "description": st.text(max_size=12),
                    "parameters": st.fixed_dictionaries(
                        {"type": st.just("object"), "properties": st.dictionaries(names, schemas, max_size=3)},
                        optional={"required": st.lists(names, max_size=2)},
                    ),
                },
            ),
        }
    ),
    max_size=2,
)
text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=6).map("".join)
parts = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": text})
    | st.fixed_dictionaries({"type": st.sampled_from(["image", "audio", "video"])}),
    max_size=3,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(names, kids, max_size=3),
    max_leaves=5,
)
call = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": names, "arguments": st.dictionaries(names, json_values, max_size=3)}
        ),
    }
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "model", "tool"]),
        "content": text | parts | st.none(),
    },
    optional={"tool_calls": st.lists(call, max_size=2), "reasoning": text, "name": names},
)
conversations = st.lists(message, max_size=5)


@pytest.fixture(scope="module")
def codec():
    return PromptCodec(load_tokenizer(DEMO_MODEL))


def _render_or_our_error(fn):
    try:
        return fn()
    except ChatTemplateError as e:
        assert one_line(str(e)), str(e)
        return None


@given(msgs=conversations, tools=tools, thinking=st.booleans())
@fuzz_settings(100)
def test_render_builtin_grammar(msgs, tools, thinking):
    out = _render_or_our_error(lambda: render(msgs, tools=tools, thinking=thinking))
    assert out is None or out.startswith("<bos>")


@given(msgs=conversations, tools=tools, thinking=st.booleans())
@fuzz_settings(60)
def test_render_shipped_template_escaped(codec, msgs, tools, thinking):
    """Through the jinja template, escaped as every caller does: renders or raises our
    error, and no untrusted string adds a control token (the control ids are those of the
    same conversation with every text replaced by "x")."""
    escaped = codec.escape_messages(msgs)
    out = _render_or_our_error(
        lambda: render_with_checkpoint_template(
            CHAT_TEMPLATE, escaped, tools=codec.escape_value(tools) or None, thinking=thinking
        )
    )
    if out is None:
        return
    ref = _render_or_our_error(
        lambda: render_with_checkpoint_template(
            CHAT_TEMPLATE, _plain(msgs), tools=_plain(tools) or None, thinking=thinking
        )
    )
    controls = set(codec._ids.values())
    got = [i for i in codec.encode(out) if i in controls]
    assert ref is not None and got == [i for i in codec.encode(ref) if i in controls]


UNTRUSTED = {"content", "text", "reasoning", "description", "arguments", "enum"}


def _plain(v, untrusted: bool = False):
    """`v` with every non-blank untrusted string made "x": the same structure, nothing to
    inject (names come from a safe alphabet)."""
    if isinstance(v, str):
        return ("x" if v.strip() else v) if untrusted else v
    if isinstance(v, dict):
        return {k: x if k == "type" else _plain(x, untrusted or k in UNTRUSTED) for k, x in v.items()}
    if isinstance(v, list):
        return [_plain(x, untrusted) for x in v]
    return v
