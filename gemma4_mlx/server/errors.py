"""Errors in each API's JSON shape (OpenAI's or Anthropic's, by path)."""

from __future__ import annotations

import functools
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("gemma4_mlx.server")

# OpenAI reports a bad key and an unknown model as invalid requests, told apart by `code`.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}
_OPENAI_CODES = {401: "invalid_api_key"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
}


class APIError(Exception):
    """An HTTP error with a one-line message for the client."""

    def __init__(self, status: int, message: str, param: str | None = None, *, headers=None, code=None, details=None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}
        self.code = code  # OpenAI's machine-readable `code` (e.g. "model_not_found"), if any
        self.details = details  # Anthropic's `error.details` (e.g. {"error_code": ...}), if any


def malformed_is_400(build):
    """Wrap a function that reads a request body's messages: a value of the wrong type
    anywhere in them (a dict where text belongs, a number for a tool) is the client's
    error, reported as 400 naming the exception, never a 500."""

    @functools.wraps(build)
    def wrapped(*args, **kwargs):
        try:
            return build(*args, **kwargs)
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise APIError(400, f"malformed messages ({type(e).__name__}: {e})", param="messages") from None

    return wrapped


def text_field(part: dict, where: str) -> str:
    """The `text` of a content part or block: a string, or the client's 400."""
    text = part.get("text")
    if text is None:
        return ""
    if not isinstance(text, str):
        raise APIError(400, f"{where}.text: expected a string, got {type(text).__name__}", param="messages")
    return text


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_body(path: str, status: int, message: str, param=None, code=None, details=None) -> dict:
    if is_anthropic(path):
        error = {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message}
        return {"type": "error", "error": error | ({"details": details} if details else {})}
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _OPENAI_CODES.get(status)}}


def error_response(path: str, status: int, message: str, param=None, headers=None, code=None, details=None):
    body = error_body(path, status, message, param, code, details)
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(request.url.path, exc.status, exc.message, exc.param, exc.headers, exc.code, exc.details)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
    return error_response(request.url.path, 400, message, where or None)


async def _http_error(request: Request, exc) -> JSONResponse:
    status = getattr(exc, "status_code", 500)
    return error_response(request.url.path, status, str(getattr(exc, "detail", "error")))


class _Unexpected:
    """ASGI middleware: any other exception is a JSON 500 (the traceback goes to the
    log).  Not an exception handler for `Exception`: Starlette runs that one in its
    outermost layer and re-raises after it, so the server closed the connection and
    the client's next request on it failed."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.inner(scope, receive, tracked)
        except Exception:
            log.exception("internal error on %s", scope["path"])
            if not started:  # a response under way cannot change its status; it just ends
                message = "internal server error (see the server log)"
                await error_response(scope["path"], 500, message)(scope, receive, send)


def install(app) -> None:
    """Error handlers; call before adding other middleware (this one sits inside them)."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_middleware(_Unexpected)
