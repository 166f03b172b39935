"""Strict tool calls: a grammar for Gemma 4's call syntax over the declared tools
(docs/structured-output.md §5, docs/chat-format.md §5.3).

    <|tool_call>call:NAME{key:value,...}<tool_call|>

NAME is a declared tool; the keys are its parameters in the order the chat template
renders them (sorted, case-insensitively), required ones present; each value follows
the parameter's schema in Gemma's value syntax: strings between `<|"|>` tokens,
bare numbers, true / false / null, [...] lists, {key:value} maps.  This translates
the small schema vocabulary `prompt.tool_schema` produces (type, enum, items,
properties, required, nullable, maxLength, additionalProperties: false); anything
else is refused, unless the grammar is `loose` (the server's): then only for a tool
declared `strict`, and another tool's calls take any arguments.  A declaration with
an `input_format` (INPUT_FORMAT: a custom tool, one string argument `input`) has
that string follow its own Lark or regex grammar.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence

from gemma4_mlx.constrain.grammar import ConstraintError, Grammar, nested, regex_lark
from gemma4_mlx.prompt.arguments import _NAME
from gemma4_mlx.prompt.tool_schema import tool_schema

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# what the grammar enforces, or what does not constrain a value (description, title, default)
_KNOWN = {"type", "enum", "items", "properties", "required", "nullable", "maxLength", "description", "title", "default"}
_NUMBER = r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/"
_INTEGER = r"/-?(0|[1-9][0-9]*)/"
MAX_STRING = 1 << 20  # maxLength the grammar engine is asked to count to
# A text answer: anything that does not begin (after whitespace) with "call:", which the
# parser reads as a call written without its <|tool_call> token (docs/chat-format.md
# §10 #1): such a "text" would be a call whose arguments no schema checked.
TEXT = r"TEXT: /(?s:\s*([^\sc].*|c([^a].*)?|ca([^l].*)?|cal([^l].*)?|call([^:].*)?)|\s+)/"
# A declaration's key for its one string argument's grammar, {"syntax": "lark" or
# "regex", "definition": text}: what the server makes of OpenAI's custom tools.  The
# prompt does not render it (the server tells the model the grammar in the description).
INPUT_FORMAT = "input_format"


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


class _Writer:
    """Lark rules for one declaration set; `q`, `open_`, `close`: the token ids of
    `<|"|>`, `<|tool_call>`, `<tool_call|>`."""

    def __init__(self, q: int, open_: int, close: int):
        self.q, self.open, self.close = q, open_, close
        self.rules: list[str] = []
        self.n, self.has_any = 0, False

    def rule(self, body: str) -> str:
        self.n += 1
        name = f"r{self.n}"
        self.rules.append(f"{name}: {body}")
        return name

    def string(self, max_len: int | None = None) -> str:
        text = "/(?s:.*)/" if max_len is None else f"/(?s:.{{0,{int(max_len)}}})/"
        return f"<[{self.q}]> {text} <[{self.q}]>"

    def value(self, schema: Mapping, where: str) -> str:
        if not isinstance(schema, Mapping):
            raise ConstraintError(f"{where}: a parameter schema must be an object")
        extra = (
            set(schema) - _KNOWN - ({"additionalProperties"} if schema.get("additionalProperties") is False else set())
        )
        if extra:
            raise ConstraintError(f"{where}: strict tool calls cannot enforce {sorted(extra)}")
        kind, nullable = schema.get("type"), bool(schema.get("nullable"))
        if isinstance(kind, list):
            nullable |= "null" in kind
            rest = [k for k in kind if k != "null"]
            if len(rest) > 1:
                raise ConstraintError(f"{where}: strict tool calls cannot enforce a union of types {rest}")
            kind = rest[0] if rest else None
        if "enum" in schema:
            if not isinstance(schema["enum"], (list, tuple)) or not schema["enum"]:
                raise ConstraintError(f"{where}.enum: expected a non-empty list")
            alts = [
                f"<[{self.q}]> {_lit(v)} <[{self.q}]>" if isinstance(v, str) else _lit(json.dumps(v))
                for v in schema["enum"]
            ]
            body = " | ".join(alts)
        elif kind == "string":
            body = self.string(_max_length(schema.get("maxLength"), where))
        elif kind == "integer":
            body = _INTEGER
        elif kind == "number":
            body = _NUMBER
        elif kind == "boolean":
            body = '"true" | "false"'
        elif kind == "array":
            item = self.value(schema.get("items") or {}, f"{where}.items") if schema.get("items") else self.any()
            body = f'"[" ({item} ("," {item})*)? "]"'
        elif kind == "object" and schema.get("properties"):
            body = f'"{{" {self.members(schema, where)} "}}"'
        elif kind in ("object", None):
            body = self.any() if kind is None else self.any_map()
        else:
            raise ConstraintError(f"{where}: strict tool calls cannot enforce type {kind!r}")
        return self.rule(f'{body} | "null"' if nullable else body)

    def members(self, schema: Mapping, where: str) -> str:
        """key:value pairs in the template's order; optional ones may be left out."""
        props, required = schema.get("properties") or {}, schema.get("required") or []
        if not isinstance(props, Mapping) or not all(isinstance(k, str) for k in props):
            raise ConstraintError(f"{where}.properties: expected an object of parameter schemas")
        if not isinstance(required, list) or not all(isinstance(k, str) and k in props for k in required):
            raise ConstraintError(f"{where}.required: expected a list of names from properties")
        required, keys = set(required), sorted(props, key=str.lower)
        pairs = []
        for k in keys:
            key = _lit(k + ":") if _IDENT.match(k) else f'<[{self.q}]> {_lit(k)} <[{self.q}]> ":"'
            pairs.append((f"{key} {self.value(props[k], f'{where}.{k}')}", k in required))
        head, tail = '""', '""'  # members i.. : the first without a comma / each after a comma
        for pair, req in reversed(pairs):
            new_head = self.rule(f"{pair} {tail}" + ("" if req else f" | {head}"))
            tail = self.rule(f'"," {pair} {tail}' + ("" if req else f" | {tail}"))
            head = new_head
        return head

    def any(self) -> str:
        """Any value (a parameter without a schema)."""
        if not self.has_any:
            self.has_any = True
            self.rules += [
                f'anyval: {self.string()} | {_NUMBER} | "true" | "false" | "null" | "[" (anyval ("," anyval)*)? "]"'
                " | anymap",
                'anymap: "{" (anykey ":" anyval ("," anykey ":" anyval)*)? "}"',
                f"anykey: /[A-Za-z_][A-Za-z0-9_]*/ | <[{self.q}]> /(?s:.+)/ <[{self.q}]>",
            ]
        return "anyval"

    def any_map(self) -> str:
        self.any()
        return "anymap"

    def any_members(self) -> str:
        """Any key:value pairs (a call of a tool whose schema is not enforced)."""
        self.any()
        return '(anykey ":" anyval ("," anykey ":" anyval)*)?'

    def arguments(self, fn: Mapping, subgrammars: dict[str, tuple[str, str]], loose: bool) -> str:
        """One call's arguments: a custom tool's `input` in its own grammar (added to
        `subgrammars`); else the schema's members; else, when `loose`, for a tool
        not declared strict whose schema has what the grammar cannot enforce, any
        arguments."""
        where = f"tools.{fn['name']}"
        if fn.get(INPUT_FORMAT) is not None:
            name = f"input{len(subgrammars) + 1}"
            subgrammars[name] = _input_grammar(fn[INPUT_FORMAT], f"{where}.format"), f"{where}.format"
            return f'"input:" <[{self.q}]> @{name} <[{self.q}]>'
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not params.get("properties"):
            return '""'
        mark = len(self.rules), self.n, self.has_any
        try:
            return self.members(params, f"{where}.parameters")
        except ConstraintError:
            if not loose or fn.get("strict"):
                raise
            del self.rules[mark[0] :]
            self.n, self.has_any = mark[1], mark[2]
            return self.any_members()


