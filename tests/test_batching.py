"""Continuous batching is exact: rows that join a running batch (prefilled apart,
aligned at the write slot) and leave it give every request what it gets alone, with
and without a drafter; a row's cache taken out of the batch continues as if it had
run alone; the prefix pool reuses exact prefixes (docs/serving.md)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from gemma4_mlx.batching import Job, Scheduler
from gemma4_mlx.batching import scheduler as scheduler_module
from gemma4_mlx.batching.scheduler import drain
from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.cache.prefix import PrefixPool
from gemma4_mlx.runtime.generate import SamplingOptions, generate_tokens, prefill

from helpers.checkpoints import max_diff, random_ids
from helpers.mtp_pairs import PAIRS

LENGTHS = [5, 13, 3, 9, 17, 7, 11, 4]  # most cross the window W = 4


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    return [random_ids(LENGTHS[i % len(LENGTHS)] + i // len(LENGTHS), seed=seed + i) for i in range(n)]


def alone(model, prompt, max_tokens, options=None):
    return list(generate_tokens(model, prompt, max_tokens=max_tokens, options=options))


@pytest.mark.parametrize("name", list(PAIRS))
def test_joined_rows_decode_as_alone(pairs, name):
    """Cache level: rows prefilled apart, joined (either side longer), decode exactly
    as alone; a row taken back out continues as alone."""
    model, _ = pairs[name]
    ps = [random_ids(n, seed=n) for n in (13, 3, 9)]
    caches = []
    for p in ps:
        c = model.make_cache(max_rollback=64)
        prefill(model, mx.array([p]), c)
        caches.append(c)
    batch = caches[0]
    for c in caches[1:]:
        batch.join(c)
    seqs = [list(p) for p in ps]
    for step in range(6):  # past the window: sliding rows drop keys while batched
        toks = [(7 * step + 3 * i) % 256 for i in range(3)]
        got = model(mx.array([[t] for t in toks]), batch)[:, -1]
        for i, t in enumerate(toks):
            seqs[i].append(t)
            assert max_diff(got[i], model(mx.array([seqs[i]]))[0, -1]) < 1e-4, (step, i)
    row = batch.take_row(1, model.make_cache(max_rollback=64))
    assert row.offset == len(seqs[1])
    nxt = model(mx.array([[5]]), row)[0, -1]
    assert max_diff(nxt, model(mx.array([seqs[1] + [5]]))[0, -1]) < 1e-4


def run_jobs(sched: Scheduler, jobs: list[Job], arrive_every: int = 0) -> None:
    """Add jobs (all at once, or one every `arrive_every` steps) and step to the end."""
    pending = list(jobs)
    steps = 0
    while pending or sched.busy:
        if pending and (arrive_every == 0 or steps % arrive_every == 0):
            batch = pending if arrive_every == 0 else pending[:1]
            for j in batch:
                sched.add(j)
            pending = pending[len(batch) :]
        sched.step()
        steps += 1


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("arrive_every", [0, 3])
def test_greedy_jobs_equal_alone(pairs, name, arrive_every):
    model, _ = pairs[name]
    ps = prompts(10, seed=arrive_every)
    maxes = [4 + (i * 5) % 13 for i in range(10)]
    jobs = [Job(p, list(p), max_tokens=m) for p, m in zip(ps, maxes)]
    run_jobs(Scheduler(model, max_batch=4, prefill_chunk=5), jobs, arrive_every)
    for j, p, m in zip(jobs, ps, maxes):
        assert j.out == alone(model, p, m)


def oracle_draft(reference: dict, alpha_mod: int):
    """A drafter that proposes each row's true continuation except every
    alpha_mod-th token (docs/speculative.md §14.2): exercises every acceptance length."""
    calls = [0]

    def fake(drafter, target, bonus, h, caches, K, mtp):
        sched = fake.sched
        out = []
        for job in sched.rows:
            ref, n = reference[id(job)], len(job.out)
            row = []
            for k in range(K):
                calls[0] += 1
                want = ref[n + k] if n + k < len(ref) else 0
                row.append(want if calls[0] % alpha_mod else (want + 1) % 256)
            out.append(row)
        return mx.array(out)

    return fake


@pytest.mark.parametrize("name", list(PAIRS))
def test_speculative_rounds_over_the_batch_equal_alone(pairs, name, monkeypatch):
    model, drafter = pairs[name]
    ps = prompts(8, seed=5)
    jobs = [Job(p, list(p), max_tokens=12) for p in ps]
    want = [alone(model, p, 12) for p in ps]
    fake = oracle_draft({id(j): w for j, w in zip(jobs, want)}, alpha_mod=4)
    monkeypatch.setattr(scheduler_module, "draft", fake)
    sched = Scheduler(model, drafter=drafter, draft_tokens=3, max_batch=5, prefill_chunk=4)
    fake.sched = sched
    run_jobs(sched, jobs, arrive_every=2)
    assert [j.out for j in jobs] == want
    assert sched.rounds < sum(len(w) for w in want) / 2  # drafts were accepted


def test_real_drafter_auto_policy_is_lossless(pairs):
    model, drafter = pairs["e2b_like"]
    ps = prompts(6, seed=9)
    jobs = [Job(p, list(p), max_tokens=10) for p in ps]
    run_jobs(Scheduler(model, drafter=drafter, max_batch=3), jobs, arrive_every=1)
    assert [j.out for j in jobs] == [alone(model, p, 10) for p in ps]


def test_seeded_sampling_and_penalties_per_row_equal_alone(pairs):
    """Each row its own sampler, seed and penalties, as `generate` with the same options."""
    model, _ = pairs["dense"]
    ps = prompts(4, seed=3)
    opts = [
        SamplingOptions(temperature=1.0, seed=11),
        SamplingOptions(temperature=0.7, top_p=0.9, seed=12, repetition_penalty=1.3),
        SamplingOptions(),
        SamplingOptions(temperature=1.0, top_k=20, seed=13, presence_penalty=0.5, frequency_penalty=0.3),
    ]
    jobs = [Job(p, list(p), options=o, max_tokens=9) for p, o in zip(ps, opts)]
    drain_all(Scheduler(model, max_batch=4), jobs)
    for j, p, o in zip(jobs, ps, opts):
        assert j.out == alone(model, p, 9, o)


def drain_all(sched, jobs):
    for j in jobs:
        sched.add(j)
    drain(sched)


def test_stop_tokens_and_dropping_a_row(pairs):
    model, _ = pairs["moe"]
    ps = prompts(4, seed=21)
    want = [alone(model, p, 14) for p in ps]
    stop = want[0][2]
    jobs = [Job(p, list(p), max_tokens=14, stop_ids=frozenset({stop})) for p in ps]
    sched = Scheduler(model, max_batch=4)
    for j in jobs:
        sched.add(j)
    for _ in range(8):
        sched.step()
    assert jobs[3] in sched.rows and len(jobs[3].out) < 14
    sched.drop(jobs[3])  # a client went away
    sched.step()
    assert jobs[3] not in sched.rows
    dropped_at = len(jobs[3].out)
    drain(sched)
    assert len(jobs[3].out) == dropped_at
    for j, w in zip(jobs[:3], want):
        cut = w.index(stop) + 1 if stop in w else len(w)
        assert j.out == w[:cut]


def test_prefix_pool_reuses_a_conversation_past_the_window(pairs):
    model, _ = pairs["e2b_like"]
    sched = Scheduler(model, max_batch=2)
    first = random_ids(15, seed=4)
    a = Job(first, list(first), max_tokens=6)
    drain_all(sched, [a])
    follow = first + a.out + random_ids(5, seed=8)
    b = Job(follow, list(follow), max_tokens=8)
    drain_all(sched, [b])
    assert b.cached == len(first) + len(a.out) - 1  # the last output was never fed
    assert b.cached > 4  # past the window W = 4: sliding layers rolled back exactly
    assert b.out == alone(model, follow, 8)


def test_prefix_pool_budget_and_copies(pairs):
    model, _ = pairs["dense"]
    fresh = lambda: model.make_cache(max_rollback=64)  # noqa: E731
    p = random_ids(12, seed=1)
    c = fresh()
    prefill(model, mx.array([p]), c)
    pool = PrefixPool(fresh, budget_bytes=10**9)
    pool.put(p, c)
    one, n1 = pool.take(p + [3])
    two, n2 = pool.take(p[:6] + [9, 9])
    assert (n1, n2) == (12, 6) and len(pool.entries) == 1
    before = [mx.array(k) for k, _ in pool.entries[0].cache.state]
    model(mx.array([[3]]), one)  # writing into a copy leaves the entry alone
    one.trim(2)
    model(mx.array([[7, 8]]), one)  # overwrite slots the entry holds
    assert pool.entries[0].cache.offset == 12
    assert all(mx.array_equal(a, k) for a, (k, _) in zip(before, pool.entries[0].cache.state))
    small = PrefixPool(fresh, budget_bytes=pool.nbytes - 1)
    small.put(p, c)
    assert small.entries == []  # larger than the budget: not kept


def test_compacting_a_batch_after_rows_left(pairs, monkeypatch):
    """Dead leading slots are dropped (min_slots=1 forces it): every remaining row's
    cache still gives the logits of its whole sequence, and no token changes."""
    model, _ = pairs["e2b_like"]
    ps = prompts(6, seed=31)
    maxes = [3, 16, 4, 16, 5, 16]
    jobs = [Job(p, list(p), max_tokens=m) for p, m in zip(ps, maxes)]
    sched = Scheduler(model, max_batch=6)
    freed, real = [], LayerCaches.compact

    def eager(self, min_slots=256):
        before = sum(c.size for c in self.writers())
        real(self, min_slots=1)
        freed.append(before - sum(c.size for c in self.writers()))
        for i, job in enumerate(sched.rows):
            row = self.take_row(i, sched.fresh())
            seq = job.ids + job.out
            got = model(mx.array([seq[-1:]]), row)[0, -1]
            assert max_diff(got, model(mx.array([seq]))[0, -1]) < 1e-4

    monkeypatch.setattr(LayerCaches, "compact", eager)
    drain_all(sched, jobs)
    assert any(freed)  # slots were freed
    for j, p, m in zip(jobs, ps, maxes):
        assert j.out == alone(model, p, m)
