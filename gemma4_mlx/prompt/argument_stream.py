"""A tool call's arguments as JSON while the model is still writing them
(docs/chat-format.md §9.4).

`ArgumentStream` reads the growing body of a call (`call:NAME{key:value,...}`) and
hands out the JSON text of its arguments as far as it is certain: the pieces handed
out so far always join into a prefix of `json.dumps(arguments)` of the finished
call, however the body goes on. `parse_call_block` reads left to right, a value once
complete never changes (a repeated key keeps its first value, nothing read is
replaced), and what the finished call adds (a truncated value, positional
arguments) comes after what was read. Long string values stream character by
character, which is what a client showing a file being written needs.

It follows the well-formed subset only: objects, lists, `<|"|>` strings (streamed),
quoted strings and literals (each handed out once complete). Anything else — a
positional value, a mismatched closer, the parenthesised or BEGIN_ARG forms — stops
it, and the finished call supplies the rest (`finish`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gemma4_mlx.prompt.arguments import _NAME, Q, _Reader, _Tools
from gemma4_mlx.prompt.guard import _QUOTE, unguard, unguard_value

_NAME_RE = re.compile(_NAME)
_CLOSERS = {"{": "}", "[": "]"}
_MEMBER_STOPS, _ITEM_STOPS = ",}])", ",]}"  # where the reader ends a bare value in an object / a list


@dataclass
class _Open:
    """An object or list whose JSON is being handed out."""

    closer: str  # "}" or "]"
    members: int = 0  # handed out so far
    keys: set = field(default_factory=set)  # an object's keys so far (as written)


def _skip_space(s: str, i: int) -> int:
    while i < len(s) and s[i].isspace():
        i += 1
    return i


def _escaped(text: str) -> str:
    """`text` as it stands inside a JSON string (json.dumps escapes character by character)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


