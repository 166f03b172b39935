"""The public entry points: load a checkpoint, generate text (plain or speculative).

This is the one place that picks plain decoding (`runtime.generate`) or speculative
decoding (`speculative`) for a request, and media prompts (`media.prepare`) or
text prompts (`prompt.tokens`).  `Chat` (`chat.session`) is the multi-turn form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.cache.prefix import sync_prefix
from gemma4_mlx.checkpoint.load import LoadError, load, load_drafter
from gemma4_mlx.checkpoint.prompt_cache import CacheFileError, load_prompt_cache, save_prompt_cache
from gemma4_mlx.constrain import ConstraintError, bind, grammar_from
from gemma4_mlx.media.prepare import has_media, media_prompt_keyed
from gemma4_mlx.prompt.output_text import primed_detokenizer
from gemma4_mlx.prompt.tokens import encode_prompt
from gemma4_mlx.runtime.generate import (
    DEFAULT_PREFILL_CHUNK,
    SamplingOptions,
    Stats,
    batch_generate,
    check_ids,
    generate_tokens,
    prefill,
)
from gemma4_mlx.runtime.processors import LogitBias
from gemma4_mlx.speculative.loop import SpecStats, speculative_batch_generate, speculative_generate_tokens
from gemma4_mlx.speculative.policy import is_auto, pair_policy

__all__ = [
    "CacheFileError",
    "Chunk",
    "ConstraintError",
    "LoadError",
    "SamplingOptions",
    "Stats",
    "batch_generate",
    "cache_prompt",
    "generate",
    "generate_ids",
    "load",
    "load_drafter",
    "own_thread",
    "share_with_thread",
    "speculative_batch_generate",
    "stream_generate",
]


# sliding-layer rollback slack of a quantized cache made here: what `speculate`
# would give itself for any draft length its policy picks (docs/speculative.md §9)
KV_ROLLBACK = 64


@dataclass
class Chunk:
    """One streamed piece of output."""

    text: str
    token: int
    stats: Stats
    finished: bool = False
    # on the finished chunk: "stop" (a stop token, or a constrained output whose grammar
    # allows nothing more) or "length" (cut at max_tokens)
    finish_reason: str | None = None


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
    repetition_context_size: int = 64,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    penalty_context_size: int | None = None,
    seed: int | None = None,
    logit_bias: dict[int, float] | None = None,
    chat: bool = True,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    draft_model=None,
    draft_tokens: int | str = "auto",
    images=(),
    audio=(),
    videos=(),
    image_budget: int | None = None,
    media_processor=None,
    json_schema: dict | str | None = None,
    regex: str | None = None,
    grammar=None,
    kv_bits: int | None = None,
    prompt_cache: str | Path | None = None,
) -> Iterator[Chunk]:
    """Stream text chunks; stops on the model's end-of-turn / end-of-text ids.

    The sampling keywords are `SamplingOptions`'s fields (greedy by default).
    logit_bias: {token id: number added to its logit} (OpenAI's; -100 bans a token).
    draft_model: an MTP drafter (`load_drafter`) for speculative decoding; the
    output is unchanged (greedy, or sampling with the same seed), only faster.
    draft_tokens: tokens drafted per round, or "auto" (cost-aware; what it learns
    about the pair carries over to the next call with the same model and drafter).
    images / audio / videos: media for a text prompt (paths, arrays, PIL images or
    `gemma4_mlx.Image/Audio/Video`), placed before the text in the user turn;
    image_budget: soft tokens per image (70, 140, 280, 560, 1120).
    json_schema / regex / grammar (one at most): the output follows a JSON schema
    (dict or JSON text), fully matches a regex, or is a sentence of a grammar
    (llguidance Lark text, or a `constrain.Grammar`, e.g. from
    `constrain.constraint_from_response_format`); one that cannot be compiled raises
    `ConstraintError` before anything runs (docs/structured-output.md).
    kv_bits: 16 (the model's dtype), 8 or 4: store the KV cache quantized
    (docs/kv-cache.md); about 1.9x / 3.6x less cache memory at long contexts.
    prompt_cache: a file `cache_prompt` wrote for this model and kv_bits: the longest
    prefix it shares with this prompt is reused, exactly, and only the rest is
    prefilled; a file made for another model or kv_bits raises `CacheFileError`.

    Everything is checked at the call (prompt, options, constraint, cache file), not
    at the first `next()`: a plain function that returns the streaming generator.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, Integral) or max_tokens < 1:
        raise TypeError(f"max_tokens: expected a positive integer, got {max_tokens!r:.60}")
    if draft_model is not None and not hasattr(draft_model, "config"):
        raise TypeError(f"draft_model: expected a drafter from gemma4_mlx.load_drafter, got {draft_model!r:.60}")
    # a quantized cache is made here and handed in (plain and speculative decoding
    # both take one); a bad width is refused before anything runs
    cache = None if kv_bits in (None, 16) else model.make_cache(max_rollback=KV_ROLLBACK, kv_bits=kv_bits)
    spec = grammar_from(json_schema=json_schema, regex=regex, grammar=grammar)
    stop = set(getattr(tokenizer, "eos_token_ids", None) or []) | set(model.config.eos_ids)
    constraint = None if spec is None else bind(spec, tokenizer, model.config.vocab_size, stop)
    options = SamplingOptions(
        temperature,
        top_p,
        top_k,
        min_p,
        repetition_penalty,
        repetition_context_size,
        presence_penalty,
        frequency_penalty,
        penalty_context_size,
        seed=seed,
        logit_bias=logit_bias,
        constraint=constraint,
    )
    LogitBias.check(options.logit_bias, model.config.vocab_size)
    ids, keys, mprompt = _encode(model, tokenizer, prompt, chat, images, audio, videos, image_budget, media_processor)
    start = 0
    if prompt_cache is not None:
        saved = load_prompt_cache(prompt_cache, model, kv_bits=kv_bits, max_rollback=KV_ROLLBACK)
        cache, start = sync_prefix(
            saved.cache, saved.keys, keys, lambda: model.make_cache(max_rollback=KV_ROLLBACK, kv_bits=kv_bits)
        )
    media = None if mprompt is None else mprompt.rows(start)
    stats = Stats(prompt_cached=start)
    tokens = generate_ids(  # lazy: nothing runs before the first next()
        model,
        ids[start:],
        max_tokens=max_tokens,
        options=options,
        stop_ids=stop,
        draft_model=draft_model,
        draft_tokens=draft_tokens,
        prefill_chunk=prefill_chunk,
        stats=stats,
        media=media,
        cache=cache,
    )
    # a reply starts a turn (its first space is dropped); a raw prompt's output goes on from its text
    detok = primed_detokenizer(tokenizer, prime=not chat)
    return _chunks(detok, tokens, stop, stats, None if constraint is None else constraint.finished)


def _chunks(detok, tokens: Iterator[int], stop: set, stats: Stats, finished=None) -> Iterator[Chunk]:
    """`stream_generate`'s text chunks of the generated `tokens`, up to a stop id.
    finished: whether a constrained output cut at max_tokens has ended its grammar anyway."""
    mx.reset_peak_memory()
    reason, out = "length", []
    for tok in tokens:
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        if tok in stop:
            reason = "stop"
            break
        out.append(tok)
        detok.add_token(tok)
        yield Chunk(detok.last_segment, tok, stats)
    if reason == "length" and finished is not None and finished(out):
        reason = "stop"
    detok.finalize()
    yield Chunk(detok.last_segment, -1, stats, finished=True, finish_reason=reason)


def _encode(model, tokenizer, prompt, chat, images, audio, videos, image_budget, processor):
    """(ids, per-slot cache keys, MediaPrompt or None) of a prompt, text or with media."""
    if has_media(images, audio, videos):
        ids, mprompt = media_prompt_keyed(
            model, tokenizer, prompt, images, audio, videos, chat=chat, image_budget=image_budget, processor=processor
        )
        return ids, mprompt.keys(), mprompt
    ids = encode_prompt(tokenizer, prompt, chat)
    check_ids(ids, model.config.vocab_size)
    return ids, list(ids), None


def cache_prompt(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    path: str | Path,
    *,
    chat: bool = True,
    kv_bits: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    max_rollback: int = KV_ROLLBACK,
    images=(),
    audio=(),
    videos=(),
    image_budget: int | None = None,
) -> int:
    """Prefill `prompt` (encoded as `stream_generate` encodes it) and save the KV
    cache to `path` (docs/kv-cache.md §8), for `stream_generate(prompt_cache=path)`
    with the same kv_bits.  max_rollback: tokens the sliding layers keep beyond
    their window, i.e. how far before the prompt's end a later prompt may diverge
    and still reuse the cache.  Returns the number of tokens cached."""
    cache = model.make_cache(max_rollback=max_rollback, kv_bits=kv_bits)
    ids, keys, mprompt = _encode(model, tokenizer, prompt, chat, images, audio, videos, image_budget, None)
    media = None if mprompt is None else mprompt.rows(0)
    mx.eval(prefill(model, mx.array([ids]), cache, prefill_chunk, media))
    save_prompt_cache(path, model, cache, keys)
    return len(ids)


def generate_ids(
    model,
    ids: Sequence[int],
    *,
    max_tokens: int = 256,
    options: SamplingOptions | None = None,
    stop_ids: Sequence[int] = (),
    cache=None,
    draft_model=None,
    draft_tokens: int | str = "auto",
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    stats: Stats | None = None,
    media=None,
) -> Iterator[int]:
    """Token ids in, generated token ids out (the stop token included), plain or
    speculative.  cache: the model's caches already holding the tokens before `ids`
    (`model.make_cache()`); afterwards they hold every fed token, i.e. all but the
    last yielded one, also when the caller stops early.  media: `MediaRows` for
    placeholders in `ids` (`MediaPrompt.rows`)."""
    kw = dict(max_tokens=max_tokens, options=options or SamplingOptions(), stop_ids=stop_ids, cache=cache)
    kw.update(prefill_chunk=prefill_chunk, stats=stats, media=media)
    if draft_model is None:
        return generate_tokens(model, ids, **kw)
    if stats is not None and stats.speculative is None:
        stats.speculative = SpecStats()
    spec = None if stats is None else stats.speculative
    if is_auto(draft_tokens):  # the pair's policy goes on learning across calls
        kw["policy"] = pair_policy(model, draft_model)
    return speculative_generate_tokens(model, draft_model, ids, spec_stats=spec, draft_tokens=draft_tokens, **kw)


def share_with_thread(*objects) -> None:
    """Evaluate every array `objects` hold (weights, buffers, nested modules), so that
    another thread can run them: MLX ties a lazy array to a stream of the thread that
    made it.  Towers loaded lazily are read from disk now."""
    arrays, seen, todo = [], set(), list(objects)
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, mx.array):
            arrays.append(o)
        elif isinstance(o, dict):
            todo += o.values()
        elif isinstance(o, (list, tuple)):
            todo += o
        elif hasattr(o, "__dict__") and type(o).__module__.startswith(("gemma4_mlx", "mlx")):
            todo += vars(o).values()
    mx.eval(arrays)


def own_thread() -> None:
    """Give the calling (non-main) thread its own default stream to run models on
    (after `share_with_thread` on the thread that loaded them)."""
    mx.set_default_stream(mx.new_stream(mx.default_device()))


def release_thread() -> None:
    """Free the calling thread's MLX streams before it ends (MLX requires it of every
    thread that ran MLX work; without it the process may abort at exit)."""
    mx.clear_streams()


def generate(model, tokenizer, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole completion as one string."""
    return "".join(c.text for c in stream_generate(model, tokenizer, prompt, **kwargs))
