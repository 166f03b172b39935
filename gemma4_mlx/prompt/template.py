"""Gemma 4 prompt rendering (docs/chat-format.md §2-§7).

`render` is our own implementation of the 9 Jul 2026 "canonical" grammar, used
when a checkpoint ships no template; `render_with_checkpoint_template` runs the
checkpoint's own Jinja template, which takes precedence when present (docs/chat-format.md §3).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from gemma4_mlx.prompt.tool_schema import tool_schema

Q = '<|"|>'  # string delimiter of the tool grammar; no escaping inside
BOS = "<bos>"
SPECIAL_TOKENS = {
    "<pad>": 0,
    "<eos>": 1,
    "<bos>": 2,
    "<unk>": 3,
    "<mask>": 4,
    "<|tool>": 46,
    "<tool|>": 47,
    "<|tool_call>": 48,
    "<tool_call|>": 49,
    "<|tool_response>": 50,
    "<tool_response|>": 51,
    Q: 52,
    "<|think|>": 98,
    "<|channel>": 100,
    "<channel|>": 101,
    "<|turn>": 105,
    "<turn|>": 106,
    "<|image>": 255999,
    "<|audio>": 256000,
    "<|image|>": 258880,
    "<|audio|>": 258881,
    "<image|>": 258882,
    "<audio|>": 258883,
    "<|video|>": 258884,
}
# docs/chat-format.md §8: generation stops at <eos>, <turn|> and <|tool_response> (the client
# appends the tool result there).  The one list; ids are the released vocabulary's.
STOP_STRINGS = ("<eos>", "<turn|>", "<|tool_response>")
STOP_TOKEN_IDS = tuple(SPECIAL_TOKENS[s] for s in STOP_STRINGS)
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"
_MEDIA = {
    "image": "<|image|>",
    "image_url": "<|image|>",
    "audio": "<|audio|>",
    "input_audio": "<|audio|>",
    "video": "<|video|>",
}
_STD_KEYS = ("description", "type", "properties", "required", "nullable")


class ChatTemplateError(ValueError):
    """Raised for messages the grammar cannot express, and by `raise_exception`."""


# ----------------------------------------------------------------- values
def _sorted(d: Mapping):
    # Jinja's dictsort is case-insensitive by default; templates sort that way.
    return sorted(d.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def format_value(v, quote_keys: bool = False) -> str:
    """Gemma value syntax (docs/chat-format.md §5.1): <|"|>strings<|"|>, bare numbers, sorted bare keys."""
    if v is None:
        return "null"
    if isinstance(v, str):
        return Q + v + Q
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Mapping):
        items = (((Q + k + Q) if quote_keys else str(k)) + ":" + format_value(x, quote_keys) for k, x in _sorted(v))
        return "{" + ",".join(items) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x, quote_keys) for x in v) + "]"
    return str(v)  # numbers print like Jinja's {{ x }} (Python str)


# ------------------------------------------------------------ declarations
def _type_of(schema: Mapping) -> tuple[str, bool]:
    t = schema.get("type")
    if isinstance(t, (list, tuple)):  # JSON-schema unions: first non-null type, null -> nullable
        rest = [x for x in t if x != "null"]
        return (str(rest[0]).upper() if rest else "NULL"), "null" in t
    return ("" if t is None else str(t).upper()), False


def _qlist(xs) -> str:
    return "[" + ",".join(Q + str(x) + Q for x in xs) + "]"


def _properties(props: Mapping, filter_std: bool = False) -> str:
    out = []
    for key, v in _sorted(props):
        if filter_std and (key in _STD_KEYS or not isinstance(v, Mapping)):
            continue
        v = v if isinstance(v, Mapping) else {}
        t, nullable = _type_of(v)
        parts = []
        if v.get("description"):
            parts.append(f"description:{Q}{v['description']}{Q}")
        if t == "STRING" and v.get("enum"):
            parts.append("enum:" + format_value(list(v["enum"]), True))
        elif t == "ARRAY" and isinstance(v.get("items"), Mapping) and v["items"]:
            parts.append("items:{" + _items(v["items"]) + "}")
        if v.get("nullable") or nullable:
            parts.append("nullable:true")
        if t == "OBJECT":
            if isinstance(v.get("properties"), Mapping):
                parts.append("properties:{" + _properties(v["properties"]) + "}")
            else:  # the template hoists mapping-valued extra keys as properties
                parts.append("properties:{" + _properties(v, filter_std=True) + "}")
            if v.get("required"):
                parts.append("required:" + _qlist(v["required"]))
        parts.append(f"type:{Q}{t}{Q}")
        out.append(f"{key}:{{" + ",".join(parts) + "}")
    return ",".join(out)


def _items(items: Mapping) -> str:
    parts = []
    for k, v in _sorted(items):
        if v is None:
            continue
        if k == "properties":
            parts.append("properties:{" + (_properties(v) if isinstance(v, Mapping) else "") + "}")
        elif k == "required":
            parts.append("required:" + _qlist(v))
        elif k == "type":
            parts.append("type:" + format_value(v.upper() if isinstance(v, str) else [str(x).upper() for x in v], True))
        else:
            parts.append(f"{k}:" + format_value(v, True))
    return ",".join(parts)


def _tool_function(tool) -> dict:
    """Accept {"type":"function","function":{...}}, a bare function dict, or a callable."""
    if callable(tool) and not isinstance(tool, Mapping):
        return tool_schema(tool)["function"]
    if isinstance(tool, Mapping):
        fn = tool.get("function", tool)
        if isinstance(fn, Mapping) and fn.get("name"):
            return dict(fn)
    raise ChatTemplateError(f"not a tool declaration: {tool!r}")


def format_declaration(tool) -> str:
    """One `<|tool>declaration:…<tool|>` block (docs/chat-format.md §5.2)."""
    fn = _tool_function(tool)
    s = f"declaration:{fn['name']}{{description:{Q}{fn.get('description') or ''}{Q}"
    params = fn.get("parameters")
    if params:
        s += ",parameters:{"
        if params.get("properties"):
            s += "properties:{" + _properties(params["properties"]) + "},"
        if params.get("required"):
            s += "required:" + _qlist(params["required"]) + ","
        # The template omits type (and the closing brace!) when absent; default to OBJECT.
        s += f"type:{Q}{str(params.get('type') or 'object').upper()}{Q}}}"
    if "response" in fn:
        r = fn["response"] or {}
        s += ",response:{"
        if r.get("description"):
            s += f"description:{Q}{r['description']}{Q},"
        s += f"type:{Q}{str(r.get('type') or 'object').upper()}{Q}}}"
    return "<|tool>" + s + "}<tool|>"


# ---------------------------------------------------------------- messages
def _is_content_parts(value) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(p, Mapping) and p.get("type") in ("text", *_MEDIA) for p in value)
    )


def tool_result_content(value) -> str | list:
    """A tool's return value as `role: tool` content: strings and text parts as they
    are, anything else as JSON (the OpenAI convention).  Checkpoint templates accept
    only a string or parts there (a mapping crashes them), so both render paths see
    this same form and print `response:NAME{value:<|"|>JSON<|"|>}`.  Media parts are
    JSON too: nothing prepares media for a tool result, and a placeholder rendered
    for one would bind no media (or the next message's)."""
    if isinstance(value, str):
        return value
    if _is_content_parts(value) and all(p.get("type") == "text" for p in value):
        return [dict(p) for p in value]
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):  # non-string keys, cycles, deep nesting
        return repr(value)


