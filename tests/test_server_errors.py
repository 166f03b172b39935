"""`gemma4_mlx.server`'s errors, each in its API's JSON shape, against a live server
(real `openai` / `anthropic` clients): 400s, 401, 413, 429 with Retry-After, 500
without a traceback, a client leaving mid-stream; the server keeps serving after each."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from http.client import HTTPConnection
from types import SimpleNamespace

import anthropic
import openai
import pytest
from PIL import Image

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL

from helpers.live_server import http, live_server, wait_idle

KEY = "sk-test"
NAME = "gemma4-demo"
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
ANSWER = "The capital of Japan is Tokyo."


@pytest.fixture(scope="module")
def server():
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    with live_server(
        model, tok, model_name=NAME, api_key=KEY, max_queue=2, max_context=1024, max_body_bytes=64 << 10
    ) as (url, api):
        yield url, api


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def an(server):
    return anthropic.Anthropic(base_url=server[0], api_key=KEY, max_retries=0, timeout=30)


def serving(oa) -> None:
    r = oa.chat.completions.create(model=NAME, messages=JAPAN, temperature=0)
    assert r.choices[0].message.content == ANSWER


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _declared_huge_png() -> str:
    """A 4x4 PNG whose header says 12000x12000 (1.4 GB decoded, from a few hundred bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", 12000, 12000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return "data:image/png;base64," + base64.b64encode(bytes(data)).decode()


def _image_message(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([{"role": "tool", "tool_call_id": "x", "content": "{}"}], "tool message must follow"),
        (_image_message("data:image/png;base64,aGVsbG8gd29ybGQ="), "undecodable image"),
        (_image_message("data:image/png;base64,@@@"), "not valid base64"),
        (_image_message(_declared_huge_png()), "12000x12000 pixels is over the 89478485 pixel limit"),
        (_image_message("https://example.com/cat.png"), "not fetched"),
        (_image_message("/etc/hosts"), "local files are not allowed"),
        (_image_message(_png()), "no vision tower"),  # the demo model is text-only
        ([{"role": "user", "content": "capital " * 1500}], "maximum context of 1024 tokens"),
        ([{"role": "user", "content": "capital " * 2100}], "characters, more than the maximum context of 1024"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "must follow a user message"),
    ],
)
def test_openai_400(oa, messages, says):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=NAME, messages=messages, temperature=0)
    assert e.value.status_code == 400 and says in e.value.body["message"]
    assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):  # streamed: refused before the stream starts
        oa.chat.completions.create(model=NAME, messages=messages, temperature=0, stream=True)
    serving(oa)


def test_prompt_too_long_names_both_lengths(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "capital " * 1500}])
    msg = e.value.body["message"]
    n = int(msg.split("the prompt is ")[1].split()[0])
    assert n > 1024 and "1024" in msg


def test_unknown_model_and_fields(oa, an):
    with pytest.raises(openai.BadRequestError, match="not served here"):
        oa.chat.completions.create(model="gpt-9", messages=JAPAN)
    with pytest.raises(anthropic.BadRequestError) as e:
        an.messages.create(model="claude-9", max_tokens=8, messages=JAPAN)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oa.chat.completions.create(model=NAME, messages=JAPAN, temperature=9)
    r = oa.chat.completions.create(model=NAME, messages=JAPAN, temperature=0, extra_body={"frobnicate": 1})
    assert r.choices[0].message.content == ANSWER  # unknown fields are ignored


