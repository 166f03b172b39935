"""From API messages to engine `Request`s, through the path `Chat` takes
(`chat.conversation`: the checkpoint's template, `PromptCodec` escaping, tool results
via `tool_result_content`), with the checks that answer 400."""

from __future__ import annotations

import base64
import binascii
import functools
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from gemma4_mlx.api import SamplingOptions
from gemma4_mlx.batching.thinking import ThinkingBudget
from gemma4_mlx.chat.conversation import (
    audio_from_bytes,
    channel_ids,
    encode_conversation,
    image_from_bytes,
    prepare_in_order,
    render_conversation,
    stop_ids,
)
from gemma4_mlx.constrain import Constraint, ConstraintError, bind, constraint_from_response_format
from gemma4_mlx.constrain.tools import INPUT_FORMAT, tool_call_grammar
from gemma4_mlx.prompt.parser import parser_for_prompt
from gemma4_mlx.prompt.template import ChatTemplateError
from gemma4_mlx.prompt.tokens import PromptCodec, encode_prompt
from gemma4_mlx.server.errors import APIError, malformed_is_400
from gemma4_mlx.server.handle import Request

DEFAULT_MAX_TOKENS = 4096
SEED_BITS = (1 << 64) - 1  # the keyed sampler reads a seed's low 64 bits
_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON's "\ud800" escapes: not Unicode, the tokenizer fails


@dataclass
class Conversation:
    """An API request's conversation in the shape `Chat` keeps (OpenAI messages, media
    parts as `{"type": "image"}` / `{"type": "audio"}` placeholders) with its media as
    (kind, source) pairs in placeholder order."""

    messages: list[dict]
    media: list = field(default_factory=list)
    tools: list[dict] | None = None
    thinking: bool = False
    tool_choice: Any = None  # OpenAI's: None, "auto", "none", "required" or a named function
    response_format: dict | None = None
    prefill: str = ""  # the reply's start, which it continues (`split_prefill`)
    thinking_tokens: int | None = None  # the request's own limit on thinking tokens


def split_prefill(messages: list[dict]) -> tuple[list[dict], str]:
    """A conversation that ends with an assistant message without tool calls asks for
    that message to be continued (Anthropic's prefill; llama.cpp reads OpenAI's the
    same way): the other messages, and the text the reply starts with."""
    last = messages[-1] if messages else None
    if last is None or last["role"] != "assistant" or last.get("tool_calls"):
        return messages, ""
    if len(messages) == 1 or messages[-2]["role"] not in ("user", "tool"):
        raise APIError(400, "an assistant message to continue must follow a user message or a tool result", "messages")
    return messages[:-1], last.get("content") or ""


def check_roles(messages: Sequence[dict]) -> None:
    """400 for an order the chat format cannot express.  A system message anywhere is
    fine: the first is hoisted, a later one is a system turn in place (Google's
    template; docs/chat-format.md), which agents such as Claude Code send."""
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            prev = messages[i - 1] if i else None
            if prev is None or not (prev["role"] == "tool" or (prev["role"] == "assistant" and prev.get("tool_calls"))):
                raise APIError(
                    400, f"messages[{i}]: a tool message must follow an assistant message with tool_calls", "messages"
                )
    turns = [m for m in messages if m["role"] not in ("system", "developer")]
    if messages and (not turns or turns[-1]["role"] not in ("user", "tool")):
        raise APIError(
            400, "the last message (system messages aside) must be from the user or a tool result", param="messages"
        )


def _constrained_by(conv: Conversation) -> str:
    """What made a conversation's output constrained (`Prompter.constraint`), for messages."""
    if conv.response_format is not None:
        return "a response format"
    if conv.tool_choice == "required" or isinstance(conv.tool_choice, dict):
        return "a forced tool choice"
    return "a strict tool or a custom tool's grammar"


