"""One request's token stream in a batch (`Job`) and the per-row pick of a round.

Every row samples with its own options.  Randomness is keyed by (seed, 0, output
index) — `runtime.sampling.PositionedSampler` with the request as stream 0 — so a
request draws the same tokens alone or beside others, with or without a drafter,
as `generate` with the same seed does (docs/serving.md §2).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from gemma4_mlx import ops
from gemma4_mlx.batching.thinking import ThinkingBudget
from gemma4_mlx.constrain import ConstraintError
from gemma4_mlx.runtime.generate import SamplingOptions, grammar_failure
from gemma4_mlx.runtime.processors import History, apply_processors
from gemma4_mlx.runtime.sampling import PositionedSampler
from gemma4_mlx.speculative.round import emit


@dataclass(eq=False)
class Job:
    """ids: the prompt; keys: per position the token id or a media key (what a cached
    prefix must match); media: a `MediaPrompt` for the placeholders; stop_ids: tokens
    that end it (yielded, then the job leaves); logprobs: None, or how many of the
    most likely alternatives to report with every token's own log-probability;
    thinking: a budget of thinking tokens (`batching.thinking`)."""

    ids: list[int]
    keys: list
    options: SamplingOptions = field(default_factory=SamplingOptions)
    max_tokens: int = 256
    stop_ids: frozenset = frozenset()
    media: Any = None
    logprobs: int | None = None
    thinking: ThinkingBudget | None = None
    out: list[int] = field(default_factory=list)  # tokens emitted so far
    cached: int = 0  # prompt positions reused from the prefix pool

    def __post_init__(self):
        o = self.options
        seed = o.seed if o.seed is not None else random.getrandbits(32)
        self.sampler = PositionedSampler(o.temperature, o.top_p, o.top_k, o.min_p, seed)
        self.processors = o.processors()
        self.history = History(self.ids)  # prompt + out: what the processors read
        self.bonus = 0  # the token the next round feeds first
        self.thought = self.thinking.at_start(self.ids) if self.thinking else None  # after `out`

    @property
    def simple(self) -> bool:
        """Greedy without processors or log-probabilities: one batched argmax."""
        return self.sampler.greedy and not self.processors and self.logprobs is None

    @property
    def reads_drafts(self) -> bool:
        """Whether picking its tokens reads a round's drafts on the host: processors
        and the thinking budget see each position's history."""
        return bool(self.processors) or self.thinking is not None

    @property
    def remaining(self) -> int:
        return self.max_tokens - len(self.out)

    def take(self, picks: Sequence[int]) -> list[int]:
        """Emit picks in order, cut after a stop token or at max_tokens (as a
        speculative round's rows are: `speculative.round.emit`)."""
        new = emit(picks, self.remaining, self.stop_ids)
        self.out.extend(new)
        self.history.extend(new)
        if self.thinking:
            self.thought = self.thinking.after(self.thought, new)
        return new

    @property
    def finished(self) -> bool:
        ended = bool(self.out) and (self.out[-1] in self.stop_ids or self.remaining <= 0)
        return ended or self.grammar_failure() is not None

    def grammar_failure(self) -> ConstraintError | None:
        """The grammar engine's error if it failed mid-output (the job ends with it:
        the text so far is not an answer the grammar accepts)."""
        why = grammar_failure(self.processors)
        return None if why is None else ConstraintError(why)


@dataclass
class Progress:
    """What one step did for one job: new tokens (stop token included), their
    log-probabilities when asked — per token (logprob, [(token, logprob), ...]) —,
    whether the job left the batch, or the error that ended it."""

    job: Job
    tokens: list[int] = field(default_factory=list)
    logprobs: list | None = None
    done: bool = False
    error: BaseException | None = None


def _row_logits(job: Job, logits: mx.array, drafts: list[int] | None) -> mx.array:
    """logits [T, V] of one row after its processors; position t sees the history
    plus the drafts before it (docs/speculative.md §8.5)."""
    if not job.processors:
        return logits
    T = logits.shape[0]
    hists = [job.history + (drafts[:t] if drafts else []) for t in range(T)]
    return apply_processors(logits, hists, job.processors)


def _top(logits: mx.array, toks: mx.array, n: int):
    lp = logits.astype(mx.float32)
    lp = lp - ops.logsumexp(lp)
    chosen = mx.take_along_axis(lp, toks[:, None], axis=-1)[:, 0]
    if not n:
        return chosen, None, None
    # the n best, then their order: sorting the whole vocabulary took ~30 ms a row
    # for 262,144 tokens on the CPU, this ~3 ms
    ids = mx.argpartition(-lp, kth=n - 1, axis=-1)[:, :n] if n < lp.shape[-1] else mx.argsort(-lp, axis=-1)
    top = mx.take_along_axis(lp, ids, axis=-1)
    order = mx.argsort(-top, axis=-1)
    return chosen, mx.take_along_axis(ids, order, axis=-1), mx.take_along_axis(top, order, axis=-1)


def _budget_masks(job: Job, drafts: list[int] | None, T: int, V: int) -> mx.array | None:
    if job.thinking is None:
        return None
    return job.thinking.masks(job.thought, drafts or [], T, V)


def pick_rows(jobs: Sequence[Job], logits: mx.array, drafts: list[list[int]] | None):
    """The picks [B][T] at every position of every row, and per row its
    log-probabilities (None unless the job asked): logits [B, T, V]; drafts: the
    round's drafts per row (position t follows drafts[:t]), given whenever a row
    `reads_drafts`. A thinking budget that binds masks its row at those positions."""
    B, T, V = logits.shape
    masks = [_budget_masks(j, drafts[i] if drafts else None, T, V) for i, j in enumerate(jobs)]
    simple = [i for i, j in enumerate(jobs) if j.simple and masks[i] is None]
    lazy: dict[int, Any] = {}
    if simple:
        greedy = mx.argmax(logits[mx.array(simple)], axis=-1)
        for n, i in enumerate(simple):
            lazy[i] = (greedy[n], None)
    for i, job in enumerate(jobs):
        if i in lazy:
            continue
        if job.simple:  # greedy, its thinking budget binding at some position: one masked argmax
            lazy[i] = (mx.argmax(logits[i] + masks[i].astype(logits.dtype), axis=-1), None)
            continue
        x = _row_logits(job, logits[i], drafts[i] if drafts else None)
        if masks[i] is not None:  # the thinking budget binds at some position
            x = x + masks[i].astype(x.dtype)
        toks = job.sampler(x, [0] * T, [len(job.out) + t for t in range(T)])
        lazy[i] = (toks, None if job.logprobs is None else _top(x, toks, job.logprobs))
    mx.eval([a for i in range(B) for a in (lazy[i][0], *(lazy[i][1] or ())) if a is not None])
    picks = [lazy[i][0].tolist() for i in range(B)]
    return picks, [_listed(lazy[i][1]) for i in range(B)]


def _listed(top):
    if top is None:
        return None
    chosen, ids, lps = (None if a is None else a.tolist() for a in top)
    if ids is None:
        return [(c, []) for c in chosen]
    # alternatives a grammar masked to -inf are not alternatives (and JSON
    # has no -inf): fewer than asked are reported when fewer tokens were allowed
    return [(c, [(t, v) for t, v in zip(i, p) if math.isfinite(v)]) for c, i, p in zip(chosen, ids, lps)]
