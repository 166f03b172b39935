"""The engine: one thread owns the model; the asyncio side enqueues `Request`s and
reads their `Output`s.

The HTTP layer only builds a `Request` (prompt ids, cache keys, media, sampling
options, stop strings, a parser factory), calls `Engine.submit` and iterates the
returned `RequestHandle` (`async for out in handle`), calling `handle.cancel()` when
the client goes away.  Below `submit`, the engine thread turns each request into a
`batching.Job` and steps a `batching.Scheduler` (continuous batching, prefix reuse,
speculative rounds over the batch); per request it turns tokens into text, parser
events and stop-string matches (`_Run`).  docs/serving.md.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gemma4_mlx.api import SamplingOptions, own_thread, release_thread, share_with_thread
from gemma4_mlx.batching import Job, Progress, Scheduler
from gemma4_mlx.chat.conversation import stop_ids
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
    logprobs: int | None = None  # None, or how many alternatives to report per token
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
    logprobs: list | None = None  # per token of this event: (text, logprob, [(text, logprob), ...])


class RequestHandle:
    """The asyncio side of a submitted request: `async for out in handle`.

    The engine thread appends outputs and wakes the event loop at most once until
    they are read; the reader takes everything that arrived, with consecutive text
    of one kind merged into one output — so a busy server sends fewer, larger
    stream chunks instead of falling behind one token at a time."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self._loop = request, loop
        self.first_token_at: float | None = None
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
    return out.kind == "event" and out.event.type in ("content", "reasoning")


def _same_kind(a: Output, b: Output) -> bool:
    return b.kind == "event" and b.event.type == a.event.type


