"""A multi-turn chat session that keeps its KV cache across turns.

Each turn renders the whole conversation with the checkpoint's template (or our
renderer), keeps the longest prefix the cache already holds, rolls the cache
back to it if needed (thoughts of earlier turns are dropped from history), and
prefills only the rest — also when the history is longer than the sliding window.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from gemma4_mlx.cache.prefix import sync_prefix
from gemma4_mlx.chat.conversation import (
    STOP_STRINGS,
    channel_ids,
    encode_conversation,
    render_conversation,
    stop_ids,
)
from gemma4_mlx.chat.saved import read_chat, save_chat
from gemma4_mlx.checkpoint.memory import slack_tokens
from gemma4_mlx.checkpoint.prompt_cache import load_prompt_cache
from gemma4_mlx.constrain import Grammar, bind, constraint_from_response_format
from gemma4_mlx.constrain.tools import tool_call_grammar
from gemma4_mlx.media.prepare import has_media, media_items, processor_for, user_content
from gemma4_mlx.prompt.output_text import OutputText
from gemma4_mlx.prompt.parser import Event, ParseResult, ToolCall, parser_for_prompt
from gemma4_mlx.prompt.template import tool_result_content, tool_schema
from gemma4_mlx.prompt.tokens import PromptCodec
from gemma4_mlx.runtime.generate import SamplingOptions, Stats, generate_tokens
from gemma4_mlx.speculative.loop import SpecStats, speculative_generate_tokens
from gemma4_mlx.speculative.policy import DraftPolicy

__all__ = ["STOP_STRINGS", "Chat", "Reply", "ReplyEvent", "ToolRun"]


def _act_bytes(model) -> int:
    """Bytes per activation element: the KV cache's float dtype (the final norm's)."""
    return model.model.norm.weight.dtype.size


@dataclass
class ToolRun:
    """What became of one tool call.  status: "ran", "failed" (the function raised),
    "unknown_tool", "declined", "malformed" (no name, unparseable or truncated) or
    "round_limit" (the tool loop ended first); result: what the model was given."""

    call: ToolCall
    status: str
    result: Any = None

    @property
    def detail(self) -> str:
        """Why a call was not run, in a few words ("" when it ran)."""
        c = self.call
        if self.status == "malformed":
            why = ["no function name"] * (not c.name) + ["cut off"] * c.truncated + c.warnings
            return f"malformed tool call ({'; '.join(why) or c.error})"
        return {
            "unknown_tool": f"unknown tool {c.name!r}",
            "declined": "declined",
            "round_limit": "the tool loop's round limit was reached",
            "failed": f"failed: {self.result.get('error') if isinstance(self.result, dict) else self.result}",
        }.get(self.status, "")


@dataclass
class Reply:
    text: str
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    stats: Stats | None = None
    tool_runs: list[ToolRun] = field(default_factory=list)  # `run`: every call of the turn's tool loop


class Chat:
    """`send(text) -> Reply`; `stream(text)` yields parser events, then a final
    Event("reply") whose `.reply` holds the Reply."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: str | None = None,
        thinking: bool = False,
        tools: Sequence[Callable] = (),
        max_tokens: int = 1024,
        options: SamplingOptions | None = None,
        max_rollback: int | str = 2048,
        thinking_budget: int | None = None,
        drafter=None,
        draft_tokens: int | str = "auto",
        strict_tools: bool = False,
        response_format=None,
        kv_bits: int | None = None,
    ):
        """thinking_budget: characters of reasoning after which `<channel|>` is
        injected so the model moves on to its answer (None: unlimited).
        drafter: an MTP drafter (`load_drafter`): speculative decoding, same replies.
        strict_tools: an answer is free text or calls of the declared tools only, whose
        arguments follow the tools' schemas (docs/structured-output.md §5).
        response_format: the default of `send`'s (every turn's answer); checked now.
        kv_bits: 8 or 4 keep the conversation's KV cache quantized (docs/kv-cache.md);
        turns reuse it exactly as a float one.
        max_rollback: the rollback slack every sliding layer keeps so that a turn can go
        back that far exactly (a regenerated reply, dropped thoughts): tokens, or a
        memory budget for this model ("256MB", "1GB"; docs/kv-cache.md §5).  Going back
        further re-prefills the conversation: still exact, slower."""
        _check_arguments(model, tokenizer, tools, options, drafter)
        self.model, self.tokenizer = model, tokenizer
        self.system, self.thinking = system, thinking
        self.functions = {f.__name__: f for f in tools}
        self.max_tokens, self.options = max_tokens, options or SamplingOptions()
        self.kv_bits = kv_bits
        # tokens, or a byte budget ("512MB") turned into tokens for this model and kv_bits
        self.max_rollback = slack_tokens(model.config, max_rollback, _act_bytes(model), kv_bits)
        self.thinking_budget = thinking_budget
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self.strict_tools = strict_tools
        # the draft-length policy learns across turns; a wrong value is refused now, not at the first send
        self._policy = DraftPolicy.for_setting(draft_tokens)
        self._streaming: Iterator[Event] | None = None  # the last stream(), until the next turn
        self._reader: int | None = None  # the thread reading it
        self._stop_asked = threading.Event()  # stop() from another thread: the reader ends the reply
        self.messages: list[dict] = []
        self.prefilled_last = 0  # tokens prefilled by the latest turn (cache reuse is visible here)
        self._stop_ids = stop_ids(model, tokenizer)
        self._close_id = tokenizer.convert_tokens_to_ids("<channel|>")
        self._channel = channel_ids(tokenizer)  # (open, close): a thought the reply opens stays free of a grammar
        self._codec = PromptCodec(tokenizer)  # message text never becomes control tokens
        self.response_format = response_format
        self._constraint(response_format)  # a schema the engine refuses: said now
        self.reset()

    # -- conversation state --------------------------------------------------
    def reset(self) -> None:
        self.messages = []
        self.media: list = []  # multimodal.Prepared of every medium so far, in prompt order
        self.cache = self._fresh_cache()
        self.cached: list = []  # per cached slot: token id, or a media key (`MediaPrompt.keys`)

    def _fresh_cache(self):
        if self.kv_bits in (None, 16):  # the models' make_cache without the new keyword
            return self.model.make_cache(max_rollback=self.max_rollback)
        return self.model.make_cache(max_rollback=self.max_rollback, kv_bits=self.kv_bits)

    @property
    def tools(self) -> list[dict] | None:
        return [tool_schema(f) for f in self.functions.values()] or None

    def prompt_text(self) -> str:
        """The rendered conversation, its text escaped (`chat.tokens`): typed control
        strings, `<|image|>` included, stay text."""
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return render_conversation(self._codec, msgs, tools=self.tools, thinking=self.thinking)

    def save(self, path: str | Path, with_cache: bool = False) -> None:
        """The conversation as JSON; with_cache: a safetensors file that also holds the
        KV cache, so `Chat.load` continues without re-prefilling (docs/kv-cache.md §8).
        Conversations with media are refused (saved chats keep text only)."""
        data = {"system": self.system, "thinking": self.thinking, "messages": self.messages}
        if not with_cache:
            save_chat(path, data)
            return
        data["max_rollback"] = self.max_rollback
        save_chat(path, data, self.model, self.cache, self.cached)

    @classmethod
    def load(cls, path: str | Path, model, tokenizer, **kwargs) -> Chat:
        """A chat `save` wrote: its conversation and, when saved with the cache, the
        cache itself — refused (`CacheFileError`, one line) if made for another model,
        dtype or kv_bits.  kwargs: Chat's options; system, thinking, kv_bits and
        max_rollback default to the saved ones."""
        rollback = kwargs.get("max_rollback")
        if isinstance(rollback, str):  # a memory budget ("256MB"): the cache is read with its tokens
            rollback = kwargs["max_rollback"] = slack_tokens(
                model.config, rollback, _act_bytes(model), kwargs.get("kv_bits")
            )
        saved = read_chat(path, model, kwargs.get("kv_bits", "saved"), rollback)
        settings = {"system": saved.data.get("system"), "thinking": saved.data.get("thinking", False)}
        if saved.cache is not None:
            w = next(iter(saved.cache.writers()))
            settings.update(kv_bits=w.kv_bits, max_rollback=saved.data.get("max_rollback", 2048))
        chat = cls(model, tokenizer, **{**settings, **kwargs})
        chat.messages = list(saved.data["messages"])
        if saved.cache is not None:
            chat.cache, chat.cached = saved.cache, saved.keys
        return chat

    def use_prompt_cache(self, path: str | Path) -> int:
        """Start from a prompt cache file (`api.cache_prompt`, or a chat saved with its
        cache): the next turn reuses the longest prefix it shares with the file's
        tokens.  Returns the tokens the file holds; `CacheFileError` for a file made
        for another model, dtype or kv_bits."""
        saved = load_prompt_cache(path, self.model, kv_bits=self.kv_bits, max_rollback=self.max_rollback)
        self.cache, self.cached = saved.cache, saved.keys
        return len(saved.keys)

    # -- the cache -----------------------------------------------------------
    def _sync(self, keys: list) -> int:
        """Roll the cache back to the longest prefix it shares with `keys` (token ids,
        media keys at placeholders: the same ids with another image do not match);
        return where prefilling starts (`conversation.sync_prefix`)."""
        self.cache, n = sync_prefix(self.cache, self.cached, keys, self._fresh_cache)
        self.cached = keys[:n]
        return n

    def _add_user_turn(self, text, images, audio, videos, image_budget) -> None:
        """Append the user message; media are processed first, so bad media raise
        (`MediaError`, one line) and leave the conversation as it was."""
        items, prepared = [], []
        if has_media(images, audio, videos):
            items = media_items(images, audio, videos, image_budget)
            mp = processor_for(self.model)
            prepared = [mp.prepare(m) for m in items]  # raises before anything changes
        if text is not None or items:
            self.messages.append({"role": "user", "content": user_content(text, items)})
            self.media.extend(prepared)

    def _prompt_ids(self, prompt: str):
        """(ids, cache keys, MediaPrompt or None) of the rendered conversation."""
        return encode_conversation(self.model, self._codec, prompt, self.media)

    def _constraint(self, response_format):
        """This turn's constraint (None: free), on the answer only when thinking
        (docs/structured-output.md §4); a bad format raises before the turn starts."""
        response_format = self.response_format if response_format is None else response_format
        if isinstance(response_format, Grammar):
            spec = response_format
        else:
            spec = constraint_from_response_format(response_format)
        if spec is None and self.strict_tools and self.functions:
            spec = tool_call_grammar(list(self.functions.values()), self.tokenizer.convert_tokens_to_ids)
        if spec is None:
            return None
        c = bind(spec, self.tokenizer, self.model.config.vocab_size, self._stop_ids)
        if self._channel:  # thinking on or off, a thought the reply opens with stays free
            return c.thought_optional(*self._channel)
        return c.answer_only(self._close_id) if self.thinking else c

    # -- generation ----------------------------------------------------------
    def stream(
        self,
        text: str | None = None,
        images=None,
        audio=None,
        videos=None,
        image_budget: int | None = None,
        response_format=None,
    ) -> Iterator[Event]:
        """images / audio / videos: paths, arrays, PIL images or `gemma4_mlx.Image/
        Audio/Video`, placed before the text of this user turn; image_budget: soft
        tokens per image (70, 140, 280, 560 or 1120; default from the checkpoint).
        response_format: the answer's shape, an OpenAI-style dict ({"type":
        "json_schema", "json_schema": {"schema": ...}}, json_object, regex, grammar)
        or a `constrain.Grammar`.

        A reply left unfinished (an app kept the iterator and stopped reading) ends
        when the next turn starts, as `stop()` ends it."""
        self.stop()
        self._stop_asked.clear()
        self._streaming = self._turn(text, images, audio, videos, image_budget, response_format)
        return self._streaming

    def stop(self) -> None:
        """End the reply being streamed, if any (a stop button): what it said so far
        stays in the conversation as the assistant's turn, and its iterator ends.
        Called from another thread than the one reading the stream (a UI's button), it
        asks: the reading thread ends the reply after the token it is on (MLX work
        stays on that thread)."""
        if self._streaming is None:
            return
        if self._closable_here(self._streaming):
            self._streaming.close()
            self._streaming = None
        else:
            self._stop_asked.set()

    def _closable_here(self, stream) -> bool:
        """Whether this thread may end `stream` now: not started, or paused between
        events on this very thread."""
        state = inspect.getgeneratorstate(stream)
        mine = self._reader == threading.get_ident() and state == inspect.GEN_SUSPENDED
        return state in (inspect.GEN_CREATED, inspect.GEN_CLOSED) or mine

    def _turn(self, text, images, audio, videos, image_budget, response_format) -> Iterator[Event]:
        self._reader = threading.get_ident()
        constraint = self._constraint(response_format)
        n_msgs, n_media = len(self.messages), len(self.media)
        self._add_user_turn(text, images, audio, videos, image_budget)
        try:
            prompt = self.prompt_text()
            ids, keys, mprompt = self._prompt_ids(prompt)
            start = self._sync(keys)
            media = None if mprompt is None else mprompt.rows(start)  # encodes what is new
        except BaseException:  # bad media, Ctrl-C while encoding: this turn is undone
            del self.messages[n_msgs:], self.media[n_media:]
            raise
        new = ids[start:]
        self.prefilled_last = len(new)
        parser = parser_for_prompt(prompt, self.tools, thinking_budget=self.thinking_budget, guarded=True)
        spec = SpecStats() if self.drafter is not None else None
        stats, generated = Stats(speculative=spec, prompt_cached=start), []  # cached: earlier turns or a file
        text = OutputText(self.tokenizer)  # a fresh detokenizer; control tokens only read as control strings
        mx.reset_peak_memory()
        try:
            pending, calls = new, 0
            while pending:
                close_thought, calls = False, calls + 1
                part = Stats(speculative=stats.speculative)  # this generate call's
                for tok in self._tokens(pending, self.max_tokens - len(generated), part, media, constraint):
                    generated.append(tok)
                    for ev in parser.feed(text.add(tok)):
                        close_thought |= ev.type == "thinking_budget"
                        yield ev
                    if parser.done or tok in self._stop_ids or close_thought or self._stop_asked.is_set():
                        break
                _add_stats(stats, part, continuation=calls > 1)
                pending = []
                more = len(generated) < self.max_tokens and not self._stop_asked.is_set()
                if close_thought and self._close_id is not None and more:
                    # Thinking budget spent: close the thought channel ourselves and
                    # let the model go on with its answer in the same turn.
                    generated.append(self._close_id)
                    yield from parser.feed(text.add(self._close_id))
                    pending = (ids + generated)[self.cache.offset :]
                    media = None  # the continuation holds generated tokens only
                    # the thought is closed in `pending`: the grammar starts at the output
                    constraint = None if constraint is None else constraint.answer_only(None)
            yield from parser.feed(text.finalize())
        finally:
            # The cache holds exactly `offset` slots of ids + generated (the newest
            # sampled token is not fed yet; an interrupt may leave one queued step).
            stats.peak_memory_gb = mx.get_peak_memory() / 1e9
            self.cached = (keys + generated)[: self.cache.offset]
            events = parser.finish()
            self._record(parser.result)
        yield from events
        reply = Reply(
            parser.result.content, parser.result.reasoning, parser.result.tool_calls, parser.result.finish_reason, stats
        )
        yield ReplyEvent("reply", reply=reply)

    def _tokens(self, pending: list[int], max_tokens: int, stats: Stats, media=None, constraint=None):
        options = self.options if constraint is None else replace(self.options, constraint=constraint)
        if self.drafter is None:
            return generate_tokens(
                self.model,
                pending,
                stop_ids=self._stop_ids,
                max_tokens=max_tokens,
                options=options,
                cache=self.cache,
                stats=stats,
                media=media,
            )
        return speculative_generate_tokens(
            self.model,
            self.drafter,
            pending,
            cache=self.cache,
            stats=stats,
            spec_stats=stats.speculative,
            stop_ids=self._stop_ids,
            max_tokens=max_tokens,
            options=options,
            policy=self._policy,
            media=media,
        )

    def _record(self, r: ParseResult) -> None:
        msg = {"role": "assistant", "content": r.content}
        if r.reasoning:
            msg["reasoning"] = r.reasoning
        if r.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in r.tool_calls
            ]
        self.messages.append(msg)

    def send(
        self,
        text: str | None = None,
        images=None,
        audio=None,
        videos=None,
        image_budget: int | None = None,
        response_format=None,
    ) -> Reply:
        """stream() to its end; response_format: see stream()."""
        reply = None
        for ev in self.stream(text, images, audio, videos, image_budget, response_format):
            if ev.type == "reply":
                reply = ev.reply
        return reply

    # -- tools ---------------------------------------------------------------
    def call_tool(self, call: ToolCall):
        return self._call(call)[1]

    def _call(self, call: ToolCall) -> tuple[bool, Any]:
        fn = self.functions.get(call.name)
        if fn is None:
            return False, {"error": f"unknown tool {call.name!r}"}
        try:
            return True, fn(**call.arguments)
        except Exception as e:  # the model sees the failure and can recover
            return False, {"error": f"{type(e).__name__}: {e}"}

    def resolve_call(self, call: ToolCall, confirm: Callable[[ToolCall], bool] | None = None) -> ToolRun:
        """Run one tool call (once `confirm(call)` says yes, when given) or say why
        not: malformed calls and unknown tools are never run, nor offered to
        `confirm`.  The result, or the reason as an error, joins the conversation."""
        if not call.name or call.error or call.truncated:
            run = ToolRun(call, "malformed")
        elif call.name not in self.functions:
            run = ToolRun(call, "unknown_tool")
        elif confirm is not None and not confirm(call):
            run = ToolRun(call, "declined", {"error": "the user declined this tool call"})
        else:
            ok, result = self._call(call)
            run = ToolRun(call, "ran" if ok else "failed", result)
        if run.result is None:
            run.result = {"error": run.detail}
        self.add_tool_result(call, run.result)
        return run

    def add_tool_result(self, call: ToolCall, result) -> None:
        """Store `result` as the templates take it: a string (JSON for structured
        values) or content parts (`template.tool_result_content`)."""
        self.messages.append(
            {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": tool_result_content(result)}
        )

    def run(self, text: str, confirm: Callable[[ToolCall], bool] | None = None, max_rounds: int = 8, **media) -> Reply:
        """send() plus the tool loop: registered functions are called (after
        `confirm(call)` says yes, when given) until the model answers in text.
        media: send()'s images / audio / videos / image_budget for this turn."""
        reply, runs = self.send(text, **media), []
        for _ in range(max_rounds):
            if not reply.tool_calls:
                break
            runs += [self.resolve_call(call, confirm) for call in reply.tool_calls]
            reply = self.send(None)
        reply.tool_runs = runs + [ToolRun(c, "round_limit") for c in reply.tool_calls]
        return reply


def _check_arguments(model, tokenizer, tools, options, drafter) -> None:
    """One line naming the argument for what `Chat` would otherwise fail on deep
    inside (`'NoneType' object has no attribute 'unk_token_id'`)."""

    def wrong(name: str, expected: str, value) -> TypeError:
        return TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r:.60}")

    if not hasattr(model, "config") or not hasattr(model, "make_cache"):
        raise wrong("model", "a model from gemma4_mlx.load (load it first)", model)
    if not hasattr(tokenizer, "encode") or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise wrong("tokenizer", "the tokenizer gemma4_mlx.load returns", tokenizer)
    for f in tools:
        if not callable(f) or not hasattr(f, "__name__"):
            raise wrong("tools", "Python functions (type hints and a docstring declare them)", f)
        tool_schema(f)  # a parameter without a type hint is refused now, not at the first send
    if options is not None and not isinstance(options, SamplingOptions):
        raise wrong("options", "gemma4_mlx.SamplingOptions(...)", options)
    if drafter is not None and not hasattr(drafter, "config"):
        raise wrong("drafter", "a drafter from gemma4_mlx.load_drafter (load it first)", drafter)


def _add_stats(total: Stats, part: Stats, continuation: bool) -> None:
    """Fold one generate call into the turn's Stats: the prompt is the first call's;
    a continuation (after an injected `<channel|>`) only feeds tokens of the reply,
    so its prefill counts as generation time."""
    if not continuation:
        total.prompt_tokens, total.prompt_time = part.prompt_tokens, part.prompt_time
    else:
        total.generation_time += part.prompt_time
    total.generation_tokens += part.generation_tokens
    total.generation_time += part.generation_time


@dataclass
class ReplyEvent(Event):
    reply: Reply | None = None
