"""OpenAI's custom (freeform) tools, on Chat Completions and Responses: a tool whose
input is one text, free or a sentence of a Lark or regex grammar.

Gemma 4 calls functions with named arguments, so a custom tool is declared to the
model as a function of one string, `input`, whose description tells the grammar,
and the grammar is enforced on that string (`INPUT_FORMAT`, docs/serving.md §5.3).
The two APIs spell the format differently; both come here as Responses' shape,
{"type": "grammar", "syntax": ..., "definition": ...} or {"type": "text"}.
"""

from __future__ import annotations

import json

from gemma4_mlx.constrain.tools import INPUT_FORMAT
from gemma4_mlx.server.errors import APIError


def declaration(name, description, fmt) -> dict:
    """The function declaration (Chat Completions' shape) of a custom tool; a format
    of another type than text or grammar is a 400."""
    if not isinstance(name, str):
        raise APIError(400, "tools: a custom tool needs a name (a string)", "tools")
    if fmt is not None and not isinstance(fmt, dict):
        raise APIError(400, f"tools.{name}.format: expected an object", "tools")
    fmt = fmt or {}
    if fmt.get("type") not in (None, "text", "grammar"):
        raise APIError(400, f"tools.{name}.format.type: expected 'text' or 'grammar', got {fmt['type']!r}", "tools")
    how, grammar = "The tool's whole input, as free text.", None
    if fmt.get("type") == "grammar":
        grammar = {"syntax": fmt.get("syntax"), "definition": fmt.get("definition")}
        how = f"The tool's whole input, text following this {fmt.get('syntax')} grammar:\n{fmt.get('definition')}"
    params = {"type": "object", "properties": {"input": {"type": "string", "description": how}}, "required": ["input"]}
    fn = {k: v for k, v in (("name", name), ("description", description), ("parameters", params)) if v is not None}
    if grammar is not None:
        fn[INPUT_FORMAT] = grammar
    return {"type": "function", "function": fn}


def chat_format(fmt):
    """Chat Completions' format, {"type": "grammar", "grammar": {"syntax", "definition"}},
    in Responses' shape."""
    if isinstance(fmt, dict) and fmt.get("type") == "grammar":
        inner = fmt.get("grammar") if isinstance(fmt.get("grammar"), dict) else {}
        return {"type": "grammar", "syntax": inner.get("syntax"), "definition": inner.get("definition")}
    return fmt


def chat_names(tools) -> set[str]:
    """The names of a Chat Completions request's custom tools (their calls are
    answered as custom calls)."""
    return {
        t["custom"]["name"]
        for t in tools or []
        if isinstance(t, dict) and t.get("type") == "custom" and isinstance(t.get("custom"), dict)
    }


def arguments(text: str) -> str:
    """A custom call's input as the declared function's arguments (a past call)."""
    return json.dumps({"input": text}, ensure_ascii=False)


def input_text(call) -> str:
    """A custom call's input: its one string argument (`input` as declared, or however
    the model named it); nothing written yet (`{}`, a call cut within its key) is
    empty; anything else is the arguments' JSON."""
    values = list(call.arguments.values())
    if len(values) == 1 and isinstance(values[0], str):
        return values[0]
    return "" if all(v is None for v in values) else call.arguments_json