# Media per request.  A 13 KB PNG can declare 9000x9000 pixels (243 MB decoded) and the
# body limit allows thousands of them: images are refused from their headers once a
# request's decoded pixels would pass MAX_REQUEST_PIXELS (~0.8 GB as RGB; a Gemma 4 image
# is resized to at most ~2.6 M pixels anyway).
MAX_MEDIA = 256
MAX_REQUEST_PIXELS = 1 << 28


class Prompter:
    """Builds engine requests for one model."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_context: int | None = None,
        allow_local_files: bool = False,
        thinking_tokens: int | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ):
        """thinking_tokens: the most thinking tokens of any reply (a request may ask
        for fewer), None for no limit; default_max_tokens: the most tokens of a reply
        whose request sets no limit (Codex sends none)."""
        self.model, self.tokenizer, self.codec = model, tokenizer, PromptCodec(tokenizer)
        self.stop_ids = sorted(stop_ids(model, tokenizer))
        self.close_id = tokenizer.convert_tokens_to_ids("<channel|>")  # the thought channel's end
        self.channel_ids = channel_ids(tokenizer)  # budgets and optional thoughts need both
        if thinking_tokens is not None and not (type(thinking_tokens) is int and thinking_tokens >= 0):
            raise ValueError(f"thinking_tokens {thinking_tokens!r}: expected an integer >= 0, or None for no limit")
        self.thinking_tokens = thinking_tokens
        if not (type(default_max_tokens) is int and default_max_tokens >= 1):
            raise ValueError(f"default_max_tokens {default_max_tokens!r}: expected an integer >= 1")
        self.default_max_tokens = default_max_tokens
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", None) or 131072
        self.allow_local_files = allow_local_files

    # -- media -----------------------------------------------------------------------
    def add_image(self, media: list, url: str, where: str) -> None:
        """Decode an image part into the request's `media`, within its budget: at most
        MAX_MEDIA items and MAX_REQUEST_PIXELS decoded pixels per request, each image
        refused from its header before decoding (small files can declare huge images)."""
        self._room(media, where)
        used = sum(m.width * m.height for kind, m in media if kind == "image")
        media.append(("image", self.image(url, where, MAX_REQUEST_PIXELS - used)))

    def add_audio(self, media: list, part: dict, where: str) -> None:
        self._room(media, where)
        media.append(("audio", self.audio(part, where)))

    @staticmethod
    def _room(media: list, where: str) -> None:
        if len(media) >= MAX_MEDIA:
            raise APIError(400, f"{where}: more than {MAX_MEDIA} images and audio clips in one request", "messages")

    def image(self, url: str, where: str, max_pixels: int | None = None) -> Image.Image:
        """A PIL image from a `data:` URI or, with allow_local_files, a local path."""
        if url.startswith(("http://", "https://")):
            raise APIError(400, f"{where}: image URLs are not fetched; send the image as a data: URI", param=where)
        if url.startswith("data:"):
            head, _, payload = url.partition(",")
            try:
                data = base64.b64decode(payload, validate=True) if head.endswith(";base64") else payload.encode()
            except (binascii.Error, ValueError):
                raise APIError(400, f"{where}: the data: URI is not valid base64", param=where) from None
            return self.decode_image(data, where, max_pixels)
        if not self.allow_local_files:
            raise APIError(400, f"{where}: local files are not allowed (start the server with --allow-local-files)")
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise APIError(400, f"{where}: no such file: {path}", param=where)
        return self.decode_image(path.read_bytes(), where, max_pixels)

    @staticmethod
    def audio(part: dict, where: str):
        """A waveform from an `input_audio` part: {"data": base64, "format": "wav" | "mp3" | ...}."""
        spec = part.get("input_audio")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise APIError(400, f"{where}.input_audio: expected {{'data': base64, 'format': ...}}", param="messages")
        fmt = spec.get("format") or "wav"
        if not isinstance(fmt, str):
            raise APIError(400, f"{where}.input_audio.format: expected a string", param="messages")
        try:
            data = base64.b64decode(spec["data"], validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}.input_audio.data: not valid base64", param="messages") from None
        try:
            return audio_from_bytes(data, fmt)
        except ValueError as e:  # AudioError / DecodeError: one line, without our temp file's name
            raise APIError(400, f"{where}: undecodable audio ({fmt}): {_line(e).split(': ')[-1]}") from None

    @staticmethod
    def decode_image(data: bytes, where: str, max_pixels: int | None = None) -> Image.Image:
        try:
            budget = f"this request's {MAX_REQUEST_PIXELS} image pixels"
            return image_from_bytes(data, "the image", max_pixels, budget)
        except ValueError as e:  # one line: "cannot read the image: <why>"
            raise APIError(
                400, f"{where}: undecodable image ({_line(e).removeprefix('cannot read the image: ')})", where
            ) from None

    # -- requests ------------------------------------------------------------------
    @staticmethod
    @malformed_is_400
    def _render(codec, conv: Conversation) -> str:
        return render_conversation(codec, conv.messages, tools=conv.tools, thinking=conv.thinking)

    def render(self, conv: Conversation) -> str:
        """The prompt: the conversation rendered up to the reply's turn, then the
        prefill's text (escaped: it stays text), which the reply continues."""
        if conv.prefill and conv.thinking:
            raise APIError(400, "an assistant message to continue cannot be combined with thinking", "messages")
        try:
            prompt = self._render(self.codec, conv) + self.codec.escape(conv.prefill)
        except (ChatTemplateError, ValueError) as e:
            raise APIError(400, _line(e)) from None
        except RecursionError:  # a schema or arguments nested hundreds deep
            raise APIError(400, "messages or tools nested too deeply to render") from None
        self.check_text(prompt, "messages")
        return prompt

    @functools.cached_property
    def _max_token_chars(self) -> int:
        return max((len(piece) for piece in self.tokenizer.get_vocab()), default=1)

    def check_text(self, text: str, param: str) -> None:
        """400 before tokenizing: for text with lone surrogates, and for text longer
        than the context could hold even at the vocabulary's longest token (tokenizing
        a 60 MB body first took minutes and gigabytes)."""
        most = self.max_context * self._max_token_chars
        if len(text) > most:
            raise APIError(
                400,
                f"the prompt is {len(text)} characters, more than the maximum context of {self.max_context} "
                f"tokens can hold ({self._max_token_chars} characters or fewer per token)",
                param=param,
            )
        bad = _SURROGATE.search(text)
        if bad:
            why = f"the text holds a lone UTF-16 surrogate (\\u{ord(bad.group()):04x}), which is not valid Unicode"
            raise APIError(400, why, param=param)

    def encode(self, prompt: str, media: list):
        """(ids, keys, MediaPrompt or None); with media this is MLX work, for the
        engine thread.  400 (MediaError) for media the model cannot take."""
        try:
            prepared = prepare_in_order(self.model, media)
            return encode_conversation(self.model, self.codec, prompt, prepared)
        except ValueError as e:  # MediaError is a ValueError
            raise APIError(400, _line(e)) from None

    def sampling(self, body) -> SamplingOptions:
        """The request's sampling, the checkpoint's defaults where it is silent."""
        defaults = getattr(self.model, "generation_defaults", None)
        return sampling_options(body, self.model.config.vocab_size, defaults)

    def count(self, conv: Conversation) -> int:
        if conv.media:
            raise APIError(400, "counting the tokens of images or audio is not supported yet")
        return len(self.encode(self.render(self.settled(conv)), [])[0])

    def constraint(self, conv: Conversation) -> Constraint | None:
        """What decoding must follow (docs/structured-output.md): the response_format;
        else, with tool_choice "required" or a named function, calls only of the
        offered tools with arguments that follow their schemas; else, when a tool is
        declared `strict` or is a custom tool with a grammar, free text or such calls.
        A schema the grammar cannot enforce frees that tool's arguments, unless it is
        declared `strict`.  A thought the reply opens with stays free (thinking on
        or off); the grammar applies after it, or from the first token.  400 for what
        the grammar engine cannot compile (a strict schema, a custom grammar)."""
        try:
            grammar = constraint_from_response_format(conv.response_format)
            if grammar is None and conv.tools:
                forced = conv.tool_choice == "required" or isinstance(conv.tool_choice, dict)
                fns = [t.get("function") or t for t in conv.tools]
                enforced = any(fn.get("strict") or fn.get(INPUT_FORMAT) is not None for fn in fns)
                if forced or enforced:
                    token_id = self.tokenizer.convert_tokens_to_ids
                    grammar = tool_call_grammar(conv.tools, token_id, require_call=forced, loose=True)
            if grammar is None:
                return None
            c = bind(grammar, self.tokenizer, self.model.config.vocab_size, self.stop_ids)
        except ConstraintError as e:
            raise APIError(400, _line(e), param="response_format" if conv.response_format else "tools") from None
        if self.channel_ids:  # thinking on or off, a thought the reply opens with stays free
            return c.thought_optional(*self.channel_ids)
        return c.answer_only(self.close_id) if conv.thinking else c

    def _budget(self, n_prompt: int, max_tokens: int | None, param: str = "messages") -> int:
        if n_prompt >= self.max_context:
            raise APIError(
                400,
                f"the prompt is {n_prompt} tokens, longer than the maximum context of {self.max_context} tokens",
                param=param,
            )
        room = self.max_context - n_prompt
        return min(room, max_tokens or self.default_max_tokens)

    def settled(self, conv: Conversation) -> Conversation:
        """The conversation as it is rendered: a thinking budget of 0 is thinking off
        (no thought may open, so a grammar starts with the reply, not after a thought)."""
        return replace(conv, thinking=False) if conv.thinking and self.thought_limit(conv) == 0 else conv

    def thought_limit(self, conv: Conversation) -> int | None:
        """The most thinking tokens of the reply: the lower of the server's and the
        request's limits; None for none. It holds with thinking off too: a model may
        open a thought on its own, and a limit of 0 then closes it at once."""
        limits = [n for n in (self.thinking_tokens, conv.thinking_tokens) if n is not None]
        return min(limits) if limits and self.channel_ids else None

    def chat_request(
        self, conv: Conversation, options: SamplingOptions, max_tokens: int | None, stop, logprobs: int | None = None
    ) -> Request:
        """The request for a conversation; with media it is encoded on the engine thread.
        logprobs: None, or how many alternatives to report with each token."""
        conv = self.settled(conv)
        limit = self.thought_limit(conv)
        prompt, tools = self.render(conv), conv.tools

        def encode(req: Request) -> None:
            req.ids, req.keys, req.media = self.encode(prompt, conv.media)
            req.max_tokens = self._budget(len(req.ids), max_tokens)

        constraint = self.constraint(conv)
        if constraint is not None and conv.prefill:  # the grammar would start before the prefill
            raise APIError(400, f"an assistant message to continue cannot take {_constrained_by(conv)}")
        if constraint is not None:
            options = replace(options, constraint=constraint)
        req = Request(
            ids=[],
            keys=[],
            options=options,
            stop=stop_list(stop),
            logprobs=logprobs,
            continues=bool(conv.prefill),
            thinking=None if limit is None else ThinkingBudget(limit, *self.channel_ids),
        )
        req.parser = lambda: parser_for_prompt(
            prompt, tools, continuing=bool(conv.prefill), guarded=True, stream_arguments=True
        )
        if conv.media:
            req.prepare = encode
        else:
            encode(req)
        return req

    def raw_request(
        self,
        prompt,
        options: SamplingOptions,
        max_tokens: int | None,
        stop,
        ignore_eos: bool = False,
        logprobs: int | None = None,
    ) -> Request:
        """A raw completion: the text as the tokenizer reads it (control strings too)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) > 1:
                raise APIError(400, "prompt: one prompt per request (got a list of several)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and any(not 0 <= t < self.model.config.vocab_size for t in prompt):
            raise APIError(400, "prompt: token ids out of the vocabulary's range", param="prompt")
        if isinstance(prompt, str):
            self.check_text(prompt, "prompt")
        ids = encode_prompt(self.tokenizer, prompt, chat=False)
        if not ids:
            raise APIError(400, "prompt: empty", param="prompt")
        return Request(
            ids=ids,
            keys=list(ids),
            options=options,
            max_tokens=self._budget(len(ids), max_tokens, "prompt"),
            stop=stop_list(stop),
            ignore_eos=ignore_eos,
            logprobs=logprobs,
            continues=True,  # the completion goes on from the prompt's text (its first space is text)
        )


def choices(request: Request, n: int) -> list[Request]:
    """OpenAI's `n`: the request and n - 1 copies, each a generation of its own (own
    cancel flag; with a seed, choice i samples with seed + i, so seeded choices differ
    and choice 0 is what n = 1 gives)."""
    out = [request]
    for i in range(1, n):
        seed = request.options.seed
        options = request.options if seed is None else replace(request.options, seed=(seed + i) & SEED_BITS)
        fresh = dict(cancelled=threading.Event(), submitted=time.perf_counter())
        out.append(replace(request, ids=list(request.ids), keys=list(request.keys), options=options, **fresh))
    return out


def _line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 16:
        raise APIError(400, "stop: at most 16 stop strings", param="stop")
    return [s for s in stops if s]


def logit_bias(body, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"token id": bias in [-100, 100]}) as {id: bias}; 400 naming
    the entry that is not a token id of the vocabulary or whose bias is out of range."""
    # OpenAI's field only: other APIs' bodies accept unknown fields, and must ignore this one
    bias = body.logit_bias if "logit_bias" in type(body).model_fields else None
    if not bias:
        return None
    table = {}
    for key, value in bias.items():
        token = int(key) if key.strip().isdigit() and key.isascii() else None
        if token is None or token >= vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id (0 .. {vocab_size - 1})", param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise APIError(400, f"logit_bias[{key!r}]: {value} is outside [-100, 100]", param="logit_bias")
        table[token] = value
    return table


