"""The engine: one thread owns the model; the asyncio side enqueues `Request`s and
reads their `Output`s.

The HTTP layer only builds a `Request` (prompt ids, cache keys, media, sampling
options, stop strings, a parser factory), calls `Engine.submit` and iterates the
returned `RequestHandle` (`async for out in handle`), calling `handle.cancel()` when
the client goes away.  Everything below `submit` is the scheduler: today one request
at a time (`_run`), reusing the longest cached prefix from a small LRU of KV caches
(`PrefixCache`).  A batched scheduler replaces `_loop` / `_run` (and keeps one slot
per running row) without changing `Request`, `Output` or `RequestHandle`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemma4_mlx.api import SamplingOptions, generate_ids, own_thread, share_with_thread
from gemma4_mlx.chat.conversation import common_prefix, stop_ids, sync_prefix
from gemma4_mlx.prompt.parser import Event, StreamParser

log = logging.getLogger("gemma4_mlx.server")


class QueueFull(Exception):
    """More requests are waiting than the engine's `max_queue`."""


@dataclass
class Request:
    """One generation.  keys: per prompt position the token id, or a media key at
    placeholders (what a cached prefix must match); media: a `MediaPrompt` (its rows
    are encoded on the engine thread); parser: makes the output parser (reasoning /
    content / tool calls), None for raw text; stop: strings that end the content;
    prepare: run first on the engine thread (MLX work such as processing images),
    it may fill ids / keys / media; what it raises is the request's error."""

    ids: list[int]
    keys: list
    options: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int = 256
    stop: Sequence[str] = ()
    parser: Callable[[], StreamParser] | None = None
    media: Any = None
    prepare: Callable[[Request], None] | None = None
    ignore_eos: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class Output:
    """kind: "event" (a parser `Event`: reasoning, content or tool_call), "done"
    (finish_reason: stop / length / tool_calls / cancelled; stop_string when a stop
    string ended it) or "error" (error: the exception)."""

    kind: str
    event: Event | None = None
    finish_reason: str | None = None
    stop_string: str | None = None
    usage: Usage | None = None
    error: BaseException | None = None


