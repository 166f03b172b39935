"""Which web pages may call the server (CORS, `server/origins.py`), checked on the
wire against a live server: the preflight a browser sends before a page's JSON POST
(with the headers the OpenAI and Anthropic SDKs add), the headers that let the page
read the answer (errors too), and the 403 for a page that is not allowed."""

from __future__ import annotations

import json
import re
import time

import pytest

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.server.origins import Origins

from helpers.live_server import http, live_server

NAME = "gemma4-demo"
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
SDK_HEADERS = "authorization, content-type, x-stainless-os, x-stainless-retry-count, anthropic-version, x-api-key"


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


def _preflight(url: str, origin: str, path: str = "/v1/chat/completions", **extra):
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": SDK_HEADERS}
    return http("OPTIONS", url + path, headers=headers | extra)


def _lower(headers: dict) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def test_local_pages_may_call_by_default(demo):
    """A page on localhost (any port) gets through the preflight (before any key is
    asked for) and may read the answer, an error included; SDKs send no Origin."""
    with live_server(*demo, model_name=NAME, api_key="k") as (url, _):
        for origin in ("http://localhost:5173", "http://127.0.0.1:3000", "app://obsidian.md"):
            status, headers, _ = _preflight(url, origin)
            h = _lower(headers)
            assert status == 200 and h["access-control-allow-origin"] == origin, (origin, status, h)
            assert h["access-control-allow-headers"] == SDK_HEADERS and "POST" in h["access-control-allow-methods"]
        status, headers, body = http("POST", url + "/v1/chat/completions", CHAT, {"Origin": "http://localhost:5173"})
        h = _lower(headers)
        assert status == 401 and h["access-control-allow-origin"] == "http://localhost:5173"
        key = {"Authorization": "Bearer k"}
        status, headers, body = http(
            "POST", url + "/v1/chat/completions", CHAT, key | {"Origin": "http://localhost:5173"}
        )
        h = _lower(headers)
        assert status == 200 and json.loads(body)["choices"]
        assert h["access-control-allow-origin"] == "http://localhost:5173" and "Origin" in h["vary"]
        assert "Retry-After" in h["access-control-expose-headers"]  # a 429's wait is readable
        assert http("POST", url + "/v1/chat/completions", CHAT, key)[0] == 200  # no Origin: not a browser


def test_other_pages_are_refused(demo):
    """A page elsewhere fails its preflight with a 403 that says how to allow it, and
    a request that carries its Origin anyway gets the same (it is not served blind)."""
    with live_server(*demo, model_name=NAME) as (url, _):
        for origin in ("https://evil.example", "http://localhost.evil.example", "null"):
            status, headers, body = _preflight(url, origin)
            assert status == 403 and "access-control-allow-origin" not in _lower(headers), origin
            assert f"start the server with --cors-origin {origin}" in json.loads(body)["error"]["message"]
            status, headers, body = http("POST", url + "/v1/chat/completions", CHAT, {"Origin": origin})
            error = json.loads(body)["error"]
            assert status == 403 and "access-control-allow-origin" not in _lower(headers), origin
            assert f"start the server with --cors-origin {origin}" in error["message"]
        status, _, body = http("POST", url + "/v1/messages", CHAT | {"max_tokens": 2}, {"Origin": "null"})
        assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"  # Anthropic's shape
        status, _, body = http("POST", url + "/v1/chat/completions", CHAT, {"Origin": "https://a b"})
        assert status == 403 and "it is not an origin" in json.loads(body)["error"]["message"]  # no flag to suggest
        metrics = http("GET", url + "/metrics")[2].decode()
        assert 'endpoint="/v1/chat/completions",status="403"' in metrics  # preflights are counted too


def test_origins_given_any_and_none(demo):
    """Given origins and globs are allowed (a public page may then reach this private
    address: Chrome's Private Network Access preflight); `*` allows any page; `none`
    sends no CORS headers and refuses every page."""
    given = ["https://chat.example.com", "chrome-extension://*"]
    with live_server(*demo, model_name=NAME, cors_origins=given) as (url, _):
        pna = {"Access-Control-Request-Private-Network": "true"}
        status, headers, _ = _preflight(url, "https://chat.example.com", **pna)
        h = _lower(headers)
        assert status == 200 and h["access-control-allow-private-network"] == "true"
        assert _preflight(url, "chrome-extension://abcdefgh")[0] == 200
        assert _preflight(url, "http://localhost:5173")[0] == 403  # "local" was not given
    with live_server(*demo, model_name=NAME, cors_origins=["*"]) as (url, _):
        status, headers, _ = http("POST", url + "/v1/chat/completions", CHAT, {"Origin": "https://any.example"})
        assert status == 200 and _lower(headers)["access-control-allow-origin"] == "*"
    with live_server(*demo, model_name=NAME, cors_origins=["none"]) as (url, _):
        status, headers, _ = _preflight(url, "http://localhost:5173")
        assert status != 200 and "access-control-allow-origin" not in _lower(headers)
        status, _, body = http("POST", url + "/v1/chat/completions", CHAT, {"Origin": "http://localhost:5173"})
        assert status == 403 and "(--cors-origin none)" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (["http://localhost:3000/"], "no path, no trailing slash"),
        (["localhost:3000"], "expected scheme://host[:port]"),
        (["none", "local"], "'none' cannot be combined"),
        (["https://x.example:"], "expected scheme://host[:port]"),
    ],
)
def test_origins_that_are_not_origins_are_refused(given, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        Origins(given)


def test_globs_stay_within_the_host():
    o = Origins(["https://*.example.com", "HTTP://192.168.*.*:*"])  # given in capitals: browsers send lower case
    assert o.allows("https://a.example.com") and o.allows("https://a.b.example.com")
    assert not o.allows("https://evil.com/.example.com") and not o.allows("https://example.com")
    assert o.allows("http://192.168.1.5:3000") and not o.allows("http://192.168.1.5/x:3000")
    assert o.allows("https://A.Example.com")  # scheme and host are case-blind
    assert not Origins().allows("http://localhost.evil.example") and Origins().allows("http://[::1]:8080")


def test_matching_a_long_origin_is_quick():
    """Matching runs on the event loop before the key is checked: as regular
    expressions, three `*` took 10.8 s on a 2,000-character Origin (one request froze
    the server). Globs are matched without backtracking, and Origins longer than a
    host name can be are refused unread."""
    o = Origins(["https://*.*.*.example.com", "http://192.168.*.*:*"])
    start = time.perf_counter()
    for hostile in ("https://" + "." * 290, "http://192.168." + ".:" * 140 + "/", "https://" + "a." * 5000):
        assert not o.allows(hostile)
    assert time.perf_counter() - start < 0.015  # ~0.3 ms here; the expressions took ~50 ms at 290 characters
