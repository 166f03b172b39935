"""The KV-memory admission check (docs/serving.md §2.2): jobs that would push the
batch's projected KV bytes past the budget wait for rows to leave (their output
unchanged), the batch's real KV bytes never pass the budget, and a job that cannot
fit even alone fails with one line naming the budget."""

from __future__ import annotations

from gemma4_mlx.batching import Job, Scheduler
from gemma4_mlx.batching.memory import KVBudget
from gemma4_mlx.cache import quantized as kvs

from helpers.checkpoints import random_ids
from test_batching import alone


def kv_bytes(sched: Scheduler) -> int:
    if sched.caches is None:
        return 0
    return sum(kvs.nbytes(k) + kvs.nbytes(v) for k, v in sched.caches.state)


def test_jobs_wait_for_room_and_the_batch_stays_within_budget(pairs):
    model, _ = pairs["e2b_like"]  # sliding and full-attention layers
    ps = [random_ids(12, seed=60 + i) for i in range(6)]
    jobs = [Job(p, list(p), max_tokens=8) for p in ps]
    probe = KVBudget(1)
    sched = Scheduler(model, max_batch=8)
    probe.learn(model, sched.fresh)
    budget = probe.projected([], 0, jobs[:2])  # two of these jobs at their largest
    assert budget < probe.projected([], 0, jobs[:3])
    sched = Scheduler(model, max_batch=8, kv_budget_bytes=budget)
    for j in jobs:
        sched.add(j)
    seen, steps = 0, 0
    while sched.busy:
        steps += 1
        assert steps < 100  # waiting jobs do get in
        assert not any(p.error for p in sched.step())
        seen = max(seen, kv_bytes(sched))
        assert kv_bytes(sched) <= budget
    assert sched.peak_batch == 2 and seen > budget // 2
    assert [j.out for j in jobs] == [alone(model, p, 8) for p in ps]


def test_a_job_that_cannot_fit_alone_fails_alone(pairs):
    model, _ = pairs["dense"]
    small, big = random_ids(5, seed=61), random_ids(40, seed=62)
    probe = KVBudget(1)
    sched = Scheduler(model)
    probe.learn(model, sched.fresh)
    jobs = [Job(big, list(big), max_tokens=30), Job(small, list(small), max_tokens=4)]
    sched = Scheduler(model, kv_budget_bytes=probe.projected([], 0, jobs[1:]))
    errors = []
    for j in jobs:
        sched.add(j)
    for _ in range(50):
        errors += [(p.job, str(p.error)) for p in sched.step() if p.error is not None]
    assert not sched.busy
    assert [e[0] for e in errors] == [jobs[0]]
    assert "KV cache for its 40 prompt tokens" in errors[0][1] and "--kv-cache-gb" in errors[0][1]
    assert jobs[1].out == alone(model, small, 4)