def _max_length(value, where: str) -> int | None:
    if value is None:
        return None
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # 100.0 from some encoders
    if not whole or isinstance(value, bool) or not 0 <= value <= MAX_STRING:
        raise ConstraintError(f"{where}.maxLength: expected an integer from 0 to {MAX_STRING}, got {value!r}")
    return int(value)


def _input_grammar(fmt, where: str) -> str:
    """The Lark text of a custom tool's input format (checked by `nested`)."""
    if not isinstance(fmt, Mapping) or not isinstance(fmt.get("definition"), str):
        raise ConstraintError(f"{where}: expected a grammar definition (text)")
    syntax = fmt.get("syntax")
    if syntax == "regex":
        text = regex_lark(fmt["definition"], where)
    elif syntax == "lark":
        text = fmt["definition"]
        if _names_a_token(text):
            raise ConstraintError(f"{where}: the grammar names a token (<...>); a custom tool's input is text")
    else:
        raise ConstraintError(f"{where}.syntax: expected 'lark' or 'regex', got {syntax!r}")
    return text


# llguidance's own lexemes: strings stop at control characters, regexes may span
# lines, comments start with `//` or `#`
_LARK_SKIPPED = re.compile(r'"(?:\\[^\n]|[^"\\\x00-\x1f\x7f])*"|/(?:\\[^\n]|[^/\\])+/|(?:#|//)[^\n]*')


