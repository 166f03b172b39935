"""Chat under a checkpoint-style template (tests/templates/gemma4_checkpoint_style.jinja,
written by us to the rules of Google's published Gemma 4 templates): tool results of
any Python type and reasoning stored by `Chat` render, and render exactly as our
built-in renderer does."""

from pathlib import Path

import pytest

import gemma4_mlx
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.template import render, render_with_checkpoint_template, tool_result_content

from test_chat_session import assert_cache_is_exact

TEMPLATE = (Path(__file__).parent / "templates" / "gemma4_checkpoint_style.jinja").read_text()
RESULTS = {
    "dict": {"temp_c": 21, "sky": "clear"},
    "list": [{"day": "mon", "temp_c": 21}, {"day": "tue", "temp_c": 19}],
    "string": "21 degrees and clear",
    "error": {"error": "ValueError: no such city"},
    "number": 21,
    "parts": [{"type": "text", "text": "21 degrees"}, {"type": "text", "text": " and clear"}],
}


def get_weather(city: str, unit: str = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        city: City name
        unit: celsius or fahrenheit
    """
    raise AssertionError("replaced per test")


def conversation(result, thinking_key: str = "reasoning") -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    return [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call], thinking_key: "Call the tool."},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": tool_result_content(result)},
    ]


@pytest.mark.parametrize("kind", RESULTS)
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("thinking_key", ["reasoning", "reasoning_content"])
def test_both_render_paths_agree(kind, thinking, thinking_key):
    msgs = conversation(RESULTS[kind], thinking_key)
    later = msgs + [
        {"role": "assistant", "content": "It is 21 degrees.", thinking_key: "Done."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    prompts = []
    for m in (msgs, later):
        ours = render(m, tools=[get_weather], thinking=thinking)
        assert render_with_checkpoint_template(TEMPLATE, m, tools=[get_weather], thinking=thinking) == ours
        prompts.append(ours)
    # inside the tool loop the current thought is kept; after the next user turn it is dropped
    assert "<|channel>thought\nCall the tool.\n<channel|>" in prompts[0]
    assert "Call the tool." not in prompts[1]


def test_tool_results_are_strings_or_parts():
    assert tool_result_content({"b": 1, "a": "é"}) == '{"b": 1, "a": "é"}'
    assert tool_result_content([1, 2]) == "[1, 2]"
    assert tool_result_content(None) == "null"
    assert tool_result_content("as is") == "as is"
    parts = [{"type": "text", "text": "x"}]
    assert tool_result_content(parts) == parts
    assert tool_result_content([{"type": "weird"}]) == '[{"type": "weird"}]'  # not parts: JSON


@pytest.fixture(scope="module")
def templated_demo():
    """The demo model with a checkpoint template in its tokenizer (own load: the
    tokenizer is changed)."""
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    tok._tokenizer.chat_template = TEMPLATE
    return model, tok


@pytest.mark.parametrize("kind", ["dict", "list", "string", "error"])
@pytest.mark.parametrize("thinking", [False, True])
def test_tool_loop_under_checkpoint_template(templated_demo, kind, thinking):
    model, tok = templated_demo
    calls = []

    def get_weather(city: str) -> dict:
        """Get the current weather in a city.

        Args:
            city: City name
        """
        calls.append(city)
        if kind == "error":
            raise ValueError("no such city")
        return RESULTS[kind]

    chat = Chat(model, tok, tools=[get_weather], thinking=thinking, max_tokens=64)
    reply = chat.run("What's the weather in Paris?")
    assert calls == ["Paris"] and reply.finish_reason == "stop"
    tool_msg = chat.messages[2]
    assert tool_msg["role"] == "tool" and isinstance(tool_msg["content"], str)
    if kind == "error":
        assert tool_msg["content"] == '{"error": "ValueError: no such city"}'
    # the checkpoint template and our renderer give the very same prompt
    msgs = [dict(m) for m in chat.messages]
    assert chat.prompt_text() == render(msgs, tools=chat.tools, thinking=thinking)
    assert_cache_is_exact(chat)
    chat.run("What's the weather in Oslo?")  # a second turn renders the whole history again
    assert chat.prompt_text() == render([dict(m) for m in chat.messages], tools=chat.tools, thinking=thinking)
    assert_cache_is_exact(chat)


def test_reasoning_reaches_a_template_that_reads_reasoning_content(templated_demo):
    model, tok = templated_demo
    chat = Chat(model, tok, tools=[get_weather], thinking=True)
    chat.messages = conversation(RESULTS["dict"], "reasoning")
    assert "<|channel>thought\nCall the tool.\n<channel|>" in chat.prompt_text()