def test_explicit_nulls_mean_unset(server, oa):
    """The APIs document these fields as nullable; SDKs and proxies send nulls."""
    url, _ = server
    nulls = dict.fromkeys(["n", "stream", "logprobs", "stream_options", "max_tokens", "stop", "seed", "tools"])
    body = {"model": NAME, "messages": JAPAN, "temperature": 0, **nulls}
    status, _, raw = http("POST", url + "/v1/chat/completions", body, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and json.loads(raw)["choices"][0]["message"]["content"] == ANSWER, raw
    body = {"model": NAME, "max_tokens": 32, "messages": JAPAN, "temperature": 0, "stream": None, "system": None}
    status, _, raw = http("POST", url + "/v1/messages", body, headers={"x-api-key": KEY})
    assert status == 200 and json.loads(raw)["content"][0]["text"] == ANSWER, raw
    body = {"model": None, "messages": JAPAN}  # a required field sent as null is missing
    status, _, raw = http("POST", url + "/v1/chat/completions", body, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 400 and "model" in json.loads(raw)["error"]["message"], raw


def test_any_integer_seed_is_taken(oa):
    """The keyed sampler reads a seed's low 64 bits, so -2 and 2**64 - 2 are one
    stream; -1 means "random" to llama.cpp-style clients (their "regenerate" sends it)."""
    kw = dict(model=NAME, messages=JAPAN, temperature=1.5, max_tokens=12)
    a = oa.chat.completions.create(seed=-2, **kw).choices[0].message.content
    assert a == oa.chat.completions.create(seed=(1 << 64) - 2, **kw).choices[0].message.content
    raw = dict(model=NAME, prompt="The capital", temperature=1.5, max_tokens=24, extra_body={"ignore_eos": True})
    randoms = {oa.completions.create(seed=-1, **raw).choices[0].text for _ in range(3)}
    assert len(randoms) > 1
    serving(oa)


def test_api_key(server, oa):
    url, _ = server
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=NAME, messages=JAPAN)
    status, _, body = http("POST", url + "/v1/chat/completions", {"model": NAME, "messages": JAPAN})
    error = json.loads(body)["error"]  # OpenAI's own shape for a bad key
    assert status == 401 and (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    status, _, body = http("POST", url + "/v1/messages", {"model": NAME, "max_tokens": 8, "messages": JAPAN})
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert http("GET", url + "/v1/models")[0] == 401
    greedy = {"model": NAME, "max_tokens": 8, "messages": JAPAN, "temperature": 0}  # Anthropic's default is 1.0
    status, _, body = http("POST", url + "/v1/messages", greedy, headers={"x-api-key": KEY})
    assert status == 200 and json.loads(body)["content"][0]["text"] == ANSWER
    serving(oa)


def test_body_too_large(server, oa):
    url, _ = server
    big = {"model": NAME, "messages": [{"role": "user", "content": "x" * (80 << 10)}]}
    status, _, body = http("POST", url + "/v1/chat/completions", big, headers={"Authorization": f"Bearer {KEY}"})
    assert status == 413 and "exceeds" in json.loads(body)["error"]["message"]
    serving(oa)


def test_queue_full_429(server, oa):
    _, api = server
    engine = api.state.server.engine
    engine.pause()
    results = []

    def ask():
        results.append(oa.chat.completions.create(model=NAME, messages=JAPAN, temperature=0))

    threads = [threading.Thread(target=ask) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while engine.depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            oa.chat.completions.create(model=NAME, messages=JAPAN)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
    finally:
        engine.resume()
        for t in threads:
            t.join(timeout=30)
    assert [r.choices[0].message.content for r in results] == [ANSWER, ANSWER]
    serving(oa)


def test_500_hides_the_traceback(server, oa, monkeypatch):
    _, api = server
    prefixes = api.state.server.engine.scheduler.pool

    def broken(keys):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(prefixes, "take", broken)
    with pytest.raises(openai.InternalServerError) as e:
        oa.chat.completions.create(model=NAME, messages=JAPAN)
    assert "secret" not in json.dumps(e.value.body) and "Traceback" not in json.dumps(e.value.body)
    monkeypatch.undo()
    serving(oa)


def test_an_unexpected_error_keeps_the_connection(server, monkeypatch):
    """A bug's 500 is JSON, and the client's next request on the same keep-alive
    connection is served (the server used to drop the connection after it)."""
    url, api = server
    prompter = api.state.server.prompter

    def broken(body):
        raise RuntimeError("secret detail")

    body = json.dumps({"model": NAME, "messages": JAPAN, "temperature": 0})
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection = HTTPConnection(url.removeprefix("http://"), timeout=30)  # one keep-alive connection
    try:
        monkeypatch.setattr(prompter, "sampling", broken)
        connection.request("POST", "/v1/chat/completions", body, headers)
        r = connection.getresponse()
        error = json.loads(r.read())["error"]
        assert r.status == 500 and error["type"] == "server_error" and "secret" not in json.dumps(error)
        monkeypatch.undo()
        connection.request("POST", "/v1/chat/completions", body, headers)
        r = connection.getresponse()
        assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["content"] == ANSWER
    finally:
        connection.close()


def _nested(depth: int) -> dict:
    schema = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({"type": "object", "properties": {"city": "string"}}, "parameters.properties: expected an object of"),
        ({"type": "object", "properties": {}, "required": [5, None]}, "parameters.required: expected a list"),
        ({"type": "object", "properties": {"a": _nested(400)}}, "nested too deeply"),
    ],
)
def test_malformed_tool_declarations_are_400(oa, parameters, says):
    """Each was a 500.  (A boolean property schema is valid JSON Schema: served.)"""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model=NAME, messages=JAPAN, tools=[tool], stream=stream)
        assert says in e.value.body["message"] and e.value.body["param"] in ("tools", None)
    boolean = {"type": "object", "properties": {"city": True}}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": boolean}}
    r = oa.chat.completions.create(model=NAME, messages=JAPAN, tools=[tool], temperature=0)
    assert r.choices[0].finish_reason in ("stop", "tool_calls")
    serving(oa)


