"""Several fresh prompts prefilled together in one left-padded forward give every
row what its prompt gives alone — logits, final-norm hidden state (the drafter's
seed), the cache it decodes from past the sliding window — and the scheduler's
grouped admission leaves every request's tokens unchanged, with and without a
drafter, under cancellation and failure (docs/serving.md §2.1)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from gemma4_mlx.batching import Job, Scheduler
from gemma4_mlx.batching import prefill as prefill_module
from gemma4_mlx.batching import scheduler as scheduler_module
from gemma4_mlx.batching.prefill import fits, start_group
from gemma4_mlx.batching.scheduler import drain
from gemma4_mlx.runtime.generate import SamplingOptions, prefill_hidden

from helpers.checkpoints import max_diff, random_ids
from helpers.mtp_pairs import PAIRS
from test_batching import alone, drain_all, oracle_draft, prompts, run_jobs


def finish(steps):
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("tokens_per_chunk", [512, 24])  # one chunk; chunks of 3 positions per row
def test_group_prefill_equals_each_prompt_alone(pairs, name, tokens_per_chunk):
    model, _ = pairs[name]
    ps = prompts(8, seed=40)  # lengths 3..17: most cross the window W = 4
    jobs = [Job(p, list(p)) for p in ps]
    fresh = lambda left_pad=None: model.make_cache(max_rollback=64, left_pad=left_pad)  # noqa: E731
    group = start_group(model, jobs, fresh, tokens_per_chunk)
    logits, h = finish(group.steps)
    for i, p in enumerate(ps):
        want_logits, want_h = prefill_hidden(model, mx.array([p]), fresh())
        assert max_diff(logits[i], want_logits[0]) < 1e-4, i
        assert max_diff(h[i], want_h[0]) < 1e-4, i
    seqs = [list(p) for p in ps]
    for step in range(6):  # decode on: every row's keys, sliding layers past the window
        toks = [(11 * step + 5 * i) % 256 for i in range(len(ps))]
        got = model(mx.array([[t] for t in toks]), group.cache)[:, -1]
        for i, t in enumerate(toks):
            seqs[i].append(t)
            assert max_diff(got[i], model(mx.array([seqs[i]]))[0, -1]) < 1e-4, (step, i)


@pytest.mark.parametrize("name", list(PAIRS))
def test_a_burst_is_prefilled_together_and_equals_alone(pairs, name):
    model, _ = pairs[name]
    ps = prompts(8, seed=41)
    maxes = [3 + (i * 5) % 11 for i in range(8)]
    jobs = [Job(p, list(p), max_tokens=m) for p, m in zip(ps, maxes)]
    sched = Scheduler(model, max_batch=8)
    run_jobs(sched, jobs)
    assert sched.largest_group == 8  # one forward for the whole burst
    for j, p, m in zip(jobs, ps, maxes):
        assert j.out == alone(model, p, m)


@pytest.mark.parametrize("name", list(PAIRS))
def test_grouped_rows_join_a_running_speculative_batch(pairs, name, monkeypatch):
    """Two rows run; a burst arrives and is prefilled in groups that fit the step's
    budget; with an oracle drafter accepting ragged counts, every output equals alone."""
    model, drafter = pairs[name]
    ps = prompts(8, seed=42)
    jobs = [Job(p, list(p), max_tokens=10) for p in ps]
    want = [alone(model, p, 10) for p in ps]
    fake = oracle_draft({id(j): w for j, w in zip(jobs, want)}, alpha_mod=3)
    monkeypatch.setattr(scheduler_module, "draft", fake)
    sched = Scheduler(model, drafter=drafter, draft_tokens=3, max_batch=8, prefill_chunk=30)
    fake.sched = sched
    for j in jobs[:2]:
        sched.add(j)
    sched.step()
    sched.step()
    assert len(sched.rows) == 2
    for j in jobs[2:]:
        sched.add(j)
    drain(sched)
    assert [j.out for j in jobs] == want
    assert sched.largest_group >= 2


def test_real_drafter_with_grouped_prefill_is_lossless(pairs):
    model, drafter = pairs["e2b_like"]
    ps = prompts(6, seed=43)
    jobs = [Job(p, list(p), max_tokens=9) for p in ps]
    sched = Scheduler(model, drafter=drafter, max_batch=6)
    run_jobs(sched, jobs)
    assert sched.largest_group == 6
    assert [j.out for j in jobs] == [alone(model, p, 9) for p in ps]


def test_cancel_while_grouped_and_a_failing_prompt_fails_alone(pairs, monkeypatch):
    """A job dropped during its group's prefill never joins; a job whose sampling
    fails sends its group back to be prefilled one by one: only it fails."""
    model, _ = pairs["e2b_like"]
    monkeypatch.setattr(scheduler_module, "DEFAULT_PREFILL_CHUNK", 8)  # several chunks
    ps = prompts(4, seed=44)
    jobs = [Job(p, list(p), max_tokens=6) for p in ps]
    sched = Scheduler(model, max_batch=8, prefill_chunk=8)
    for j in jobs:
        sched.add(j)
    sched.step()
    assert sched.joining is not None and len(sched.joining.jobs) == 4
    sched.drop(jobs[1])
    drain(sched)
    assert jobs[1].out == []
    for i in (0, 2, 3):
        assert jobs[i].out == alone(model, ps[i], 6)

    ps = prompts(3, seed=45)

    def broken(history, logits):  # fails at the first token (in a round it would fail the batch)
        if len(history) == len(ps[1]):
            raise ValueError("bad processor")
        return logits

    jobs = [Job(p, list(p), max_tokens=5) for p in ps]
    jobs[1].processors = [broken]
    errors = []
    sched = Scheduler(model, max_batch=8)
    for j in jobs:
        sched.add(j)
    drain(sched, lambda p: p.error is not None and errors.append((p.job, str(p.error))))
    assert errors == [(jobs[1], "bad processor")]
    assert sched.largest_group == 3  # tried together first
    for i in (0, 2):
        assert jobs[i].out == alone(model, ps[i], 5)


def test_which_prompts_are_grouped(pairs, monkeypatch):
    """Padding within bounds; media and long cached prefixes go alone; a short
    shared header (a chat template's) does not stop a group."""
    assert fits([10, 10], 20) and not fits([10, 10], 19)
    assert fits([3, 3, 12], None) and not fits([2, 3, 12], None)  # padding <= real tokens
    model, _ = pairs["dense"]
    sched = Scheduler(model, max_batch=8)
    head = random_ids(prefill_module.SHORT_HIT, seed=50)
    run_jobs(sched, [Job(head, list(head), max_tokens=2)])  # files a cache holding the head
    other = head[:-1] + [(head[-1] + 1) % 256]  # shares SHORT_HIT - 1 tokens with it
    short = [Job(other + p, other + p, max_tokens=2) for p in prompts(2, seed=51)]
    run_jobs(sched, short)
    assert sched.largest_group == 2 and [j.cached for j in short] == [0, 0]
    long = [Job(head + p, head + p, max_tokens=2) for p in prompts(2, seed=52)]
    seen = []
    monkeypatch.setattr(scheduler_module, "start_group", lambda *a: seen.append(a) or 1 / 0)
    run_jobs(sched, long)  # the shared head is long enough to be reused: alone
    assert seen == [] and all(j.cached >= prefill_module.SHORT_HIT for j in long)


def _prefill_rows(monkeypatch) -> list[int]:
    """Records the rows of every prefill the scheduler starts."""
    rows = []
    real = prefill_module.prefill_steps

    def counted(model, ids, *a, **k):
        rows.append(ids.shape[0])
        return real(model, ids, *a, **k)

    monkeypatch.setattr(prefill_module, "prefill_steps", counted)
    return rows


@pytest.mark.parametrize("name", list(PAIRS))
def test_twins_are_prefilled_once(pairs, name, monkeypatch):
    """Equal prompts (the n choices of a request) take one row of a group's prefill;
    each twin still decodes with its own sampler and seed, as it would alone."""
    model, _ = pairs[name]
    a, b = prompts(2, seed=60)
    opts = [SamplingOptions(), SamplingOptions(temperature=1.0, seed=61), SamplingOptions(temperature=1.0, seed=62)]
    jobs = [Job(a, list(a), options=o, max_tokens=8) for o in opts] + [Job(b, list(b), max_tokens=8) for _ in range(2)]
    rows = _prefill_rows(monkeypatch)
    sched = Scheduler(model, max_batch=8)
    drain_all(sched, jobs)
    assert rows == [2] and sched.largest_group == 5
    assert [j.out for j in jobs[:3]] == [alone(model, a, 8, o) for o in opts]
    assert jobs[1].out != jobs[2].out  # the seeds still differ
    assert jobs[3].out == jobs[4].out == alone(model, b, 8)


def test_twins_join_while_rows_decode(pairs, monkeypatch):
    """With rows decoding, a step's prefill budget bounds a group's padded size; a twin
    adds nothing to it, so twins of a prompt longer than the budget still share."""
    model, _ = pairs["dense"]
    sched = Scheduler(model, max_batch=8, prefill_chunk=16)
    runner = Job(*[prompts(1, seed=66)[0]] * 2, max_tokens=40)
    sched.add(runner)
    sched.step()
    assert sched.rows == [runner]
    p = random_ids(40, seed=67)  # longer than the budget
    jobs = [Job(p, list(p), max_tokens=5) for _ in range(3)]
    rows = _prefill_rows(monkeypatch)
    drain_all(sched, jobs)
    assert rows == [1]
    assert [j.out for j in jobs] == [alone(model, p, 5)] * 3


def test_twins_with_a_cached_prefix_are_prefilled_once(pairs, monkeypatch):
    """Twins that reuse a cached prefix (a conversation's next turn, n > 1) are
    prefilled alone, once, after it; all report the reused tokens."""
    model, _ = pairs["dense"]
    sched = Scheduler(model, max_batch=8)
    head = random_ids(prefill_module.SHORT_HIT + 8, seed=63)
    run_jobs(sched, [Job(head, list(head), max_tokens=2)])
    p = head + prompts(1, seed=64)[0]
    jobs = [Job(p, list(p), options=SamplingOptions(temperature=1.0, seed=s), max_tokens=6) for s in (1, 2, 3)]
    rows = _prefill_rows(monkeypatch)
    drain_all(sched, jobs)
    assert rows == [1]
    assert all(j.cached >= prefill_module.SHORT_HIT for j in jobs)
    assert [j.out for j in jobs] == [alone(model, p, 6, j.options) for j in jobs]


def test_twins_whose_prefill_fails_are_retried_one_by_one(pairs, monkeypatch):
    """A failed shared prefill sends the twins back to be prefilled one at a time,
    not again together (which would fail again, forever)."""
    model, _ = pairs["dense"]
    sched = Scheduler(model, max_batch=8)
    head = random_ids(prefill_module.SHORT_HIT + 4, seed=65)
    run_jobs(sched, [Job(head, list(head), max_tokens=2)])
    jobs = [Job(head + [1, 2], head + [1, 2], max_tokens=3) for _ in range(3)]
    real, calls = scheduler_module.start_alone, []

    def fail_when_shared(model, group, *a):
        calls.append(len(group))
        if len(calls) > 8:  # pytest.fail is no Exception: the scheduler cannot catch it
            pytest.fail(f"prefills retried in a loop: {calls}")
        if len(group) > 1:
            raise ValueError("shared prefill failed")
        return real(model, group, *a)

    monkeypatch.setattr(scheduler_module, "start_alone", fail_when_shared)
    drain_all(sched, jobs)
    assert calls == [3, 1, 1, 1]
    assert [j.out for j in jobs] == [alone(model, head + [1, 2], 3)] * 3
