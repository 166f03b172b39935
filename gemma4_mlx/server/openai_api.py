"""The OpenAI API: /v1/chat/completions and /v1/completions (plain and streamed)."""

from __future__ import annotations

import json

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from gemma4_mlx.constrain.tools import INPUT_FORMAT
from gemma4_mlx.server import custom_tools
from gemma4_mlx.server.errors import APIError, error_body, malformed_is_400, text_field
from gemma4_mlx.server.prompts import (
    Conversation,
    check_roles,
    choices,
    split_prefill,
)
from gemma4_mlx.server.results import (
    KEEP_ALIVE,
    Result,
    chat_logprobs,
    collect_all,
    completion_logprobs,
    failure,
    merged,
    new_id,
    now,
    opened_all,
    total_usage,
    ttft,
    with_heartbeats,
)
from gemma4_mlx.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from gemma4_mlx.server.tool_choice import select_tools

_FINISH = {"tool_calls": "tool_calls", "length": "length"}


def _text(content, where: str) -> str:
    """The text of string-or-parts content (system, assistant, tool messages)."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, p in enumerate(content):
        if p.get("type") not in ("text", "input_text", "output_text"):
            raise APIError(400, f"{where}.content[{j}]: only text parts are allowed here", param="messages")
        parts.append(text_field(p, f"{where}.content[{j}]"))
    return "".join(parts)


def _user_content(content, where: str, prompter, media: list):
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, p in enumerate(content):
        kind = p.get("type")
        if kind in ("text", "input_text"):
            parts.append({"type": "text", "text": text_field(p, f"{where}.content[{j}]")})
        elif kind == "image_url":
            ref = p.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise APIError(400, f"{where}.content[{j}].image_url: no url", param="messages")
            prompter.add_image(media, url, f"{where}.content[{j}]")
            parts.append({"type": "image"})
        elif kind == "input_audio":
            prompter.add_audio(media, p, f"{where}.content[{j}]")
            parts.append({"type": "audio"})
        else:
            raise APIError(400, f"{where}.content[{j}]: unsupported content part type {kind!r}", param="messages")
    return parts


def _message(m: ChatMessage, i: int, prompter, media: list, names: dict) -> dict:
    where = f"messages[{i}]"
    role = "system" if m.role == "developer" else m.role
    if role == "user":
        return {"role": "user", "content": _user_content(m.content, where, prompter, media)}
    out = {"role": role, "content": _text(m.content, where)}
    if role == "assistant":
        if m.reasoning_content or m.reasoning:
            out["reasoning_content"] = m.reasoning_content or m.reasoning
        if m.tool_calls:
            out["tool_calls"] = [_past_call(c, f"{where}.tool_calls[{k}]") for k, c in enumerate(m.tool_calls)]
            for c in out["tool_calls"]:
                names[c.get("id")] = (c.get("function") or {}).get("name")
    elif role == "tool":
        out["tool_call_id"] = m.tool_call_id
        out["name"] = m.name or names.get(m.tool_call_id) or ""
    return out


def _past_call(call, where: str):
    """A custom tool's past call as a call of the function it is declared as."""
    if not isinstance(call, dict) or call.get("type") != "custom":
        return call
    custom = call.get("custom") if isinstance(call.get("custom"), dict) else {}
    name, text = custom.get("name"), custom.get("input")
    if not isinstance(name, str) or not isinstance(text, str):
        raise APIError(400, f"{where}.custom: expected a name and an input (a string)", param="messages")
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": name, "arguments": custom_tools.arguments(text)},
    }


def _tools(tools) -> list | None:
    """Custom tools as the functions they are declared as (`custom_tools`); a
    function's own `input_format` is dropped (only a custom tool's format sets it)."""
    out = []
    for i, t in enumerate(tools or []):
        if isinstance(t, dict) and t.get("type") == "custom":
            custom = t.get("custom")
            if not isinstance(custom, dict) or not isinstance(custom.get("name"), str):
                raise APIError(400, f"tools[{i}].custom: expected an object with a name", param="tools")
            t = custom_tools.declaration(
                custom["name"], custom.get("description"), custom_tools.chat_format(custom.get("format"))
            )
        elif isinstance(t, dict) and isinstance(t.get("function"), dict):
            t = t | {"function": {k: v for k, v in t["function"].items() if k != INPUT_FORMAT}}
        elif isinstance(t, dict):  # a flat declaration, as some clients send
            t = {k: v for k, v in t.items() if k != INPUT_FORMAT}
        out.append(t)
    return out if tools is not None else None