def _merged(a: Output, b: Output) -> Output:
    lps = (a.logprobs or []) + (b.logprobs or [])
    return Output("event", Event(a.event.type, a.event.text + b.event.text), logprobs=lps or None)


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

    def __init__(
        self,
        model,
        tokenizer,
        *,
        drafter=None,
        draft_tokens: int | str = "auto",
        max_queue: int = 64,
        max_batch: int = 8,
        prefix_cache_bytes: int = 2 << 30,
        prefill_chunk: int = 256,
        kv_bits: int | None = None,
    ):
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        share_with_thread(model, drafter)
        self.max_queue = max_queue
        self.stop_ids = frozenset(stop_ids(model, tokenizer))
        self.scheduler = Scheduler(
            model,
            drafter=drafter,
            draft_tokens=draft_tokens,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            prefix_budget_bytes=prefix_cache_bytes,
            kv_bits=kv_bits,
        )
        self._inbox: queue.Queue = queue.Queue()
        self._runs: dict[Job, _Run] = {}
        self._resume = threading.Event()
        self._resume.set()
        self._thread = threading.Thread(target=self._loop, name="gemma4-mlx-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self._inbox.qsize() + len(self._runs)

    def submit(self, request: Request) -> RequestHandle:
        """Enqueue (from the event loop); raises QueueFull past `max_queue`."""
        if self.depth >= self.max_queue:
            raise QueueFull(f"{self.depth} requests are queued (the limit is {self.max_queue})")
        handle = RequestHandle(request, asyncio.get_running_loop())
        self._inbox.put(handle)
        return handle

    def pause(self) -> None:
        """Stop taking new requests (running ones go on); `resume()` goes on."""
        self._resume.clear()

    def resume(self) -> None:
        self._resume.set()

    def close(self) -> None:
        self._resume.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # -- the engine thread ----------------------------------------------------
    def _loop(self) -> None:
        own_thread()
        try:
            self._serve()
        finally:
            release_thread()

    def _serve(self) -> None:
        while True:
            if not self._admit():
                return
            self._notice_cancelled()
            try:
                progress = self.scheduler.step()
            except Exception as e:  # the batch cannot be trusted: the running requests fail
                log.exception("generation failed")
                for job in self.scheduler.abandon():
                    self._end(job, error=e)
                continue
            for p in progress:
                try:
                    self._deliver(p)
                except Exception as e:  # this request's text handling (parser, detokenizer)
                    log.exception("request failed")
                    self.scheduler.drop(p.job)
                    self._end(p.job, error=e)

    def _admit(self) -> bool:
        """Take new requests: wait for one when idle, else only those already here.
        False when the engine is closing."""
        busy = self.scheduler.busy
        if not busy:
            self._resume.wait()
        elif not self._resume.is_set():
            return True
        try:
            handle = self._inbox.get(block=not busy)
        except queue.Empty:
            return True
        while True:
            if handle is None:
                return False
            try:
                self._start(handle)
            except Exception as e:  # its sampler / processors / parser could not be made
                log.exception("request could not start")
                handle.put(Output("error", error=e))
            try:
                handle = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _start(self, handle: RequestHandle) -> None:
        req = handle.request
        if req.cancelled.is_set():
            handle.put(Output("done", finish_reason="cancelled", usage=Usage(len(req.ids))))
            return
        if req.prepare is not None:
            try:
                req.prepare(req)  # MLX work (media) on this thread; bad input fails only this request
            except Exception as e:
                handle.put(Output("error", error=e))
                return
        job = Job(
            req.ids,
            req.keys,
            options=req.options,
            max_tokens=req.max_tokens,
            stop_ids=frozenset() if req.ignore_eos else self.stop_ids,
            media=req.media,
            logprobs=req.logprobs,
        )
        self._runs[job] = _Run(self, handle, Usage(prompt_tokens=len(req.ids)))
        self.scheduler.add(job)

    def _notice_cancelled(self) -> None:
        """A client that went away frees its row at this step."""
        for job, run in list(self._runs.items()):
            if run.req.cancelled.is_set():
                run.cancelled = True
                self.scheduler.drop(job)
                self._end(job)

    def _deliver(self, p: Progress) -> None:
        run = self._runs.get(p.job)
        if run is None:  # ended by the engine side already (stop string, client gone)
            return
        if p.error is not None:
            log.error("request failed", exc_info=p.error)  # the client gets the API's error, not this
            self._end(p.job, error=p.error)
            return
        run.usage.cached_tokens = p.job.cached
        for n, tok in enumerate(p.tokens):
            if run.step(tok, None if p.logprobs is None else p.logprobs[n]):
                if not p.done:
                    self.scheduler.drop(p.job)
                self._end(p.job)
                return
        if p.done:
            self._end(p.job)

    def _end(self, job: Job, error: BaseException | None = None) -> None:
        run = self._runs.pop(job, None)
        if run is None:
            return
        if error is not None:
            run.handle.put(Output("error", error=error))
        else:
            run.finish()


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
        # log-probabilities wait here with the offset where their text starts in the
        # content stream; an output carries those whose text it begins (a stop string
        # cuts the text, and with it the tokens after it)
        self.pending: deque = deque()
        self.text_at = self.emitted = 0  # content characters fed / sent

    def step(self, tok: int, logprob=None) -> bool:
        """Take one token (and its (logprob, top alternatives) when asked for); True
        when generation must end."""
        if self.handle.first_token_at is None:
            self.handle.first_token_at = time.perf_counter()
        self.generated.append(tok)
        if logprob is not None:
            entry = self._named(tok, logprob)
            self.pending.append((self.text_at, entry))
            self.text_at += len(entry[0])
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
                    self._send(text)
            elif ev.type in ("reasoning", "tool_call"):
                # OpenAI reports log-probabilities of content tokens only
                self.pending.clear()
                self.text_at = self.emitted
                self.handle.put(Output("event", ev))

    def _send(self, text: str) -> None:
        self.emitted += len(text)
        lps = []
        while self.pending and self.pending[0][0] < self.emitted:
            lps.append(self.pending.popleft()[1])
        self.handle.put(Output("event", Event("content", text), logprobs=lps or None))

    def _named(self, tok: int, logprob) -> tuple:
        """(token text, logprob, [(text, logprob) of the top alternatives])."""
        decode = self.engine.tokenizer.decode
        chosen, top = logprob
        return decode([tok]), chosen, [(decode([t]), lp) for t, lp in top]

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
                self._send(rest)
        self.handle.put(Output("done", finish_reason=self._reason(), stop_string=self.stop_string, usage=self.usage))

    def _reason(self) -> str:
        if self.stop_string is not None:
            return "stop"
        if self.parser is None:
            ended = self.generated and self.generated[-1] in self.engine.stop_ids
            return "stop" if ended else "length"
        reason = self.parser.result.finish_reason or "stop"
        return "stop" if reason == "degenerate_output" else reason
