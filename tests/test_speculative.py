"""Speculative decoding is lossless: greedy equals plain greedy, sampling equals plain
sampling token for token, ragged batches equal each row alone, and after every
round the caches hold exactly what plain decoding would (docs/speculative.md §7-§10, §15).

Random drafters almost never guess right, so most tests replace the drafter's
tokens (after it ran) by the reference continuation at a set rate — docs/speculative.md §14.2's
controlled-acceptance method — to exercise every acceptance length.
"""

from __future__ import annotations

import gc
import random
import time

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx import api
from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.runtime.generate import SamplingOptions, generate_tokens
from gemma4_mlx.speculative import policy as policy_module
from gemma4_mlx.speculative.loop import MTPSettings, SpecStats, speculative_batch_generate
from gemma4_mlx.speculative.policy import DraftPolicy, pair_policy

from helpers.checkpoints import W, random_ids
from helpers.mtp_pairs import PAIRS

LENGTHS = [5, 13, 3, 9, 17, 7, 11, 4]  # mixed; most cross the window W = 4
MAX = 14


def prompts_for(B: int, seed: int = 0):
    return [random_ids(LENGTHS[i], seed=seed + i) for i in range(B)]


def oracle(reference, alpha: float, seed: int, vocab: int = 256):
    """Draft override: the reference token at rate alpha, else a surely wrong one."""
    rng = random.Random(seed)

    def override(rows, index, drafts):
        out = []
        for r, n, d in zip(rows, index, drafts):
            ref = reference[r]
            new = []
            for j in range(len(d)):
                want = ref[n + j] if n + j < len(ref) else d[j]
                new.append(want if rng.random() < alpha else (want + 1) % vocab)
            out.append(new)
        return out

    return override


def plain(target, prompts, max_tokens=MAX):
    return [list(generate_tokens(target, p, max_tokens=max_tokens)) for p in prompts]


@pytest.mark.parametrize("name", list(PAIRS))
def test_greedy_equals_plain_decoding_for_every_batch_and_draft_length(pairs, name):
    target, drafter = pairs[name]
    for B in (1, 2, 4, 8):
        prompts = prompts_for(B, seed=B)
        ref = plain(target, prompts)
        for K in range(1, 8):
            stats = SpecStats()
            out = speculative_batch_generate(
                target,
                drafter,
                prompts,
                max_tokens=MAX,
                draft_tokens=K,
                stats=stats,
                draft_override=oracle(ref, 0.75, seed=K),
            )
            assert out == ref, (name, B, K)
            assert stats.tokens_per_round > 1.4, (name, B, K)  # drafts really were accepted
            if B > 1:  # ragged: rows accepted different counts in the same round
                assert 0 < stats.acceptance()[0] < 1


@pytest.mark.parametrize("name", list(PAIRS))
def test_real_drafter_and_auto_draft_length_are_lossless(pairs, name):
    target, drafter = pairs[name]
    prompts = prompts_for(4, seed=7)
    ref = plain(target, prompts, 20)
    for setting in (3, "auto"):
        assert speculative_batch_generate(target, drafter, prompts, max_tokens=20, draft_tokens=setting) == ref
    for mtp in (MTPSettings("bonus"), MTPSettings(sliding_keys=W + 1)):
        assert speculative_batch_generate(target, drafter, prompts, max_tokens=20, draft_tokens=2, mtp=mtp) == ref


def test_auto_times_each_commit_in_its_own_round(pairs, monkeypatch):
    """draft_tokens="auto": a round's commit (ragged rows rolled in every cache) is
    timed with the round that caused it — left to the next round, a plain step after
    a speculative one was charged for both (docs/speculative.md §12.1)."""
    target, drafter = pairs["dense"]
    real = LayerCaches.commit

    def slow_commit(self, accepted, drafted):
        real(self, accepted, drafted)
        if drafted:
            time.sleep(0.05)  # stands for a speculative round's cache work

    monkeypatch.setattr(LayerCaches, "commit", slow_commit)
    policy = DraftPolicy.for_setting("auto")
    speculative_batch_generate(target, drafter, prompts_for(1, seed=3), max_tokens=12, policy=policy)
    drafted = [T for T in policy.verify_time if T > 1]  # one row: T = K + 1
    assert drafted and all(policy.verify_time[T] >= 0.05 for T in drafted), policy.verify_time


def test_auto_starts_drafting_and_is_told_the_tokens_left(pairs):
    """Round 1 (cold, docs/speculative.md §12.1) drafts and round 2 is plain; every
    choice knows the most tokens a row may still emit (no probe near the end)."""
    target, drafter = pairs["dense"]
    seen = []

    class Recording(DraftPolicy):
        def choose(self, B, left=None):
            K = super().choose(B, left)
            seen.append((left, K))
            return K

    speculative_batch_generate(target, drafter, prompts_for(2, seed=5), max_tokens=12, policy=Recording())
    lefts = [left for left, _ in seen]
    assert seen[0] == (11, 2) and seen[1][1] == 0  # the first token comes from the prefill
    assert lefts == sorted(lefts, reverse=True) and lefts[-1] >= 1, seen


