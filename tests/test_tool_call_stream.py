"""A tool call's arguments streamed while the model writes them (docs/chat-format.md §9.4):
the `tool_call_delta` texts join into exactly the finished call's `arguments_json`,
for any split of the text, guarded or not, on well-formed and malformed calls alike;
a long string value arrives before the call ends; streaming changes no result."""

from __future__ import annotations

import json
import random
import re
import time

import pytest

from gemma4_mlx.prompt import StreamParser
from gemma4_mlx.prompt.arguments import Q, parse_call_block
from gemma4_mlx.prompt.guard import guard

from test_chat_format import ALPHABET, FIXTURES, GET_X, _random_pieces

CONTROL = re.compile(r'(<\|tool_call>|<tool_call\|>|<\|"\|>|<\|channel>|<channel\|>|<turn\|>|<\|tool_response>)')
HEAD = "<|tool_call>call:get_x{"
# call bodies: Gemma's syntax, JSON-isms and the malformed forms the reader tolerates
BODY = [Q, "city", "unit", ":", "=", ",", " ", "\n", "{", "}", "[", "]", "(", ")", '"', "'", "\\", "\\n"]
BODY += ["1", "-2.50", "1e3", "true", "None", "null", "x y", "é", "🌍", "\ue001", "\ue002", "<", "call:", "get_x"]
BODY += ["ns:", "<tool_call|>", "<turn|>", "<|channel>", "<channel|>"]


def _guarded(text: str) -> str:
    """`text` as `output_text.OutputText` hands it over: ordinary text guarded."""
    return "".join(p if CONTROL.fullmatch(p) else guard(p) for p in CONTROL.split(text))


def _streamed(text: str, pieces, **kw):
    """(result, [(name, joined deltas)] per started call, the events)."""
    p = StreamParser(**({"tools": [GET_X]} | kw), stream_arguments=True)
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    started = []
    for e in events:
        if e.type == "tool_call_start":
            started.append([e.call.name, ""])
        elif e.type == "tool_call_delta":
            assert started, "a delta before its call started"
            started[-1][1] += e.text
    return p.result, started, events


def _check(text: str, pieces, **kw):
    plain = StreamParser(**({"tools": [GET_X]} | kw))
    for piece in pieces:
        plain.feed(piece)
    plain.finish()
    result, started, events = _streamed(text, pieces, **kw)
    assert result == plain.result, text  # streaming the arguments changes nothing
    calls = [e.call for e in events if e.type == "tool_call"]
    for call in calls:
        assert not any("cut where" in w for w in call.warnings), (text, call.warnings)
    # each started call is followed by its own deltas, then its `tool_call`; the joined
    # deltas are exactly its arguments' JSON
    starts = [i for i, e in enumerate(events) if e.type == "tool_call_start"]
    for (name, joined), at in zip(started, starts):
        call = next(e.call for e in events[at:] if e.type == "tool_call")
        assert (name, joined) == (call.name, call.arguments_json), text
        json.loads(joined)
    return started


@pytest.mark.parametrize("seed", range(120))
def test_deltas_join_into_the_finished_arguments(seed):
    rng = random.Random(seed)
    body = "".join(rng.choice(BODY) for _ in range(rng.randint(1, 40)))
    text = (HEAD if rng.random() < 0.8 else "<|tool_call>") + body + rng.choice(["<tool_call|>", "", "<turn|>"])
    for guarded in (False, True):
        t = _guarded(text) if guarded else text
        for pieces in ([t], list(t), _random_pieces(t, rng) if len(t) > 1 else [t]):
            _check(t, pieces, guarded=guarded)


@pytest.mark.parametrize("seed", range(40))
def test_random_markup_keeps_the_promise(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(5, 60)))
    _check(text, _random_pieces(text, rng) if len(text) > 1 else [text])


@pytest.mark.parametrize("fx", FIXTURES, ids=[f[0] for f in FIXTURES])
def test_parser_fixtures_unchanged(fx):
    _, text, kw, _ = fx
    for pieces in ([text], list(text)):
        _check(text, pieces, **kw)