def _tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "custom":
        name = (choice.get("custom") or {}).get("name") if isinstance(choice.get("custom"), dict) else None
        return {"type": "function", "function": {"name": name}}
    return choice


@malformed_is_400
def conversation(body: ChatCompletionRequest, prompter) -> Conversation:
    media, names = [], {}
    msgs = [_message(m, i, prompter, media, names) for i, m in enumerate(body.messages)]
    msgs, prefill = split_prefill(msgs)
    check_roles(msgs)
    kw = body.chat_template_kwargs or {}
    if "enable_thinking" in kw:
        thinking = bool(kw["enable_thinking"])
    else:
        thinking = body.reasoning_effort not in (None, "none", "minimal")
    choice = _tool_choice(body.tool_choice)
    tools = select_tools(_tools(body.tools), choice)
    budget = body.thinking_token_budget
    return Conversation(msgs, media, tools, thinking, choice, body.response_format, prefill, budget)


def _tool_call(call, custom: set[str]) -> dict:
    if call.name in custom:
        return {
            "id": new_id("call_"),
            "type": "custom",
            "custom": {"name": call.name, "input": custom_tools.input_text(call)},
        }
    fn = {"name": call.name, "arguments": call.arguments_json}
    return {"id": new_id("call_"), "type": "function", "function": fn}


def _usage(u) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def routes(server) -> APIRouter:
    """server: the app's `ServerState` (model name, prompter, engine, metrics)."""
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        server.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

        def build():
            conv = conversation(body, server.prompter)
            limit = body.max_completion_tokens or body.max_tokens
            lps = (body.top_logprobs or 0) if body.logprobs else None
            options = server.prompter.sampling(body)
            return server.prompter.chat_request(conv, options, limit, body.stop, lps)

        handles = server.submit_all(choices(await run_in_threadpool(build), body.n))
        custom = custom_tools.chat_names(body.tools)  # their calls are answered as custom calls
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            streams = await opened_all(handles, http)
            stream = _chat_stream(server, handles, streams, usage, body.logprobs, custom)
            return StreamingResponse(with_heartbeats(stream, KEEP_ALIVE), media_type="text/event-stream")
        results = await collect_all(handles, http, server.metrics)
        return {
            "id": new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": now(),
            "model": server.model_name,
            "choices": [_chat_choice(i, r, body.logprobs, custom) for i, r in enumerate(results)],
            "usage": _usage(total_usage([r.usage for r in results])),
        }

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        server.check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")

        def build():
            options = server.prompter.sampling(body)
            return server.prompter.raw_request(
                body.prompt, options, body.max_tokens, body.stop, body.ignore_eos, body.logprobs
            )

        handles = server.submit_all(choices(await run_in_threadpool(build), body.n))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            streams = await opened_all(handles, http)
            stream = _completion_stream(server, handles, streams, usage, body.logprobs is not None)
            return StreamingResponse(with_heartbeats(stream, KEEP_ALIVE), media_type="text/event-stream")
        results = await collect_all(handles, http, server.metrics)
        return {
            "id": new_id("cmpl-"),
            "object": "text_completion",
            "created": now(),
            "model": server.model_name,
            "choices": [_completion_choice(i, r, body.logprobs is not None) for i, r in enumerate(results)],
            "usage": _usage(total_usage([r.usage for r in results])),
        }

    return router


def _chat_choice(index: int, r: Result, logprobs: bool, custom: set[str]) -> dict:
    # OpenAI's shape: content is null when the reply is only tool calls
    message = {"role": "assistant", "content": None if r.tool_calls and not r.content else r.content}
    if r.reasoning:
        message["reasoning_content"] = r.reasoning
    if r.tool_calls:
        message["tool_calls"] = [_tool_call(c, custom) for c in r.tool_calls]
    choice = {"index": index, "message": message, "finish_reason": _FINISH.get(r.finish_reason, "stop")}
    if logprobs:
        choice["logprobs"] = chat_logprobs(r.logprobs)
    return choice