class ArgumentStream:
    """`update(body)` -> the JSON the body adds; `name` is set once `call:NAME{` is read.

    guarded: the body is guarded text (`guard.py`): a "<" of ordinary text stands as
    U+E002 and literal U+E001/U+E002 are escaped by U+E001; what comes out is unguarded.
    """

    def __init__(self, tools: _Tools, guarded: bool = False):
        self.tools, self.guarded = tools, guarded
        self.name: str | None = None  # resolved, as the finished call will name it
        self.raw_name = ""
        self.unknown_tool = False
        self.sent = ""  # the JSON handed out so far
        self.stopped = False  # the object closed, or the body left the well-formed subset
        self._i = 0  # where reading goes on in the body
        self._stack: list[_Open] = []
        self._value_stops: str | None = None  # set while a value comes next: where a bare one would end
        self._in_string = False  # inside a <|"|> string whose text is being handed out
        self._looked = (-1, 0, False)  # a quoted or bare value not yet complete: (start, scanned up to, escaped)

    def update(self, body: str) -> str:
        """The JSON that the body, as it now stands (it only grows), adds to `sent`."""
        out: list[str] = []
        while not self.stopped and self._step(body, out):
            pass
        piece = "".join(out)
        self.sent += piece
        return piece

    def finish(self, call) -> str:
        """The rest of the JSON once the call is parsed (`call`: the finished `ToolCall`).
        A safety net: were the call ever not to extend what was sent (a reader change
        this module did not follow), what was sent is completed and becomes the call's
        arguments, with a warning, so that the client's JSON and the call agree."""
        whole = call.arguments_json
        if not whole.startswith(self.sent):
            whole = self._closed()
            call.arguments = json.loads(whole)
            call.warnings.append("arguments cut where streaming them stopped")
        return whole[len(self.sent) :]

    def _closed(self) -> str:
        """`sent` completed into valid JSON (a value still awaited reads as null)."""
        tail = '"' if self._in_string else "null" if self._value_stops is not None else ""
        return self.sent + tail + "".join(frame.closer for frame in reversed(self._stack))

    # ------------------------------------------------------------------ reading
    def _step(self, s: str, out: list[str]) -> bool:
        """Read one thing; False when the body holds nothing more that is certain."""
        if self.name is None:
            return self._head(s, out)
        if self._in_string:
            return self._string(s, out)
        i = _skip_space(s, self._i)
        if i == len(s):
            return False
        if self._value_stops is not None:
            return self._value(s, i, out)
        frame = self._stack[-1]
        c = s[i]
        if c == ",":  # the reader skips any number of commas
            self._i = i + 1
            return True
        if c in "}])":
            if c != frame.closer:
                return self._stop()
            out.append(c)
            self._stack.pop()
            self._i, self.stopped = i + 1, not self._stack
            return True
        if frame.closer == "]":
            out.append(", " if frame.members else "")
            frame.members += 1
            self._i, self._value_stops = i, _ITEM_STOPS
            return True
        return self._key(s, i, frame, out)

    def _head(self, s: str, out: list[str]) -> bool:
        i = _skip_space(s, 0)
        if "call:".startswith(s[i:]):
            return False  # too early to tell
        if s.startswith("call:", i):
            i += 5
        m = _NAME_RE.match(s, i)
        if not m:
            return self._stop()
        if m.end() == len(s) or (s[m.end()] == ":" and m.end() + 1 == len(s)):
            return False  # the name may still grow
        if s[m.end()] != "{":
            return self._stop()  # the parenthesised or BEGIN_ARG forms: the finished call says
        self.raw_name = m.group()
        self.name, known = self.tools.resolve(self.raw_name)
        self.unknown_tool = not known
        self._stack.append(_Open("}"))
        self._i = m.end() + 1
        out.append("{")
        return True

    def _key(self, s: str, i: int, frame: _Open, out: list[str]) -> bool:
        if s.startswith(Q, i):
            j = s.find(Q, i + len(Q))
            if j < 0:
                return False
            key, end = s[i + len(Q) : j], j + len(Q)
        elif s[i] in "\"'":
            return self._stop()
        else:
            m = _Reader._KEY.match(s, i)
            if not m:
                return self._stop()
            if m.end() == len(s):
                return False
            key, end = m.group(), m.end()
        k = _skip_space(s, end)
        if k == len(s):
            return False
        if s[k] not in ":=" or key in frame.keys:  # a positional value, or a repeated key
            return self._stop()
        frame.keys.add(key)
        out.append((", " if frame.members else "") + json.dumps(self._text(key), ensure_ascii=False) + ": ")
        frame.members += 1
        self._i, self._value_stops = k + 1, _MEMBER_STOPS
        return True

    def _value(self, s: str, i: int, out: list[str]) -> bool:
        if s[i] in _CLOSERS:
            self._stack.append(_Open(_CLOSERS[s[i]]))
            out.append(s[i])
            self._i, self._value_stops = i + 1, None
            return True
        if s.startswith(Q, i):
            out.append('"')
            self._i, self._value_stops, self._in_string = i + len(Q), None, True
            return True
        if not self._complete(s, i):  # a literal or a quoted string: handed out once complete
            return False
        reader = _Reader(s)
        reader.i = i
        value = reader.value(self._value_stops)
        if reader.truncated:
            return False
        value = unguard_value(value) if self.guarded else value
        out.append(json.dumps(value, ensure_ascii=False))
        self._i, self._value_stops = reader.i, None
        return True

    def _complete(self, s: str, i: int) -> bool:
        """Whether the quoted string or bare value at i has ended in the body: its
        closing quote, or (bare) a character after it, is there. The look goes on
        where the last one stopped, so a long value costs its length once, not once
        per piece."""
        start, k, escaped = self._looked if self._looked[0] == i else (i, i + (s[i] in "\"'"), False)
        quote = s[i] if s[i] in "\"'" else None
        while k < len(s):
            c = s[k]
            if quote is None and (c in self._value_stops or s.startswith(Q, k)):
                return True
            if quote is not None and c == quote and not escaped:
                return True
            escaped = quote == '"' and c == "\\" and not escaped
            k += 1
        self._looked = (start, k, escaped)
        return False

    def _string(self, s: str, out: list[str]) -> bool:
        j = s.find(Q, self._i)  # whole: the body grows by whole control tokens (the parser holds a partial one)
        end = j if j >= 0 else self._complete_up_to(s)
        if end > self._i:
            out.append(_escaped(self._text(s[self._i : end])))
        if j < 0:
            self._i = end
            return False
        out.append('"')
        self._i, self._in_string = j + len(Q), False
        return True

    def _complete_up_to(self, s: str) -> int:
        """Where the string's text read so far can be handed out: (guarded) not an escape
        character still waiting for its pair. Escapes come in pairs from where the string
        started, so an odd run of them at the end leaves the last one waiting."""
        if not self.guarded:
            return len(s)
        run = len(s) - len(s.rstrip(_QUOTE))
        return len(s) - min(run, len(s) - self._i) % 2

    def _text(self, text: str) -> str:
        return unguard(text) if self.guarded else text

    def _stop(self) -> bool:
        self.stopped = True
        return False
