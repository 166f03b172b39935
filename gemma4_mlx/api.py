"""The public entry points: load a checkpoint, generate text (plain or speculative).

This is the one place that picks plain decoding (`runtime.generate`) or speculative
decoding (`speculative`) for a request, and media prompts (`media.prepare`) or
text prompts (`prompt.tokens`).  `Chat` (`chat.session`) is the multi-turn form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx

from gemma4_mlx.checkpoint.load import LoadError, load, load_drafter
from gemma4_mlx.media.prepare import has_media, media_prompt
from gemma4_mlx.prompt.tokens import encode_prompt
from gemma4_mlx.runtime.generate import (
    DEFAULT_PREFILL_CHUNK,
    SamplingOptions,
    Stats,
    batch_generate,
    generate_tokens,
)
from gemma4_mlx.speculative.loop import SpecStats, speculative_batch_generate, speculative_generate_tokens

__all__ = [
    "Chunk",
    "LoadError",
    "batch_generate",
    "generate",
    "load",
    "load_drafter",
    "speculative_batch_generate",
    "stream_generate",
]


@dataclass
class Chunk:
    """One streamed piece of output."""

    text: str
    token: int
    stats: Stats
    finished: bool = False


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    chat: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    draft_model=None,
    draft_tokens: int | str = "auto",
    images=(),
    audio=(),
    videos=(),
    image_budget: int | None = None,
    media_processor=None,
) -> Iterator[Chunk]:
    """Stream text chunks; stops on the model's end-of-turn / end-of-text ids.

    draft_model: an MTP drafter (`load_drafter`) for speculative decoding; the
    output is unchanged (greedy, or sampling with the same seed), only faster.
    draft_tokens: tokens drafted per round, or "auto" (cost-aware).
    images / audio / videos: media for a text prompt (paths, arrays, PIL images or
    `multimodal.Image/Audio/Video`), placed before the text in the user turn;
    image_budget: soft tokens per image (70, 140, 280, 560, 1120).
    """
    options = SamplingOptions(temperature, top_p, top_k, min_p, repetition_penalty, seed=seed)
    media = None
    if has_media(images, audio, videos):
        ids, media = media_prompt(
            model,
            tokenizer,
            prompt,
            images,
            audio,
            videos,
            chat=chat,
            image_budget=image_budget,
            processor=media_processor,
        )
    else:
        ids = encode_prompt(tokenizer, prompt, chat)
    stop = set(getattr(tokenizer, "eos_token_ids", None) or []) | set(model.config.eos_ids)
    stats = Stats()
    detok = tokenizer.detokenizer
    detok.reset()
    mx.reset_peak_memory()
    if draft_model is not None:
        stats.speculative = SpecStats()
        tokens = speculative_generate_tokens(
            model,
            draft_model,
            ids,
            max_tokens=max_tokens,
            options=options,
            stop_ids=stop,
            draft_tokens=draft_tokens,
            prefill_chunk=prefill_chunk,
            stats=stats,
            spec_stats=stats.speculative,
            media=media,
        )
    else:
        tokens = generate_tokens(
            model,
            ids,
            max_tokens=max_tokens,
            options=options,
            stop_ids=stop,
            prefill_chunk=prefill_chunk,
            stats=stats,
            media=media,
        )
    for tok in tokens:
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        if tok in stop:
            break
        detok.add_token(tok)
        yield Chunk(detok.last_segment, tok, stats)
    detok.finalize()
    yield Chunk(detok.last_segment, -1, stats, finished=True)


def generate(model, tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole completion as one string."""
    return "".join(c.text for c in stream_generate(model, tokenizer, prompt, **kwargs))
