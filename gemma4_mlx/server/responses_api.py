"""OpenAI's Responses API: POST /v1/responses (plain and streamed).

A request's `input` becomes the same conversation the Chat Completions endpoint
builds (`responses_input`), so it renders, batches, caches and parses the same way.
Responses are kept in memory (the last `KEPT_RESPONSES`, unless `store: false`) for
`previous_response_id`: the earlier conversation and its reply go before the new
input, whose cached prefix the engine then reuses. docs/serving.md §5.2.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from gemma4_mlx.server import custom_tools
from gemma4_mlx.server.errors import APIError
from gemma4_mlx.server.responses_input import conversation, kept_reply, tool_names
from gemma4_mlx.server.results import (
    KEEP_ALIVE,
    Result,
    collect,
    failure,
    new_id,
    now,
    opened,
    ttft,
    with_heartbeats,
)
from gemma4_mlx.server.schemas import ResponsesRequest

KEPT_RESPONSES = 256
KEPT_BYTES = 1 << 30  # text and decoded images / audio the kept responses may hold, all together


def _weight(msgs: list, media: list) -> int:
    """Memory a kept conversation holds: its text (as JSON: reasoning items and call
    ids count too, though they never reach the prompt) and its decoded media (images
    as RGB)."""
    total = len(json.dumps(msgs, ensure_ascii=False, default=str))
    for _, item in media:
        size = getattr(item, "size", None)
        total += size[0] * size[1] * 3 if isinstance(size, tuple) else int(getattr(item, "nbytes", 0))
    return total


class Kept:
    """The last responses' conversations (messages without the instructions, the
    reply included, and their decoded media), for `previous_response_id`; least
    recently used first out, at most `size` of them and `budget` bytes of text and
    media."""

    def __init__(self, size: int = KEPT_RESPONSES, budget: int = KEPT_BYTES):
        self.size, self.budget, self.items, self.lock = size, budget, OrderedDict(), threading.Lock()
        self.held = 0  # the weight of what is kept

    def get(self, rid: str) -> tuple[list, list]:
        with self.lock:
            if rid not in self.items:
                why = f"previous_response_id: no response {rid!r} is kept here (the last {self.size}, in memory)"
                raise APIError(400, why, param="previous_response_id")
            self.items.move_to_end(rid)
            msgs, media, _ = self.items[rid]
        return list(msgs), list(media)

    def put(self, rid: str, msgs: list, media: list) -> None:
        weight = _weight(msgs, media)
        if weight > self.budget:  # not kept: a later previous_response_id is told so
            return
        with self.lock:
            self.items[rid] = (msgs, media, weight)  # response ids are new: never a replacement
            self.held += weight
            while len(self.items) > self.size or self.held > self.budget:
                self.held -= self.items.popitem(last=False)[1][2]


# -- the response ------------------------------------------------------------------


def _usage(u) -> dict:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def _reasoning_item(text: str, item_id: str | None = None, summarize: bool = False) -> dict:
    """summarize: the request asked for `reasoning.summary`; the whole thought is its
    summary (clients that read only summaries see it too)."""
    content = [{"type": "reasoning_text", "text": text}] if text else []
    summary = [{"type": "summary_text", "text": text}] if text and summarize else []
    return {"type": "reasoning", "id": item_id or new_id("rs_"), "summary": summary, "content": content}


def _summarize(reasoning: dict | None) -> bool:
    """Whether a request's `reasoning` asks for a summary."""
    return bool((reasoning or {}).get("summary"))


