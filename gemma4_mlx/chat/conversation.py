"""A conversation to token ids, and the KV-cache prefix it can reuse.

The steps `Chat` takes each turn, as functions of their inputs so that other
front ends (the HTTP server) render, encode and reuse caches exactly as `Chat`
does: `render_conversation` (template + `PromptCodec` escaping),
`encode_conversation` (ids, per-position cache keys, media), and
`cache.prefix.sync_prefix` (roll a cache back to the longest prefix it shares with
a new prompt).
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence

from gemma4_mlx.media.audio import load_audio
from gemma4_mlx.media.image import decode_image
from gemma4_mlx.media.prepare import as_media, media_items, processor_for
from gemma4_mlx.prompt.template import STOP_STRINGS, render, render_with_checkpoint_template
from gemma4_mlx.prompt.tokens import PromptCodec


def stop_ids(model, tokenizer) -> set[int]:
    """Token ids that end a reply: the turn / tool-response / end-of-text controls and
    the checkpoint's eos ids."""
    unk = tokenizer.unk_token_id
    ids = {i for i in (tokenizer.convert_tokens_to_ids(s) for s in STOP_STRINGS) if i is not None and i != unk}
    return ids | set(model.config.eos_ids)


def channel_ids(tokenizer) -> tuple[int, int] | None:
    """The thought channel's (`<|channel>`, `<channel|>`) token ids; None unless the
    vocabulary has both as tokens of their own (every Gemma 4 vocabulary does)."""
    ids = tuple(tokenizer.convert_tokens_to_ids(s) for s in ("<|channel>", "<channel|>"))
    known = all(isinstance(i, int) and i != tokenizer.unk_token_id for i in ids)
    return ids if known else None


def render_conversation(
    codec: PromptCodec, messages: Sequence[dict], *, tools: list[dict] | None = None, thinking: bool = False
) -> str:
    """The rendered conversation (the checkpoint's template, else ours), its text
    escaped: typed control strings, `<|image|>` included, stay text."""
    msgs = codec.escape_messages(messages)
    tools = codec.escape_value(tools)
    template = getattr(codec.tokenizer, "chat_template", None)
    if template:
        return render_with_checkpoint_template(template, msgs, tools=tools, thinking=thinking)
    return render(msgs, tools=tools, thinking=thinking)


def prepare_media(model, images=(), audio=(), videos=(), image_budget: int | None = None) -> list:
    """Process media (paths, arrays, PIL images, `media.prepare.Image/Audio/Video`)
    for a prompt, in order; raises `MediaError` (one line) for what the model cannot take."""
    items = media_items(images, audio, videos, image_budget)
    if not items:
        return []
    mp = processor_for(model)
    return [mp.prepare(m) for m in items]


def prepare_in_order(model, items: Sequence[tuple[str, object]]) -> list:
    """Process media given as (kind, source) pairs — "image", "audio" or "video" — in
    the order their placeholders appear (an API request's parts can mix kinds)."""
    if not items:
        return []
    mp = processor_for(model)
    return [mp.prepare(as_media(source, kind)) for kind, source in items]


def audio_from_bytes(data: bytes, fmt: str):
    """A mono 16 kHz waveform from an encoded clip (wav, mp3, flac, ...: the format
    names the decoder); raises `AudioError` (one line) for what cannot be read."""
    suffix = "." + "".join(c for c in fmt.lower() if c.isalnum())[:8]
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_audio(path)
    finally:
        os.unlink(path)


def image_from_bytes(data: bytes, name: str, max_pixels: int | None = None, budget: str = ""):
    """An upright RGB PIL image from an encoded one (PNG, JPEG, ...), as a file path
    would be read (`media.image.decode_image`); ValueError (one line) naming `name`."""
    return decode_image(io.BytesIO(data), name, max_pixels, budget)


def encode_conversation(model, codec: PromptCodec, prompt: str, media: Sequence = ()):
    """(ids, cache keys, MediaPrompt or None) of a rendered prompt: keys are the ids,
    with (content hash, run, index) at media placeholders."""
    if not media:
        ids = codec.encode(prompt)
        return ids, ids, None
    mp = processor_for(model)
    ids = codec.encode(mp.expand(prompt, list(media)))
    mprompt = mp.prompt(ids, list(media))
    return ids, mprompt.keys(), mprompt
