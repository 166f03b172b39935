"""Generation: `prefill`, `decode_step`, and the loops built from them.

Logits processors are ours (`runtime.processors`: penalties, logit bias; the grammar
mask from `constrain`); sampling is keyed (`runtime.sampling.PositionedSampler`, with
mlx-lm's filters); the caches and the prefill are ours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import mlx.core as mx

from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.contracts import DecodingModel
from gemma4_mlx.runtime.processors import History, LogitBias, Penalties, apply_processors
from gemma4_mlx.runtime.sampling import GREEDY_BELOW, PositionedSampler, fresh_seed

DEFAULT_PREFILL_CHUNK = 512


def prefill(
    model: DecodingModel, ids: mx.array, cache: LayerCaches, chunk_size: int = DEFAULT_PREFILL_CHUNK, media=None
) -> mx.array:
    """Feed `ids` [B, T] into `cache`; return the last position's logits [B, V].

    Every chunk but the last only fills the caches: it skips the KV-shared layers
    and the LM head, whose outputs nobody reads.
    media: `MediaRows` for the placeholders in `ids` (one prompt, B = 1).
    """
    logits, _ = prefill_hidden(model, ids, cache, chunk_size, media)
    return logits


def prefill_hidden(
    model: DecodingModel, ids: mx.array, cache: LayerCaches, chunk_size: int = DEFAULT_PREFILL_CHUNK, media=None
) -> tuple[mx.array, mx.array]:
    """`prefill`, also returning the final-norm hidden [B, H] of the last position
    (what an MTP drafter is seeded with)."""
    steps = prefill_steps(model, ids, cache, chunk_size, media)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def prefill_steps(
    model: DecodingModel, ids: mx.array, cache: LayerCaches, chunk_size: int = DEFAULT_PREFILL_CHUNK, media=None
) -> Generator[int, None, tuple[mx.array, mx.array]]:
    """`prefill_hidden` one chunk at a time: yields the number of positions filled
    after every chunk but the last, and returns (logits [B, V], hidden [B, H]) of the
    last position.  A server interleaves these chunks with decode rounds of other
    requests.  A chunk never splits an image, frame or audio run: bidirectional image
    blocks must be seen whole (docs/multimodal.md §3.3)."""
    T = ids.shape[1]
    if chunk_size <= 0:
        raise ValueError(f"prefill chunk size must be positive, got {chunk_size}")
    start = 0
    while T - start > chunk_size:
        end = start + chunk_size if media is None else media.cut(start, start + chunk_size)
        if end >= T:
            break
        part = None if media is None else media.window(start, end)
        model.fill_cache(ids[:, start:end], cache, media=part)
        mx.eval(LayerCaches.of(cache).state)
        start = end
        yield start
    part = None if media is None else media.window(start, T)
    h = model.hidden(ids[:, start:], cache, keep=1, media=part)
    return model.logits(h)[:, -1], h[:, -1]


def decode_step(model: DecodingModel, tokens: mx.array, cache: LayerCaches) -> mx.array:
    """One token per row [B] -> logits [B, V]."""
    return model(tokens[:, None], cache)[:, -1]


@dataclass
class SamplingOptions:
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float | None = None
    repetition_context_size: int = 64
    # OpenAI's: subtracted once from every token the output holds / once per occurrence
    # there (the prompt's tokens are not counted: `runtime.processors`)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    penalty_context_size: int | None = None  # only the output's last N tokens count (None: all)
    seed: int | None = None
    # OpenAI's logit_bias: token id -> a number added to its logit before sampling
    # (-100 bans a token, 100 all but forces it).  Token ids are checked against the
    # vocabulary at the first step (`LogitBias`).
    logit_bias: Mapping[int, float] | None = None
    # Structured output: a factory (`constrain.Constraint`) called once per generation;
    # the processor it returns masks what the grammar forbids, last (docs/structured-output.md §3).
    constraint: Callable[[], Callable] | None = None

    def __post_init__(self):
        """Refuse, at the call, values mlx-lm's filters would misread: a negative
        temperature inverts the distribution, a top_p above 1 or a negative top_k is
        silently off, NaN poisons the logits, a negative seed fails inside MLX."""
        _number("temperature", self.temperature, 0.0, None)
        if self.temperature < GREEDY_BELOW:  # every sampler then takes the argmax
            self.temperature = 0.0
        _number("top_p", self.top_p, 0.0, 1.0)
        _number("min_p", self.min_p, 0.0, 1.0)
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), 0.0 if name == "repetition_penalty" else None, None)
        for name in ("top_k", "repetition_context_size", "penalty_context_size", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Integral) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} {value!r}: expected an integer >= 0")
        if self.seed is not None and self.seed >= 1 << 64:
            raise ValueError(f"seed {self.seed}: expected an integer below 2**64")
        if self.logit_bias is not None:
            self.logit_bias = _bias_table(self.logit_bias)

    def processors(self) -> list:
        """This generation's processors, in order: logit bias (before the penalties,
        as OpenAI and mlx-lm apply it), penalties, then the grammar's mask."""
        penalties = Penalties(
            self.repetition_penalty,
            self.repetition_context_size,
            self.presence_penalty,
            self.frequency_penalty,
            self.penalty_context_size,
        )
        procs = [LogitBias(self.logit_bias)] if self.logit_bias else []
        procs += [penalties] if penalties else []
        return procs + [self.constraint()] if self.constraint is not None else procs