def normalize_messages(messages) -> list[dict]:
    """OpenAI-style input -> the shape Gemma templates expect (docs/chat-format.md §5.4 API mapping).

    Tool results become a string or content parts; the reasoning of an assistant
    message is offered under both `reasoning` and `reasoning_content` (templates
    read one or the other; transformers copies it the same way)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "model":
            m["role"] = "assistant"
        if m.get("role") == "tool" and "content" in m:
            m["content"] = tool_result_content(m["content"])
        thought = m.get("reasoning") or m.get("reasoning_content")
        if thought:
            m["reasoning"] = m["reasoning_content"] = thought
        calls = []
        for c in m.get("tool_calls") or []:
            fn = dict(c.get("function", c))
            args = fn.get("arguments")
            if isinstance(args, str):  # JSON string (OpenAI); the 9 Jul template rejects strings
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as e:
                    raise ChatTemplateError(f"tool call arguments are not JSON: {args!r}") from e
            if args is not None and not isinstance(args, Mapping):
                raise ChatTemplateError(f"tool call arguments must be a mapping: {args!r}")
            fn["arguments"] = args
            calls.append({**{k: v for k, v in c.items() if k != "function"}, "function": fn})
        if calls:
            m["tool_calls"] = calls
        out.append(m)
    return out


def _strip_thinking(text: str) -> str:
    # Drop every <|channel>…<channel|> block from history (docs/chat-format.md §4.3), then trim.
    kept = [part.split("<|channel>")[0] for part in text.split("<channel|>")]
    return "".join(kept).strip()


def _content(content, model: bool) -> str:
    if isinstance(content, str):
        return _strip_thinking(content) if model else content.strip()
    if not isinstance(content, (list, tuple)):
        return ""
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            text = part.get("text") or ""
            out.append(_strip_thinking(text) if model else text.strip())
        elif kind in _MEDIA:  # bare placeholder; the processor expands it (docs/chat-format.md §6)
            out.append(_MEDIA[kind])
    return "".join(out)


def _system_text(content) -> str:
    if isinstance(content, str):
        return content.strip()
    # List form (29 Apr+): the template appends a space after every part.
    return "".join((p.get("text") or "").strip() + " " for p in content or [])


def format_tool_call(call) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments") or {}
    body = ",".join(f"{k}:{format_value(v)}" for k, v in _sorted(args))
    return f"<|tool_call>call:{fn['name']}{{{body}}}<tool_call|>"


def format_tool_response(name: str, response) -> str:
    if isinstance(response, Mapping):
        body = ",".join(f"{k}:{format_value(v)}" for k, v in _sorted(response))
    else:
        body = "value:" + format_value(response)
    return f"<|tool_response>response:{name}{{{body}}}<tool_response|>"


def _tool_message(name: str, content) -> str:
    if isinstance(content, (list, tuple)):  # text parts joined, media after the block
        text = "".join(p.get("text") or "" for p in content if p.get("type") == "text")
        media = "".join(_MEDIA[p["type"]] for p in content if p.get("type") in _MEDIA)
        return format_tool_response(name, text) + media
    return format_tool_response(name, content)


def render(
    messages,
    *,
    tools=None,
    thinking: bool = False,
    add_generation_prompt: bool = True,
    empty_thought_prefill: bool = False,
    preserve_thinking: bool = False,
) -> str:
    """Render a conversation with the built-in canonical (9 Jul) grammar.

    empty_thought_prefill: the 26B/31B templates (~10 Apr on) end the thinking-off
    generation prompt with an empty, closed thought block; E2B/E4B do not (docs/chat-format.md §4.2).
    Never opens a thought channel except where the template itself primes one
    (after a tool result with thinking on, docs/chat-format.md §4.3).
    """
    msgs = normalize_messages(messages)
    fns = [_tool_function(t) for t in tools or []]
    out = [BOS]
    prev = None  # kind of the last thing rendered, as the template tracks it
    if thinking or fns or (msgs and msgs[0]["role"] in ("system", "developer")):
        system, msgs = (msgs[0], msgs[1:]) if msgs and msgs[0]["role"] in ("system", "developer") else (None, msgs)
        out.append(_system_turn(system, fns, thinking))
    last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
    prev_role = None
    for i, m in enumerate(msgs):
        if m["role"] == "tool":
            continue  # folded into the model turn that made the call
        text, prev = _message(m, msgs, i, prev_role, keep_thought=i > last_user, preserve_thinking=preserve_thinking)
        out.append(text)
        prev_role = m["role"]
    if add_generation_prompt:
        if prev not in ("tool_response", "tool_call"):
            out.append("<|turn>model\n")
            if not thinking and empty_thought_prefill:
                out.append(EMPTY_THOUGHT)
        elif prev == "tool_response" and thinking:
            out.append("<|channel>thought\n")
    return "".join(out)


def _system_turn(system: dict | None, fns: list[dict], thinking: bool) -> str:
    """`<|think|>`, the first system message's text, then the tool declarations."""
    return (
        "<|turn>system\n"
        + ("<|think|>\n" if thinking else "")
        + (_system_text(system.get("content")) if system else "")
        + "".join(format_declaration(f) for f in fns)
        + "<turn|>\n"
    )


