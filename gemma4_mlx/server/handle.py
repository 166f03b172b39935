"""What a request is and how its outputs reach the asyncio side: `Request` (built by
the HTTP layer), `Output` (one event, the end, or an error), `RequestHandle` (the
engine thread appends outputs; `async for out in handle` reads them, merged).
docs/serving.md §1, §5.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gemma4_mlx.api import SamplingOptions
from gemma4_mlx.batching.thinking import ThinkingBudget
from gemma4_mlx.prompt.parser import Event, StreamParser


@dataclass
class Request:
    """One generation.  keys: per prompt position the token id, or a media key at
    placeholders (what a cached prefix must match); media: a `MediaPrompt` (its rows
    are encoded on the engine thread); parser: makes the output parser (reasoning /
    content / tool calls), None for raw text; stop: strings that end the content;
    prepare: run first on the engine thread (MLX work such as processing images),
    it may fill ids / keys / media; what it raises is the request's error;
    continues: the output goes on from the prompt's text (an assistant prefill, a
    raw completion), so its first space is text, not the start of a turn."""

    ids: list[int]
    keys: list
    options: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int = 256
    stop: Sequence[str] = ()
    parser: Callable[[], StreamParser] | None = None
    media: Any = None
    prepare: Callable[[Request], None] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None, or how many alternatives to report per token
    continues: bool = False
    thinking: ThinkingBudget | None = None  # the reply's thinking budget in tokens
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class TokenLogprob(NamedTuple):
    """One generated content token's log-probability as the APIs report it."""

    text: str  # the token's text
    raw: bytes  # its own bytes (part of a character for some tokens)
    logprob: float
    top: list  # the most likely alternatives: (text, bytes, logprob)
    offset: int  # where its text starts in the reply's content


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0  # of the completion's, those read inside a thought


@dataclass
class Output:
    """kind: "event" (a parser `Event`: reasoning, content, tool_call_start,
    tool_call_delta or tool_call), "done"
    (finish_reason: stop / length / tool_calls / cancelled; stop_string when a stop
    string ended it) or "error" (error: the exception)."""

    kind: str
    event: Event | None = None
    finish_reason: str | None = None
    stop_string: str | None = None
    usage: Usage | None = None
    error: BaseException | None = None
    logprobs: list | None = None  # per token of this event: a `TokenLogprob`


class RequestHandle:
    """The asyncio side of a submitted request: `async for out in handle`.

    The engine thread appends outputs and wakes the event loop at most once until
    they are read; the reader takes everything that arrived, with consecutive text
    of one kind merged into one output — so a busy server sends fewer, larger
    stream chunks instead of falling behind one token at a time."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self._loop = request, loop
        self.first_token_at: float | None = None
        self.cached_tokens: int | None = None  # the reused prefix, known once the engine took the prompt
        self._items: deque[Output] = deque()
        self._lock = threading.Lock()
        self._ready = asyncio.Event()
        self._signalled = False
        self._ended = False

    def put(self, out: Output) -> None:  # engine thread
        with self._lock:
            self._items.append(out)
            if self._signalled:
                return
            self._signalled = True
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody reads this
            pass

    def cancel(self) -> None:
        self.request.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        if self._ended:
            raise StopAsyncIteration
        while True:
            with self._lock:
                if self._items:
                    out = self._items.popleft()
                    while _mergeable(out) and self._items and _same_kind(out, self._items[0]):
                        out = _merged(out, self._items.popleft())
                    break
                self._signalled = False
                self._ready.clear()
            await self._ready.wait()
        if out.kind in ("done", "error"):
            self._ended = True  # the last item
        return out


def _mergeable(out: Output) -> bool:
    return out.kind == "event" and out.event.type in ("content", "reasoning", "tool_call_delta")


def _same_kind(a: Output, b: Output) -> bool:
    return b.kind == "event" and b.event.type == a.event.type


def _merged(a: Output, b: Output) -> Output:
    lps = (a.logprobs or []) + (b.logprobs or [])
    return Output("event", Event(a.event.type, a.event.text + b.event.text), logprobs=lps or None)