def _message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict:
    content = [] if text is None else [_text_part(text)]
    return {
        "type": "message",
        "id": item_id or new_id("msg_"),
        "role": "assistant",
        "status": status,
        "content": content,
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call, tools) -> dict:
    """A function_call item, or for a custom tool (`tools`: the request's) a
    custom_tool_call; a call of `namespace.name` names its namespace apart."""
    status, name = "incomplete" if call.truncated else "completed", call.name
    space = next((n for n in tool_names(tools, "namespace") if name.startswith(n + ".")), None)
    named = {"name": name[len(space) + 1 :], "namespace": space} if space else {"name": name}
    if name in tool_names(tools, "custom"):
        item = {"type": "custom_tool_call", "id": new_id("ctc_"), "call_id": new_id("call_")}
        return item | named | {"input": custom_tools.input_text(call), "status": status}
    item = {"type": "function_call", "id": new_id("fc_"), "call_id": new_id("call_")}
    return item | named | {"arguments": call.arguments_json, "status": status}


def _envelope(server, body: ResponsesRequest, rid: str, created: int) -> dict:
    """The response object without output and usage (as `response.created` shows it)."""
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "model": server.model_name,
        "output": [],
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": True,
        "previous_response_id": body.previous_response_id,
        "reasoning": body.reasoning,
        "store": body.store is not False,
        "temperature": body.temperature,
        "text": body.text or {"format": {"type": "text"}},
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "top_p": body.top_p,
        "truncation": "disabled",
        "usage": None,
        "error": None,
        "incomplete_details": None,
    }


