"""Tolerant streaming parser for Gemma 4 output (docs/chat-format.md §9-§10).

Feed decoded text (special tokens kept as their strings, e.g. "<|tool_call>")
piece by piece; get events separating reasoning, visible content and tool
calls. Every decision depends only on text already seen, never on where the
pieces were split, so streamed and one-shot parsing give identical results.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field, replace

from gemma4_mlx.prompt.argument_stream import ArgumentStream
from gemma4_mlx.prompt.arguments import _NAME, Q, ToolCall, _Tools, name_only, parse_call_block
from gemma4_mlx.prompt.guard import unguard, unguard_call

# Any control token: <|x>, <|x|>, <x|>, and the named/unused pieces (docs/chat-format.md §1).
CTRL_RE = re.compile(r'<\|[a-z_"]{1,24}\|?>|<[a-z_]{1,24}\|>|<(?:pad|eos|bos|unk|mask|unused\d{1,4})>')
_CTRL_PREFIX = re.compile(r'<(?:\|[a-z_"]{0,24}\|?|[a-z_]{0,24}\|?|unused\d{0,4})?\Z')
TERMINATORS = ("<turn|>", "<|tool_response>", "<eos>", "<|turn>")  # <|turn>: defensive, docs/chat-format.md §8
_BARE = re.compile(r"call:(" + _NAME + ")")
CONTENT, THOUGHT, CALL, DONE = "content", "thought", "call", "done"


@dataclass
class Event:
    # reasoning | content | tool_call | thinking_budget | degenerate | done; with
    # stream_arguments also tool_call_start (call: its name, no arguments yet) and
    # tool_call_delta (text: the next piece of its arguments' JSON)
    type: str
    text: str = ""
    call: ToolCall | None = None


@dataclass
class ParseResult:
    content: str = ""
    reasoning: str = ""
    tool_calls: list = field(default_factory=list)
    finish_reason: str | None = None  # stop | tool_calls | length | degenerate_output
    stop_token: str | None = None
    degenerate: str | None = None
    thinking_truncated: bool = False
    warnings: list = field(default_factory=list)
    trailing: str = ""  # text after the stop point, never shown (e.g. a hallucinated tool result)


class StreamParser:
    """feed(piece) -> events; finish() -> events; `result` holds the totals.

    start_in_thought: the prompt ended inside a thought channel (e.g. 9 Jul
    template priming after a tool result); see `parser_for_prompt`.
    continuing: the prompt ended inside the reply's text (an assistant prefill):
    its leading whitespace is kept and no stray channel name or bare call is looked for.
    thinking_budget: max reasoning characters kept; beyond it reasoning is
    dropped and a `thinking_budget` event asks the runtime to inject <channel|>.
    The degenerate-output detector (docs/chat-format.md §10.1) stops on a control token repeated
    more than max_control_repeat times, more than max_thought_openings
    channel openings, or a text loop of period <= loop_period covering
    loop_min_chars characters (loop_min_chars=None turns it off).
    guarded: the pieces come from `output_text.OutputText` (ordinary text guarded, so
    only control tokens read as control strings); what comes out is unguarded.
    stream_arguments: a call's arguments also come while it is written: a
    `tool_call_start` event once its name is read, `tool_call_delta` events whose
    texts join into exactly its `arguments_json`, the last just before its
    `tool_call` event (docs/chat-format.md §9.4). A call in a form that cannot
    stream gets its start and one delta when it ends, so every call has all three.
    """

    def __init__(
        self,
        tools=None,
        *,
        start_in_thought=False,
        continuing=False,
        thinking_budget=None,
        max_thought_openings=4,
        max_control_repeat=8,
        loop_period=64,
        loop_min_chars=800,
        guarded=False,
        stream_arguments=False,
    ):
        # guarded: the text comes from `output_text.OutputText` (a "<" of ordinary text
        # stands guarded, so only control tokens read as control strings); what this
        # parser hands out is unguarded, as the model wrote it
        self.guarded, self.stream_arguments = guarded, stream_arguments
        self._args: ArgumentStream | None = None  # the open call's arguments as they come
        self._out = unguard if guarded else str
        self._call_out = unguard_call if guarded else (lambda call: call)
        self.tools = tools if isinstance(tools, _Tools) else _Tools(tools)
        self.result = ParseResult()
        self.budget, self.max_open, self.max_repeat = thinking_budget, max_thought_openings, max_control_repeat
        self.loop_period, self.loop_min = loop_period, loop_min_chars
        self.state = THOUGHT if start_in_thought else CONTENT
        self.name_mode = "strict" if start_in_thought else None  # pending channel name to drop
        # content segment start / nothing seen at all; a continued reply (a prefill) is neither
        self.at_start, self.fresh = not continuing, not continuing
        self.buf, self._pushback, self._events, self._call = "", "", [], None
        self._decoder, self._openings, self._run, self._ncalls = None, 0, (None, 0), 0
        self._pend = {"reasoning": "", "content": ""}  # held trailing whitespace
        # strip leading whitespace next; not when the reply continues text of the prompt (a prefill)
        self._lead = {"reasoning": True, "content": not continuing}
        self._loops = {"reasoning": ("", [0] * (loop_period + 1)), "content": ("", [0] * (loop_period + 1))}

    @property
    def done(self) -> bool:  # generation should stop
        return self.state == DONE

    def feed(self, piece) -> list[Event]:
        if isinstance(piece, (bytes, bytearray)):  # byte-fallback pieces: hold partial UTF-8
            self._decoder = self._decoder or codecs.getincrementaldecoder("utf-8")("replace")
            piece = self._decoder.decode(bytes(piece))
        if self.state == DONE:
            self.result.trailing += self._out(piece)
        else:
            self.buf += piece
            self._pump(final=False)
        return self._take()

    def finish(self) -> list[Event]:
        if self._decoder and self.state != DONE:
            self.buf += self._decoder.decode(b"", final=True)
        self._pump(final=True)
        cut = self.state == CALL  # the text ended inside a call (max_tokens)
        if cut:
            self._end_call(self._begin_closed(), cut=True)
        if self.state != DONE:
            self._done(None, cut)
        return self._take()

    def _take(self):
        ev, self._events = self._events, []
        return ev

    # ------------------------------------------------------------ scanning
    def _pump(self, final: bool):
        while self.state != DONE and self.buf:
            before = (len(self.buf), self.state, self.at_start, self.name_mode, self.fresh)
            m = CTRL_RE.search(self.buf)
            if m and m.start() == 0:
                self.buf = self.buf[m.end() :]
                self._token(m.group())
                continue
            end = m.start() if m else (len(self.buf) if final else self._safe_len())
            text = self.buf[:end]
            if not text:
                break
            if text.strip():
                self._run = (None, 0)
            n = getattr(self, "_text_" + self.state)(text, bool(m) or final)
            self.buf = self._pushback + self.buf[n:]
            self._pushback = ""
            if (len(self.buf), self.state, self.at_start, self.name_mode, self.fresh) == before:
                break  # waiting for more text
        if self.state == DONE:
            self.result.trailing += self._out(self.buf)
            self.buf = ""

    def _safe_len(self) -> int:
        # Hold back a tail that may still grow into a control token.
        j = self.buf.rfind("<", max(0, len(self.buf) - 32))
        return j if j >= 0 and _CTRL_PREFIX.match(self.buf, j) else len(self.buf)

    def _text_content(self, s: str, boundary: bool) -> int:
        if not self.at_start:
            self._emit("content", s)
            return len(s)
        k = len(s) - len(s.lstrip())
        t = s[k:]
        if not t:
            return len(s)
        if self.fresh:  # docs/chat-format.md §10 #13: a channel name leaked without its <|channel>
            if t.startswith("thought\n") or (t == "thought" and boundary):
                self._warn("leaked channel name 'thought' dropped")
                self.fresh = False
                return k + min(len(t), 8)
            if "thought\n".startswith(t) and not boundary:
                return k
            self.fresh = False
        if self.tools.params:  # docs/chat-format.md §10 #1: bare `call:NAME{` after the thought, declared names only
            d = self._bare_call(t, boundary)
            if d == "hold":
                return k
            if d is not None:
                self._warn("tool call without <|tool_call>")
                self._start_call(bare=True, begin=d)
                return k
        self.at_start = False
        self._emit("content", t)
        return len(s)

    def _bare_call(self, t: str, boundary: bool):
        m = _BARE.match(t)
        if not m or len(m.group(1)) > 128:  # decided on the name alone: split-independent
            return "hold" if not m and "call:".startswith(t) and not boundary else None
        after = t[m.end() :]
        if not after:
            return None if boundary else "hold"
        if after[0] == ":":
            r = after[1:].lstrip()
            if not r.startswith("BEGIN_ARG"):
                return "hold" if "BEGIN_ARG".startswith(r) and not boundary else None
        elif after[0] not in "{(":
            return None
        name, known = self.tools.resolve(m.group(1))
        return (after[0] == ":") if known and name in self.tools.params else None

    def _text_thought(self, s: str, boundary: bool) -> int:
        if self.name_mode:
            n = self._channel_name(s, boundary)
            if n is None:
                return 0
            self.name_mode = None
            return n
        self._emit("reasoning", s)
        return len(s)

    def _channel_name(self, s: str, boundary: bool):
        if self.name_mode == "strict":  # prompt opened the channel: drop only a repeated `thought\n`
            if s.startswith("thought\n"):
                return 8
            if "thought\n".startswith(s) and not boundary:
                return None
            return 7 if s == "thought" else 0
        m = re.match(r"[A-Za-z_][\w-]{0,31}", s)
        if not m:
            return 0
        if m.end() == len(s):
            return len(s) if boundary else (None if len(s) <= 32 else 0)
        if s[m.end()] == "\n":
            return m.end() + 1
        return m.end() if m.group() == "thought" else 0

    def _text_call(self, s: str, boundary: bool) -> int:
        c = self._call
        if c["skip"]:  # inside a thought block opened within the call: dropped
            return len(s)
        c["body"] += s
        if c["bare"]:
            end = self._bare_end(c)
            if end is not None:
                self._pushback, c["body"] = c["body"][end:], c["body"][:end]
                self._end_call(True)  # what the cut body adds comes with the call
                return len(s)
        self._feed_arguments()
        return len(s)

    def _bare_end(self, c):
        b = c["body"]
        if c["begin"]:  # ends after an END_ARG not followed by another BEGIN_ARG
            j = b.rfind("END_ARG")
            if j < 0 or b.rfind("BEGIN_ARG") > j:
                return None
            r = b[j + 7 :].lstrip()
            return None if not r or r.startswith("BEGIN_ARG") or "BEGIN_ARG".startswith(r) else j + 7
        i = c["pos"]  # incremental brace matcher that skips strings
        while i < len(b):
            if c["quote"] == Q:
                j = b.find(Q, i)
                i, c["quote"] = (len(b), Q) if j < 0 else (j + len(Q), None)
                continue
            ch = b[i]
            if c["quote"]:
                if ch == "\\" and c["quote"] == '"':
                    i += 1
                elif ch == c["quote"]:
                    c["quote"] = None
            elif b.startswith(Q, i):
                c["quote"] = Q
                i += len(Q)
                continue
            elif ch in "\"'" and c["prev"] in ":,[{(=":  # quote opens only where a value starts
                c["quote"] = ch
            elif ch in "{[(":
                c["depth"] += 1
            elif ch in "}])":
                c["depth"] -= 1
                if c["depth"] <= 0:
                    c["pos"] = i + 1
                    return i + 1
            if not ch.isspace():
                c["prev"] = ch
            i += 1
        c["pos"] = i
        return None

    def _begin_closed(self) -> bool:
        c = self._call
        return bool(c and c["begin"] and c["body"].rfind("END_ARG") > c["body"].rfind("BEGIN_ARG"))

    # -------------------------------------------------------------- tokens
    def _token(self, tok: str):
        self.fresh = False
        if tok != Q:
            last, n = self._run
            self._run = (tok, n + 1 if tok == last else 1)
            if self._run[1] > self.max_repeat:
                return self._degenerate(f"{tok} repeated {self._run[1]} times")
        self._handle(tok)

    def _handle(self, tok: str):
        if self.state == CALL:
            return self._token_call(tok)
        if tok in TERMINATORS:
            return self._done(tok)
        if tok == "<|channel>":
            if self._open_channel():
                self._close_segment()
                self.state, self.name_mode = THOUGHT, "loose"
        elif tok == "<|tool_call>":
            if self.state == THOUGHT:  # docs/chat-format.md §10 #2: thought closed implicitly, call kept
                self._warn("tool call opened inside the thought channel")
            self._close_segment()
            self.name_mode = None
            self._start_call(bare=False, begin=False)
        elif tok == "<channel|>":
            if self.state != THOUGHT:
                self._warn("stray <channel|> ignored")
            self._close_segment()
            self.state, self.name_mode, self.at_start = CONTENT, None, True
        elif tok == "<tool_call|>":
            self._warn("stray <tool_call|> ignored")
        else:
            self._warn(f"control token {tok} dropped")

    def _token_call(self, tok: str):
        c = self._call
        if tok == Q:
            if not c["skip"]:
                c["body"] += tok
                self._feed_arguments()
        elif tok == "<|channel>":
            if c["bare"] and self._begin_closed():  # a bare BEGIN_ARG call is over
                self._end_call(True)
                self._handle(tok)
            elif self._open_channel():
                c["skip"] = True
                self._warn("thought channel inside a tool call dropped")
        elif tok == "<channel|>":
            c["skip"] = False
        elif tok == "<tool_call|>":
            self._end_call(not c["bare"] or self._begin_closed())
        elif tok == "<|tool_call>" or tok in TERMINATORS:
            self._end_call(self._begin_closed())  # missing <tool_call|>: flagged truncated
            self._handle(tok)
        else:
            self._warn(f"control token {tok} dropped")

    def _open_channel(self) -> bool:
        self._openings += 1
        if self._openings > self.max_open:
            self._degenerate(f"{self._openings} thought channel openings")
            return False
        return True

    # ------------------------------------------------------------- actions
    def _start_call(self, bare: bool, begin: bool):
        self.state = CALL
        self._call = {
            "body": "",
            "bare": bare,
            "begin": begin,
            "pos": 0,
            "depth": 0,
            "quote": None,
            "prev": "",
            "skip": False,
        }
        self._args = ArgumentStream(self.tools, self.guarded) if self.stream_arguments else None

    def _feed_arguments(self):
        a = self._args
        if a is None or a.stopped:
            return
        started = a.name is not None
        piece = a.update(self._call["body"])
        if a.name is not None and not started:
            head = ToolCall(name=a.name, arguments={}, raw_name=a.raw_name, unknown_tool=a.unknown_tool)
            self._events.append(Event("tool_call_start", call=self._call_out(head)))
        if piece:
            self._events.append(Event("tool_call_delta", piece))

    def _end_call(self, closed: bool, cut: bool = False):
        """cut: the text ended inside the call (max_tokens); a call cut within its name
        is not one (its name may be a piece of another: `get_` of `get_weather`)."""
        c, self._call = self._call, None
        streamed, self._args = self._args, None
        calls = list(map(self._call_out, parse_call_block(c["body"], self.tools)))
        calls[-1].truncated |= not closed  # the block's last call is the one its end reached
        if cut and name_only(calls[-1]):
            self._warn(f"a tool call cut within its name ({calls[-1].raw.strip()[:40]!r}) dropped")
            calls.pop()
        for k, call in enumerate(calls):
            call.id = f"call_{self._ncalls}"
            self._ncalls += 1
            if streamed is not None:  # the stream, if it started, was the block's first call
                self._owed_deltas(call, streamed if k == 0 and streamed.name is not None else None)
            self.result.tool_calls.append(call)
            self._events.append(Event("tool_call", call=call))
        self.state, self.at_start = CONTENT, True

    def _owed_deltas(self, call: ToolCall, started: ArgumentStream | None):
        """What a call's stream still owes before its `tool_call` event: the rest of its
        arguments, or (a call that could not stream) its start and all of them."""
        if started is None:
            self._events.append(Event("tool_call_start", call=replace(call, arguments={})))
        rest = call.arguments_json if started is None else started.finish(call)
        if rest:
            self._events.append(Event("tool_call_delta", rest))

    def _close_segment(self):
        self._pend = {"reasoning": "", "content": ""}
        self._lead = {"reasoning": True, "content": True}

    def _emit(self, kind: str, text: str):
        if self._lead[kind]:
            text = text.lstrip()
        text = self._pend[kind] + text
        vis = text.rstrip()
        self._pend[kind] = text[len(vis) :]
        if not vis:
            return
        if self._lead[kind] and kind == "reasoning" and self.result.reasoning:
            vis = "\n" + vis  # separate successive thought blocks
        self._lead[kind] = False
        over = False
        if kind == "reasoning" and self.budget is not None:
            room = self.budget - len(self.result.reasoning)
            over, vis = len(vis) > room, vis[: max(room, 0)]
        hit = self._loop_check(kind, vis)  # index just past a detected loop, else None
        cut = len(vis) if hit is None else hit
        if vis[:cut]:
            text = self._out(vis[:cut])
            setattr(self.result, kind, getattr(self.result, kind) + text)
            self._events.append(Event(kind, text))
        if over and not self.result.thinking_truncated:  # runtime should inject <channel|>
            self.result.thinking_truncated = True
            self._events.append(Event("thinking_budget"))
        if hit is not None:
            self.result.trailing += self._out(vis[cut:] + self._pend[kind])
            self._degenerate(f"repetition loop in {kind}")

    def _loop_check(self, kind: str, s: str):
        if not self.loop_min:
            return None
        tail, runs = self._loops[kind]
        for idx, ch in enumerate(s):
            n = len(tail)
            for p in range(1, n + 1):
                runs[p] = runs[p] + 1 if tail[n - p] == ch else 0
                if runs[p] >= self.loop_min:
                    return idx + 1
            tail = (tail + ch)[-self.loop_period :]
        self._loops[kind] = (tail, runs)
        return None

    def _degenerate(self, reason: str):
        if self.state == CALL:
            self._end_call(self._begin_closed())
        self.result.degenerate = reason
        self._events.append(Event("degenerate", reason))
        self._done(None)

    def _done(self, stop, cut: bool = False):
        """cut: the text ended inside a call: the reply is not a finished one."""
        self._close_segment()
        r = self.result
        r.stop_token, self.state = stop, DONE
        length = stop is None and (cut or not r.tool_calls)  # the text ran out (max_tokens)
        r.finish_reason = (
            "degenerate_output" if r.degenerate else "length" if length else "tool_calls" if r.tool_calls else "stop"
        )
        self._events.append(Event("done", r.finish_reason))

    def _warn(self, msg: str):
        self.result.warnings.append(msg)


def parse(text, tools=None, **kw) -> ParseResult:
    """Parse one complete piece of model output."""
    p = StreamParser(tools, **kw)
    p.feed(text)
    p.finish()
    return p.result


def parser_for_prompt(prompt: str, tools=None, **kw) -> StreamParser:
    """A parser whose start state matches how the rendered prompt ends (`continuing`:
    the prompt ends inside the reply's text, which keeps its leading whitespace)."""
    primed = prompt.endswith("<|channel>thought\n") or prompt.endswith("<|channel>")
    return StreamParser(tools, start_in_thought=primed, **kw)


def coalesce(events) -> list[Event]:
    """Merge adjacent text events of one type (the chunking of deltas is not stable)."""
    out: list[Event] = []
    for e in events:
        if out and e.type in ("reasoning", "content") and out[-1].type == e.type:
            out[-1] = Event(e.type, out[-1].text + e.text)
        else:
            out.append(e)
    return out
