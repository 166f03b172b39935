"""One request's text on the engine thread: tokens to text (detokenizer), parser
events (reasoning / content / tool calls), stop strings, log-probabilities, and the
`Output`s that carry them to the request's handle (docs/serving.md §1, §5)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from gemma4_mlx.prompt.output_text import OutputText, primed_detokenizer
from gemma4_mlx.prompt.parser import CONTENT, THOUGHT, Event
from gemma4_mlx.prompt.token_bytes import token_bytes
from gemma4_mlx.server.handle import Output, RequestHandle, TokenLogprob, Usage


class StopScanner:
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


class Run:
    """The per-request state of one generation: detokenizing, parsing, stop strings,
    emitting outputs."""

    def __init__(self, tokenizer, stop_ids: frozenset, handle: RequestHandle, usage: Usage):
        """tokenizer: the model's (mlx-lm wrapper: `detokenizer`, `decode`); stop_ids:
        the tokens that end generation unless the request ignores them."""
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.handle, self.req, self.usage = handle, handle.request, usage
        self.parser = self.req.parser() if self.req.parser else None
        self.scanner = StopScanner(self.req.stop)
        # a reply starts a turn: the detokenizer drops its first space; text that goes
        # on from the prompt (a prefill, a raw completion) keeps it
        self.detok = primed_detokenizer(tokenizer, prime=self.req.continues)
        # for the parser, control tokens only are control strings (prompt/output_text.py)
        self.text = OutputText(tokenizer, self.detok, guarded=getattr(self.parser, "guarded", False))
        self.generated: list[int] = []
        self.nameless = False  # the call being sent has no name: it is not sent at all
        self.stop_string: str | None = None
        self.cancelled = False
        # log-probabilities of content tokens wait here, each with the offset where its
        # text starts in the content; an output carries those whose text it begins (a
        # stop string cuts the text, and with it the tokens after it)
        self.pending: deque[TokenLogprob] = deque()
        self.content_at = self.emitted = 0  # content characters out of the parser / sent

    def step(self, tok: int, logprob=None) -> bool:
        """Take one token (and its (logprob, top alternatives) when asked for); True
        when generation must end."""
        if self.handle.first_token_at is None:
            self.handle.first_token_at = time.perf_counter()
        self.generated.append(tok)
        if self.req.cancelled.is_set():
            self.cancelled = True
            return True
        stop = tok in self.stop_ids and not self.req.ignore_eos
        if self.parser is None and stop:
            return True  # raw text: the stop token is not shown
        if self.parser is not None and self.parser.state == THOUGHT:
            self.usage.reasoning_tokens += 1
        # a token read in the content state may be content (thought and call markup are not)
        entry = None
        if logprob is not None and (self.parser is None or self.parser.state == CONTENT):
            entry = self._named(tok, logprob, self.content_at)
            self.pending.append(entry)
        before, piece = self.content_at, self.text.add(tok)
        self._feed(piece)
        if entry is not None and self.pending and self.pending[-1] is entry and self._swallowed(piece, before):
            self.pending.pop()  # markup the parser consumed (an end-of-turn, a channel's close)
        return stop or self.stop_string is not None or (self.parser is not None and self.parser.done)

    def _swallowed(self, piece: str, before: int) -> bool:
        """The token's text went into the parser and left no content, and nothing
        waits there to become content later."""
        return bool(piece) and self.content_at == before and self.parser is not None and not self.parser.buf

    def _feed(self, piece: str) -> None:
        events = self.parser.feed(piece) if self.parser else [Event("content", piece)]
        self._emit(events)

    def _emit(self, events) -> None:
        for ev in events:
            if self.stop_string is not None:
                return
            if ev.type == "content":
                self.content_at += len(ev.text)
                text, self.stop_string = self.scanner.feed(ev.text)
                if text:
                    self._send(text)
            elif ev.type.startswith("tool_call") and self._nameless(ev):
                continue
            elif ev.type in ("reasoning", "tool_call_start", "tool_call_delta", "tool_call"):
                # the content held for a stop string ended with its segment: it goes first
                rest = self.scanner.flush()
                if rest:
                    self._send(rest)
                # OpenAI reports log-probabilities of content tokens only
                self.pending.clear()
                self.handle.put(Output("event", ev))

    def _nameless(self, ev) -> bool:
        """Whether a tool-call event (a call's start, its arguments' pieces, the call)
        belongs to a call without a name (`call:{...}`): no client can answer one
        (Claude Code replies "No such tool available: "), so it is left out. A piece
        belongs to the call whose start came last."""
        if ev.type != "tool_call_delta":
            self.nameless = not ev.call.name
        return self.nameless

    def _send(self, text: str) -> None:
        self.emitted += len(text)
        lps = []
        while self.pending and self.pending[0].offset < self.emitted:
            lps.append(self.pending.popleft())
        self.handle.put(Output("event", Event("content", text), logprobs=lps or None))

    def _named(self, tok: int, logprob, offset: int) -> TokenLogprob:
        decode, tokenizer = self.tokenizer.decode, self.tokenizer
        chosen, top = logprob
        alternatives = [(decode([t]), token_bytes(tokenizer, t), lp) for t, lp in top]
        return TokenLogprob(decode([tok]), token_bytes(tokenizer, tok), chosen, alternatives, offset)

    def finish(self) -> None:
        self.usage.completion_tokens = len(self.generated)
        if self.cancelled:
            self.handle.put(Output("done", finish_reason="cancelled", usage=self.usage))
            return
        if self.stop_string is None:
            self._feed(self.text.finalize())
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
            ended = self.generated and self.generated[-1] in self.stop_ids
            return "stop" if ended else "length"
        reason = self.parser.result.finish_reason or "stop"
        if reason == "tool_calls" and not any(c.name for c in self.parser.result.tool_calls):
            return "stop"  # its calls had no name, and were not sent (`_nameless`)
        return "stop" if reason == "degenerate_output" else reason