def _number(name: str, value, lo: float | None, hi: float | None) -> None:
    """ValueError naming `name` unless value is a finite real number in [lo, hi]."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            bounds = f"in [{lo}, {hi}]"
        elif lo is not None:
            bounds = f">= {lo}"
        elif hi is not None:
            bounds = f"<= {hi}"
        else:
            bounds = ""
        raise ValueError(f"{name} {value!r}: expected a finite number {bounds}".rstrip())


def _bias_table(bias) -> dict[int, float]:
    """A logit_bias mapping as {token id: finite float}; ValueError naming the entry."""
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias {bias!r}: expected a mapping of token ids to numbers")
    table = {}
    for token, value in bias.items():
        if not isinstance(token, Integral) or isinstance(token, bool) or token < 0:
            raise ValueError(f"logit_bias: key {token!r} is not a token id (an integer >= 0)")
        _number(f"logit_bias[{token}]", value, None, None)
        table[int(token)] = float(value)
    return table


def grammar_failure(processors) -> str | None:
    """Why a grammar processor's engine failed mid-output (its `failure`), if one did:
    its mask then allows only the end, and the text would pass for a finished answer."""
    why = next((p.failure for p in processors if getattr(p, "failure", None)), None)
    return None if why is None else f"the output grammar failed while decoding ({why})"


def check_grammar(processors) -> None:
    """ValueError when `grammar_failure` says the grammar engine failed."""
    why = grammar_failure(processors)
    if why is not None:
        raise ValueError(why)


def _pick(logits, history, sampler, processors):
    if processors:
        logits = apply_processors(logits, history, processors)
    return sampler(logits)


class _Greedy:
    """Argmax of the processed logits."""

    def __call__(self, logits):
        return mx.argmax(logits, axis=-1)

    def keep(self, rows: list[int]) -> None:
        pass


class _Keyed:
    """Keyed sampling: the n-th call draws output index n of every live row
    (`keep` tells it which rows are still live).  Without a seed, one is drawn
    from MLX's generator (so `mx.random.seed` still makes a run repeatable)."""

    def __init__(self, options: SamplingOptions, rows: list[int]):
        seed = options.seed if options.seed is not None else fresh_seed()
        self.keyed = PositionedSampler(options.temperature, options.top_p, options.top_k, options.min_p, seed)
        self.rows, self.step = list(rows), 0

    def __call__(self, logits):
        tok = self.keyed(logits, self.rows, [self.step] * len(self.rows))
        self.step += 1
        return tok

    def keep(self, rows: list[int]) -> None:
        self.rows = list(rows)


def _sampler(options: SamplingOptions, rows: list[int]):
    """Greedy: argmax of the processed logits.  Sampling: keyed by (seed, row, output
    index) — the randomness speculative decoding and the server use, so a seed gives
    the same text with or without a drafter, alone or in a batch.  (Unseeded
    sampling used mlx-lm's sampler, whose top-p sorts the whole vocabulary: ~37 ms
    a token for 262,144 tokens on the CPU, against ~6 ms keyed.)"""
    if options.temperature == 0:
        return _Greedy()
    return _Keyed(options, rows)


