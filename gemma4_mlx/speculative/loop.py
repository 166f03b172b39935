"""Speculative decoding with Gemma 4's MTP drafters: the loop (docs/speculative.md §7-§10).

`speculate` prefills every prompt, emits each row's first token, then runs rounds
until every row stopped.  A round, for every live row at once (`speculative.round`):
  draft    K tokens with the drafter, seeded by (bonus token, target hidden);
  verify   [bonus, d_1..d_K] in one target forward (K + 1 positions per row);
  accept   per row, while the target's own pick equals the draft (sample-and-compare
           with keyed randomness: the output is the plain-decoding output);
  commit   keep A_i + 1 new cache entries in row i — rows accept different counts
           (ragged), no clamping to the batch minimum (`LayerCaches.commit`);
  reseed   bonus = the target's pick after the last accepted draft, h = its hidden.
K = 0 is plain decoding through the same code.  K comes from a `DraftPolicy`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import mlx.core as mx

from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.contracts import DecodingModel, MTPDrafter
from gemma4_mlx.models.assistant import check_pair
from gemma4_mlx.models.parallel import from_leader
from gemma4_mlx.runtime.generate import (
    DEFAULT_PREFILL_CHUNK,
    SamplingOptions,
    Stats,
    check_grammar,
    prefill_hidden,
)
from gemma4_mlx.runtime.sampling import PositionedSampler, fresh_seed
from gemma4_mlx.speculative.policy import DraftPolicy, expected_tokens
from gemma4_mlx.speculative.round import Rows, accepted_counts, advance_rows, commit, draft, pick, verify
from gemma4_mlx.speculative.stats import MTPSettings, SpecStats

# The round's steps are looked up in this module when called: tests and the demo
# trainer replace `loop.draft`, the benchmark wraps `loop.prefill_hidden` and `loop.profile`.


@dataclass
class SpecSettings:
    """The keyword arguments of `speculate` (and of `speculative_batch_generate`).

    draft_tokens: K, or "auto" (cost-aware `DraftPolicy`); 0 is plain decoding.
    policy: a `DraftPolicy` to use (and keep learning) instead of draft_tokens'.
    stats: a `SpecStats` the run adds to.
    draft_override(rows, index, drafts) -> drafts: replaces the drafter's tokens
        after it ran (controlled-acceptance benchmarks and tests, docs/speculative.md §14).
    on_commit(caches, rows, outputs): called after every round's cache commit.
    kv_bits: 8 or 4 quantize the caches made here (docs/kv-cache.md); a cache handed
        in keeps its own.
    """

    max_tokens: int = 256
    options: SamplingOptions | None = None
    stop_ids: Sequence[int] = ()
    draft_tokens: int | str = "auto"
    policy: DraftPolicy | None = None
    mtp: MTPSettings | None = None
    pad_id: int = 0
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    max_rollback: int | None = None
    stats: SpecStats | None = None
    draft_override: Callable | None = None
    on_commit: Callable | None = None
    kv_bits: int | None = None


@dataclass
class Speculation:
    """The fixed parts of one `speculate` call: the pair, the caches, the sampler,
    the policy, and where the measurements go."""

    target: DecodingModel
    drafter: MTPDrafter
    caches: LayerCaches
    sampler: PositionedSampler
    processors: list
    stop: set
    policy: DraftPolicy
    mtp: MTPSettings
    stats: SpecStats
    settings: SpecSettings

    @classmethod
    def start(cls, target, drafter, pads: list[int], s: SpecSettings, cache) -> Speculation:
        options = s.options or SamplingOptions()
        policy = s.policy or DraftPolicy.for_setting(s.draft_tokens)
        # No seed: a fresh one per call, as plain sampling draws it (`mx.random.seed` repeats both).
        seed = options.seed if options.seed is not None else fresh_seed()
        sampler = PositionedSampler(options.temperature, options.top_p, options.top_k, options.min_p, seed)
        if cache is not None:
            if len(pads) != 1:
                raise ValueError("an existing cache serves one prompt")
            caches = LayerCaches.of(cache)
        else:
            rollback = max(32, s.max_rollback or 2 * policy.k_max + 2)
            quant = {} if s.kv_bits in (None, 16) else {"kv_bits": s.kv_bits}  # test fakes lack the keyword
            caches = target.make_cache(max_rollback=rollback, left_pad=pads if any(pads) else None, **quant)
        return cls(
            target,
            drafter,
            caches,
            sampler,
            options.processors(),
            set(s.stop_ids),
            policy,
            s.mtp or MTPSettings(),
            s.stats if s.stats is not None else SpecStats(),
            s,
        )

    @property
    def sync_drafts(self) -> bool:
        """Whether the host reads the drafts before verifying: only to time the two
        phases (auto K), to override them, or for per-position processors; otherwise
        drafting and verifying run as one graph with a single sync."""
        return self.policy.fixed is None or self.settings.draft_override is not None or bool(self.processors)

    def finish_round(self, rows: Rows, K: int, accepted: list[int], emitted: list, times: tuple[float, float]) -> None:
        """The round's hook, statistics and policy update."""
        if self.settings.on_commit is not None:
            self.settings.on_commit(self.caches, rows.live, rows.out)
        t_draft, t_verify = times
        self.stats.record(K, accepted, sum(len(new) for _, new in emitted))
        self.stats.draft_time += t_draft
        self.stats.verify_time += t_verify
        self.policy.observe(len(rows.live), K, accepted, t_draft, t_verify)