def _message(
    m: dict, msgs: list[dict], i: int, prev_role: str | None, *, keep_thought: bool, preserve_thinking: bool
) -> tuple[str, str | None]:
    """One non-tool message (with the tool results that answer its calls) and the
    kind of the last thing it rendered."""
    role, out, prev = m["role"], [], None
    is_model = role == "assistant"
    if not (is_model and prev_role == "assistant"):  # consecutive assistants share a turn
        out.append("<|turn>" + {"assistant": "model", "developer": "system"}.get(role, role) + "\n")
    thought = m.get("reasoning") or m.get("reasoning_content")
    calls = m.get("tool_calls") or []
    if thought and (keep_thought or (preserve_thinking and calls)):
        out.append(f"<|channel>thought\n{thought}\n<channel|>")
    out.extend(format_tool_call(c) for c in calls)
    prev = "tool_call" if calls else prev
    results = _tool_results(m, calls, msgs, i)
    out.extend(results)
    answered = bool(results)
    prev = "tool_response" if answered else prev
    body = _content(m.get("content"), is_model)
    out.append(body)
    nxt = next((x["role"] for x in msgs[i + 1 :] if x["role"] != "tool"), None)
    if prev == "tool_call" and not answered:
        out.append("<|tool_response>")  # unanswered call: the client appends the result
    elif is_model and nxt == "assistant" and (not calls or answered):
        pass  # the next assistant message continues this model turn
    elif not (answered and not body.strip() and nxt is None):
        out.append("<turn|>\n")
    return "".join(out), prev


