"""A live uvicorn server on 127.0.0.1 and a free port, in a thread, for the server tests."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import uvicorn

from gemma4_mlx.server import app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model, tokenizer, **options):
    """Yields (base URL, the FastAPI app); the server stops when the block ends."""
    api = app(model, tokenizer, **options)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", api
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def wait_idle(engine, timeout: float = 10.0) -> int:
    """Wait until the engine has no request waiting or running (a client that left
    frees its row within a round); its depth then (0 unless it timed out)."""
    deadline = time.monotonic() + timeout
    while engine.depth and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.depth


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one plain HTTP request (stdlib only)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