class RequestHandle:
    """The asyncio side of a submitted request: `async for out in handle`."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self._loop, self._queue = request, loop, asyncio.Queue()
        self.first_token_at: float | None = None

    def put(self, out: Output) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    def cancel(self) -> None:
        self.request.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Output:
        if self._queue is None:
            raise StopAsyncIteration
        out = await self._queue.get()
        if out.kind in ("done", "error"):
            self._queue = None  # the last item
        return out


@dataclass
class _Slot:
    cache: Any
    cached: list = field(default_factory=list)


class PrefixCache:
    """A few KV caches with the keys they hold, most recently used last.  `take(keys)`
    gives the slot sharing the longest prefix with `keys`, rolled back to it (exact,
    `conversation.sync_prefix`), and where prefilling starts."""

    def __init__(self, fresh: Callable[[], Any], size: int = 4):
        self.fresh, self.size, self.slots = fresh, max(1, size), []

    def take(self, keys: Sequence) -> tuple[_Slot, int]:
        shared = [common_prefix(s.cached, keys) for s in self.slots]
        best = max(range(len(shared)), key=shared.__getitem__, default=None)
        # a slot is reused when the prompt continues (most of) it; otherwise a new one,
        # so one conversation does not wipe another's cache
        if best is None or (2 * shared[best] < len(self.slots[best].cached) and len(self.slots) < self.size):
            slot = _Slot(self.fresh())  # room for one more (when full, the best slot is reused)
        else:
            slot = self.slots.pop(best)
        self.slots.append(slot)
        slot.cache, n = sync_prefix(slot.cache, slot.cached, keys, self.fresh)
        slot.cached = list(keys[:n])
        return slot, n


class _StopScanner:
    """Finds stop strings in streamed text, holding back a possible partial match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string found or None)."""
        if not self.stops:
            return text, None
        self.buf += text
        hits = [(self.buf.find(s), s) for s in self.stops if s in self.buf]
        if hits:
            at, s = min(hits)
            out, self.buf = self.buf[:at], ""
            return out, s
        cut = max(0, len(self.buf) - self.keep)
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, None

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class Engine:
    """Owns the model on one thread (module doc)."""

    def __init__(self, model, tokenizer, *, drafter=None, max_queue: int = 64, cache_slots: int = 4):
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        share_with_thread(model, drafter)
        self.max_queue = max_queue
        self.stop_ids = stop_ids(model, tokenizer)
        self.prefixes = PrefixCache(lambda: model.make_cache(max_rollback=2048), cache_slots)
        self._inbox: queue.Queue = queue.Queue()
        self._running = 0
        self._resume = threading.Event()
        self._resume.set()
        self._thread = threading.Thread(target=self._loop, name="gemma4-mlx-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._inbox.qsize() + self._running

    def submit(self, request: Request) -> RequestHandle:
        """Enqueue (from the event loop); raises QueueFull past `max_queue`."""
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} requests are queued (the limit is {self.max_queue})")
        handle = RequestHandle(request, asyncio.get_running_loop())
        self._inbox.put(handle)
        return handle

    def pause(self) -> None:
        """Stop taking new requests (the running one finishes); `resume()` goes on."""
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    def close(self) -> None:
        self._resume.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        own_thread()
        while True:
            self._resume.wait()
            handle = self._inbox.get()
            if handle is None:
                return
            self._running = 1
            try:
                self._run(handle)
            except Exception as e:  # reported to the client as a 500, never its traceback
                log.exception("generation failed")
                handle.put(Output("error", error=e))
            finally:
                self._running = 0

    def _run(self, handle: RequestHandle) -> None:
        req = handle.request
        if req.cancelled.is_set():
            handle.put(Output("done", finish_reason="cancelled", usage=Usage(len(req.ids))))
            return
        if req.prepare is not None:
            try:
                req.prepare(req)
            except Exception as e:  # bad input: the HTTP layer says which status
                handle.put(Output("error", error=e))
                return
        usage = Usage(prompt_tokens=len(req.ids))
        slot, start = self.prefixes.take(req.keys)
        usage.cached_tokens = start
        media = None if req.media is None else req.media.rows(start)
        run = _Run(self, handle, usage)
        tokens = None
        try:
            tokens = generate_ids(
                self.model,
                req.ids[start:],
                max_tokens=req.max_tokens,
                options=req.options,
                stop_ids=() if req.ignore_eos else self.stop_ids,
                cache=slot.cache,
                draft_model=self.drafter,
                media=media,
            )
            for tok in tokens:
                if run.step(tok):
                    break
            run.finish()
        finally:
            if tokens is not None:
                # close the generator first: a speculative one trims the cache back to what
                # plain decoding would hold only when it is closed
                tokens.close()
            slot.cached = (list(req.keys) + run.generated)[: slot.cache.offset]


class _Run:
    """The per-request state of one generation: detokenizing, parsing, stop strings,
    emitting outputs."""

    def __init__(self, engine: Engine, handle: RequestHandle, usage: Usage):
        self.engine, self.handle, self.req, self.usage = engine, handle, handle.request, usage
        self.parser = self.req.parser() if self.req.parser else None
        self.scanner = _StopScanner(self.req.stop)
        self.detok = engine.tokenizer.detokenizer
        self.detok.reset()
        self.generated: list[int] = []
        self.stop_string: str | None = None
        self.cancelled = False

    def step(self, tok: int) -> bool:
        """Take one token; True when generation must end."""
        if self.handle.first_token_at is None:
            self.handle.first_token_at = time.perf_counter()
        self.generated.append(tok)
        if self.req.cancelled.is_set():
            self.cancelled = True
            return True
        stop = tok in self.engine.stop_ids and not self.req.ignore_eos
        if self.parser is None and stop:
            return True  # raw text: the stop token is not shown
        self.detok.add_token(tok)
        self._feed(self.detok.last_segment)
        return stop or self.stop_string is not None or (self.parser is not None and self.parser.done)

    def _feed(self, piece: str) -> None:
        events = self.parser.feed(piece) if self.parser else [Event("content", piece)]
        self._emit(events)

    def _emit(self, events) -> None:
        for ev in events:
            if self.stop_string is not None:
                return
            if ev.type == "content":
                text, self.stop_string = self.scanner.feed(ev.text)
                if text:
                    self.handle.put(Output("event", Event("content", text)))
            elif ev.type in ("reasoning", "tool_call"):
                self.handle.put(Output("event", ev))

    def finish(self) -> None:
        self.usage.completion_tokens = len(self.generated)
        if self.cancelled:
            self.handle.put(Output("done", finish_reason="cancelled", usage=self.usage))
            return
        if self.stop_string is None:
            self.detok.finalize()
            self._feed(self.detok.last_segment)
            if self.parser is not None:
                self._emit(self.parser.finish())
        if self.stop_string is None:
            rest = self.scanner.flush()
            if rest:
                self.handle.put(Output("event", Event("content", rest)))
        self.handle.put(Output("done", finish_reason=self._reason(), stop_string=self.stop_string, usage=self.usage))

    def _reason(self) -> str:
        if self.stop_string is not None:
            return "stop"
        if self.parser is None:
            ended = self.generated and self.generated[-1] in self.engine.stop_ids
            return "stop" if ended else "length"
        reason = self.parser.result.finish_reason or "stop"
        return "stop" if reason == "degenerate_output" else reason