def _check_against_fresh(target, prompts, seen, max_tokens):
    """on_commit hook: each continuing row's valid K/V equals a fresh prefill."""

    def hook(caches, rows, outputs):
        for b, r in enumerate(rows):
            if len(outputs[r]) >= max_tokens:  # finished: leaves the batch next round
                continue
            seq = prompts[r] + outputs[r][:-1]  # the newest token is not in the cache yet
            fresh = target.make_cache()
            target.fill_cache(mx.array([seq]), fresh)
            for c, f in zip(caches, fresh):
                if c is None:
                    continue
                pad = 0 if c.left_pad is None else int(c.left_pad[b])
                assert c.offset - pad == len(seq)  # the row's next position
                oldest = c.offset - c.size
                first = max(oldest, 0 if c.valid_from is None else int(c.valid_from[b]))
                n = min(c.offset - first, f.size)
                if c.window is not None:
                    assert n >= min(c.window - 1, len(seq))
                for got, want in zip(c.state, f.state):
                    d = np.abs(np.array(got[b, :, -n:]) - np.array(want[0, :, -n:])).max()
                    assert d < 1e-4, (r, len(seq), d)  # fp32, other batch shapes
        seen.append(len(rows))

    return hook


@pytest.mark.parametrize("name", list(PAIRS))
def test_cache_after_every_round_equals_plain_prefill(pairs, name):
    target, drafter = pairs[name]
    prompts = prompts_for(4, seed=3)
    ref = plain(target, prompts, 24)
    seen = []
    out = speculative_batch_generate(
        target,
        drafter,
        prompts,
        max_tokens=24,
        draft_tokens=4,
        draft_override=oracle(ref, 0.6, seed=1),
        on_commit=_check_against_fresh(target, prompts, seen, 24),
    )
    assert out == ref
    assert len(seen) >= 5


def test_sampling_is_token_identical_to_plain_sampling(pairs):
    target, drafter = pairs["e2b_like"]
    prompts = prompts_for(4, seed=11)
    opts = SamplingOptions(temperature=0.9, top_p=0.95, top_k=40, repetition_penalty=1.2, seed=1234)
    base = speculative_batch_generate(target, drafter, prompts, max_tokens=20, options=opts, draft_tokens=0)
    for K, alpha in ((1, 0.9), (3, 0.7), (6, 0.8)):
        out = speculative_batch_generate(
            target, drafter, prompts, max_tokens=20, options=opts, draft_tokens=K, draft_override=oracle(base, alpha, K)
        )
        assert out == base, K
    other = speculative_batch_generate(
        target, drafter, prompts, max_tokens=20, options=SamplingOptions(temperature=0.9, seed=99), draft_tokens=0
    )
    assert other != base  # the seed matters


def test_stop_tokens_and_max_tokens_end_rows(pairs):
    target, drafter = pairs["dense"]
    prompts = prompts_for(4, seed=5)
    ref = plain(target, prompts, 16)
    stop = ref[1][5]  # row 1 stops at its sixth token (others may stop on it too)
    out = speculative_batch_generate(
        target,
        drafter,
        prompts,
        max_tokens=16,
        draft_tokens=5,
        stop_ids=[stop],
        draft_override=oracle(ref, 0.9, seed=2),
    )
    for o, r in zip(out, ref):
        want = r[: r.index(stop) + 1] if stop in r else r
        assert o == want
    assert len(out[1]) <= 6


def test_a_seed_gives_the_same_text_with_or_without_a_drafter(pairs):
    target, drafter = pairs["moe"]
    prompt = prompts_for(1, seed=21)[0]
    # A negative presence penalty makes the output repeat itself (the penalties then
    # matter: without them this prompt's 16 tokens are all different).
    opts = SamplingOptions(
        temperature=0.8, top_k=30, repetition_penalty=1.3, presence_penalty=-0.7, frequency_penalty=0.3, seed=5
    )
    plain_run = list(generate_tokens(target, prompt, max_tokens=16, options=opts))
    assert len(set(plain_run)) < len(plain_run)
    spec = speculative_batch_generate(
        target,
        drafter,
        [prompt],
        max_tokens=16,
        options=opts,
        draft_tokens=3,
        draft_override=oracle([plain_run], 0.8, 0),
    )
    assert spec == [plain_run]


def test_cache_handed_in_ends_as_plain_decoding_leaves_it(pairs):
    """Chat sessions continue one cache: after an early stop it must hold exactly the
    prompt and every token the caller took except the last."""
    from gemma4_mlx.speculative.loop import speculative_generate_tokens

    target, drafter = pairs["e2b_like"]
    prompt = prompts_for(1, seed=4)[0]
    ref = plain(target, [prompt], 20)[0]
    cache = target.make_cache(max_rollback=64)
    got = []
    for tok in speculative_generate_tokens(
        target, drafter, prompt, cache=cache, max_tokens=20, draft_tokens=4, draft_override=oracle([ref], 0.9, 3)
    ):
        got.append(tok)
        if len(got) == 7:
            break
    assert got == ref[:7]
    assert cache.offset == len(prompt) + 6
    # continuing from that cache gives plain decoding's next tokens
    more = list(speculative_generate_tokens(target, drafter, [got[-1]], cache=cache, max_tokens=5, draft_tokens=2))
    assert more == ref[7:12]