def profile(
    target: DecodingModel,
    drafter: MTPDrafter,
    policy: DraftPolicy,
    caches: LayerCaches,
    bonus: mx.array,
    h: mx.array,
    mtp: MTPSettings,
) -> None:
    """Measure t_verify(B * (K + 1)) on the live caches (each block is trimmed off
    again, exactly) and one draft step, for the cost-aware policy."""
    B = bonus.shape[0]
    for K in policy.profile_ks():
        block = mx.repeat(bonus[:, None], K + 1, axis=1)
        for _ in range(2):  # the first run of a shape warms up (kernel builds on GPUs)
            t0 = time.perf_counter()
            mx.eval(verify(target, block, caches))
            dt = time.perf_counter() - t0
            caches.trim(K + 1)
        policy.record_profile(B * (K + 1), dt)
    k = min(2, policy.k_max)
    for _ in range(2):
        t0 = time.perf_counter()
        mx.eval(draft(drafter, target, bonus, h, caches, k, mtp))
        dt = time.perf_counter() - t0
    policy.draft_time[B] = dt / k
    policy.profiled = True


def propose(run: Speculation, rows: Rows, bonus: mx.array, K: int):
    """(the verify block [B, K + 1] = [bonus, drafts], the drafts [B, K] or None when
    K = 0, the drafts as host lists — None while the host has not needed them)."""
    if not K:
        return bonus[:, None], None, [[] for _ in rows.live]
    drafts = draft(run.drafter, run.target, bonus, rows.hidden, run.caches, K, run.mtp)
    listed = None
    if run.sync_drafts:
        mx.eval(drafts)
        listed = drafts.tolist()
    if run.settings.draft_override is not None:
        listed = run.settings.draft_override(rows.live, rows.index(), listed)
        drafts = mx.array(listed, dtype=drafts.dtype)
    return mx.concatenate([bonus[:, None], drafts], axis=1), drafts, listed


def speculative_round(run: Speculation, rows: Rows):
    """Draft, verify, pick, accept and commit for every live row.

    Returns (K, the target's picks per row, accepted drafts per row, (draft seconds,
    verify-and-commit seconds)); the caches then hold accepted[i] + 1 new entries in row i and
    rows.hidden the hidden after row i's last accepted token.
    """
    B = len(rows.live)
    bonus = mx.array(rows.bonus)
    if run.policy.needs_profile(B):
        profile(run.target, run.drafter, run.policy, run.caches, bonus, rows.hidden, run.mtp)
    left = rows.most_left(run.settings.max_tokens)
    K = min(from_leader(run.policy.choose(B, left), getattr(run.target, "tp", None)), left - 1)
    t0 = time.perf_counter()
    block, drafts, listed = propose(run, rows, bonus, K)
    t1 = time.perf_counter()
    logits, hidden = verify(run.target, block, run.caches)
    picks = pick(run.sampler, run.processors, logits, rows.live, rows.index(), rows.histories(), listed)
    mx.eval(picks, hidden)
    listed = drafts.tolist() if listed is None else listed
    picks = picks.tolist()
    accepted = accepted_counts(listed, picks)
    rows.hidden = commit(run.caches, hidden, accepted, K, timed=run.policy.fixed is None)
    t2 = time.perf_counter()
    return K, picks, accepted, (t1 - t0, t2 - t1)