def generate_tokens(
    model,
    prompt: Sequence[int],
    *,
    max_tokens: int = 256,
    options: SamplingOptions | None = None,
    stop_ids: Sequence[int] = (),
    cache=None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    stats: Stats | None = None,
    media=None,
) -> Iterator[int]:
    """Yield generated token ids for one prompt, stopping on any of `stop_ids`.

    The stop token itself is yielded (callers decide whether to show it).
    media: `MediaRows` for the placeholders in `prompt` (`MediaPrompt.rows`).
    With `cache`, afterwards the cache holds the prompt and every yielded token but
    the last, also when the caller stops early (as `speculative_generate_tokens`).

    Each step is queued before the token it feeds is read, as mlx-lm does: building
    step n + 1's graph on the host overlaps computing step n (3-4 ms of a 60 ms
    4-bit MoE step on the CPU).  A step queued for a token that ends the generation
    is taken back (`trim(1)`), so this needs a cache that can roll back one token
    (`rollback_room`); with none to spare, or with processors that read the history
    on the host (penalties, a grammar), the token is read first (and with none to
    spare, the step is built only once the caller asks for more).
    """
    options = options or SamplingOptions()
    sampler, processors = _sampler(options, [0]), options.processors()
    if options.seed is not None:
        mx.random.seed(options.seed)
    cache = LayerCaches.of(model.make_cache() if cache is None else cache)
    stop, fed = set(stop_ids), cache.offset + len(prompt)  # fed: slots the yielded tokens account for
    prompt = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)  # mx / numpy rows too
    ids, history = mx.array([prompt]), History(prompt)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache, prefill_chunk, media)
    token = _pick(logits, [history], sampler, processors)
    mx.eval(token)
    if stats is not None:
        stats.prompt_tokens, stats.prompt_time = len(prompt), time.perf_counter() - t0
    t1 = time.perf_counter()
    # Queue ahead (docstring) unless processors read each token on the host while
    # the next step is built: nothing would overlap.  Then the step is built before
    # the token is yielded (it overlaps the caller's work) if it can be taken back.
    reads = any(getattr(p, "reads_history", True) for p in processors)
    undoable = cache.rollback_room >= 1
    ahead = undoable and not reads

    def step(token):
        if reads:
            history.append(token.item())
        nxt = _pick(decode_step(model, token, cache), [history], sampler, processors)
        mx.async_eval(nxt)
        return nxt

    try:
        for n in range(1, max_tokens + 1):
            nxt = step(token) if ahead and n < max_tokens else None
            tok = token.item()
            check_grammar(processors)
            more = n < max_tokens and tok not in stop
            if nxt is None and more and undoable:
                nxt = step(token)
            if stats is not None:
                stats.generation_tokens = n
                stats.generation_time = time.perf_counter() - t1
            fed += n > 1
            yield tok
            if not more:
                break
            token = nxt if nxt is not None else step(token)
    finally:
        if undoable:  # a step queued for a token that ended it, or the caller left
            cache.trim_to(fed)


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_time: float = 0.0
    generation_tokens: int = 0
    generation_time: float = 0.0
    peak_memory_gb: float = field(default_factory=lambda: 0.0)
    speculative: object = None  # a speculative.SpecStats when a drafter ran
    prompt_cached: int = 0  # prompt tokens taken from a prompt cache (not in prompt_tokens)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_time if self.prompt_time else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_time if self.generation_time else 0.0

    def line(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens"
            + (f" (+{self.prompt_cached} cached)" if self.prompt_cached else "")
            + f", {self.prompt_tps:.1f} tok/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
            f"peak memory: {self.peak_memory_gb:.2f} GB"
            + (f"\n{self.speculative.line()}" if self.speculative is not None else "")
        )


def check_ids(ids: Sequence, vocab_size: int) -> None:
    """A prompt of token ids must hold at least one id, each an integer of the
    vocabulary (outside it MLX gathers garbage or fails deep in a forward)."""
    if len(ids) == 0:
        raise ValueError("prompt: empty (no token ids)")
    bad = next((t for t in ids if not isinstance(t, Integral) or isinstance(t, bool) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt: token id {bad!r} is not in the vocabulary (0 .. {vocab_size - 1})")


def batch_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int = 64,
    options: SamplingOptions | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    kv_bits: int | None = None,
) -> list[list[int]]:
    """Generate for several prompts at once (left-padded); finished rows leave the batch.
    kv_bits: 8 or 4 quantize the KV cache (docs/kv-cache.md)."""
    if isinstance(prompts, str) or len(prompts) == 0 or any(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: expected a non-empty list of token id lists (encode text first)")
    prompts = [p.tolist() if hasattr(p, "tolist") else list(p) for p in prompts]  # mx / numpy rows too
    for p in prompts:
        check_ids(p, model.config.vocab_size)
    options = options or SamplingOptions()
    if options.seed is not None:
        mx.random.seed(options.seed)
    live = list(range(len(prompts)))
    sampler, processors = _sampler(options, live), options.processors()
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    ids = mx.array([[pad_id] * n + list(p) for n, p in zip(pads, prompts)])
    quant = {} if kv_bits in (None, 16) else {"kv_bits": kv_bits}  # `contracts.DecodingModel` has no kv_bits
    cache = model.make_cache(left_pad=pads, **quant)
    hist = [History(p) for p in prompts]  # per row, without the padding

    def history():
        return [hist[r] for r in live] if processors else None

    token = _pick(prefill(model, ids, cache, prefill_chunk), history(), sampler, processors)
    out: list[list[int]] = [[] for _ in prompts]
    stop = set(stop_ids)
    for _ in range(max_tokens):
        toks = token.tolist()
        check_grammar(processors)  # one processor serves every row: the batch fails as a whole
        keep = []
        for row, tok in enumerate(toks):
            out[live[row]].append(tok)
            hist[live[row]].append(tok)
            if tok not in stop and len(out[live[row]]) < max_tokens:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):
            cache.filter(keep)
            token = token[mx.array(keep)]
            live = [live[r] for r in keep]
            sampler.keep(live)
        token = _pick(decode_step(model, token, cache), history(), sampler, processors)
    return out