@pytest.mark.parametrize("name", list(PAIRS))
def test_batched_drafts_equal_single_row_drafts(pairs, name):
    """The drafter itself, not only the acceptance logic: every round, each row's
    drafts from the ragged batch (per-row positions, masks, reseeded hiddens) equal
    the drafts computed for that row alone from a fresh prefill."""
    from gemma4_mlx.runtime.generate import prefill_hidden
    from gemma4_mlx.speculative.loop import draft

    target, drafter = pairs[name]
    prompts = prompts_for(4, seed=9)
    ref = plain(target, prompts, 20)
    steer = oracle(ref, 0.6, seed=4)
    checked = []

    def check_then_steer(rows, index, drafts):
        for r, n, d in zip(rows, index, drafts):
            cache = target.make_cache()
            _, h = prefill_hidden(target, mx.array([prompts[r] + ref[r][: n - 1]]), cache)
            alone = draft(drafter, target, mx.array([ref[r][n - 1]]), h, cache, len(d), MTPSettings())
            assert alone.tolist()[0] == d, (r, n)
            checked.append(n)
        return steer(rows, index, drafts)

    out = speculative_batch_generate(
        target, drafter, prompts, max_tokens=20, draft_tokens=3, draft_override=check_then_steer
    )
    assert out == ref and len(checked) > 12 and max(checked) > 2 * W


def test_long_single_row_run_drops_and_rolls_back_sliding_entries(pairs):
    target, drafter = pairs["e2b_like"]
    prompt = prompts_for(5, seed=2)[4]  # 17 tokens
    ref = plain(target, [prompt], 48)
    out = speculative_batch_generate(
        target,
        drafter,
        [prompt],
        max_tokens=48,
        draft_tokens=5,
        max_rollback=6,
        draft_override=oracle(ref, 0.7, seed=8),
    )
    assert out == ref  # context 65 > the 3 + 32 slots a sliding cache keeps


def test_edge_cases(pairs):
    target, drafter = pairs["dense"]
    prompt = prompts_for(1, seed=6)[0]
    assert speculative_batch_generate(target, drafter, [prompt], max_tokens=0) == [[]]
    runs = {
        tuple(
            speculative_batch_generate(
                target, drafter, [prompt], max_tokens=8, options=SamplingOptions(temperature=1.0)
            )[0]
        )
        for _ in range(3)
    }
    assert len(runs) > 1  # no seed: random, as plain sampling
    with pytest.raises(ValueError, match="non-empty prompt"):
        speculative_batch_generate(target, drafter, [[]], max_tokens=4)


def test_seeded_batch_generate_equals_speculative_batch(pairs):
    from gemma4_mlx.runtime.generate import batch_generate

    target, drafter = pairs["moe"]
    prompts = prompts_for(4, seed=13)
    opts = SamplingOptions(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=21)
    base = batch_generate(target, prompts, max_tokens=14, options=opts)
    spec = speculative_batch_generate(
        target, drafter, prompts, max_tokens=14, options=opts, draft_tokens=3, draft_override=oracle(base, 0.8, 5)
    )
    assert spec == base
    alone = [list(generate_tokens(target, p, max_tokens=14, options=opts)) for p in prompts[:1]]
    assert alone[0] == base[0]  # row 0 of a batch samples what it samples alone


def test_auto_policy_of_a_pair_carries_over_between_api_calls(pairs):
    """`api.generate_ids` with draft_tokens="auto": the second call with the same
    (target, drafter) goes on with what the first learned (no second warm start);
    a fixed K leaves it alone; another pair, or the drafter with a new target, gets
    its own.  Output stays plain greedy."""
    target, drafter = pairs["dense"]
    prompt = prompts_for(1, seed=6)[0]
    ref = plain(target, [prompt], 10)[0]
    policy = pair_policy(target, drafter)
    assert policy.rounds == 0 and not policy.verify_time
    assert list(api.generate_ids(target, prompt, max_tokens=10, draft_model=drafter)) == ref
    learned = policy.rounds
    assert learned > 0 and policy.draft_time and pair_policy(target, drafter) is policy
    assert list(api.generate_ids(target, prompt, max_tokens=10, draft_model=drafter)) == ref
    assert policy.rounds > learned
    learned = policy.rounds
    assert list(api.generate_ids(target, prompt, max_tokens=10, draft_model=drafter, draft_tokens=2)) == ref
    assert pair_policy(target, drafter) is policy and policy.rounds == learned

    other_target, other = pairs["e2b_like"]
    assert pair_policy(other_target, other) is not policy
    assert pair_policy(other_target, drafter) is not policy  # a new target starts over
    assert pair_policy(target, drafter).rounds == 0


def test_pair_policies_do_not_keep_drafters_alive():
    class Drafter:
        pass

    target, gone = Drafter(), Drafter()
    pair_policy(target, gone)
    held = len(policy_module._PAIR_POLICIES)
    del gone
    gc.collect()
    assert len(policy_module._PAIR_POLICIES) == held - 1
