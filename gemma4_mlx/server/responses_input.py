"""OpenAI's Responses API, the request side: a request's `input` (a string, or items:
messages, function calls and their outputs, reasoning) and tools as the same
`Conversation` the Chat Completions endpoint builds, so it renders, batches, caches
and parses the same way; and a finished response as history for
`previous_response_id` (`kept_reply`). docs/serving.md §5.2.
"""

from __future__ import annotations

from gemma4_mlx.server import custom_tools
from gemma4_mlx.server.errors import APIError, malformed_is_400, text_field
from gemma4_mlx.server.prompts import Conversation, check_roles, split_prefill
from gemma4_mlx.server.schemas import ResponsesRequest
from gemma4_mlx.server.tool_choice import select_tools

_ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
# how input items become the messages check_roles counts
_ORDER = "instructions first, a turn's function_calls one assistant message, empty user messages left out"


def _parts(content, where: str, prompter, media: list, user: bool, field: str = "content"):
    """A message's content: text, or (user) parts with images as placeholders."""
    if isinstance(content, str):
        return content
    parts = []
    for j, p in enumerate(content or []):
        kind, at = p.get("type"), f"{where}.{field}[{j}]"
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": text_field(p, at)})
        elif kind == "refusal":  # history from OpenAI's own models: what the assistant said
            parts.append({"type": "text", "text": text_field({"text": p.get("refusal")}, at)})
        elif kind == "input_image" and user:
            url = p.get("image_url")
            if not isinstance(url, str):
                raise APIError(400, f"{at}: an input_image needs an image_url (a data: URI)", param="input")
            prompter.add_image(media, url, at)
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"{at}: unsupported content part type {kind!r}", param="input")
    if user:
        return parts
    return "".join(p["text"] for p in parts)


def _call(item: dict, where: str) -> dict:
    """A function_call or custom_tool_call item as a Chat Completions tool call (a
    custom tool's input as the one argument `input`, as it is declared)."""
    if item.get("type") == "custom_tool_call":
        name, text = item.get("name"), item.get("input")
        if not isinstance(name, str) or not isinstance(text, str):
            raise APIError(400, f"{where}: a custom_tool_call needs a name and an input (a string)", param="input")
        args = custom_tools.arguments(text)
    else:
        name, args = item.get("name"), item.get("arguments") or "{}"
    if not isinstance(name, str) or not isinstance(args, str):
        raise APIError(400, f"{where}: a function_call needs a name and arguments (a JSON string)", param="input")
    if isinstance(item.get("namespace"), str):  # a namespace's function: declared as `namespace.name`
        name = f"{item['namespace']}.{name}"
    return {"id": item.get("call_id"), "type": "function", "function": {"name": name, "arguments": args}}


def _empty(content) -> bool:
    return not content or (isinstance(content, list) and all(p == {"type": "text", "text": ""} for p in content))


def _tool_output(out, where: str, prompter, media: list) -> tuple[str, list]:
    """A function_call_output's text, and the images it returned (placeholders)."""
    if isinstance(out, str):
        return out, []
    if not isinstance(out, list):
        raise APIError(400, f"{where}.output: expected a string or a list of content parts", param="input")
    parts = _parts(out, where, prompter, media, True, field="output")
    return "".join(p["text"] for p in parts if p["type"] == "text"), [p for p in parts if p["type"] == "image"]


def _messages(items: list, prompter, media: list) -> list[dict]:
    """Input items -> Chat Completions messages (calls of one turn on one assistant
    message).  Images a tool returned follow its results as a user turn, since tool
    results are text.  Empty user turns (some clients put one before tool results)
    are left out."""
    msgs, names, thought, shown = [], {}, None, []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind not in ("function_call_output", "custom_tool_call_output", "reasoning") and shown:
            msgs.append({"role": "user", "content": shown})
            shown = []
        if kind == "message":
            role = _ROLES.get(item.get("role"))
            if role is None:
                raise APIError(400, f"{where}.role: expected user, system, developer or assistant", param="input")
            content = _parts(item.get("content"), where, prompter, media, role == "user")
            if role == "user" and _empty(content):
                continue
            msgs.append({"role": role, "content": content})
        elif kind in ("function_call", "custom_tool_call"):
            call = _call(item, where)
            names[call["id"]] = call["function"]["name"]
            if not (msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]):
                msgs.append({"role": "assistant", "content": ""})
            msgs[-1].setdefault("tool_calls", []).append(call)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            text, images = _tool_output(item.get("output"), where, prompter, media)
            uid = item.get("call_id")
            if not isinstance(uid, (str, type(None))):
                raise APIError(400, f"{where}.call_id: expected a string", param="input")
            msgs.append({"role": "tool", "tool_call_id": uid, "name": names.get(uid, ""), "content": text})
            shown += images
        elif kind == "reasoning":
            thought = "".join(c.get("text") or "" for c in item.get("content") or [] if isinstance(c, dict))
            continue
        else:
            raise APIError(400, f"{where}: unsupported input item type {kind!r}", param="input")
        if thought and msgs[-1]["role"] == "assistant":  # a reasoning item goes with the reply after it
            msgs[-1]["reasoning_content"], thought = thought, None
    return msgs + ([{"role": "user", "content": shown}] if shown else [])