def test_well_formed_arguments_stream_as_they_are_written():
    content = 'line one\n\t"quoted" \\ back <b> ' + "x" * 300 + " é🌍 \ue001\ue002 \ue001"
    text = f"<|tool_call>call:get_x{{city:{Q}{content}{Q},unit:[1, 2.5, {{a:true}}],n:null}}<tool_call|>"
    t = _guarded(text)
    p = StreamParser(tools=[GET_X], stream_arguments=True, guarded=True)
    sent, at_close = "", None
    close = t.index(Q, t.index(Q) + 1)  # the string's closing delimiter
    for i, ch in enumerate(t):
        if i == close:
            at_close = sent
        for e in p.feed(ch):
            sent += e.text if e.type == "tool_call_delta" else ""
    p.finish()
    # the whole string value was out before its closing delimiter, escaped as JSON
    assert at_close == '{"city": ' + json.dumps(content, ensure_ascii=False)[:-1]
    whole = p.result.tool_calls[0].arguments_json
    assert sent == whole and json.loads(whole) == {"city": content, "unit": [1, 2.5, {"a": True}], "n": None}


def test_a_bare_call_streams_too():
    p = StreamParser(tools=[GET_X], stream_arguments=True)
    events = []
    for ch in f"<|channel>thought\nok<channel|>call:get_x{{city:{Q}Oslo{Q}}} trailing":
        events += p.feed(ch)
    events += p.finish()
    kinds = [e.type for e in events if e.type.startswith("tool_call")]
    assert kinds[0] == "tool_call_start" and kinds[-1] == "tool_call" and kinds.count("tool_call_delta") >= 4
    assert "".join(e.text for e in events if e.type == "tool_call_delta") == '{"city": "Oslo"}'


def test_a_repeated_key_keeps_its_first_value():
    text = f"<|tool_call>call:get_x{{city:{Q}Oslo{Q},city:{Q}Rome{Q},unit:1}}<tool_call|>"
    assert _check(text, list(text)) == [["get_x", '{"city": "Oslo", "unit": 1}']]
    (call,) = parse_call_block(text[len("<|tool_call>") : -len("<tool_call|>")])
    assert call.arguments == {"city": "Oslo", "unit": 1}
    assert any("repeated key 'city'" in w for w in call.warnings)
    (call,) = parse_call_block("call:get_x{city:1,city")  # truncated: the first stays too
    assert call.arguments == {"city": 1}


def test_forms_that_cannot_stream_come_whole():
    """The parenthesised and BEGIN_ARG forms: nothing until the call ends, then its
    start, all of its arguments in one delta, and the call."""
    for text in (f"<|tool_call>call:get_x({Q}Oslo{Q})<tool_call|>", "<|tool_call>call:get_x: BEGIN_ARG\nOslo\nEND_ARG"):
        p = StreamParser(tools=[GET_X], stream_arguments=True)
        early = [e for ch in text[:-1] for e in p.feed(ch) if e.type.startswith("tool_call")]
        last = [e for e in p.feed(text[-1]) + p.finish() if e.type.startswith("tool_call")]
        assert early == [] and [e.type for e in last] == ["tool_call_start", "tool_call_delta", "tool_call"]
        assert (
            (last[0].call.name, last[1].text)
            == ("get_x", '{"city": "Oslo"}')
            == (last[2].call.name, last[2].call.arguments_json)
        )


def test_a_call_cut_inside_a_string_keeps_what_was_sent():
    """Cut by the end of the reply (max_tokens, a stop) right after a newline or a
    space inside a string: the value keeps them, streamed or not."""
    for cut in ("line one\n", "Oslo ", "a \t\n "):
        text = f"<|tool_call>call:get_x{{city:{Q}{cut}"
        for guarded in (False, True):
            t = _guarded(text) if guarded else text
            assert _check(t, list(t), guarded=guarded) == [["get_x", json.dumps({"city": cut})]]
            assert _check(t + "<turn|>", [t + "<turn|>"], guarded=guarded) == [["get_x", json.dumps({"city": cut})]]