def _completion_choice(index: int, r: Result, logprobs: bool) -> dict:
    lps = completion_logprobs(r.logprobs) if logprobs else None
    return {"index": index, "text": r.content, "logprobs": lps, "finish_reason": _FINISH.get(r.finish_reason, "stop")}


async def _chat_stream(server, handles, streams, include_usage: bool, logprobs: bool, custom: set[str]):
    """custom: the custom tools' names; a call of one streams its input whole when it
    ends (the parser's pieces are the arguments' JSON, not the input's text)."""
    base = {"id": new_id("chatcmpl-"), "object": "chat.completion.chunk", "created": now(), "model": server.model_name}

    def chunk(i: int, delta: dict, finish=None, lps=None) -> str:
        choice = {"index": i, "delta": delta, "finish_reason": finish}
        if lps is not None:
            choice["logprobs"] = chat_logprobs(lps)
        return _sse({**base, "choices": [choice]})

    for i in range(len(streams)):
        yield chunk(i, {"role": "assistant", "content": ""})
    calls, usages = [0] * len(streams), []  # calls: each choice's calls ended so far
    opened = [False] * len(streams)  # whether each choice's open call is a custom tool's
    async for i, out in merged(streams, handles):
        if out.kind == "error":  # after the stream started: a late client error keeps its status
            e = failure(out)
            yield _sse(error_body("/v1/chat/completions", e.status, e.message, e.param))
            return
        if out.kind == "done":
            server.metrics.record(out.usage, ttft(handles[i]))
            usages.append(out.usage)
            yield chunk(i, {}, _FINISH.get(out.finish_reason, "stop"))
            continue
        ev = out.event
        if ev.type == "content":
            yield chunk(i, {"content": ev.text}, lps=(out.logprobs or []) if logprobs else None)
        elif ev.type == "reasoning":
            yield chunk(i, {"reasoning_content": ev.text})
        elif ev.type == "tool_call_start":  # its name; then its arguments' pieces; then it ends
            head, opened[i] = {"index": calls[i], "id": new_id("call_")}, ev.call.name in custom
            if opened[i]:
                custom_call = {"name": ev.call.name, "input": ""}
                yield chunk(i, {"tool_calls": [{**head, "type": "custom", "custom": custom_call}]})
            else:
                fn = {"name": ev.call.name, "arguments": ""}
                yield chunk(i, {"tool_calls": [{**head, "type": "function", "function": fn}]})
        elif ev.type == "tool_call_delta" and not opened[i]:
            yield chunk(i, {"tool_calls": [{"index": calls[i], "function": {"arguments": ev.text}}]})
        elif ev.type == "tool_call":
            if opened[i]:
                yield chunk(
                    i, {"tool_calls": [{"index": calls[i], "custom": {"input": custom_tools.input_text(ev.call)}}]}
                )
            calls[i] += 1
    if include_usage and len(usages) == len(streams):
        yield _sse({**base, "choices": [], "usage": _usage(total_usage(usages))})
    yield "data: [DONE]\n\n"


async def _completion_stream(server, handles, streams, include_usage: bool, logprobs: bool):
    base = {"id": new_id("cmpl-"), "object": "text_completion", "created": now(), "model": server.model_name}

    def chunk(i: int, text: str, finish=None, lps=None) -> str:
        lp = completion_logprobs(lps or []) if logprobs and not finish else None
        return _sse({**base, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]})

    usages = []
    async for i, out in merged(streams, handles):
        if out.kind == "error":
            e = failure(out)
            yield _sse(error_body("/v1/completions", e.status, e.message, e.param))
            return
        if out.kind == "done":
            server.metrics.record(out.usage, ttft(handles[i]))
            usages.append(out.usage)
            yield chunk(i, "", _FINISH.get(out.finish_reason, "stop"))
            continue
        yield chunk(i, out.event.text, lps=out.logprobs)
    if include_usage and len(usages) == len(streams):
        yield _sse({**base, "choices": [], "usage": _usage(total_usage(usages))})
    yield "data: [DONE]\n\n"
