"""Speculative decoding with Gemma 4's MTP drafters (mtp-drafter spec §7-§10).

A round, for every live row at once:
  draft    K tokens with the drafter, seeded by (bonus token, target hidden);
  verify   [bonus, d_1..d_K] in one target forward (K + 1 positions per row);
  accept   per row, while the target's own pick equals the draft (sample-and-compare
           with keyed randomness: the output is the plain-decoding output);
  commit   keep A_i + 1 new cache entries in row i — rows accept different counts
           (ragged), no clamping to the batch minimum (`cache.commit_caches`);
  reseed   bonus = the target's pick after the last accepted draft, h = its hidden.
K = 0 is plain decoding through the same code.  K comes from a `DraftPolicy`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import mlx.core as mx

from gemma4_mlx.cache import cache_offset, commit_caches, draft_view, trim_caches
from gemma4_mlx.config import FULL
from gemma4_mlx.speculative.policy import DraftPolicy, expected_tokens
from gemma4_mlx.runtime.generate import DEFAULT_PREFILL_CHUNK, SamplingOptions, Stats, apply_processors, prefill_hidden
from gemma4_mlx.models.assistant import check_pair, producer_layers
from gemma4_mlx.runtime.sampling import PositionedSampler


@dataclass
class MTPSettings:
    """Where the drafter's query sits (spec §4).

    position: "last_committed" (p = L - 1; vLLM, SGLang, mlx-vlm) or "bonus" (p = L;
        transformers).  The training convention is undocumented; both are offered.
    sliding_keys: keys the drafter sees on sliding layers: None = the window W,
        or W + 1 as transformers passes them.
    """

    position: str = "last_committed"
    sliding_keys: int | None = None

    def __post_init__(self):
        if self.position not in ("last_committed", "bonus"):
            raise ValueError(f"mtp position {self.position!r}: expected 'last_committed' or 'bonus'")


@dataclass
class SpecStats:
    rounds: int = 0  # batched rounds
    row_rounds: int = 0  # sum over rounds of live rows
    tokens: int = 0  # tokens emitted by rounds (the first token comes from the prefill)
    drafted_at: list = field(default_factory=list)  # per position j: drafts judged (all before accepted)
    accepted_at: list = field(default_factory=list)  # ... of which accepted
    reached_at: list = field(default_factory=list)  # per position j: rounds that drafted it
    k_used: dict = field(default_factory=dict)  # K -> rounds
    draft_time: float = 0.0
    verify_time: float = 0.0

    def record(self, K: int, accepted: list[int], emitted: int) -> None:
        self.rounds += 1
        self.row_rounds += len(accepted)
        self.tokens += emitted
        self.k_used[K] = self.k_used.get(K, 0) + 1
        while len(self.drafted_at) < K:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
            self.reached_at.append(0)
        for a in accepted:
            for j in range(K):
                self.reached_at[j] += 1
                if j <= a:  # draft j is judged only if drafts 0..j-1 were accepted
                    self.drafted_at[j] += 1
                    self.accepted_at[j] += j < a

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.row_rounds if self.row_rounds else 0.0

    def acceptance(self) -> list[float]:
        """Conditional acceptance per draft position: P(draft j accepted | drafts
        before it accepted) — the a_j of the spec and of `DraftPolicy`."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def reach(self) -> list[float]:
        """P(A >= j + 1): the share of drafted positions j that ended up accepted."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached_at)]

    def line(self) -> str:
        acc = " ".join(f"{a:.2f}" for a in self.acceptance()) or "-"
        ks = ",".join(f"K={k}:{n}" for k, n in sorted(self.k_used.items()))
        return (f"speculative: {self.tokens_per_round:.2f} tokens/round over {self.rounds} rounds "
                f"({ks}) | acceptance by position: {acc}")


def draft(drafter, target, bonus: mx.array, h: mx.array, caches, K: int,
          mtp: MTPSettings) -> mx.array:
    """K greedy draft tokens per row [B, K], as a lazy graph (no host sync)."""
    cfg = target.config
    kv, masks = {}, {}
    for t, i in producer_layers(cfg).items():
        n = None if t == FULL else (mtp.sliding_keys or cfg.sliding_window)
        k, v, m = draft_view(caches[i], n)
        kv[t], masks[t] = (k, v), m
    pos = caches[producer_layers(cfg)[FULL]].positions()  # L: the bonus token's position
    offset = pos - 1 if mtp.position == "last_committed" else pos
    tok, hcur, out = bonus, h[:, None, :], []
    for _ in range(K):
        e = target.model.embed(tok[:, None])  # target table * sqrt(D_t)
        x, hcur = drafter.step(mx.concatenate([e, hcur.astype(e.dtype)], axis=-1), kv, masks, offset)
        tok = drafter.argmax(x)[:, 0]
        out.append(tok)
    return mx.stack(out, axis=1)


def verify(target, block: mx.array, caches) -> tuple[mx.array, mx.array]:
    """Target logits [B, T, V] and final-norm hiddens [B, T, H] for every position."""
    h = target.model(block, caches)
    return target.logits(h), h


def pick(sampler: PositionedSampler, processors, logits: mx.array, rows: Sequence[int],
         index: Sequence[int], histories=None, drafts=None) -> mx.array:
    """The target's token at every verify position [B, T].

    Row b, position j is output index index[b] + j of stream rows[b].  Processors
    (penalties) see the history plus the drafts before position j (spec §8.5).
    """
    B, T, V = logits.shape
    logits = logits.reshape(B * T, V)
    if processors:
        hists = [mx.array(histories[b] + (drafts[b][:j] if drafts else []))
                 for b in range(B) for j in range(T)]
        logits = apply_processors(logits, hists, processors)
    flat_rows = [r for r in rows for _ in range(T)]
    flat_index = [i + j for i in index for j in range(T)]
    return sampler(logits, flat_rows, flat_index).reshape(B, T)


def accepted_counts(drafts: list[list[int]], picks: list[list[int]]) -> list[int]:
    out = []
    for d, p in zip(drafts, picks):
        a = 0
        while a < len(d) and d[a] == p[a]:
            a += 1
        out.append(a)
    return out


def profile(target, drafter, policy: DraftPolicy, caches, bonus: mx.array, h: mx.array,
            mtp: MTPSettings) -> None:
    """Measure t_verify(B * (K + 1)) on the live caches (each block is trimmed off
    again, exactly) and one draft step, for the cost-aware policy."""
    B = bonus.shape[0]
    for K in policy.profile_ks():
        block = mx.repeat(bonus[:, None], K + 1, axis=1)
        for _ in range(2):  # the first run of a shape warms up (kernel builds on GPUs)
            t0 = time.perf_counter()
            mx.eval(verify(target, block, caches))
            dt = time.perf_counter() - t0
            trim_caches(caches, K + 1)
        policy.record_profile(B * (K + 1), dt)
    k = min(2, policy.k_max)
    for _ in range(2):
        t0 = time.perf_counter()
        mx.eval(draft(drafter, target, bonus, h, caches, k, mtp))
        dt = time.perf_counter() - t0
    policy.draft_time[B] = dt / k
    policy.profiled = True


def speculate(target, drafter, prompts: Sequence[Sequence[int]], *, max_tokens: int = 256,
              options: SamplingOptions | None = None, stop_ids: Sequence[int] = (),
              draft_tokens: int | str = "auto", policy: DraftPolicy | None = None,
              mtp: MTPSettings | None = None, pad_id: int = 0,
              prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_rollback: int | None = None,
              stats: SpecStats | None = None, draft_override=None,
              on_commit=None, cache=None, media=None) -> Iterator[tuple[int, list[int]]]:
    """Yield (row, new tokens) as rows advance; a row's stop token is yielded and ends it.

    draft_tokens: K, or "auto" (cost-aware `DraftPolicy`); 0 is plain decoding.
    Greedy output equals plain greedy decoding; sampled output equals plain sampling
    with the same keyed sampler (`PositionedSampler`), for every K.
    draft_override(rows, index, drafts) -> drafts: replaces the drafter's tokens
        after it ran (controlled-acceptance benchmarks and tests, spec §14).
    on_commit(caches, rows, outputs): called after every round's cache commit.
    cache: continue an existing single-row cache (chat sessions); `prompts[0]` are
        the ids it does not hold yet.  It must allow rollback of K + 1 tokens.
    media: `MediaRows` of a single prompt's placeholders (only the prefill reads them).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("speculative decoding needs at least one non-empty prompt")
    check_pair(drafter.config, target.config)  # one clear line for a mismatched drafter
    options = options or SamplingOptions()
    mtp = mtp or MTPSettings()
    stats = stats if stats is not None else SpecStats()
    policy = policy or DraftPolicy.for_setting(draft_tokens)
    # No seed: a fresh one per call (plain sampling is random then too).
    seed = options.seed if options.seed is not None else random.getrandbits(32)
    sampler = PositionedSampler(options.temperature, options.top_p, options.top_k,
                                options.min_p, seed)
    processors = options.processors()
    stop = set(stop_ids)
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    if cache is not None:
        if len(prompts) != 1:
            raise ValueError("an existing cache serves one prompt")
        caches = cache
    else:
        caches = target.make_cache(max_rollback=max(32, max_rollback or 2 * policy.k_max + 2),
                                   left_pad=pads if any(pads) else None)
    ids = mx.array([[pad_id] * n + list(p) for n, p in zip(pads, prompts)])
    if media is not None and len(prompts) != 1:
        raise ValueError("media prompts run one at a time")
    logits, h = prefill_hidden(target, ids, caches, prefill_chunk, media)
    if max_tokens <= 0:  # as plain decoding: the prompt is in the cache, nothing is emitted
        return
    live = list(range(len(prompts)))
    hist = [list(p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    first = pick(sampler, processors, logits[:, None], live, [0] * len(live), hist).tolist()
    bonus_l = [f[0] for f in first]
    keep = []
    for r, t in zip(live, bonus_l):
        out[r].append(t)
        hist[r].append(t)
        yield r, [t]
        if t not in stop and len(out[r]) < max_tokens:
            keep.append(r)
    while keep:
        if len(keep) < len(live):  # finished rows leave the batch
            sel = [live.index(r) for r in keep]
            idx = mx.array(sel)
            for c in caches:
                if c is not None:
                    c.filter(sel)
            h = h[idx]
            bonus_l = [bonus_l[i] for i in sel]
            live = keep
        B = len(live)
        left = max(max_tokens - len(out[r]) for r in live)
        bonus = mx.array(bonus_l)
        if policy.needs_profile(B):
            profile(target, drafter, policy, caches, bonus, h, mtp)
        K = min(policy.choose(B), left - 1)
        t0 = time.perf_counter()
        # The host needs the drafts before verifying only to time the two phases
        # (auto K), to override them, or for per-position processors; otherwise
        # drafting and verifying run as one graph with a single sync.
        sync = policy.fixed is None or draft_override is not None or bool(processors)
        drafts_l = [[] for _ in live]
        if K:
            drafts = draft(drafter, target, bonus, h, caches, K, mtp)
            if sync:
                mx.eval(drafts)
                drafts_l = drafts.tolist()
            if draft_override is not None:
                drafts_l = draft_override(live, [len(out[r]) for r in live], drafts_l)
                drafts = mx.array(drafts_l, dtype=drafts.dtype)
            block = mx.concatenate([bonus[:, None], drafts], axis=1)
        else:
            block = bonus[:, None]
        t1 = time.perf_counter()
        logits, hidden = verify(target, block, caches)
        picks = pick(sampler, processors, logits, live, [len(out[r]) for r in live],
                     [hist[r] for r in live], drafts_l)
        mx.eval(picks, hidden)
        t2 = time.perf_counter()
        if K and not sync:
            drafts_l = drafts.tolist()
        picks_l = picks.tolist()
        acc = accepted_counts(drafts_l, picks_l)
        commit_caches(caches, acc, K)
        h = hidden[mx.arange(B), mx.array(acc)]
        emitted_total, keep = 0, []
        for i, r in enumerate(live):
            new = []
            for t in picks_l[i][: acc[i] + 1]:
                new.append(t)
                if t in stop or len(out[r]) + len(new) >= max_tokens:
                    break
            if len(new) < acc[i] + 1 and len(live) == 1:
                # the last row stopped inside the round: keep its cache at exactly
                # what plain decoding would hold (chat sessions reuse it)
                trim_caches(caches, acc[i] + 1 - len(new))
            out[r].extend(new)
            hist[r].extend(new)
            emitted_total += len(new)
            yield r, new
            if new[-1] not in stop and len(out[r]) < max_tokens:
                keep.append(r)
            bonus_l[i] = picks_l[i][acc[i]]
        if on_commit is not None:
            on_commit(caches, live, out)
        stats.record(K, acc, emitted_total)
        stats.draft_time += t1 - t0
        stats.verify_time += t2 - t1
        policy.observe(B, K, acc, t1 - t0, t2 - t1)


def speculative_generate_tokens(target, drafter, prompt: Sequence[int], *, cache=None,
                                stats: Stats | None = None, spec_stats: SpecStats | None = None,
                                **kwargs) -> Iterator[int]:
    """One prompt: yield tokens as they are accepted (stop token included).

    `generate_tokens` with a drafter: same arguments, same output.  With `cache`,
    the cache afterwards holds the prompt and every yielded token but the last —
    as after plain decoding — also when the caller stops early.
    """
    start = 0 if cache is None else cache_offset(cache)
    t0 = time.perf_counter()
    t1, n = None, 0
    try:
        for _, toks in speculate(target, drafter, [prompt], cache=cache, stats=spec_stats,
                                 **kwargs):
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
            extra = cache_offset(cache) - (start + len(prompt) + max(n - 1, 0))
            if extra > 0:
                trim_caches(cache, extra)


def speculative_batch_generate(target, drafter, prompts: Sequence[Sequence[int]],
                               **kwargs) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in prompts]
    for r, toks in speculate(target, drafter, prompts, **kwargs):
        out[r].extend(toks)
    return out


__all__ = ["MTPSettings", "SpecStats", "draft", "verify", "pick", "accepted_counts", "speculate",
           "speculative_generate_tokens", "speculative_batch_generate", "expected_tokens", "profile"]