def sampling_options(body, vocab_size: int | None = None, defaults=None) -> SamplingOptions:
    """SamplingOptions from a request body's fields (OpenAI semantics: top_p 1 = off);
    vocab_size: the model's, to check OpenAI's logit_bias against; defaults: the
    checkpoint's recommended sampling (`model.generation_defaults`) for the fields the
    request leaves out (temperature otherwise 1, as both APIs define it)."""

    def given(name: str, otherwise):
        value = getattr(body, name)
        if value is None:
            value = getattr(defaults, name, None)
        return otherwise if value is None else value

    top_p, penalty = given("top_p", 1.0), given("repetition_penalty", 1.0)
    try:
        return SamplingOptions(
            temperature=given("temperature", 1.0),
            top_p=top_p if top_p < 1.0 else 0.0,
            top_k=given("top_k", 0),
            min_p=given("min_p", 0.0),
            repetition_penalty=None if penalty == 1.0 else penalty,
            presence_penalty=body.presence_penalty or None,
            frequency_penalty=body.frequency_penalty or None,
            # -1 is "random" to llama.cpp-style clients (a chat UI's "regenerate" must
            # differ); any other integer: the keyed sampler reads its low 64 bits
            seed=None if body.seed in (None, -1) else body.seed & SEED_BITS,
            logit_bias=None if vocab_size is None else logit_bias(body, vocab_size),
        )
    except ValueError as e:  # what the schema's ranges leave (a negative seed): the field is named first
        raise APIError(400, str(e), param=str(e).split()[0]) from None
