"""The Anthropic Messages API: /v1/messages (plain and streamed) and
/v1/messages/count_tokens."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from gemma4_mlx.server.errors import APIError, error_body, malformed_is_400, text_field
from gemma4_mlx.server.handle import Usage
from gemma4_mlx.server.prompts import Conversation, check_roles, split_prefill
from gemma4_mlx.server.results import collect, failure, new_id, opened, ttft, with_heartbeats
from gemma4_mlx.server.schemas import CountTokensRequest, MessagesRequest
from gemma4_mlx.server.tool_choice import select_tools

_STOP = {"tool_calls": "tool_use", "length": "max_tokens"}


def _blocks_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    out = []
    for j, b in enumerate(content or []):
        if b.get("type") != "text":
            raise APIError(400, f"{where}[{j}]: only text blocks are allowed here ({b.get('type')!r})")
        out.append(text_field(b, where))
    return "\n".join(out)


def _image(block: dict, where: str, prompter, media: list) -> None:
    src = block.get("source") or {}
    if src.get("type") == "base64":
        url = f"data:{src.get('media_type', 'image/png')};base64,{src.get('data', '')}"
    elif src.get("type") == "url":
        url = src.get("url", "")
    else:
        raise APIError(400, f"{where}: unsupported image source {src.get('type')!r}")
    prompter.add_image(media, url, where)


def _assistant(blocks: list, where: str) -> dict:
    msg = {"role": "assistant", "content": ""}
    calls, thoughts = [], []
    for j, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "text":
            msg["content"] += text_field(b, where)
        elif kind == "thinking":
            thoughts.append(b.get("thinking") or "")
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            fn = {"name": b.get("name"), "arguments": b.get("input") or {}}
            calls.append({"id": b.get("id"), "type": "function", "function": fn})
        else:
            raise APIError(400, f"{where}[{j}]: unsupported block type {kind!r} in an assistant message")
    if thoughts:
        msg["reasoning_content"] = "\n".join(thoughts)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _user(blocks: list, where: str, prompter, media: list, names: dict) -> list[dict]:
    """Tool results become `tool` messages (first, as the API requires), the rest one user message."""
    tools, parts = [], []
    for j, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "tool_result":
            text = _blocks_text(b.get("content") or "", f"{where}[{j}].content")
            uid = b.get("tool_use_id")
            tools.append({"role": "tool", "tool_call_id": uid, "name": names.get(uid, ""), "content": text})
        elif kind == "text":
            parts.append({"type": "text", "text": text_field(b, where)})
        elif kind == "image":
            _image(b, f"{where}[{j}]", prompter, media)
            parts.append({"type": "image"})
        else:
            raise APIError(400, f"{where}[{j}]: unsupported block type {kind!r} in a user message")
    return tools + ([{"role": "user", "content": parts}] if parts else [])


def _tools(tools) -> list[dict] | None:
    if not tools:
        return None
    out = []
    for t in tools:
        fn = {"name": t.get("name"), "description": t.get("description", "")}
        fn["parameters"] = t.get("input_schema") or {"type": "object", "properties": {}}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice):
    if not choice:
        return None
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return {"auto": "auto", "any": "required", "none": "none"}.get(kind, kind)


# Anthropic's SDKs (tool runners) open a server-side thread and then send only the
# new turn; this error code makes them fall back to sending the whole conversation.
_NO_THREADS = {"error_code": "thread_unsupported_request"}


@malformed_is_400
def conversation(body: CountTokensRequest, prompter) -> Conversation:
    if (body.model_extra or {}).get("thread"):  # a continued thread's turn alone would lose the history
        why = "thread: message threads are not served here; send the whole conversation"
        raise APIError(400, why, param="thread", details=_NO_THREADS)
    msgs, media, names = [], [], {}
    if body.system:
        msgs.append({"role": "system", "content": _blocks_text(body.system, "system")})
    for i, m in enumerate(body.messages):
        where = f"messages[{i}].content"
        if m.role == "system":
            msgs.append({"role": "system", "content": _blocks_text(m.content, where)})
        elif isinstance(m.content, str):
            msgs.append({"role": m.role, "content": m.content})
        elif m.role == "assistant":
            msgs.append(_assistant(m.content, where))
            names.update({c["id"]: c["function"]["name"] for c in msgs[-1].get("tool_calls", [])})
        else:
            msgs += _user(m.content, where, prompter, media, names)
    msgs, prefill = split_prefill(msgs)
    check_roles(msgs)
    thinking = body.thinking is not None and body.thinking.type in ("enabled", "adaptive")
    budget = body.thinking.budget_tokens if thinking else None
    choice = _tool_choice(body.tool_choice)
    tools = select_tools(_tools(body.tools), choice)
    return Conversation(msgs, media, tools, thinking, choice, prefill=prefill, thinking_tokens=budget)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n"


def routes(server) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest):
        server.check_model(body.model)
        n = await run_in_threadpool(lambda: server.prompter.count(conversation(body, server.prompter)))
        return {"input_tokens": n}

    @router.post("/v1/messages")
    async def messages(body: MessagesRequest, http: HTTPRequest):
        server.check_model(body.model)

        def build():
            conv = conversation(body, server.prompter)
            return server.prompter.chat_request(
                conv, server.prompter.sampling(body), body.max_tokens, body.stop_sequences
            )

        handle = server.submit(await run_in_threadpool(build))
        if body.stream:
            outs = await opened(handle, http)
            stream = with_heartbeats(_stream(server, handle, outs), _event("ping", {}))
            return StreamingResponse(stream, media_type="text/event-stream")
        r = await collect(handle, http, server.metrics)
        content = [{"type": "thinking", "thinking": r.reasoning, "signature": ""}] if r.reasoning else []
        if r.content or not r.tool_calls:
            content.append({"type": "text", "text": r.content})
        content += [
            {"type": "tool_use", "id": new_id("toolu_"), "name": c.name, "input": json.loads(c.arguments_json)}
            for c in r.tool_calls
        ]
        return {
            "id": new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": server.model_name,
            "content": content,
            "stop_reason": "stop_sequence" if r.stop_string else _STOP.get(r.finish_reason, "end_turn"),
            "stop_sequence": r.stop_string,
            "usage": _usage(r.usage),
        }

    return router


def _usage(u) -> dict:
    return {
        "input_tokens": u.prompt_tokens - u.cached_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


_BLOCKS = {
    "reasoning": ({"type": "thinking", "thinking": "", "signature": ""}, "thinking_delta", "thinking"),
    "content": ({"type": "text", "text": ""}, "text_delta", "text"),
}


async def _stream(server, handle, outs):
    message = {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": server.model_name}
    message.update(content=[], stop_reason=None, stop_sequence=None)
    # The split of the input into cached and not is recorded just before the first
    # output, which `opened` waits for; a stream opened earlier (a prefill past
    # OPEN_WAIT) counts it all as input here, and message_delta splits it.
    message["usage"] = _usage(Usage(len(handle.request.ids), 0, handle.cached_tokens or 0))
    yield _event("message_start", {"message": message})
    blocks = _Blocks()
    async for out in outs:
        if out.kind == "error":  # after the stream started: a late client error keeps its status
            e = failure(out)
            yield _event("error", error_body("/v1/messages", e.status, e.message))
            return
        if out.kind == "done":
            server.metrics.record(out.usage, ttft(handle))
            for e in blocks.close():
                yield e
            stop = "stop_sequence" if out.stop_string else _STOP.get(out.finish_reason, "end_turn")
            delta = {"stop_reason": stop, "stop_sequence": out.stop_string}
            yield _event("message_delta", {"delta": delta, "usage": _usage(out.usage)})
            yield _event("message_stop", {})
            return
        for e in blocks.events(out.event):
            yield e


class _Blocks:
    """A streamed message's content blocks: thinking, text, tool_use. `kind` says which
    is open: reasoning, content or tool_call_start (a tool_use block: the call's start,
    its arguments' pieces, then its end; the block closes when the next one starts)."""

    def __init__(self):
        self.index, self.kind = -1, None

    def events(self, ev) -> list[str]:
        if ev.type == "tool_call_delta":
            return [self._delta({"type": "input_json_delta", "partial_json": ev.text})]
        if ev.type == "tool_call":
            return []
        out = []
        if ev.type != self.kind or ev.type == "tool_call_start":
            out += self.close()
            self.index += 1
            out.append(self._start(ev))
        if ev.type in _BLOCKS:
            _, kind, key = _BLOCKS[ev.type]
            out.append(self._delta({"type": kind, key: ev.text}))
        return out

    def _start(self, ev) -> str:
        if ev.type == "tool_call_start":
            block = {"type": "tool_use", "id": new_id("toolu_"), "name": ev.call.name, "input": {}}
        else:
            block = _BLOCKS[ev.type][0]
        self.kind = ev.type
        return _event("content_block_start", {"index": self.index, "content_block": block})

    def _delta(self, delta: dict) -> str:
        return _event("content_block_delta", {"index": self.index, "delta": delta})

    def close(self) -> list[str]:
        """The events that end the open block, if any.  A thinking block ends with its
        `signature_delta`, as Anthropic's do (empty: local thinking is not signed)."""
        if self.kind is None:
            return []
        signature = [self._delta({"type": "signature_delta", "signature": ""})] if self.kind == "reasoning" else []
        return [*signature, _event("content_block_stop", {"index": self.index})]
