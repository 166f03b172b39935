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
    done: int = 0  # positions filled so far
    dropped: set = field(default_factory=set)  # jobs that left while prefilling

    @property
    def cost(self) -> int:
        """Prompt-token slots the rest of this prefill computes."""
        return len(self.jobs) * (self.width - self.done)


def groupable(job: Job, pool: PrefixPool, solo: set) -> bool:
    """Whether `job` may be prefilled together with others (no media, no long
    cached prefix to reuse, not sent back after a group failed)."""
    if job.media is not None or job in solo:
        return False
    head = job.keys[: SHORT_HIT + 1]  # only whether a match reaches SHORT_HIT matters (+1: one is fed)
    return max((common_prefix(e.keys[:SHORT_HIT], head) for e in pool.entries), default=0) < SHORT_HIT


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
        if not fits([len(j.ids) for j in group] + [len(waiting[0].ids)], limit):
            break
        group.append(waiting.popleft())
    return group


def start_group(model: DecodingModel, jobs: list[Job], fresh: Callable, tokens_per_chunk: int) -> Joining:
    """The left-padded prefill of several fresh prompts in one cache; each chunk
    spends about `tokens_per_chunk` slots over all rows."""
    lengths = [len(j.ids) for j in jobs]
    width = max(lengths)
    pads = [width - n for n in lengths]
    ids = mx.array([[0] * p + list(j.ids) for p, j in zip(pads, jobs)])  # pad ids are masked
    cache = fresh(left_pad=pads)
    chunk = max(1, tokens_per_chunk // len(jobs))
    for j in jobs:
        j.cached = 0
    return Joining(jobs, cache, prefill_steps(model, ids, cache, chunk), width)


def start_alone(model: DecodingModel, job: Job, pool: PrefixPool, tokens_per_chunk: int) -> Joining:
    """One prompt in its own single-row cache, after the longest cached prefix."""
    cache, n = pool.take(job.keys)
    job.cached = n
    media = None if job.media is None else job.media.rows(n)
    steps = prefill_steps(model, mx.array([job.ids[n:]]), cache, tokens_per_chunk, media)
    return Joining([job], cache, steps, len(job.ids) - n)
