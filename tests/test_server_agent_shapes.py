"""Request shapes that agent clients send.

System messages where agents put them: a system (or developer) message after the
first renders in place as its own system turn, as Google's template renders it —
Claude Code sends one after the user's turn (Anthropic's mid-conversation-system
beta), Codex and others send developer messages between turns — on all three APIs.
Anthropic's SDK tool runners open a server-side message thread, which is refused
with the error code that makes them send whole conversations instead."""

from __future__ import annotations

import json

import anthropic
import pytest
from anthropic import beta_tool

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.template import render
from gemma4_mlx.server import anthropic_api, openai_api, responses_input
from gemma4_mlx.server.errors import APIError
from gemma4_mlx.server.prompts import Prompter
from gemma4_mlx.server.schemas import ChatCompletionRequest, MessagesRequest, ResponsesRequest

from helpers.live_server import live_server

NAME = "gemma4-demo"
LATE = "Agent types: explore, plan."
# the conversation each API's body below carries, as the built-in renderer renders it
EXPECTED = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "List the agents."},
    {"role": "system", "content": LATE},
]


@pytest.fixture(scope="module")
def prompter():
    return Prompter(*gemma4_mlx.load(DEMO_MODEL))


def test_the_template_renders_a_late_system_turn_in_place():
    tail = f"<|turn>user\nList the agents.<turn|>\n<|turn>system\n{LATE}<turn|>\n<|turn>model\n"
    assert render(EXPECTED).endswith(tail)


def test_anthropic_late_system_message(prompter):
    body = MessagesRequest(
        model=NAME,
        max_tokens=8,
        system="Be brief.",
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
            {"role": "user", "content": [{"type": "text", "text": "List the agents."}]},
            {"role": "system", "content": [{"type": "text", "text": LATE}]},
        ],
    )
    assert prompter.render(anthropic_api.conversation(body, prompter)) == render(EXPECTED)


def test_openai_late_system_and_developer_messages(prompter):
    for role in ("system", "developer"):
        messages = [dict(m) for m in EXPECTED]
        messages[-1]["role"] = role
        body = ChatCompletionRequest(model=NAME, messages=messages)
        assert prompter.render(openai_api.conversation(body, prompter)) == render(EXPECTED), role


def test_responses_developer_items_between_turns(prompter):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]},
        {"role": "user", "content": "List the agents."},
        {"role": "developer", "content": [{"type": "input_text", "text": LATE}]},
    ]
    body = ResponsesRequest(model=NAME, input=items)
    assert prompter.render(responses_input.conversation(body, prompter)[1]) == render(EXPECTED)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "system", "content": "Only a system prompt."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}, {"role": "system", "content": ""}],
    ],
)
def test_a_reply_still_needs_a_user_turn_or_tool_result_last(prompter, messages):
    with pytest.raises(APIError, match="system messages aside"):
        openai_api.conversation(ChatCompletionRequest(model=NAME, messages=messages), prompter)


def test_claude_code_shaped_request_is_served():
    """The real client, the body shape Claude Code sends (a system message after the
    user's turn): answered, and counted as the rendered prompt."""
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    with live_server(model, tok, model_name=NAME) as (url, _):
        client = anthropic.Anthropic(base_url=url, api_key="unused")
        messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": [{"type": "text", "text": LATE}]}]
        r = client.messages.create(model=NAME, max_tokens=8, messages=messages, extra_body={"temperature": 0})
        assert r.stop_reason in ("end_turn", "max_tokens") and r.content
        counted = client.messages.count_tokens(model=NAME, messages=messages).input_tokens
        rendered = render([{"role": "user", "content": "Hi"}, {"role": "system", "content": LATE}])
        assert counted == r.usage.input_tokens == len(tok.encode(rendered, add_special_tokens=False))


def test_anthropic_tool_runner_falls_back_from_threads():
    """The SDK's tool runner (threads on by default) runs its loop to the end: the
    thread request is refused as `thread_unsupported_request`, then whole
    conversations are sent."""
    ran = []

    @beta_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
            city: City name
        """
        ran.append(city)
        return json.dumps({"temperature": 21, "condition": "sunny"})

    model, tok = gemma4_mlx.load(DEMO_MODEL)
    with live_server(model, tok, model_name=NAME) as (url, _):
        client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
        runner = client.beta.messages.tool_runner(
            model=NAME,
            max_tokens=64,
            tools=[get_weather],
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            extra_body={"temperature": 0},
        )
        final = runner.until_done()
        assert ran == ["Paris"] and final.stop_reason == "end_turn" and "Paris" in final.content[-1].text
        threaded = {"thread": {"type": "create"}}
        with pytest.raises(anthropic.BadRequestError) as e:
            client.messages.create(
                model=NAME, max_tokens=8, messages=[{"role": "user", "content": "Hi"}], extra_body=threaded
            )
        assert e.value.body["error"]["details"] == {"error_code": "thread_unsupported_request"}
