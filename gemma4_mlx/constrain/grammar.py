"""What an output must match, as an llguidance grammar (docs/structured-output.md §2).

A `Grammar` is tokenizer-free: it is compiled (and refused, in one line) when it is
made, before any model runs.  `constraint.bind` ties it to a tokenizer.  JSON
schemas are compiled by llguidance itself; nothing here interprets a schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import llguidance as llg

# Compact JSON: no whitespace between tokens, so a sampled model cannot pad an
# object with endless blanks before max_tokens (docs/structured-output.md §2).
JSON_OPTIONS = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """A schema, pattern or grammar the engine cannot compile (one line)."""


@dataclass(frozen=True)
class Grammar:
    """kind: "json_object", "json_schema", "regex", "lark" or "tool_calls";
    source: the llguidance grammar; what: how errors name it; parts: the grammars
    nested in it (`nested`), each checked on its own when bound: the engine finds
    some errors only at a grammar's first mask, which for a nested one would come
    mid-output."""

    kind: str
    source: str
    what: str
    parts: tuple[Grammar, ...] = ()

    def check(self, tokenizer: llg.LLTokenizer | None = None) -> Grammar:
        """Raise `ConstraintError` when the engine refuses the grammar."""
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(self.source, tokenizer)
        if is_error:
            raise ConstraintError(f"{self.what}: {_first_line(messages[0])}")
        return self


def _first_line(message: str) -> str:
    lines = [x.strip() for x in message.strip().splitlines() if x.strip()]
    return "; ".join(lines[:2]) if lines else "rejected by the grammar engine"


def json_schema(schema: dict | str, what: str = "json_schema") -> Grammar:
    """Output: one JSON value valid under `schema` (a dict or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ConstraintError(f"{what}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise ConstraintError(f"{what}: a JSON schema is an object, got {type(schema).__name__}")
    try:
        source = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise ConstraintError(f"{what}: {_first_line(str(e))}") from None
    return Grammar("json_schema", source, what).check()


def json_object() -> Grammar:
    """Output: any JSON object."""
    g = json_schema({"type": "object"}, what="json_object")
    return Grammar("json_object", g.source, g.what)


def regex(pattern: str, what: str = "regex") -> Grammar:
    """Output: a string that fully matches `pattern` (Rust `regex` syntax; `\\d` is
    [0-9] as in JSON Schema and most users' reading, `\\w` / `\\s` stay Unicode)."""
    source = llg.LLMatcher.grammar_from_lark(regex_lark(pattern, what))
    return Grammar("regex", source, what).check()


def regex_lark(pattern: str, what: str = "regex") -> str:
    """The Lark text of `regex`'s grammar (also a custom tool's input, `nested`)."""
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError(f"{what}: expected a non-empty pattern")
    return f"start: /{llg.regex_to_lark(pattern, use_ascii='d')}/"


def lark(text: str, what: str = "grammar") -> Grammar:
    """Output: a sentence of `text`, a grammar in llguidance's Lark dialect
    (`start` is the root; `%json {...}` embeds a JSON schema; `<[id]>` is a token)."""
    if not isinstance(text, str) or not text.strip():
        raise ConstraintError(f"{what}: expected grammar text")
    return Grammar("lark", llg.LLMatcher.grammar_from_lark(text), what).check()


def nested(main: str, subgrammars: dict[str, tuple[str, str]], what: str) -> Grammar:
    """`main` (Lark text) whose `@NAME` items are sentences of the Lark text of
    `subgrammars[NAME]` = (text, how errors name it; `start` its root).  Each runs
    with its own lexer, so its tokens and main's never clash: a custom tool's input
    grammar inside a tool call.  Each is checked alone first, so that an error names it."""
    if not subgrammars:
        return lark(main, what)
    parts = tuple(lark(text, what=label) for text, label in subgrammars.values())
    grammars = [{"lark_grammar": main}] + [{"name": n, "lark_grammar": t} for n, (t, _) in subgrammars.items()]
    return Grammar("lark", json.dumps({"grammars": grammars}), what, parts).check()


def constraint_from_response_format(response_format: dict | None) -> Grammar | None:
    """An OpenAI-style `response_format` as a `Grammar` (None: free text).

    {"type": "text"} -> None; {"type": "json_object"}; {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}; our extensions
    {"type": "regex", "regex": "..."} and {"type": "grammar", "grammar": "<lark>"}.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ConstraintError("response_format: expected an object")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise ConstraintError("response_format.json_schema: expected an object with a 'schema' field")
        return json_schema(spec["schema"], what="response_format.json_schema.schema")
    if kind == "regex":
        return regex(response_format.get("regex") or response_format.get("pattern"), what="response_format.regex")
    if kind in ("grammar", "lark"):
        return lark(response_format.get("grammar"), what="response_format.grammar")
    raise ConstraintError(
        f"response_format.type: {kind!r} is not one of text, json_object, json_schema, regex, grammar"
    )


_from_schema, _from_regex = json_schema, regex  # grammar_from's keywords shadow these names


def grammar_from(*, json_schema=None, regex=None, grammar=None) -> Grammar | None:
    """The one constraint among the keyword arguments of `api.generate` (None: free text).
    grammar: Lark text, or a `Grammar` (e.g. from `constraint_from_response_format`)."""
    given = [k for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar)) if v is not None]
    if len(given) > 1:
        raise ConstraintError(f"give one of json_schema, regex, grammar (got {', '.join(given)})")
    if json_schema is not None:
        return _from_schema(json_schema)
    if regex is not None:
        return _from_regex(regex)
    if isinstance(grammar, Grammar) or grammar is None:
        return grammar
    return lark(grammar)
