"""Guarded output text (prompt/output_text.py): what a guarded parser hands out is what
the model wrote, every character, while only control tokens act as control strings."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gemma4_mlx.checkpoint.load import load_tokenizer
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.guard import guard, unguard
from gemma4_mlx.prompt.output_text import OutputText
from gemma4_mlx.prompt.parser import StreamParser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@given(st.text(alphabet=st.sampled_from(["<", ">", "|", "a", " ", "\ue000", "\ue001", "\ue002", "é"])))
def test_guard_round_trips_and_hides_every_lt(text):
    g = guard(text)
    assert unguard(g) == text and "<" not in g


def test_strings_with_lt_inside_a_real_tool_call_come_back_whole():
    tok = load_tokenizer(DEMO_MODEL)
    text = 'Sure.<|tool_call>call:get_weather{city:<|"|>a<b <c> d<|"|>}<tool_call|>'
    ids = tok.encode(text, add_special_tokens=False)  # control strings as tokens, "a<b" as text
    out, parser = OutputText(tok), StreamParser(TOOLS, guarded=True)
    for i in ids:
        parser.feed(out.add(i))
    parser.feed(out.finalize())
    parser.finish()
    [call] = parser.result.tool_calls
    assert parser.result.content == "Sure." and call.arguments == {"city": "a<b <c> d"}
    assert "\ue002" not in call.raw and "a<b" in call.raw


def test_tool_call_warnings_read_as_the_model_wrote():
    """Warnings quote slices with repr, where a guarded "<" reads `\\ue002`."""
    tok = load_tokenizer(DEMO_MODEL)
    for args in (" <b>x</b>", "{a:x<y}"):
        text = f"<|tool_call>call:get_weather{args}<tool_call|>"
        out, guarded = OutputText(tok), StreamParser(TOOLS, guarded=True)
        for i in tok.encode(text, add_special_tokens=False):
            guarded.feed(out.add(i))
        guarded.feed(out.finalize())
        guarded.finish()
        plain = StreamParser(TOOLS)
        plain.feed(text)
        plain.finish()
        got, want = ([c.warnings for c in p.result.tool_calls] for p in (guarded, plain))
        assert got == want and any("<" in w for ws in got for w in ws), (got, want)
