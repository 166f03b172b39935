"""Reading a request's outputs on the asyncio side: collected whole, or as they come
(with the client's disconnection cancelling the generation)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from gemma4_mlx.batching.memory import KVBudgetExceeded
from gemma4_mlx.constrain import ConstraintError
from gemma4_mlx.server.errors import APIError
from gemma4_mlx.server.handle import Output, RequestHandle, Usage


@dataclass
class Result:
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)  # prompt.parser.ToolCall
    finish_reason: str = "stop"
    stop_string: str | None = None
    usage: Usage = field(default_factory=Usage)
    logprobs: list = field(default_factory=list)  # per content token: a `TokenLogprob`


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def ttft(handle: RequestHandle) -> float | None:
    at = handle.first_token_at
    return None if at is None else at - handle.request.submitted


async def outputs(handle: RequestHandle, http=None, poll: float = 0.5):
    """Yield the handle's outputs; cancel the generation when the client disconnects
    (checked at least every `poll` s, also while outputs keep coming: a non-streaming
    client that left must not keep the engine busy) or when the consumer stops early."""
    it = handle.__aiter__()
    checked = time.monotonic()
    try:
        while True:
            try:
                out: Output = await asyncio.wait_for(it.__anext__(), poll)
            except asyncio.TimeoutError:
                out = None
            except StopAsyncIteration:
                return
            if http is not None and time.monotonic() - checked >= poll:
                checked = time.monotonic()
                if await http.is_disconnected():
                    return
            if out is None:
                continue
            yield out
            if out.kind in ("done", "error"):
                return
    finally:
        handle.cancel()  # a no-op once finished


# A stream waits this long for its first output (so that an early error answers with
# its status); a longer prefill starts the stream anyway, and a stream silent for
# HEARTBEAT s sends a keep-alive (an agent's 50k-token prompt can prefill for minutes,
# and clients give up on a connection that sends nothing: Claude Code retried at 5 min).
OPEN_WAIT = 10.0
HEARTBEAT = 10.0
KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment (OpenAI-style streams)

# Errors a request brings on itself (its size, its schema or tools): 400s, not faults.
CLIENT_ERRORS = (KVBudgetExceeded, ConstraintError)


def failure(out: Output) -> APIError:
    """The client's error for an "error" output: bad input as it was raised, anything
    else a 500 without details (the engine logged the traceback)."""
    if isinstance(out.error, APIError):
        return out.error
    if isinstance(out.error, KVBudgetExceeded):  # the request's size, not a fault
        return APIError(400, str(out.error), "max_tokens")
    if isinstance(out.error, ConstraintError):  # the request's schema or tools outgrew the engine's limits
        return APIError(400, str(out.error))
    return APIError(500, "internal server error (see the server log)")


async def opened(handle: RequestHandle, http):
    """The outputs of a request once its first has come, so that an error preparing
    it (bad media, prompt too long) answers with its status before a stream starts;
    after OPEN_WAIT s the stream starts anyway (a later error comes inside it)."""
    it = outputs(handle, http)
    head = asyncio.ensure_future(it.__anext__())
    await asyncio.wait({head}, timeout=OPEN_WAIT)
    if head.done() and head.exception() is None and head.result().kind == "error":
        await it.aclose()
        raise failure(head.result())

    async def rest():
        try:
            try:
                yield await head
            except StopAsyncIteration:  # the client left while waiting
                return
            async for out in it:
                yield out
        finally:  # the response ended or the client left: stop generating
            handle.cancel()
            if not head.done():
                head.cancel()
                await asyncio.gather(head, return_exceptions=True)
            await it.aclose()

    return rest()


async def with_heartbeats(body, ping: str, every: float | None = None):
    """`body`'s chunks, and `ping` whenever it has been silent for `every` s
    (HEARTBEAT): a keep-alive the SSE parsers skip (a comment, or Anthropic's ping)."""
    it = body.__aiter__()
    nxt = asyncio.ensure_future(it.__anext__())
    try:
        while True:
            await asyncio.wait({nxt}, timeout=every or HEARTBEAT)
            if not nxt.done():
                yield ping
                continue
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                return
            yield chunk
            nxt = asyncio.ensure_future(it.__anext__())
    finally:
        if not nxt.done():
            nxt.cancel()
        await asyncio.gather(nxt, return_exceptions=True)
        await it.aclose()


async def opened_all(handles: list[RequestHandle], http) -> list:
    """The output streams of a request's choices once the first has started: its
    error (bad media, a prompt too long: every choice has the same) answers with its
    status.  The others are not waited for: they may need rows that only earlier
    choices free; an error of theirs comes inside the stream."""
    try:
        first = await opened(handles[0], http)
    except BaseException:
        for h in handles:
            h.cancel()
        raise
    return [first, *(outputs(h, http) for h in handles[1:])]


async def merged(streams: list, handles: list[RequestHandle]):
    """(choice index, output) from several choices' output streams as they come.
    Leaving early (the response ended, the client left) cancels every choice."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, out = await queue.get()
            if out is None:
                running -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for h in handles:
            h.cancel()  # a no-op once finished


def total_usage(usages: list[Usage]) -> Usage:
    """The usage of a request with several choices: its prompt once, every choice's output."""
    first = usages[0]
    completion, reasoning = (sum(getattr(u, k) for u in usages) for k in ("completion_tokens", "reasoning_tokens"))
    return Usage(first.prompt_tokens, completion, first.cached_tokens, reasoning)


async def collect_all(handles: list[RequestHandle], http, metrics) -> list[Result]:
    """`collect` for each of a request's choices, together; if one fails, all stop."""
    tasks = [asyncio.ensure_future(collect(h, http, metrics)) for h in handles]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for h in handles:
            h.cancel()


async def collect(handle: RequestHandle, http, metrics) -> Result:
    """The whole result; 500 (message only; the traceback is logged) on failure."""
    r = Result()
    async for out in outputs(handle, http):
        if out.kind == "error":
            raise failure(out)
        if out.kind == "done":
            r.finish_reason, r.stop_string, r.usage = out.finish_reason, out.stop_string, out.usage
            metrics.record(out.usage, ttft(handle))
        elif out.event.type == "reasoning":
            r.reasoning += out.event.text
        elif out.event.type == "content":
            r.content += out.event.text
            r.logprobs += out.logprobs or []
        elif out.event.type == "tool_call":
            r.tool_calls.append(out.event.call)
    return r


def chat_logprobs(entries) -> dict:
    """Chat Completions' `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def one(text, raw, lp):  # raw: the token's own bytes (part of a character for some tokens)
        return {"token": text, "logprob": lp, "bytes": list(raw)}

    return {"content": [{**one(e.text, e.raw, e.logprob), "top_logprobs": [one(*a) for a in e.top]} for e in entries]}


def completion_logprobs(entries) -> dict:
    """Completions' legacy `logprobs`: tokens, token_logprobs, top_logprobs, text_offset
    (where each token's text starts in the completion, also in a streamed chunk)."""
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{text: lp for text, _, lp in e.top} for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def now() -> int:
    return int(time.time())
