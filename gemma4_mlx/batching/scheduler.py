"""The continuous-batching scheduler (docs/serving.md §2-§4).

`step()` does, in order:
  leave    jobs told to stop (`drop`: a client went away, a stop string matched)
           leave the batch; their rows' caches go to the prefix pool;
  admit    while the batch has room, the next waiting job takes the longest cached
           prefix of its prompt from the pool (`cache.prefix.PrefixPool`) and starts
           prefilling the rest in its own single-row cache — or, a fresh text
           prompt, is prefilled together with the fresh prompts queued behind it
           in one left-padded cache (`batching.prefill`, docs/serving.md §2.1);
  prefill  one chunk of those prompts — so a running row waits at most one
           chunk — and, after the last chunk, their first tokens; their rows then
           join the batch (`LayerCaches.join`);
  round    one decode round for every row: a plain step (K = 0) or a speculative
           round with the MTP drafter, K chosen by the draft policy for the batch
           size.  Rows accept ragged counts (`LayerCaches.commit`); finished rows
           leave.
The scheduler is single-threaded: the server's engine thread owns it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import mlx.core as mx

from gemma4_mlx.batching.job import Job, Progress, pick_rows
from gemma4_mlx.batching.memory import KVBudget
from gemma4_mlx.batching.prefill import (
    Joining,
    distinct_prompts,
    groupable,
    pick_group,
    start_alone,
    start_group,
    take_twins,
)
from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.cache.prefix import PrefixPool
from gemma4_mlx.contracts import DecodingModel, MTPDrafter
from gemma4_mlx.models.parallel import from_leader
from gemma4_mlx.runtime.generate import DEFAULT_PREFILL_CHUNK
from gemma4_mlx.speculative.loop import profile
from gemma4_mlx.speculative.policy import DraftPolicy
from gemma4_mlx.speculative.round import accepted_counts, commit, draft, verify
from gemma4_mlx.speculative.stats import MTPSettings

MAX_ROLLBACK = 2048  # sliding-layer slack of every cache: prefix reuse rolls back this far


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
        kv_budget_bytes: int | None = None,
    ):
        """kv_bits: 8 or 4 keep every row's KV cache quantized (docs/kv-cache.md);
        kv_budget_bytes: the most KV bytes the batch may reach (docs/serving.md §2.2)."""
        self.model, self.drafter = model, drafter
        self.kv_bits = None if kv_bits == 16 else kv_bits
        self.max_batch, self.prefill_chunk = max(1, max_batch), prefill_chunk
        self.pool = PrefixPool(self.fresh, prefix_budget_bytes)
        self.policy = DraftPolicy.for_setting(draft_tokens) if drafter is not None else None
        self.mtp = MTPSettings()
        self.waiting: deque[Job] = deque()
        self.joining: Joining | None = None
        self.rows: list[Job] = []
        self.caches: LayerCaches | None = None
        self.hidden: mx.array | None = None  # [B, H]: seeds the drafter
        self._drop: set[Job] = set()
        self._solo: set[Job] = set()  # jobs whose group prefill failed: they go alone
        self.kv = KVBudget(kv_budget_bytes)
        self._held = False  # the next job waits for rows to leave (KV budget)
        self.rounds = 0
        self.largest_group = 0  # most prompts prefilled together so far
        self.peak_batch = 0  # most rows decoded together so far

    def fresh(self, left_pad=None) -> LayerCaches:
        quant = {} if self.kv_bits is None else {"kv_bits": self.kv_bits}  # not in the model protocol
        return LayerCaches.of(self.model.make_cache(max_rollback=MAX_ROLLBACK, left_pad=left_pad, **quant))

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
        return len(self.rows) + len(self.waiting) + (len(self.joining.jobs) if self.joining else 0)

    def abandon(self) -> list[Job]:
        """Give up the running and joining jobs (after an error in a round the batch
        state cannot be trusted); waiting jobs stay queued.  Returns the jobs given up."""
        jobs = self.rows + (self.joining.jobs if self.joining else [])
        self.rows, self.caches, self.hidden, self.joining = [], None, None, None
        self._drop.difference_update(jobs)
        self._held = False
        return jobs

    def step(self) -> list[Progress]:
        """One scheduling step (module doc); what each touched job got."""
        self._leave_dropped()
        out: list[Progress] = []
        budget = self.prefill_chunk  # prompt tokens per step: what bounds a running row's wait
        while budget > 0:
            if self.joining is None:
                if not self.waiting or len(self.rows) >= self.max_batch or self._held:
                    break
                out += self._admit(budget)
                if self.joining is None:
                    continue
            budget -= self.joining.cost
            out += self._prefill_chunk()
        if self.rows:
            out += self._round()
        return out

    # -- joining --------------------------------------------------------------
    def _admit(self, budget: int) -> list[Progress]:
        """Start prefilling the next waiting job, together with the fresh prompts
        behind it when it is one too (docs/serving.md §2.1)."""
        job = self.waiting.popleft()
        # with no row waiting on it, the prefill takes generate's larger chunks
        tokens = self.prefill_chunk if self.rows else max(self.prefill_chunk, DEFAULT_PREFILL_CHUNK)
        ok = lambda j: groupable(j, self.pool, self._solo)  # noqa: E731
        room = self.max_batch - len(self.rows)
        if ok(job):
            group = pick_group(self.waiting, job, room, budget if self.rows else None, ok)
        else:  # prefilled alone, once for it and its twins (not for jobs sent back alone)
            group = [job] + take_twins(
                self.waiting, job, room - 1, lambda j: job not in self._solo and j not in self._solo
            )
        self.kv.learn(self.model, self.fresh)
        slots = self._full_slots()
        while len(group) > 1 and not self.kv.admits(self.rows, slots, group):
            self.waiting.appendleft(group.pop())
        if not self.kv.admits(self.rows, slots, group):
            if not self.rows:  # it does not fit even alone
                return [Progress(job, done=True, error=self.kv.refusal(job))]
            self.waiting.appendleft(job)  # first in line once rows leave
            self._held = True
            return []
        try:
            if len(distinct_prompts(group)) > 1:
                self.joining = start_group(self.model, group, self.fresh, tokens)
                self.largest_group = max(self.largest_group, len(group))
            else:
                self._solo.difference_update(group)
                self.joining = start_alone(self.model, group, self.pool, tokens)
        except Exception as e:  # only these prompts fail (a prefix, media, a length)
            return self._failed(group, e)
        return []

    def _prefill_chunk(self) -> list[Progress]:
        """One chunk of the joining prompts; after the last, their first tokens and
        their rows in the batch.  Whatever fails here is these prompts' (media,
        length, options), never the batch's: a lone job fails, a group's jobs go
        back to the queue to be prefilled one by one."""
        j = self.joining
        live = [i for i, job in enumerate(j.jobs) if job not in j.dropped]
        try:
            j.done = next(j.steps)  # positions filled so far
            return []
        except StopIteration as finished:
            logits, h = finished.value
        except Exception as e:
            self.joining = None
            return self._failed([j.jobs[i] for i in live], e)
        self.joining = None
        try:
            logits, h = j.one_row_per_job(logits, h)
            mx.eval(logits, h)  # the last chunk is computed here
            picks, lps = pick_rows([j.jobs[i] for i in live], logits[mx.array(live)][:, None], None)
        except Exception as e:
            return self._failed([j.jobs[i] for i in live], e)
        out, keep = [], []
        for n, i in enumerate(live):
            job = j.jobs[i]
            new = job.take(picks[n])
            job.bonus = picks[n][0]
            out.append(Progress(job, new, lps[n], job.finished, job.grammar_failure()))
            if not job.finished:
                keep.append(i)
            elif len(j.jobs) == 1:  # its cache is the prefill's own
                self._file(job, j.cache)
            else:
                self._file(job, j.cache.take_row(i, self.fresh()))
        if keep:
            self._enter([j.jobs[i] for i in keep], j.cache, h, keep, len(j.jobs))
        return out

    def _failed(self, jobs: list[Job], error: Exception) -> list[Progress]:
        """A lone job fails; a group's jobs go back to the front of the queue, each
        to be prefilled alone, so that only the one at fault fails."""
        if len(jobs) == 1:
            return [Progress(jobs[0], done=True, error=error)]
        self._solo.update(jobs)
        self.waiting.extendleft(reversed(jobs))
        return []

    def _full_slots(self) -> int:
        """Slots the batch holds in its full-attention layers (what a new row pays too)."""
        if self.caches is None:
            return 0
        return max((c.size for c in self.caches.writers() if c.window is None), default=self.caches.offset)

    def _enter(self, jobs: list[Job], cache: LayerCaches, h: mx.array, keep: list[int], width: int) -> None:
        """Rows `keep` of a prefilled cache (of `width` rows) join the batch."""
        if len(keep) < width:
            cache.filter(keep)
            h = h[mx.array(keep)]
        if self.caches is None:
            self.rows, self.caches, self.hidden = jobs, cache, h
        else:
            self.caches.join(cache)
            self.rows += jobs
            self.hidden = mx.concatenate([self.hidden, h.astype(self.hidden.dtype)])

    # -- leaving --------------------------------------------------------------
    def _leave_dropped(self) -> None:
        if not self._drop:
            return
        self.waiting = deque(j for j in self.waiting if j not in self._drop)
        if self.joining is not None:
            self.joining.dropped.update(j for j in self.joining.jobs if j in self._drop)
            if len(self.joining.dropped) == len(self.joining.jobs):
                self.joining = None
        self._leave([i for i, j in enumerate(self.rows) if j in self._drop])
        self._solo -= self._drop
        self._drop.clear()

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        self._held = False
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
        cache.trim_to(len(seq) - 1 if job.out else len(seq))  # drafts accepted after the stop token
        self.pool.put(seq[: cache.offset], cache)

    # -- decoding -------------------------------------------------------------
    def _draft_length(self, bonus: mx.array) -> int:
        if self.drafter is None:
            return 0
        B = len(self.rows)
        if self.policy.needs_profile(B):
            profile(self.model, self.drafter, self.policy, self.caches, bonus, self.hidden, self.mtp)
        most = max(j.remaining for j in self.rows)
        k = from_leader(self.policy.choose(B, most), getattr(self.model, "tp", None))  # same K on every rank
        return max(0, min(k, most - 1))

    def _round(self) -> list[Progress]:
        B = len(self.rows)
        bonus = mx.array([j.bonus for j in self.rows])
        K = self._draft_length(bonus)
        t0 = time.perf_counter()
        block, listed = bonus[:, None], None
        if K:
            drafts = draft(self.drafter, self.model, bonus, self.hidden, self.caches, K, self.mtp)
            if self.policy.fixed is None or any(j.reads_drafts for j in self.rows):
                mx.eval(drafts)  # timed apart for the policy; processors and budgets read them
                listed = drafts.tolist()
            block = mx.concatenate([block, drafts], axis=1)
        t1 = time.perf_counter()
        logits, hidden = verify(self.model, block, self.caches)
        picks, lps = pick_rows(self.rows, logits, listed)
        if K and listed is None:
            listed = drafts.tolist()
        accepted = accepted_counts(listed, picks) if K else [0] * B
        timed = self.policy is not None and self.policy.fixed is None
        self.hidden = commit(self.caches, hidden, accepted, K, timed)
        t2 = time.perf_counter()
        if self.policy is not None:
            self.policy.observe(B, K, accepted, t1 - t0, t2 - t1)
        self.rounds += 1
        self.peak_batch = max(self.peak_batch, B)
        out, leaving = [], []
        for i, job in enumerate(self.rows):
            new = job.take(picks[i][: accepted[i] + 1])
            job.bonus = picks[i][accepted[i]]
            lp = None if lps[i] is None else lps[i][: len(new)]
            out.append(Progress(job, new, lp, job.finished, job.grammar_failure()))
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
