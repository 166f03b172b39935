"""The engine: one thread owns the model; the asyncio side enqueues `Request`s and
reads their `Output`s.

The HTTP layer only builds a `Request` (prompt ids, cache keys, media, sampling
options, stop strings, a parser factory), calls `Engine.submit` and iterates the
returned `RequestHandle` (`async for out in handle`), calling `handle.cancel()` when
the client goes away.  Below `submit`, the engine thread turns each request into a
`batching.Job` and steps a `batching.Scheduler` (continuous batching, prefix reuse,
speculative rounds over the batch); per request it turns tokens into text, parser
events and stop-string matches (`run.Run`); the request and output types and the
asyncio side of a request are in `handle`.  docs/serving.md.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

from gemma4_mlx.api import own_thread, release_thread, share_with_thread
from gemma4_mlx.batching import Job, Progress, Scheduler
from gemma4_mlx.chat.conversation import stop_ids
from gemma4_mlx.server.follow import LeaderScheduler
from gemma4_mlx.server.handle import Output, Request, RequestHandle, Usage
from gemma4_mlx.server.results import CLIENT_ERRORS
from gemma4_mlx.server.run import Run

log = logging.getLogger("gemma4_mlx.server")


class QueueFull(Exception):
    """More requests are waiting than the engine's `max_queue`."""


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
        kv_cache_bytes: int | None = None,
        group=None,
    ):
        """group: serve --distributed (rank 0): the scheduler's operations go to the
        other ranks before every step (`follow`, docs/distributed.md §6)."""
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        share_with_thread(model, drafter)
        self.max_queue = max_queue
        self.stop_ids = frozenset(stop_ids(model, tokenizer))
        self.scheduler = self.scheduler_for(
            model,
            drafter=drafter,
            draft_tokens=draft_tokens,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            prefix_cache_bytes=prefix_cache_bytes,
            kv_bits=kv_bits,
            kv_cache_bytes=kv_cache_bytes,
        )
        if group is not None:
            self.scheduler = LeaderScheduler(self.scheduler, group)
        self._inbox: queue.Queue = queue.Queue()
        self._runs: dict[Job, Run] = {}
        self._resume = threading.Event()
        self._resume.set()
        self._thread = threading.Thread(target=self._loop, name="gemma4-mlx-engine", daemon=True)
        self._thread.start()

    @staticmethod
    def scheduler_for(
        model,
        *,
        drafter=None,
        draft_tokens: int | str = "auto",
        max_batch: int = 8,
        prefill_chunk: int = 256,
        prefix_cache_bytes: int = 2 << 30,
        kv_bits: int | None = None,
        kv_cache_bytes: int | None = None,
        max_queue: int | None = None,  # the engine's, not the scheduler's
    ) -> Scheduler:
        """The scheduler an engine with these settings steps (also every other rank's)."""
        return Scheduler(
            model,
            drafter=drafter,
            draft_tokens=draft_tokens,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            prefix_budget_bytes=prefix_cache_bytes,
            kv_bits=kv_bits,
            kv_budget_bytes=kv_cache_bytes,
        )

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
        if isinstance(self.scheduler, LeaderScheduler):
            self.scheduler.close()  # the other ranks' `follow` returns

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
            thinking=req.thinking,
        )
        self._runs[job] = Run(self.tokenizer, self.stop_ids, handle, Usage(prompt_tokens=len(req.ids)))
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
            if isinstance(p.error, CLIENT_ERRORS):  # the request's own doing: a line, no traceback
                log.info("request refused: %s", p.error)
            else:
                log.error("request failed", exc_info=p.error)  # the client gets the API's error, not this
            self._end(p.job, error=p.error)
            return
        run.usage.cached_tokens = run.handle.cached_tokens = p.job.cached  # before its first output
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
        if error is None:
            try:
                run.finish()  # the text's end: detokenizer, parser, stop strings
                return
            except Exception as e:  # the client must still hear of its end: a 500
                log.exception("request failed")
                error = e
        run.handle.put(Output("error", error=error))


__all__ = ["Engine", "QueueFull", "Request", "RequestHandle", "Output", "Usage"]