def _names_a_token(text: str) -> bool:
    """Whether Lark `text` has a `<...>` item (a token, by id or by name) outside its
    strings, regular expressions and comments (read as llguidance's lexer reads
    them).  Inside a call's input such a token (`<tool_call|>`, `<|"|>`) would end
    the input or the call early."""
    return "<" in _LARK_SKIPPED.sub("", text)


def _declarations(tools: Sequence) -> list[dict]:
    out = []
    for t in tools:
        t = tool_schema(t) if callable(t) and not isinstance(t, Mapping) else t
        fn = t.get("function", t) if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise ConstraintError("tools: each tool needs a function name")
        if not re.fullmatch(_NAME, fn["name"]):  # the parser would read another name back
            raise ConstraintError(f"tools: {fn['name']!r} is not a name a tool call can carry")
        if not isinstance(fn.get("parameters") or {}, Mapping):
            raise ConstraintError(f"tools.{fn['name']}.parameters: expected an object (a JSON schema)")
        out.append(fn)
    if not out:
        raise ConstraintError("tools: strict tool calls need at least one declared tool")
    return out


def tool_call_grammar(
    tools: Sequence[Callable | Mapping],
    token_id: Callable[[str], int | None],
    require_call: bool = False,
    loose: bool = False,
) -> Grammar:
    """The answer is free text, or one or more calls of the declared `tools`
    (functions or OpenAI-style declarations) whose arguments follow their schemas.
    token_id(text): the id of a control string (`tokenizer.convert_tokens_to_ids`).
    require_call: calls only, no text (OpenAI's tool_choice "required").
    loose: a schema the grammar cannot enforce is refused only for a tool declared
    `strict`; another such tool's calls take any arguments (a request constrained
    for another tool's sake must not fail for this one)."""
    ids = {}
    for s in ('<|"|>', "<|tool_call>", "<tool_call|>"):
        i = token_id(s)
        if not isinstance(i, int) or i < 0:
            raise ConstraintError(f"tools: the tokenizer has no {s} token")
        ids[s] = i
    w = _Writer(ids['<|"|>'], ids["<|tool_call>"], ids["<tool_call|>"])
    calls, subgrammars = [], {}
    for fn in _declarations(tools):
        calls.append(w.rule(f'{_lit(fn["name"])} "{{" {w.arguments(fn, subgrammars, loose)} "}}"'))
    head = [
        "start: call+" if require_call else "start: TEXT | call+",
        TEXT,
        f'call: <[{w.open}]> "call:" ({" | ".join(calls)}) <[{w.close}]>',
    ]
    return nested("\n".join(head + w.rules), subgrammars, what="tools")
