"""`server.run.Run`, the per-request text state of the engine thread, fed tokens of the
demo tokenizer directly: the order in which content, tool calls and stop strings
leave it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gemma4_mlx.checkpoint.load import load_tokenizer
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.parser import parser_for_prompt
from gemma4_mlx.prompt.tokens import PromptCodec
from gemma4_mlx.server.handle import Request, Usage
from gemma4_mlx.server.run import Run

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
REPLY = 'Let me check the weather.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(DEMO_MODEL)


def run_reply(tok, stop, continues=False, text=REPLY):
    """(the outputs in order as (kind, text or tool name), the finish reason)."""
    parser = lambda: parser_for_prompt("", TOOLS, continuing=continues, guarded=True, stream_arguments=True)  # noqa: E731  (as `Prompter` makes it)
    req = Request(ids=[], keys=[], stop=stop, parser=parser, continues=continues)
    outs = []
    handle = SimpleNamespace(request=req, first_token_at=None, put=outs.append)
    run = Run(tok, frozenset(), handle, Usage())
    ids = tok.encode(text, add_special_tokens=False) if isinstance(text, str) else text
    for t in ids:
        if run.step(t):
            break
    run.finish()
    events = [(o.event.type, o.event.text or o.event.call.name) for o in outs if o.kind == "event"]
    return events, outs[-1].finish_reason


@pytest.mark.parametrize("stop", [[], ["XYZ"], ["weather?!"]])
def test_held_content_goes_before_a_tool_call(tok, stop):
    """Content held back for a possible stop string is sent when its segment ends,
    before the call, not after it (an Anthropic text block after the tool_use block)."""
    events, reason = run_reply(tok, stop)
    text = "".join(t for kind, t in events if kind == "content")
    assert text == "Let me check the weather." and reason == "tool_calls"
    assert [kind for kind, _ in events][-1] == "tool_call"


def test_a_call_without_a_name_is_not_sent(tok):
    """`call:{...}` names no tool: no client can answer it, so none of its events leave,
    and with no other call the reply is a plain `stop`."""
    events, reason = run_reply(tok, [], text='Hi.<|tool_call>call:{city:<|"|>Paris<|"|>}<tool_call|>')
    assert ([kind for kind, _ in events], "".join(t for _, t in events), reason) == (["content"] * 2, "Hi.", "stop")
    both = '<|tool_call>call:{city:<|"|>Oslo<|"|>}<tool_call|>' + REPLY.split("weather.")[1]
    events, reason = run_reply(tok, [], text=both)
    assert [kind for kind, _ in events] == ["tool_call_start"] + ["tool_call_delta"] * (len(events) - 2) + ["tool_call"]
    assert events[0] == ("tool_call_start", "get_weather") and reason == "tool_calls"
    assert "".join(t for kind, t in events if kind == "tool_call_delta") == '{"city": "Paris"}'


def test_stop_string_inside_content_still_ends_it(tok):
    events, reason = run_reply(tok, ["the weather"])
    assert "".join(t for _, t in events) == "Let me check " and reason == "stop"


def test_a_continued_reply_keeps_its_leading_space(tok):
    """After an assistant prefill the reply's first space is text (mlx-lm's detokenizers
    drop it at the start of a turn)."""
    events, _ = run_reply(tok, [], continues=True, text=" is Tokyo.")
    assert "".join(t for _, t in events) == " is Tokyo."
    events, _ = run_reply(tok, [], text=" is Tokyo.")
    assert "".join(t for _, t in events) == "is Tokyo."


def test_control_strings_written_as_text_stay_text(tok):
    """The characters of `<turn|>` or a whole `<|tool_call>...<tool_call|>` written by
    ordinary tokens (a reply about Gemma's format; a schema's const) ended the reply or
    made a call: only control tokens are control strings now (prompt/output_text.py)."""
    said = "End a turn with <turn|>; a call is <|tool_call>call:get_weather{city:1}<tool_call|>. <b>ok</b>"
    ids = PromptCodec(tok).encode_text(said)  # the text as ordinary pieces, as a model could write it
    assert not set(ids) & set(PromptCodec(tok).control_ids().values())
    events, reason = run_reply(tok, [], text=[*ids, tok.convert_tokens_to_ids("<turn|>")])
    assert {kind for kind, _ in events} == {"content"} and "".join(t for _, t in events) == said
    assert reason == "stop"
    real = tok.encode(REPLY, add_special_tokens=False)  # the same reply made of control tokens still calls
    assert run_reply(tok, [], text=real)[1] == "tool_calls"


@pytest.mark.parametrize(
    "reply",
    [
        "<|channel>thought\n<channel|>The answer is 4.",  # an empty thought: no reasoning event clears markup
        "<|channel>thought\nTwo and two.\n<channel|>The answer is 4.",
        "The answer is 4.",
    ],
)
def test_logprobs_are_the_contents_tokens_only(tok, reply):
    """Every content token has its log-probability entry, each starting where its text
    starts in the content; thought and channel markup have none."""
    parser = lambda: parser_for_prompt("", None, guarded=True)  # noqa: E731
    req = Request(ids=[], keys=[], parser=parser, logprobs=0)
    outs = []
    handle = SimpleNamespace(request=req, first_token_at=None, put=outs.append)
    run = Run(tok, frozenset(), handle, Usage())
    for t in tok.encode(reply, add_special_tokens=False):
        run.step(t, (-0.5, []))
    run.finish()
    content = "".join(o.event.text for o in outs if o.kind == "event" and o.event.type == "content")
    entries = [e for o in outs if o.kind == "event" and o.logprobs for e in o.logprobs]
    assert content == "The answer is 4."
    assert "".join(e.text for e in entries) == content
    assert all(content.startswith(e.text, e.offset) for e in entries)
