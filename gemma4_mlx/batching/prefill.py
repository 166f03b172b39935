"""Prompts on their way into the batch: which waiting jobs are prefilled together,
and the prefill itself (docs/serving.md §2.1).

Several fresh prompts that arrive together are prefilled as one left-padded
multi-row forward into one cache (the layout `runtime.generate.batch_generate`
uses), which then joins the running batch like a single row does
(`LayerCaches.join` keeps each row's `left_pad` / `valid_from`).  Padding keys are
masked and RoPE uses each row's own positions, so every row's keys and logits are
those of its prompt prefilled alone, up to the rounding of the larger matmuls.
A prompt with media, or with a long enough cached prefix in the pool, is
prefilled alone in its own single-row cache.

Twins — jobs whose keys (token ids and media keys) are equal, such as the `n`
choices of one request — are prefilled once: their prompt takes one row of the
prefill, and that row is copied for each of them when it ends (`Joining.rows`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from gemma4_mlx.batching.job import Job
from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.cache.prefix import PrefixPool, common_prefix
from gemma4_mlx.contracts import DecodingModel
from gemma4_mlx.runtime.generate import prefill_steps

# A cached prefix shorter than this is not worth a prefill of its own: a job whose
# best pool match is shorter (a chat template's header) is prefilled whole, grouped.
SHORT_HIT = 32
# A group's padding slots may be at most this fraction of its real prompt tokens
# (padding costs as much compute as a real token).
MAX_PAD_FRACTION = 1.0


@dataclass
class Joining:
    """Jobs whose prompts are being prefilled into one cache (one row each)."""

    jobs: list[Job]
    cache: LayerCaches
    steps: Generator
    width: int  # positions to prefill per row (the longest prompt's, padding included)
    rows: list[int]  # per job, its prompt's row in the prefill (twins share one)
    done: int = 0  # positions filled so far
    dropped: set = field(default_factory=set)  # jobs that left while prefilling

    @property
    def cost(self) -> int:
        """Prompt-token slots the rest of this prefill computes."""
        return (max(self.rows) + 1) * (self.width - self.done)

    def one_row_per_job(self, logits: mx.array, h: mx.array) -> tuple[mx.array, mx.array]:
        """After the last chunk: the cache, logits and hidden states with row i
        holding job i's prompt (twins' rows copied)."""
        if self.rows == list(range(len(self.jobs))):
            return logits, h
        self.cache.filter(self.rows)
        index = mx.array(self.rows)
        return logits[index], h[index]


def groupable(job: Job, pool: PrefixPool, solo: set) -> bool:
    """Whether `job` may be prefilled together with others (no media, no long
    cached prefix to reuse, not sent back after a group failed)."""
    if job.media is not None or job in solo:
        return False
    head = job.keys[: SHORT_HIT + 1]  # only whether a match reaches SHORT_HIT matters (+1: one is fed)
    return max((common_prefix(e.keys[:SHORT_HIT], head) for e in pool.entries), default=0) < SHORT_HIT


def twin_rows(jobs: Sequence[Job]) -> list[int]:
    """Per job, the prefill row of its prompt: twins (equal keys) share the row of
    the first of them; rows are numbered in order of first appearance."""
    first: dict[tuple, int] = {}
    return [first.setdefault(tuple(j.keys), len(first)) for j in jobs]


def distinct_prompts(jobs: Sequence[Job]) -> list[Job]:
    """The first job of each set of twins, in order: row r of the prefill is
    `distinct_prompts(jobs)[r]`'s prompt (the order `twin_rows` numbers them in)."""
    first: dict[tuple, Job] = {}
    for j in jobs:
        first.setdefault(tuple(j.keys), j)
    return list(first.values())


def take_twins(waiting, first: Job, room: int, ok: Callable[[Job], bool]) -> list[Job]:
    """The jobs right behind `first` in `waiting` (popped) that are its twins and
    `ok`, at most `room` of them."""
    twins = []
    while len(twins) < room and waiting and waiting[0].keys == first.keys and ok(waiting[0]):
        twins.append(waiting.popleft())
    return twins


def fits(lengths: Sequence[int], limit: int | None) -> bool:
    """Whether prompts of these lengths are prefilled together: padding within
    MAX_PAD_FRACTION of the real tokens, and all slots within `limit` (None: any)."""
    padded = len(lengths) * max(lengths)
    real = sum(lengths)
    return padded - real <= MAX_PAD_FRACTION * real and (limit is None or padded <= limit)


def pick_group(waiting, first: Job, room: int, limit: int | None, ok: Callable[[Job], bool]) -> list[Job]:
    """`first` and the waiting jobs after it (in order, popped from `waiting`) that
    are prefilled with it: at most `room` jobs, stopping at the first that is not
    `ok` or does not fit."""
    group = [first]
    while len(group) < room and waiting and ok(waiting[0]):
        twin = any(waiting[0].keys == j.keys for j in group)  # costs no prefill: joins whatever the budget
        if not twin and not fits([len(j.ids) for j in distinct_prompts(group + [waiting[0]])], limit):
            break
        group.append(waiting.popleft())
    return group


def start_group(model: DecodingModel, jobs: list[Job], fresh: Callable, tokens_per_chunk: int) -> Joining:
    """The left-padded prefill of several fresh prompts in one cache; each chunk
    spends about `tokens_per_chunk` slots over all rows."""
    prompts = distinct_prompts(jobs)
    width = max(len(j.ids) for j in prompts)
    pads = [width - len(j.ids) for j in prompts]
    ids = mx.array([[0] * p + list(j.ids) for p, j in zip(pads, prompts)])  # pad ids are masked
    cache = fresh(left_pad=pads)
    chunk = max(1, tokens_per_chunk // len(prompts))
    for j in jobs:
        j.cached = 0
    return Joining(jobs, cache, prefill_steps(model, ids, cache, chunk), width, twin_rows(jobs))


def start_alone(model: DecodingModel, jobs: list[Job], pool: PrefixPool, tokens_per_chunk: int) -> Joining:
    """One prompt (of `jobs`, twins) in its own single-row cache, after the longest
    cached prefix."""
    job = jobs[0]
    cache, n = pool.take(job.keys)
    for j in jobs:
        j.cached = n
    media = None if job.media is None else job.media.rows(n)
    steps = prefill_steps(model, mx.array([job.ids[n:]]), cache, tokens_per_chunk, media)
    return Joining(jobs, cache, steps, len(job.ids) - n, [0] * len(jobs))