def _finished(envelope: dict, output: list, usage, finish_reason: str) -> dict:
    done = dict(envelope, output=output, usage=_usage(usage), completed_at=now())
    if finish_reason == "length":
        return done | {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    return done | {"status": "completed"}


def _output(r: Result, summarize: bool, tools) -> list[dict]:
    out = [_reasoning_item(r.reasoning, summarize=summarize)] if r.reasoning else []
    if r.content or not r.tool_calls:  # a message cut at max_output_tokens is incomplete, as OpenAI's
        out.append(_message_item(r.content, status="incomplete" if r.finish_reason == "length" else "completed"))
    return out + [_call_item(c, tools) for c in r.tool_calls]


def routes(server) -> APIRouter:
    router = APIRouter()
    kept = Kept()

    @router.post("/v1/responses")
    async def responses(body: ResponsesRequest, http: HTTPRequest):
        server.check_model(body.model)
        past = kept.get(body.previous_response_id) if body.previous_response_id else None
        built = {}

        def build():
            built["history"], conv = conversation(body, server.prompter, past)
            built["prefill"], built["media"] = conv.prefill, conv.media
            return server.prompter.chat_request(conv, server.prompter.sampling(body), body.max_output_tokens, None)

        handle = server.submit(await run_in_threadpool(build))
        envelope = _envelope(server, body, new_id("resp_"), now())

        def keep(output: list[dict]) -> None:
            if body.store is not False:
                kept.put(envelope["id"], kept_reply(built["history"], built["prefill"], output), built["media"])

        if body.stream:
            outs = await opened(handle, http)
            stream = with_heartbeats(_stream(server, handle, outs, envelope, keep), KEEP_ALIVE)
            return StreamingResponse(stream, media_type="text/event-stream")
        r = await collect(handle, http, server.metrics)
        output = _output(r, _summarize(body.reasoning), body.tools)
        keep(output)
        return _finished(envelope, output, r.usage, r.finish_reason)

    return router


class _Events:
    """Numbered server-sent events."""

    def __init__(self):
        self.n = 0

    def __call__(self, kind: str, **data: Any) -> str:
        self.n += 1
        payload = {"type": kind, "sequence_number": self.n, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(server, handle, outs, envelope: dict, keep):
    """Responses' event stream: each reasoning, message or function-call segment is an
    output item opened, filled by deltas and closed; then the whole response."""
    ev, output, item = _Events(), [], None  # item: the open segment (kind, id, text)
    call = None  # the function_call item whose arguments are streaming
    summarize = _summarize(envelope["reasoning"])
    yield ev("response.created", response=envelope)
    yield ev("response.in_progress", response=envelope)
    async for out in outs:
        if out.kind == "error":  # after the stream started: a late client error keeps its message
            e = failure(out)
            code = "server_error" if e.status >= 500 else "invalid_request_error"
            yield ev("error", code=code, message=e.message, param=e.param)
            return
        if out.kind == "done":
            server.metrics.record(out.usage, ttft(handle))
            for e in _close(ev, item, output, summarize, out.finish_reason == "length"):
                yield e
            final = _finished(envelope, output, out.usage, out.finish_reason)
            keep(output)
            yield ev("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
            return
        e = out.event
        if item is not None and (e.type != item[0] or e.type.startswith("tool_call")):
            for x in _close(ev, item, output, summarize):
                yield x
            item = None
        if e.type.startswith("tool_call"):
            events, call = _function_call(ev, e, call, output, envelope["tools"])
            for x in events:
                yield x
            continue
        if item is None:
            item = [e.type, new_id("rs_" if e.type == "reasoning" else "msg_"), ""]
            for x in _open(ev, item, len(output)):
                yield x
        item[2] += e.text
        kind = "response.reasoning_text.delta" if e.type == "reasoning" else "response.output_text.delta"
        extra = {} if e.type == "reasoning" else {"logprobs": []}
        yield ev(kind, item_id=item[1], output_index=len(output), content_index=0, delta=e.text, **extra)


def _open(ev, item, index: int) -> list[str]:
    kind, item_id, _ = item
    if kind == "reasoning":
        return [ev("response.output_item.added", output_index=index, item=_reasoning_item("", item_id))]
    added = ev("response.output_item.added", output_index=index, item=_message_item(None, item_id, "in_progress"))
    part = ev("response.content_part.added", item_id=item_id, output_index=index, content_index=0, part=_text_part(""))
    return [added, part]


def _close(ev, item, output: list, summarize: bool, cut: bool = False) -> list[str]:
    """The events that end the open segment, which joins `output` (cut: by
    max_output_tokens, a message then being incomplete)."""
    if item is None:
        return []
    kind, item_id, text = item
    at = dict(item_id=item_id, output_index=len(output), content_index=0)
    if kind == "reasoning":
        done = _reasoning_item(text, item_id, summarize)
        events = [ev("response.reasoning_text.done", text=text, **at)]
    else:
        done = _message_item(text, item_id, "incomplete" if cut else "completed")
        events = [
            ev("response.output_text.done", text=text, logprobs=[], **at),
            ev("response.content_part.done", part=_text_part(text), **at),
        ]
    output.append(done)
    return [*events, ev("response.output_item.done", output_index=at["output_index"], item=done)]


def _function_call(ev, e, call: dict | None, output: list, tools) -> tuple[list[str], dict | None]:
    """The events of a parser's tool_call_start / _delta / tool_call event `e` (a call's
    start, its arguments' pieces, its end), and the call item open after it. A custom
    tool's input is text, not the JSON the pieces are of: it comes whole at the end."""
    if e.type == "tool_call_start":
        opened = _call_item(e.call, tools)
        opened |= {"status": "in_progress", "input" if opened["type"] == "custom_tool_call" else "arguments": ""}
        return [ev("response.output_item.added", output_index=len(output), item=opened)], opened
    at, custom = dict(item_id=call["id"], output_index=len(output)), call["type"] == "custom_tool_call"
    if e.type == "tool_call_delta":
        return ([] if custom else [ev("response.function_call_arguments.delta", delta=e.text, **at)]), call
    done = _call_item(e.call, tools) | {"id": call["id"], "call_id": call["call_id"]}
    output.append(done)
    if custom:
        events = [
            ev("response.custom_tool_call_input.delta", delta=done["input"], **at),
            ev("response.custom_tool_call_input.done", input=done["input"], **at),
        ]
    else:
        events = [ev("response.function_call_arguments.done", arguments=done["arguments"], name=done["name"], **at)]
    return [*events, ev("response.output_item.done", output_index=at["output_index"], item=done)], None