def test_lone_surrogates_are_400_on_every_endpoint(server, oa):
    """JSON may escape half a UTF-16 pair ("\\ud800"); such text is not Unicode and
    the tokenizer raised (a 500).  The SDKs cannot send one; other clients can."""
    url, _ = server
    text = "hi \ud800"
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": text}]},
        "/v1/completions": {"prompt": text},
        "/v1/messages": {"max_tokens": 4, "messages": [{"role": "user", "content": text}]},
        "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": text}]},
        "/v1/responses": {"input": text},
    }
    for path, body in bodies.items():
        status, _, raw = http("POST", url + path, {"model": NAME, **body}, headers={"x-api-key": KEY})
        assert status == 400 and b"lone UTF-16 surrogate (\\\\ud800)" in raw, (path, raw)
    serving(oa)


def test_raw_completion_errors_name_the_prompt(oa):
    with pytest.raises(openai.BadRequestError) as e:
        oa.completions.create(model=NAME, prompt="capital " * 1500, max_tokens=4)
    assert "maximum context" in e.value.body["message"] and e.value.body["param"] == "prompt"


def test_sampling_edges_are_served(oa):
    """top_k beyond the vocabulary keeps all tokens (mlx-lm's top-k raised: a 500); a
    temperature so small that 1/T overflows is greedy (it sampled NaN: garbage)."""
    r = oa.chat.completions.create(model=NAME, messages=JAPAN, temperature=1.0, extra_body={"top_k": 1 << 40})
    assert r.choices[0].finish_reason in ("stop", "length")
    r = oa.chat.completions.create(model=NAME, messages=JAPAN, temperature=1e-300)
    assert r.choices[0].message.content == ANSWER


def test_kv_budget_refuses_a_request_too_large_for_it(server, oa):
    """--kv-cache-gb: a request whose cache cannot fit even alone is a 400 naming the
    option; smaller ones are served (docs/serving.md §2.2)."""
    _, api = server
    kv = api.state.server.engine.scheduler.kv
    kv.budget = 1 << 40
    serving(oa)  # the engine reads the bytes per slot
    try:
        kv.budget = kv.projected([], 0, [SimpleNamespace(ids=[0] * 600, remaining=0)])
        r = oa.chat.completions.create(model=NAME, messages=JAPAN, temperature=0, max_tokens=16)
        assert r.choices[0].message.content == ANSWER
        with pytest.raises(openai.BadRequestError) as e:  # max_tokens: the context's ~1000 left
            oa.chat.completions.create(model=NAME, messages=JAPAN, temperature=0)
        assert "--kv-cache-gb" in e.value.body["message"] and e.value.body["param"] == "max_tokens"
    finally:
        kv.budget = None
    serving(oa)


def test_client_leaving_mid_stream(server, oa):
    _, api = server
    engine = api.state.server.engine
    stream = oa.completions.create(
        model=NAME, prompt="The capital", max_tokens=1000, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )  # ~4 s of tokens if nobody stops it
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    stream.close()
    assert wait_idle(engine) == 0
    assert len(engine.scheduler.pool.entries[-1].keys) < 500  # cancelled long before max_tokens
    serving(oa)


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}]},
        {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "c", "function": 3}]}]},
        {"messages": JAPAN, "tools": [1, 2]},
        {"messages": [{"role": "system", "content": [{"type": "text", "text": 7}]}, *JAPAN]},
    ],
)
def test_wrong_types_in_messages_are_400(server, oa, body):
    url, _ = server
    status, _, raw = http(
        "POST", url + "/v1/chat/completions", {"model": NAME, **body}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert status == 400, raw
    assert json.loads(raw)["error"]["type"] == "invalid_request_error"
    serving(oa)


def test_anthropic_wrong_types_are_400(server, an):
    url, _ = server
    body = {"model": NAME, "max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}
    status, _, raw = http("POST", url + "/v1/messages", body, headers={"x-api-key": KEY})
    assert status == 400 and json.loads(raw)["type"] == "error", raw


def test_chunked_body_too_large_is_413(server, oa):
    import http.client
    from urllib.parse import urlparse

    u = urlparse(server[0])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    payload = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * (80 << 10)}]}).encode()
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(payload), 8192):
        part = payload[i : i + 8192]
        conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    conn.send(b"0\r\n\r\n")
    r = conn.getresponse()
    assert r.status == 413 and "exceeds" in json.loads(r.read())["error"]["message"]
    conn.close()
    serving(oa)
