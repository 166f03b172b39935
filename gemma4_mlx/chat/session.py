"""A multi-turn chat session that keeps its KV cache across turns.

Each turn renders the whole conversation with the checkpoint's template (or our
renderer), keeps the longest prefix the cache already holds, rolls the cache
back to it if needed (thoughts of earlier turns are dropped from history), and
prefills only the rest — also when the history is longer than the sliding window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import mlx.core as mx

from gemma4_mlx.runtime.generate import SamplingOptions, Stats, generate_tokens
from gemma4_mlx.prompt.parser import Event, ParseResult, ToolCall, parser_for_prompt
from gemma4_mlx.prompt.template import render, render_with_checkpoint_template, tool_result_content, tool_schema
from gemma4_mlx.prompt.tokens import PromptCodec
from gemma4_mlx.media.prepare import has_media
from gemma4_mlx.media.prepare import media_items, processor_for
from gemma4_mlx.media.prepare import user_content
from gemma4_mlx.media.prepare import processor_for
from gemma4_mlx.speculative.policy import DraftPolicy
from gemma4_mlx.speculative.loop import SpecStats, speculative_generate_tokens

STOP_STRINGS = ("<turn|>", "<|tool_response>", "<eos>")


@dataclass
class Reply:
    text: str
    thinking: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    stats: Stats | None = None


class Chat:
    """`send(text) -> Reply`; `stream(text)` yields parser events, then a final
    Event("reply") whose `.reply` holds the Reply."""

    def __init__(self, model, tokenizer, *, system: str | None = None, thinking: bool = False,
                 tools: Sequence[Callable] = (), max_tokens: int = 1024,
                 options: SamplingOptions | None = None, max_rollback: int = 2048,
                 thinking_budget: int | None = None, drafter=None,
                 draft_tokens: int | str = "auto"):
        """thinking_budget: characters of reasoning after which `<channel|>` is
        injected so the model moves on to its answer (None: unlimited).
        drafter: an MTP drafter (`load_drafter`): speculative decoding, same replies."""
        self.model, self.tokenizer = model, tokenizer
        self.system, self.thinking = system, thinking
        self.functions = {f.__name__: f for f in tools}
        self.max_tokens, self.options = max_tokens, options or SamplingOptions()
        self.max_rollback, self.thinking_budget = max_rollback, thinking_budget
        self.drafter, self.draft_tokens = drafter, draft_tokens
        self._policy = None  # the draft-length policy learns across turns
        self.messages: list[dict] = []
        self.prefilled_last = 0  # tokens prefilled by the latest turn (cache reuse is visible here)
        self._stop_ids = {i for i in (tokenizer.convert_tokens_to_ids(s) for s in STOP_STRINGS)
                          if i is not None and i != tokenizer.unk_token_id}
        self._stop_ids |= set(model.config.eos_ids)
        self._close_id = tokenizer.convert_tokens_to_ids("<channel|>")
        self._codec = PromptCodec(tokenizer)  # message text never becomes control tokens
        self.reset()

    # -- conversation state --------------------------------------------------
    def reset(self) -> None:
        self.messages = []
        self.media: list = []  # multimodal.Prepared of every medium so far, in prompt order
        self.cache = self.model.make_cache(max_rollback=self.max_rollback)
        self.cached: list = []  # per cached slot: token id, or a media key (`MediaPrompt.keys`)

    @property
    def tools(self) -> list[dict] | None:
        return [tool_schema(f) for f in self.functions.values()] or None

    def prompt_text(self) -> str:
        """The rendered conversation, its text escaped (`chat.tokens`): typed control
        strings, `<|image|>` included, stay text."""
        msgs = self._codec.escape_messages(
            ([{"role": "system", "content": self.system}] if self.system else []) + self.messages)
        tools = self._codec.escape_value(self.tools)
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            return render_with_checkpoint_template(template, msgs, tools=tools, thinking=self.thinking)
        return render(msgs, tools=tools, thinking=self.thinking)

    def save(self, path: str | Path) -> None:
        data = {"system": self.system, "thinking": self.thinking, "messages": self.messages}
        Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False, default=str))

    # -- the cache -----------------------------------------------------------
    def _sync(self, keys: list) -> int:
        """Roll the cache back to the longest prefix it shares with `keys` (token ids,
        media keys at placeholders: the same ids with another image do not match);
        return where prefilling starts."""
        n = 0
        limit = min(len(self.cached), len(keys) - 1)  # at least one token must be fed
        while n < limit and self.cached[n] == keys[n]:
            n += 1
        # never start inside a media run: its rows must be prefilled together (blocks)
        while 0 < n < len(keys) and isinstance(keys[n], tuple) and isinstance(keys[n - 1], tuple) \
                and keys[n][:2] == keys[n - 1][:2]:
            n -= 1
        drop = len(self.cached) - n
        if drop:
            try:
                self.cache.trim(drop)
            except ValueError:  # rolled back past the sliding cache's slack: start over
                self.cache = self.model.make_cache(max_rollback=self.max_rollback)
                n = 0
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
        if not self.media:
            ids = self._codec.encode(prompt)
            return ids, ids, None
        mp = processor_for(self.model)
        ids = self._codec.encode(mp.expand(prompt, self.media))
        mprompt = mp.prompt(ids, self.media)
        return ids, mprompt.keys(), mprompt

    # -- generation ----------------------------------------------------------
    def stream(self, text: str | None = None, images=None, audio=None, videos=None,
               image_budget: int | None = None) -> Iterator[Event]:
        """images / audio / videos: paths, arrays, PIL images or `multimodal.Image/
        Audio/Video`, placed before the text of this user turn; image_budget: soft
        tokens per image (70, 140, 280, 560 or 1120; default from the checkpoint)."""
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
        parser = parser_for_prompt(prompt, self.tools, thinking_budget=self.thinking_budget)
        stats, generated = Stats(), []
        detok = self.tokenizer.detokenizer
        detok.reset()
        mx.reset_peak_memory()
        try:
            pending = new
            while pending:
                close_thought = False
                for tok in self._tokens(pending, self.max_tokens - len(generated), stats, media):
                    generated.append(tok)
                    detok.add_token(tok)
                    for ev in parser.feed(detok.last_segment):
                        close_thought |= ev.type == "thinking_budget"
                        yield ev
                    if parser.done or tok in self._stop_ids or close_thought:
                        break
                pending = []
                if close_thought and self._close_id is not None and len(generated) < self.max_tokens:
                    # Thinking budget spent: close the thought channel ourselves and
                    # let the model go on with its answer in the same turn.
                    generated.append(self._close_id)
                    detok.add_token(self._close_id)
                    yield from parser.feed(detok.last_segment)
                    pending = (ids + generated)[self.cache.offset:]
                    media = None  # the continuation holds generated tokens only
            detok.finalize()
            yield from parser.feed(detok.last_segment)
        finally:
            # The cache holds exactly `offset` slots of ids + generated (the newest
            # sampled token is not fed yet; an interrupt may leave one queued step).
            stats.peak_memory_gb = mx.get_peak_memory() / 1e9
            self.cached = (keys + generated)[: self.cache.offset]
            events = parser.finish()
            self._record(parser.result)
        yield from events
        reply = Reply(parser.result.content, parser.result.reasoning, parser.result.tool_calls,
                      parser.result.finish_reason, stats)
        yield ReplyEvent("reply", reply=reply)

    def _tokens(self, pending: list[int], max_tokens: int, stats: Stats, media=None):
        if self.drafter is None:
            return generate_tokens(self.model, pending, stop_ids=self._stop_ids,
                                   max_tokens=max_tokens, options=self.options,
                                   cache=self.cache, stats=stats, media=media)
        if self._policy is None:
            self._policy = DraftPolicy.for_setting(self.draft_tokens)
        stats.speculative = stats.speculative or SpecStats()
        return speculative_generate_tokens(
            self.model, self.drafter, pending, cache=self.cache, stats=stats,
            spec_stats=stats.speculative, stop_ids=self._stop_ids, max_tokens=max_tokens,
            options=self.options, policy=self._policy, media=media)

    def _record(self, r: ParseResult) -> None:
        msg = {"role": "assistant", "content": r.content}
        if r.reasoning:
            msg["reasoning"] = r.reasoning
        if r.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in r.tool_calls]
        self.messages.append(msg)

    def send(self, text: str | None = None, images=None, audio=None, videos=None,
             image_budget: int | None = None) -> Reply:
        reply = None
        for ev in self.stream(text, images, audio, videos, image_budget):
            if ev.type == "reply":
                reply = ev.reply
        return reply

    # -- tools ---------------------------------------------------------------
    def call_tool(self, call: ToolCall):
        fn = self.functions.get(call.name)
        if fn is None:
            return {"error": f"unknown tool {call.name!r}"}
        try:
            return fn(**call.arguments)
        except Exception as e:  # the model sees the failure and can recover
            return {"error": f"{type(e).__name__}: {e}"}

    def add_tool_result(self, call: ToolCall, result) -> None:
        """Store `result` as the templates take it: a string (JSON for structured
        values) or content parts (`template.tool_result_content`)."""
        self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name,
                              "content": tool_result_content(result)})

    def run(self, text: str, confirm: Callable[[ToolCall], bool] | None = None,
            max_rounds: int = 8, **media) -> Reply:
        """send() plus the tool loop: registered functions are called (after
        `confirm(call)` says yes, when given) until the model answers in text.
        media: send()'s images / audio / videos / image_budget for this turn."""
        reply = self.send(text, **media)
        for _ in range(max_rounds):
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                ok = confirm is None or confirm(call)
                self.add_tool_result(call, self.call_tool(call) if ok else
                                     {"error": "the user declined this tool call"})
            reply = self.send(None)
        return reply


@dataclass
class ReplyEvent(Event):
    reply: Reply | None = None
