"""The argument grammar of Gemma 4 tool calls (docs/chat-format.md §5.1, §9.3, §10).

`parse_call_block` turns the body of a `<|tool_call>...<tool_call|>` block (or a
bare `call:` run) into `ToolCall`s, tolerating the malformed forms models emit:
parentheses, single quotes, bare values, namespaced names, truncation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from gemma4_mlx.prompt.tool_schema import tool_schema

Q = '<|"|>'
_NAME = r"[\w.\-]+(?::(?!BEGIN_ARG)[\w.\-]+)*"  # names with dots, hyphens, ':' namespaces
_NUM = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""
    raw_name: str = ""
    raw: str = ""
    truncated: bool = False
    unknown_tool: bool = False
    error: str | None = None  # "malformed_tool_call" when only a best effort was possible
    warnings: list = field(default_factory=list)

    @property
    def arguments_json(self) -> str:  # OpenAI `arguments` is a JSON string
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}


class _Tools:
    """Declared tools: names, positional parameter order and types for repairs."""

    def __init__(self, tools):
        self.known = tools is not None
        self.params: dict[str, list] = {}
        self.types: dict[str, dict] = {}
        for t in tools or []:
            if isinstance(t, str):
                self.params[t] = []
                continue
            if callable(t) and not isinstance(t, dict):
                t = tool_schema(t)
            fn = t.get("function", t)
            p = fn.get("parameters") or {}
            props, req = dict(p.get("properties") or {}), list(p.get("required") or [])
            self.params[fn["name"]] = req + [k for k in props if k not in req]
            self.types[fn["name"]] = {k: v.get("type") if isinstance(v, dict) else None for k, v in props.items()}

    def resolve(self, name: str) -> tuple[str, bool]:
        if not self.known or name in self.params:
            return name, True
        tail = name.split(":")[-1]  # namespaced: unique match on the last segment (docs/chat-format.md §9.3)
        hits = [n for n in self.params if n.split(":")[-1] == tail]
        return (hits[0], True) if len(hits) == 1 else (name, False)


class _Reader:
    """Recursive descent over Gemma's value syntax, tolerant of JSON-isms (docs/chat-format.md §9.3)."""

    _KEY = re.compile(r'(?:(?!<\|"\|>)[^\s:=,}\])])+')
    _DQ, _SQ = re.compile(r'"(?:[^"\\]|\\.)*"', re.S), re.compile(r"'([^']*)'")

    def __init__(self, s: str):
        self.s, self.i, self.truncated, self.warnings, self.positional = s, 0, False, [], []

    def _at_end(self) -> bool:
        while self.i < len(self.s) and self.s[self.i].isspace():
            self.i += 1
        return self.i >= len(self.s)

    def _string(self) -> str:
        """<|"|>…<|"|> (verbatim), "…" (JSON escapes) or '…'; unterminated: closed at the end."""
        s, i = self.s, self.i
        if s.startswith(Q, i):
            j = s.find(Q, i + len(Q))
            self.truncated |= j < 0
            self.i = len(s) if j < 0 else j + len(Q)
            return s[i + len(Q) : j if j >= 0 else len(s)]
        m = (self._DQ if s[i] == '"' else self._SQ).match(s, i)
        if not m:
            self.truncated, self.i = True, len(s)
            return s[i + 1 :]
        self.i = m.end()
        if s[i] == "'":
            return m.group(1)
        try:
            return json.loads(m.group(), strict=False)
        except ValueError:
            return m.group()[1:-1]

    def _literal(self, tok: str):
        low = tok.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("null", "none"):
            return None
        if _NUM.fullmatch(tok):
            number = float(tok) if any(c in tok for c in ".eE") else int(tok)
            if number in (float("inf"), float("-inf")):  # JSON has no infinity: what was written stays
                self.warnings.append(f"number {tok!r} out of range kept as a string")
                return tok
            return number
        self.warnings.append(f"bare value {tok!r} kept as a string" if tok else "missing value")
        return tok or None

    def value(self, stops=",}])"):
        if self._at_end():
            self.truncated = True
            return None
        s, i = self.s, self.i
        if s[i] in "{[":
            return self.container("}" if s[i] == "{" else "]")
        if s[i] in "\"'" or s.startswith(Q, i):
            return self._string()
        j = i
        while j < len(s) and s[j] not in stops and not s.startswith(Q, j):
            j += 1
        self.i = j
        return self._literal(s[i:j].strip())

    def container(self, close: str, top: bool = False):
        """An object ({…}, or (…) in the parenthesised call form) or a list ([…])."""
        self.i += 1
        out = [] if close == "]" else {}
        while not self._at_end():
            c = self.s[self.i]
            if c == ",":
                self.i += 1
            elif c in "}])":  # a mismatched closer is left for the enclosing container
                if c != close:
                    self.warnings.append(f"mismatched {c!r}")
                if c == close or top:
                    self.i += 1
                if c == close or not top:
                    return out
            elif close == "]":
                out.append(self.value(",]}"))
            else:
                self._member(out, top)
        self.truncated = True
        return out

    def _member(self, out: dict, top: bool):
        s, i = self.s, self.i
        if s[i] in "\"'" or s.startswith(Q, i):
            key, quoted = self._string(), True
        else:
            m = self._KEY.match(s, i)
            self.i = m.end() if m else i + 1  # always advance, even on a stray character
            key, quoted = s[i : self.i], False
        if not self._at_end() and s[self.i] in ":=":  # key=value: parenthesised form (docs/chat-format.md §10 #4)
            self.i += 1
            value = self.value()
            if key in out:  # the first value stays: it may already have been streamed (§9.4)
                self.warnings.append(f"repeated key {key!r}: its first value kept")
            else:
                out[key] = value
        elif self.i >= len(s) and not quoted:
            self.truncated = True
            out.setdefault(key, None)
        else:  # a value with no key: positional argument
            self.positional.append(key if quoted else self._literal(key))
            if not top:
                self.warnings.append(f"positional value {key!r} inside an object")


