"""The continuous-batching scheduler (docs/serving.md §2-§4).

`step()` does, in order:
  leave    jobs told to stop (`drop`: a client went away, a stop string matched)
           leave the batch; their rows' caches go to the prefix pool;
  admit    while the batch has room, the next waiting job takes the longest cached
           prefix of its prompt from the pool (`cache.prefix.PrefixPool`) and starts
           prefilling the rest in its own single-row cache;
  prefill  one chunk of that job's prompt — so a running row waits at most one
           chunk — and, after the last chunk, its first token; it then joins the
           batch (`LayerCaches.join`);
  round    one decode round for every row: a plain step (K = 0) or a speculative
           round with the MTP drafter, K chosen by the draft policy for the batch
           size.  Rows accept ragged counts (`LayerCaches.commit`); finished rows
           leave.
The scheduler is single-threaded: the server's engine thread owns it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass

import mlx.core as mx

from gemma4_mlx.batching.job import Job, Progress, pick_rows
from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.cache.prefix import PrefixPool
from gemma4_mlx.contracts import DecodingModel, MTPDrafter
from gemma4_mlx.runtime.generate import DEFAULT_PREFILL_CHUNK, prefill_steps
from gemma4_mlx.speculative.loop import profile
from gemma4_mlx.speculative.policy import DraftPolicy
from gemma4_mlx.speculative.round import accepted_counts, draft, verify
from gemma4_mlx.speculative.stats import MTPSettings

MAX_ROLLBACK = 2048  # sliding-layer slack of every cache: prefix reuse rolls back this far


@dataclass
class _Joining:
    job: Job
    cache: LayerCaches
    steps: Generator
    left: int  # prompt tokens still to prefill


class Scheduler:
    """Rows of one model (and optionally its MTP drafter) decoded together."""

    def __init__(
        self,
        model: DecodingModel,
        *,
        drafter: MTPDrafter | None = None,
        draft_tokens: int | str = "auto",
        max_batch: int = 8,
        prefill_chunk: int = 256,
        prefix_budget_bytes: int = 2 << 30,
        kv_bits: int | None = None,
    ):
        """kv_bits: 8 or 4 keep every row's KV cache quantized (docs/kv-cache.md)."""
        self.model, self.drafter = model, drafter
        self.kv_bits = None if kv_bits == 16 else kv_bits
        self.max_batch, self.prefill_chunk = max(1, max_batch), prefill_chunk
        self.pool = PrefixPool(self.fresh, prefix_budget_bytes)
        self.policy = DraftPolicy.for_setting(draft_tokens) if drafter is not None else None
        self.mtp = MTPSettings()
        self.waiting: deque[Job] = deque()
        self.joining: _Joining | None = None
        self.rows: list[Job] = []
        self.caches: LayerCaches | None = None
        self.hidden: mx.array | None = None  # [B, H]: seeds the drafter
        self._drop: set[Job] = set()
        self.rounds = 0
        self.peak_batch = 0  # most rows decoded together so far

    def fresh(self) -> LayerCaches:
        if self.kv_bits is None:
            return LayerCaches.of(self.model.make_cache(max_rollback=MAX_ROLLBACK))
        return LayerCaches.of(self.model.make_cache(max_rollback=MAX_ROLLBACK, kv_bits=self.kv_bits))

    # -- the engine's side ----------------------------------------------------
    def add(self, job: Job) -> None:
        self.waiting.append(job)

    def drop(self, job: Job) -> None:
        """Take `job` out at the start of the next step (its row is freed then)."""
        self._drop.add(job)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting or self.joining)

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting) + (self.joining is not None)

    def abandon(self) -> list[Job]:
        """Give up the running and joining jobs (after an error in a round the batch
        state cannot be trusted); waiting jobs stay queued.  Returns the jobs given up."""
        jobs = self.rows + ([self.joining.job] if self.joining else [])
        self.rows, self.caches, self.hidden, self.joining = [], None, None, None
        self._drop.difference_update(jobs)
        return jobs

    def step(self) -> list[Progress]:
        """One scheduling step (module doc); what each touched job got."""
        self._leave_dropped()
        out: list[Progress] = []
        budget = self.prefill_chunk  # prompt tokens per step: what bounds a running row's wait
        while budget > 0:
            if self.joining is None:
                if not self.waiting or len(self.rows) >= self.max_batch:
                    break
                job = self.waiting.popleft()
                try:
                    self._admit(job)
                except Exception as e:  # only this job fails
                    out.append(Progress(job, done=True, error=e))
                    continue
            budget -= self.joining.left
            out += self._prefill_chunk()
        if self.rows:
            out += self._round()
        return out

    # -- joining --------------------------------------------------------------
    def _admit(self, job: Job) -> None:
        cache, n = self.pool.take(job.keys)
        job.cached = n
        media = None if job.media is None else job.media.rows(n)
        ids = mx.array([job.ids[n:]])
        # with no row waiting on it, the prefill takes generate's larger chunks
        chunk = self.prefill_chunk if self.rows else max(self.prefill_chunk, DEFAULT_PREFILL_CHUNK)
        steps = prefill_steps(self.model, ids, cache, chunk, media)
        self.joining = _Joining(job, cache, steps, len(job.ids) - n)

    def _prefill_chunk(self) -> list[Progress]:
        """One chunk of the joining job's prompt; after the last, its first token and
        its row in the batch.  Whatever fails here is this prompt's (its media, its
        length, its options): only this job fails, the batch is untouched."""
        j = self.joining
        try:
            done = next(j.steps)  # positions filled so far
            j.left = len(j.job.ids) - j.job.cached - done
            return []
        except StopIteration as finished:
            logits, h = finished.value
        except Exception as e:
            self.joining = None
            return [Progress(j.job, done=True, error=e)]
        self.joining = None
        job = j.job
        try:
            mx.eval(logits, h)  # the last chunk is computed here
            picks, lps = pick_rows([job], logits[:, None], None)
        except Exception as e:
            return [Progress(job, done=True, error=e)]
        new = job.take(picks[0])
        job.bonus = picks[0][0]
        if job.finished:
            self._file(job, j.cache)
        elif self.caches is None:
            self.rows, self.caches, self.hidden = [job], j.cache, h
        else:
            self.caches.join(j.cache)
            self.rows.append(job)
            self.hidden = mx.concatenate([self.hidden, h.astype(self.hidden.dtype)])
        return [Progress(job, new, lps[0], job.finished)]

    # -- leaving --------------------------------------------------------------
    def _leave_dropped(self) -> None:
        if not self._drop:
            return
        self.waiting = deque(j for j in self.waiting if j not in self._drop)
        if self.joining is not None and self.joining.job in self._drop:
            self.joining = None
        self._leave([i for i, j in enumerate(self.rows) if j in self._drop])
        self._drop.clear()

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        for i in rows:
            self._file(self.rows[i], self.caches.take_row(i, self.fresh()))
        keep = [i for i in range(len(self.rows)) if i not in rows]
        if not keep:
            self.rows, self.caches, self.hidden = [], None, None
            return
        self.caches.filter(keep)
        self.hidden = self.hidden[mx.array(keep)]
        self.rows = [self.rows[i] for i in keep]
        self.caches.compact()

    def _file(self, job: Job, cache: LayerCaches) -> None:
        """Put a finished row's cache in the prefix pool, holding exactly the prompt
        and the tokens it emitted but the last (as after plain decoding)."""
        seq = list(job.keys) + job.out
        extra = cache.offset - (len(seq) - 1 if job.out else len(seq))
        if extra > 0:
            cache.trim(extra)  # drafts accepted after the stop token
        self.pool.put(seq[: cache.offset], cache)

    # -- decoding -------------------------------------------------------------
    def _draft_length(self, bonus: mx.array) -> int:
        if self.drafter is None:
            return 0
        B = len(self.rows)
        if self.policy.needs_profile(B):
            profile(self.model, self.drafter, self.policy, self.caches, bonus, self.hidden, self.mtp)
        most = max(j.remaining for j in self.rows)
        return max(0, min(self.policy.choose(B), most - 1))

    def _round(self) -> list[Progress]:
        B = len(self.rows)
        bonus = mx.array([j.bonus for j in self.rows])
        K = self._draft_length(bonus)
        t0 = time.perf_counter()
        block, listed = bonus[:, None], None
        if K:
            drafts = draft(self.drafter, self.model, bonus, self.hidden, self.caches, K, self.mtp)
            if self.policy.fixed is None or any(j.processors for j in self.rows):
                mx.eval(drafts)  # timed apart for the policy; processors read them
                listed = drafts.tolist()
            block = mx.concatenate([block, drafts], axis=1)
        t1 = time.perf_counter()
        logits, hidden = verify(self.model, block, self.caches)
        picks, lps = pick_rows(self.rows, logits, listed)
        t2 = time.perf_counter()
        if K and listed is None:
            listed = drafts.tolist()
        accepted = accepted_counts(listed, picks) if K else [0] * B
        self.caches.commit(accepted, K)
        self.hidden = hidden[mx.arange(B), mx.array(accepted)]
        if self.policy is not None:
            self.policy.observe(B, K, accepted, t1 - t0, t2 - t1)
        self.rounds += 1
        self.peak_batch = max(self.peak_batch, B)
        out, leaving = [], []
        for i, job in enumerate(self.rows):
            new = job.take(picks[i][: accepted[i] + 1])
            job.bonus = picks[i][accepted[i]]
            out.append(Progress(job, new, None if lps[i] is None else lps[i][: len(new)], job.finished))
            if job.finished:
                leaving.append(i)
        self._leave(leaving)
        return out


def drain(scheduler: Scheduler, on_progress: Callable[[Progress], None] | None = None) -> None:
    """Step until every job finished (tests, benchmarks, offline batch use)."""
    while scheduler.busy:
        for p in scheduler.step():
            if on_progress is not None:
                on_progress(p)