def _tool_results(m: dict, calls: list[dict], msgs: list[dict], i: int) -> list[str]:
    """The result blocks answering message i: its legacy `tool_responses` list, or the
    `role: tool` messages that follow it."""
    if m.get("tool_responses"):  # legacy, release-template form
        return [format_tool_response(r.get("name") or "unknown", r.get("response")) for r in m["tool_responses"]]
    if not calls:
        return []
    out = []
    for f in _following_tools(msgs, i):
        name = f.get("name") or "unknown"
        for c in calls:  # last call whose id matches wins, as in the template
            if c.get("id") == f.get("tool_call_id"):
                name = c["function"]["name"]
        out.append(_tool_message(name, f.get("content")))
    return out


def _following_tools(msgs, i):
    for m in msgs[i + 1 :]:
        if m["role"] != "tool":
            return
        yield m


# ------------------------------------------------------ checkpoint templates
# Our renderer written as a checkpoint template, shipped with checkpoints that have none
# (the demo model; GGUF imports without one): tests/test_shipped_template.py.
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()


def _raise_exception(message):
    raise ChatTemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike Jinja's builtin: no HTML escaping, key order kept (what chat templates expect).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template_str: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(template_str)


def render_with_checkpoint_template(
    template_str: str, messages, *, tools=None, thinking: bool = False, add_generation_prompt: bool = True, **extra
) -> str:
    """Render with a checkpoint's `chat_template.jinja` (docs/chat-format.md §3 rule), in a jinja2 sandbox."""
    ctx = dict(
        bos_token=BOS,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        messages=normalize_messages(messages),
        tools=[{"type": "function", "function": _tool_function(t)} for t in tools] if tools else None,
        add_generation_prompt=add_generation_prompt,
        enable_thinking=thinking,
    )
    ctx.update(extra)
    return _compile(template_str).render(**ctx)


def template_info(template_str: str) -> dict:
    """Hash and detected revision of a checkpoint template, for model metadata (docs/chat-format.md §3)."""
    if "preserve_thinking" in template_str:
        revision = "2026-07-09"
    elif "'<|think|>\\n'" in template_str or '"<|think|>\\n"' in template_str:
        revision = "2026-04-10+"
    else:
        revision = "release"
    return {
        "sha256": hashlib.sha256(template_str.encode()).hexdigest(),
        "revision": revision,
        "empty_thought_prefill": EMPTY_THOUGHT.replace("\n", "\\n") in template_str,
    }
