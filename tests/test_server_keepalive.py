"""A stream whose prefill takes long starts anyway and keeps the connection alive
(agents give up on a connection that sends nothing for minutes: Claude Code retried at
5 min); an error after the stream started keeps its status and message."""

from __future__ import annotations

import json
import time

import anthropic
import pytest

import gemma4_mlx
from gemma4_mlx.batching import scheduler as scheduler_module
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.server import results
from gemma4_mlx.server.errors import APIError

from helpers.live_server import http, live_server

NAME = "gemma4-demo"
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
ANSWER = "The capital of Japan is Tokyo."
SLOW = 1.0  # seconds the prefill is held back


@pytest.fixture(scope="module")
def url():
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    with live_server(model, tok, model_name=NAME) as (base, _):
        yield base


@pytest.fixture
def slow_prefill(monkeypatch):
    """Each prompt's prefill starts SLOW s late (on the engine thread); the stream
    opens after 0.2 s and pings every 0.1 s."""
    monkeypatch.setattr(results, "OPEN_WAIT", 0.2)
    monkeypatch.setattr(results, "HEARTBEAT", 0.1)
    real = scheduler_module.start_alone

    def late(*args):
        time.sleep(SLOW)
        return real(*args)

    monkeypatch.setattr(scheduler_module, "start_alone", late)
    return monkeypatch


def _events(raw: bytes) -> list[str]:
    return [block for block in raw.decode().split("\n\n") if block]


def test_openai_stream_opens_and_pings_during_a_long_prefill(url, slow_prefill):
    t0 = time.monotonic()
    body = {"model": NAME, "messages": JAPAN, "temperature": 0, "stream": True}
    status, _, raw = http("POST", url + "/v1/chat/completions", body)
    assert status == 200 and time.monotonic() - t0 >= SLOW
    blocks = _events(raw)
    pings = [i for i, b in enumerate(blocks) if b == ": keep-alive"]
    first_text = next(i for i, b in enumerate(blocks) if '"content": "T' in b)
    assert len(pings) >= 3 and max(pings) < first_text  # while the prefill ran
    chunks = [json.loads(b[6:]) for b in blocks if b.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == ANSWER


def test_anthropic_stream_pings_and_the_sdk_reads_it(url, slow_prefill):
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    with client.messages.stream(model=NAME, max_tokens=32, messages=JAPAN, extra_body={"temperature": 0}) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert final.content[0].text == ANSWER
    body = {"model": NAME, "max_tokens": 32, "messages": JAPAN, "temperature": 0, "stream": True}
    status, _, raw = http("POST", url + "/v1/messages", body)
    blocks = _events(raw)
    assert blocks[0].startswith("event: message_start") and "event: ping" in blocks[1]
    assert kinds[0] == "message_start"


def test_an_error_after_the_stream_opened_keeps_its_status(url, slow_prefill):
    def refused(*args):
        time.sleep(SLOW)
        raise APIError(400, "this prompt cannot be prefilled here")

    slow_prefill.setattr(scheduler_module, "start_alone", refused)
    body = {"model": NAME, "messages": JAPAN, "temperature": 0, "stream": True}
    status, _, raw = http("POST", url + "/v1/chat/completions", body)
    assert status == 200  # the stream had started
    error = json.loads(_events(raw)[-1][6:])["error"]
    assert error["message"] == "this prompt cannot be prefilled here" and error["type"] == "invalid_request_error"
    slow_prefill.undo()
    status, _, raw = http("POST", url + "/v1/chat/completions", body | {"stream": False})
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == ANSWER