def _coerce(v, t):
    if isinstance(v, str) and t in ("integer", "number", "boolean"):
        x = _Reader(v.strip())._literal(v.strip())
        return x if not isinstance(x, str) else v
    return v


def _parse_one(text: str, tools: _Tools) -> tuple[ToolCall, str]:
    """One call `call:NAME{…}` / `(…)` / `: BEGIN_ARG…END_ARG`; returns it and the rest."""
    call = ToolCall(name="", arguments={}, raw=text)
    t = text
    if t.startswith("call:"):
        t = t[5:]
    else:
        call.warnings.append("missing 'call:' prefix")
    m = re.match(_NAME, t)
    if not m:
        call.error = "malformed_tool_call"
        if t[:1] not in ("{", "("):
            return call, ""
        r = _Reader(t)  # a nameless call: read past its arguments, so that the calls after it survive
        call.arguments = r.container("}" if t[0] == "{" else ")", top=True)
        call.truncated = r.truncated
        return call, t[r.i :]
    call.raw_name, after = m.group(), t[m.end() :]
    call.name, known = tools.resolve(call.raw_name)
    call.unknown_tool = not known
    positional, rest = [], ""
    if after[:1] in ("{", "("):
        r = _Reader(after)
        call.arguments = r.container("}" if after[0] == "{" else ")", top=True)
        call.truncated, positional, rest = r.truncated, r.positional, after[r.i :]
        call.warnings += r.warnings
    elif re.match(r":?\s*BEGIN_ARG", after):  # docs/chat-format.md §10 #3: positional BEGIN_ARG/END_ARG blocks
        last = 0
        for b in re.finditer(r"BEGIN_ARG:?(.*?)(END_ARG|\Z)", after, re.S):
            v = b.group(1)
            v = v[1:] if v.startswith("\n") else v
            positional.append(v[:-1] if v.endswith("\n") else v)
            call.truncated |= not b.group(2)
            last = b.end()
        rest = after[last:]
        call.warnings.append("BEGIN_ARG/END_ARG call syntax")
    elif after.strip():
        call.error = "malformed_tool_call"
        call.warnings.append(f"unparseable arguments {after[:40]!r}")
    if positional:
        order = [k for k in tools.params.get(call.name, []) if k not in call.arguments]
        if len(positional) <= len(order):
            types = tools.types.get(call.name, {})
            call.arguments.update((k, _coerce(v, types.get(k))) for k, v in zip(order, positional))
            call.warnings.append("positional arguments mapped in declaration order")
        else:
            call.arguments.setdefault("_positional", positional)  # nothing read is replaced (§9.4)
            call.error = "malformed_tool_call"
    return call, rest


def name_only(call: ToolCall) -> bool:
    """Whether a call's text ends with its name, or a namespace's `:` after it (nothing
    of its arguments written: cut there, the name itself may be a piece of another)."""
    rest = call.raw.strip()
    return (rest[5:] if rest.startswith("call:") else rest).rstrip(":") == call.raw_name


def parse_call_block(body: str, tools=None) -> list[ToolCall]:
    """Parse the text between <|tool_call> and <tool_call|> (may hold several calls)."""
    tools = tools if isinstance(tools, _Tools) else _Tools(tools)
    calls, rest = [], body.lstrip()  # not the end: an unclosed string keeps its trailing spaces (§9.4)
    while True:
        call, rest = _parse_one(rest, tools)
        calls.append(call)
        rest = rest.strip().lstrip(",").strip()
        if not rest.startswith("call:"):
            if rest:
                call.warnings.append(f"ignored trailing text {rest[:40]!r}")
            return calls