def speculate(
    target: DecodingModel,
    drafter: MTPDrafter,
    prompts: Sequence[Sequence[int]],
    settings: SpecSettings | None = None,
    *,
    cache=None,
    media=None,
    **kwargs,
) -> Iterator[tuple[int, list[int]]]:
    """Yield (row, new tokens) as rows advance; a row's stop token is yielded and ends it.

    settings / kwargs: `SpecSettings` (kwargs override its fields).  Greedy output
    equals plain greedy decoding; sampled output equals plain sampling with the same
    keyed sampler (`PositionedSampler`), for every K.
    cache: continue an existing single-row cache (chat sessions); `prompts[0]` are
        the ids it does not hold yet.  It must allow rollback of K + 1 tokens.
    media: `MediaRows` of a single prompt's placeholders (only the prefill reads them).
    """
    s = replace(settings or SpecSettings(), **kwargs)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("speculative decoding needs at least one non-empty prompt")
    check_pair(drafter.config, target.config)  # one clear line for a mismatched drafter
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    run = Speculation.start(target, drafter, pads, s, cache)
    ids = mx.array([[s.pad_id] * n + list(p) for n, p in zip(pads, prompts)])
    if media is not None and len(prompts) != 1:
        raise ValueError("media prompts run one at a time")
    logits, h = prefill_hidden(target, ids, run.caches, s.prefill_chunk, media)
    if s.max_tokens <= 0:  # as plain decoding: the prompt is in the cache, nothing is emitted
        return
    rows = Rows.start(prompts, h)
    first = pick(run.sampler, run.processors, logits[:, None], rows.live, rows.index(), rows.histories())
    emitted, keep = advance_rows(rows, first.tolist(), [0] * len(prompts), run.stop, s.max_tokens, run.caches)
    check_grammar(run.processors)
    yield from emitted
    while keep:
        rows.keep_only(keep, run.caches)
        K, picks, accepted, times = speculative_round(run, rows)
        emitted, keep = advance_rows(rows, picks, accepted, run.stop, s.max_tokens, run.caches)
        check_grammar(run.processors)
        yield from emitted
        run.finish_round(rows, K, accepted, emitted, times)


def speculative_generate_tokens(
    target: DecodingModel,
    drafter: MTPDrafter,
    prompt: Sequence[int],
    *,
    cache=None,
    stats: Stats | None = None,
    spec_stats: SpecStats | None = None,
    **kwargs,
) -> Iterator[int]:
    """One prompt: yield tokens as they are accepted (stop token included).

    `generate_tokens` with a drafter: same arguments, same output.  With `cache`,
    the cache afterwards holds the prompt and every yielded token but the last —
    as after plain decoding — also when the caller stops early.
    """
    cache = None if cache is None else LayerCaches.of(cache)
    start = 0 if cache is None else cache.offset
    t0 = time.perf_counter()
    t1, n = None, 0
    try:
        for _, toks in speculate(target, drafter, [prompt], cache=cache, stats=spec_stats, **kwargs):
            for tok in toks:
                if t1 is None:
                    t1 = time.perf_counter()
                    if stats is not None:
                        stats.prompt_tokens, stats.prompt_time = len(prompt), t1 - t0
                n += 1
                if stats is not None:
                    stats.generation_tokens = n
                    stats.generation_time = time.perf_counter() - t1
                yield tok
    finally:
        if cache is not None:  # stopped early: drop what the caller never saw
            cache.trim_to(start + len(prompt) + max(n - 1, 0))


def speculative_batch_generate(
    target: DecodingModel, drafter: MTPDrafter, prompts: Sequence[Sequence[int]], **kwargs
) -> list[list[int]]:
    """Generate for several prompts at once with an MTP drafter; the same tokens as
    `runtime.generate.batch_generate` with the same stop ids (greedy, or keyed
    sampling with a seed), usually in fewer target forwards.

    target: the model (`checkpoint.load.load_model`); drafter: its MTP drafter
        (`load_drafter(..., target=target)`).
    prompts: token id lists (not empty); rows of different lengths are left-padded
        and finish independently.
    kwargs: the fields of `SpecSettings` — max_tokens (256), options
        (`SamplingOptions`: temperature, top-p/k, min-p, seed, repetition penalty),
        draft_tokens (K or "auto"), stop_ids, stats (a `SpecStats` to fill), ... —
        or settings=SpecSettings(...).
    stop_ids: a row ends at the first of these.  None by default (as `batch_generate`):
        every row runs to max_tokens.  To stop at end of turn, pass
        stop_ids=target.config.eos_ids (plus the tokenizer's `eos_token_ids`, as
        `api.stream_generate` does).

    Returns each prompt's new tokens, its stop token included (as the last one).
    """
    out: list[list[int]] = [[] for _ in prompts]
    for r, toks in speculate(target, drafter, prompts, **kwargs):
        out[r].extend(toks)
    return out


__all__ = [
    "MTPSettings",
    "SpecSettings",
    "SpecStats",
    "draft",
    "verify",
    "pick",
    "accepted_counts",
    "speculate",
    "speculative_generate_tokens",
    "speculative_batch_generate",
    "expected_tokens",
    "profile",
]