def test_a_key_named_like_the_positional_fallback_is_kept():
    text = "<|tool_call>call:nope{_positional:1,foo}<tool_call|>"
    assert _check(text, list(text)) == [["nope", '{"_positional": 1}']]


def test_a_long_value_is_read_once_not_once_per_piece():
    """A quoted or bare value that is not yet complete is looked at from where the last
    look stopped: 100k characters in 4-character pieces took minutes when each piece
    rescanned the value from its start (the engine thread, every request stalled)."""
    content = "some words, and more " * 5000
    for value in (json.dumps(content), content.replace(",", ";")):
        text = "<|tool_call>call:get_x{city:" + value + "}<tool_call|>"
        p = StreamParser(tools=[GET_X], stream_arguments=True)
        start = time.perf_counter()
        for i in range(0, len(text), 4):
            p.feed(text[i : i + 4])
        p.finish()
        assert time.perf_counter() - start < 10 and p.result.tool_calls[0].arguments["city"].startswith("some words")


def test_a_call_cut_by_the_end_of_the_text_is_not_a_finished_one():
    """max_tokens ending the reply inside a call gives `length`, not `tool_calls`: a
    client must not take the cut call for one the model finished."""
    whole = f"<|tool_call>call:get_x{{city:{Q}Rome{Q}}}<tool_call|>"
    for text, reason in (
        (whole[:-14], "length"),  # cut inside its string
        (whole[:-12], "length"),  # its body complete, its end marker not written
        (whole, "tool_calls"),  # ended, though nothing came after it
        (whole + "<|tool_response>", "tool_calls"),
        (f"<|tool_call>call:get_x{{city:{Q}Ro<turn|>", "tool_calls"),  # the model ended it
    ):
        p = StreamParser(tools=[GET_X], stream_arguments=True)
        p.feed(text)
        p.finish()
        assert (p.result.finish_reason, len(p.result.tool_calls)) == (reason, 1), text


def test_a_call_cut_within_its_name_is_not_a_call():
    """`get_` may be the start of `get_weather` or of nothing: a call the end cut
    before its arguments is dropped (real clients failed on the unknown tool `get_`).
    Ended by the model, a call of a name alone stays (a call with no arguments)."""
    for cut in ("c", "call", "call:", "call:get_", "call:get_x", "call:get_x  ", "call:get_x:", "call:ns:"):
        p = StreamParser(tools=[GET_X], stream_arguments=True)
        events = p.feed("Hi.<|tool_call>" + cut) + p.finish()
        assert (p.result.finish_reason, p.result.tool_calls, p.result.content) == ("length", [], "Hi."), cut
        assert not any(e.type.startswith("tool_call") for e in events)
    for ended in ("<|tool_call>call:get_x<tool_call|>", "<|tool_call>call:get_x<turn|>"):
        p = StreamParser(tools=[GET_X], stream_arguments=True)
        p.feed(ended)
        p.finish()
        assert [(c.name, c.arguments) for c in p.result.tool_calls] == [("get_x", {})], ended
    p = StreamParser(tools=[GET_X])  # the block's earlier calls stay, whole; the reply was cut
    p.feed(f"<|tool_call>call:get_x{{city:{Q}Oslo{Q}}},call:ge")
    p.finish()
    assert [(c.arguments, c.truncated) for c in p.result.tool_calls] == [({"city": "Oslo"}, False)]
    assert p.result.finish_reason == "length"


def test_a_number_json_cannot_hold_stays_text():
    """`1e999` read as a float is infinity, which JSON has no token for (`Infinity` is
    not JSON; a client's parser fails): what the model wrote stays, as a string."""
    text = "<|tool_call>call:get_x{city:1e999,unit:[-1e999, 2.5]}<tool_call|>"
    assert _check(text, list(text)) == [["get_x", '{"city": "1e999", "unit": ["-1e999", 2.5]}']]