def _function(t: dict, prefix: str = "") -> dict:
    fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
    if prefix and isinstance(fn.get("name"), str):
        fn["name"] = prefix + fn["name"]
    return {"type": "function", "function": fn}


def _custom(t: dict, prefix: str = "") -> dict:
    """A custom (freeform) tool as a function of one string (`custom_tools`)."""
    name = prefix + t["name"] if isinstance(t.get("name"), str) else None
    return custom_tools.declaration(name, t.get("description"), t.get("format"))


def _tools(tools) -> list[dict] | None:
    """Function and custom tools as Chat Completions declarations.  A namespace's
    functions are declared as `namespace.name` (their calls carry `namespace` again,
    `_call_item`); a custom tool as a function of one string (`_custom`). OpenAI's
    hosted tools (web search, file search, code interpreter, ...) are left out:
    nothing here runs them, and clients such as Codex always send one."""
    out = []
    for i, t in enumerate(tools or []):
        if not isinstance(t, dict):
            raise APIError(400, f"tools[{i}]: expected a tool object", param="tools")
        if t.get("type") == "function":
            out.append(_function(t))
        elif t.get("type") == "custom":
            out.append(_custom(t))
        elif t.get("type") == "namespace" and isinstance(t.get("name"), str):
            for f in t.get("tools") or []:
                if isinstance(f, dict) and f.get("type") in ("function", "custom"):
                    out.append((_function if f["type"] == "function" else _custom)(f, t["name"] + "."))
    return out or None


def tool_names(tools, kind: str) -> list[str]:
    """The names of a request's tools of one type (namespace, custom) as declared: a
    namespace's own as `namespace.name`."""
    names = []
    for t in tools or []:
        if isinstance(t, dict) and t.get("type") == kind and isinstance(t.get("name"), str):
            names.append(t["name"])
        if isinstance(t, dict) and t.get("type") == "namespace" and isinstance(t.get("name"), str):
            names += [f"{t['name']}.{n}" for n in tool_names(t.get("tools"), kind)]
    return names


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") in ("function", "custom"):
        return {"type": "function", "function": {"name": choice.get("name")}}
    if isinstance(choice, dict):
        raise APIError(400, f"tool_choice: unsupported type {choice.get('type')!r}", param="tool_choice")
    return choice


def _response_format(text: dict | None) -> dict | None:
    """`text.format` as Chat Completions' `response_format`."""
    fmt = (text or {}).get("format") or {}
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise APIError(400, f"text.format: unsupported type {kind!r}", param="text")


@malformed_is_400
def conversation(body: ResponsesRequest, prompter, past: tuple[list, list] | None = None):
    """(the conversation without instructions, for `Kept`; the `Conversation` to answer).
    past: a kept response's (messages, media), which the input continues."""
    if (body.model_extra or {}).get("conversation"):  # would silently lose the earlier turns
        why = "conversation: the Conversations API is not served here; send the whole input or use previous_response_id"
        raise APIError(400, why, param="conversation")
    msgs, media = past or ([], [])
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    msgs += _messages(items, prompter, media)
    if not msgs:
        raise APIError(400, "input: no message to answer (only reasoning items?)", param="input")
    history = list(msgs)
    if body.instructions:  # the system prompt, before the input's own (one system turn)
        first = msgs[0] if msgs and msgs[0]["role"] == "system" else None
        joined = body.instructions + ("\n\n" + first["content"] if first else "")
        msgs = [{"role": "system", "content": joined}, *(msgs[1:] if first else msgs)]
    msgs, prefill = split_prefill(msgs)
    try:
        check_roles(msgs)
    except APIError as e:  # it counts Chat Completions messages: say what they are here
        raise APIError(400, f"input, read as a conversation ({_ORDER}): {e.message}", param="input") from None
    effort = (body.reasoning or {}).get("effort")
    choice = _tool_choice(body.tool_choice)
    tools = select_tools(_tools(body.tools), choice)
    fmt = _response_format(body.text)
    thinking = effort not in (None, "none", "minimal")
    return history, Conversation(msgs, media, tools, thinking, choice, fmt, prefill, body.thinking_token_budget)


def kept_reply(history: list, prefill: str, output: list[dict]) -> list[dict]:
    """The conversation with the reply (its output items) as an assistant message."""
    reply = {"role": "assistant", "content": prefill}
    for item in output:
        if item["type"] == "message":
            reply["content"] += "".join(p["text"] for p in item["content"])
        elif item["type"] == "reasoning":
            reply["reasoning_content"] = "".join(p["text"] for p in item["content"])
        else:
            reply.setdefault("tool_calls", []).append(_call(item, "output"))
    return (history[:-1] if prefill else history) + [reply]  # a prefill is the reply's start
