"""The FastAPI application: OpenAI- and Anthropic-compatible endpoints over one
`Engine`, plus /health, /v1/models and /metrics."""

from __future__ import annotations

import contextlib
import datetime
import hmac
import logging
import time
from collections.abc import Sequence

from fastapi import FastAPI
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware

from gemma4_mlx.server import anthropic_api, openai_api, responses_api
from gemma4_mlx.server.engine import Engine, QueueFull
from gemma4_mlx.server.errors import APIError, error_response, install
from gemma4_mlx.server.follow import follow
from gemma4_mlx.server.handle import Request
from gemma4_mlx.server.metrics import Metrics
from gemma4_mlx.server.origins import LOCAL, Origins, is_origin
from gemma4_mlx.server.prompts import DEFAULT_MAX_TOKENS, Prompter
from gemma4_mlx.server.results import RequestHandle

log = logging.getLogger("gemma4_mlx.server")

MAX_BODY_BYTES = 64 << 20
OPEN_PATHS = ("/health",)  # answered without the API key
_ENDPOINTS = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/messages",
    "/v1/responses",
)


class ServerState:
    """What the route modules share: the served name, the prompter, the engine, metrics."""

    def __init__(self, model, tokenizer, *, model_name, api_key, prompting: dict, engine: dict, aliases=()):
        """prompting: the `Prompter`'s settings (max_context, allow_local_files,
        thinking_tokens, default_max_tokens)."""
        self.model_name, self.api_key = model_name, api_key
        self.names = list(dict.fromkeys([model_name, *aliases]))  # what clients may send as `model`
        self.prompter = Prompter(model, tokenizer, **prompting)
        self.engine = Engine(model, tokenizer, **engine)
        sched = self.engine.scheduler
        self.metrics = Metrics(
            lambda: self.engine.depth, lambda: len(sched.rows), lambda: sched.pool.nbytes, scheduler=sched
        )
        self.started = int(time.time())

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(400, f"model {name!r} is not served here; this server serves {self.served}", "model")

    @property
    def served(self) -> str:
        """The names clients may send, for messages."""
        return " or ".join(map(repr, self.names))

    def submit(self, request: Request) -> RequestHandle:
        try:
            return self.engine.submit(request)
        except QueueFull as e:
            raise APIError(429, f"server busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None

    def submit_all(self, requests: list[Request]) -> list[RequestHandle]:
        """Submit a request's choices together: if the queue refuses one, those already
        queued are cancelled and the request gets the 429."""
        if len(requests) > self.engine.max_queue:  # a 429 would be retried forever
            n, most = len(requests), self.engine.max_queue
            raise APIError(400, f"n: {n} choices are more than this server queues at once ({most})", param="n")
        handles: list[RequestHandle] = []
        try:
            for r in requests:
                handles.append(self.submit(r))
        except APIError:
            for h in handles:
                h.cancel()
            raise
        return handles


class _Counted:
    """ASGI middleware, outermost: every response counted by endpoint and status
    (CORS preflights too, which the CORS middleware answers itself)."""

    def __init__(self, inner, server: ServerState):
        self.inner, self.server = inner, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        path = scope["path"]
        endpoint = next((e for e in _ENDPOINTS if path == e or path.startswith(e + "/")), "other")
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.inner(scope, receive, counted_send)
        finally:
            self.server.metrics.requests.labels(endpoint, str(status[0])).inc()


class _Guard:
    """ASGI middleware: pages not allowed (403), API key (401), body size (413)."""

    def __init__(self, inner, server: ServerState, max_body: int, origins: Origins):
        self.inner, self.server, self.max_body, self.origins = inner, server, max_body, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        path, headers = scope["path"], dict(scope["headers"])
        refusal = self._refusal(path, headers)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if scope.get("method") in ("POST", "PUT", "PATCH") and b"content-length" not in headers:
            # a chunked body: read it here (up to the limit) so an oversized one is a 413,
            # not a parse error of the framework's
            body = await self._read_limited(receive)
            if body is None:
                too_big = f"request body exceeds {self.max_body} bytes"
                return await error_response(path, 413, too_big)(scope, receive, send)
            receive = _replay(body, receive)
        await self.inner(scope, receive, send)

    def _refusal(self, path: str, headers: dict):
        origin = headers.get(b"origin")
        if origin is not None and not self.origins.allows(origin.decode("latin-1")):
            return _page_refused(path, origin.decode("latin-1"), self.origins)
        key = self.server.api_key
        if key and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return error_response(path, 401, "invalid or missing API key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return error_response(path, 413, f"request body of {int(length)} bytes exceeds {self.max_body} bytes")
        return None

    async def _read_limited(self, receive) -> bytes | None:
        """The whole body, or None once it passes the limit."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return None
            if not message.get("more_body"):
                return b"".join(chunks)


def _page_refused(path: str, origin: str, origins: Origins):
    """The 403 for a web page whose origin the server does not allow, naming the flag."""
    page = origin[:200]
    if not origins.enabled:
        how = "CORS is off (--cors-origin none)"
    elif is_origin(origin):
        how = f"start the server with --cors-origin {page}"
    else:
        how = "it is not an origin (scheme://host[:port])"
    return error_response(path, 403, f"requests from the web page origin {page!r} are not allowed: {how}")


class _Cors(CORSMiddleware):
    """Starlette's CORS, except that a preflight from a page not allowed gets the 403
    its request would get (`_page_refused`), not a bare 400: a browser never sends
    the request itself, so the preflight is what the server's log and a developer's
    network panel show."""

    def __init__(self, inner, origins: Origins):
        super().__init__(inner, **origins.middleware_options())
        self.origins = origins

    def is_allowed_origin(self, origin: str) -> bool:  # ours: bounded before any pattern runs
        return self.origins.allows(origin)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and "access-control-request-method" in headers and not self.origins.allows(origin):
                return await _page_refused(scope["path"], origin, self.origins)(scope, receive, send)
        await super().__call__(scope, receive, send)


def model_card(name: str, created: int) -> dict:
    """The served model as both APIs list it: OpenAI's fields (object, created,
    owned_by) and Anthropic's (type, display_name, created_at), one card for either client."""
    when = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    openai = {"id": name, "object": "model", "created": created, "owned_by": "gemma4-mlx"}
    return openai | {"type": "model", "display_name": name, "created_at": when}


def _replay(body: bytes, receive):
    """An ASGI receive that hands out the already-read `body` once, then the real
    receive's messages (a disconnect)."""
    sent = [False]

    async def replayed():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _engine_settings(drafter, draft_tokens, max_queue, max_batch, prefix_cache_gb, kv_bits, kv_cache_gb) -> dict:
    return dict(
        kv_bits=kv_bits,
        drafter=drafter,
        draft_tokens=draft_tokens,
        max_queue=max_queue,
        max_batch=max_batch,
        prefix_cache_bytes=int(prefix_cache_gb * (1 << 30)),
        kv_cache_bytes=None if kv_cache_gb is None else int(kv_cache_gb * (1 << 30)),
    )


def follower(
    model,
    tokenizer,
    *,
    group,
    drafter=None,
    draft_tokens: int | str = "auto",
    max_queue: int = 64,
    max_batch: int = 8,
    prefix_cache_gb: float = 2.0,
    kv_bits: int | None = None,
    kv_cache_gb: float | None = None,
    **_http,  # app()'s HTTP settings: rank 0's business
) -> None:
    """serve --distributed on a rank other than 0: the same scheduler as rank 0's
    engine, driven by it (`follow.follow`), until rank 0 shuts down."""
    settings = _engine_settings(drafter, draft_tokens, max_queue, max_batch, prefix_cache_gb, kv_bits, kv_cache_gb)
    follow(Engine.scheduler_for(model, **settings), tokenizer, group)


def app(
    model,
    tokenizer,
    *,
    model_name: str,
    aliases: Sequence[str] = (),
    drafter=None,
    api_key: str | None = None,
    max_queue: int = 64,
    max_batch: int = 8,
    prefix_cache_gb: float = 2.0,
    draft_tokens: int | str = "auto",
    max_context: int | None = None,
    allow_local_files: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    kv_bits: int | None = None,
    kv_cache_gb: float | None = None,
    thinking_tokens: int | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    cors_origins: Sequence[str] = (LOCAL,),
    group=None,
) -> FastAPI:
    """The server for one loaded model.  model_name: the name clients send as `model`
    (aliases: other names they may send, all listed by /v1/models);
    drafter: an MTP drafter (speculative decoding, same output); api_key: required as
    `Authorization: Bearer KEY` or `x-api-key` (all but /health); max_queue: requests
    waiting or running before 429; max_batch: requests decoded together;
    prefix_cache_gb: memory for KV caches of finished requests that later prompts may
    continue; draft_tokens: K or "auto"; max_context: longest prompt (default the
    model's); allow_local_files: image parts may name files on this machine;
    kv_bits: 16, 8 or 4, the KV cache's width (docs/kv-cache.md); kv_cache_gb: the
    most KV-cache memory the running batch may reach, None for no limit (a request
    waits until rows leave, or fails alone when it cannot fit; docs/serving.md §2.2);
    thinking_tokens: the most thinking tokens of a reply, None for no limit (a
    request may ask for fewer; docs/serving.md §2.3); default_max_tokens: the most
    tokens of a reply whose request sets no limit (capped by the context left);
    cors_origins: the web pages that may call the server ("local", origins, globs,
    "*" or "none"; `origins.py`); group: serve --distributed, rank 0 (the other ranks run `follower`)."""
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key is empty: give the key clients must send, or None for no key")
    origins = Origins(cors_origins)
    engine = _engine_settings(drafter, draft_tokens, max_queue, max_batch, prefix_cache_gb, kv_bits, kv_cache_gb)
    engine["group"] = group
    server = ServerState(
        model,
        tokenizer,
        model_name=model_name,
        api_key=api_key,
        prompting=dict(
            max_context=max_context,
            allow_local_files=allow_local_files,
            thinking_tokens=thinking_tokens,
            default_max_tokens=default_max_tokens,
        ),
        engine=engine,
        aliases=aliases,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        server.engine.close()

    api = FastAPI(title="gemma4-mlx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    api.state.server = server
    install(api)
    api.include_router(openai_api.routes(server))
    api.include_router(anthropic_api.routes(server))
    api.include_router(responses_api.routes(server))

    @api.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "queue_depth": server.engine.depth}

    @api.get("/v1/models")
    async def models():
        cards = [model_card(name, server.started) for name in server.names]
        return {
            "object": "list",
            "data": cards,
            "has_more": False,
            "first_id": cards[0]["id"],
            "last_id": cards[-1]["id"],
        }

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in server.names:
            message = f"model {model_id!r} not found: this server serves {server.served}"
            raise APIError(404, message, "model", code="model_not_found")
        return model_card(model_id, server.started)

    @api.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    api.add_middleware(_Guard, server=server, max_body=max_body_bytes, origins=origins)
    if origins.enabled:  # outside the guard: a preflight is answered before the key is asked for
        api.add_middleware(_Cors, origins=origins)
    api.add_middleware(_Counted, server=server)
    return api
