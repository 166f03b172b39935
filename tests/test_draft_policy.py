"""The cost-aware draft-length policy (docs/speculative.md §11-§12) on synthetic costs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gemma4_mlx.speculative.policy import NEIGHBOUR_EVERY, PROBE_EVERY, DraftPolicy, expected_tokens, start_k


def policy_with(verify, draft_step, acceptance, k_max=7):
    p = DraftPolicy(k_max=k_max, acceptance=list(acceptance)[:k_max])
    for T in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 48, 56, 64):
        p.record_profile(T, verify(T))
    for B in (1, 2, 4, 8):
        p.draft_time[B] = draft_step
    return p


def moe_verify(T, E=128, k=8):
    # docs/speculative.md §11.2: dense part + head read once, experts as the union U(T) (B params)
    U = E * (1 - (1 - k / E) ** T)
    return 2.395 + 30 * U * 5.95e-3


def test_expected_tokens():
    assert expected_tokens([]) == 1.0
    assert expected_tokens([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    a = 0.7
    assert expected_tokens([a] * 3) == pytest.approx((1 - a**4) / (1 - a))


def test_fixed_and_settings():
    assert DraftPolicy.for_setting(3).choose(4) == 3
    assert DraftPolicy.for_setting(0).choose(1) == 0
    assert DraftPolicy.for_setting("auto").fixed is None
    with pytest.raises(ValueError, match="draft tokens"):
        DraftPolicy.for_setting("many")
    with pytest.raises(ValueError, match="0..32"):
        DraftPolicy.for_setting(-1)


def test_cheap_verify_drafts_deep_expensive_verify_turns_speculation_off():
    flat = policy_with(lambda T: 1.0 + 0.01 * T, 0.02, [0.9] * 7)
    assert flat.choose(1) == 7
    compute_bound = policy_with(lambda T: float(T), 0.05, [0.8] * 7)
    assert compute_bound.choose(1) == 0


def test_moe_target_drafts_deeper_at_larger_batches():
    # 26B profile of docs/speculative.md §14.2; a 4-bit drafter step costs ~0.1 of a decode step here
    acc = [0.844, 0.71, 0.64, 0.70, 0.7, 0.7, 0.7]
    ks = {B: policy_with(moe_verify, 0.1 * moe_verify(1), acc).choose(B) for B in (1, 8)}
    assert ks[1] < ks[8], ks  # the union of experts saturates: depth gets cheaper with B
    dense = policy_with(lambda T: 3.82 * (1 + 0.05 * (T - 1)), 0.38, acc)
    assert dense.choose(8) <= dense.choose(1)  # dense: the opposite direction


def test_acceptance_is_learned_and_k0_is_probed():
    p = policy_with(lambda T: 1.0 + 0.05 * T, 0.05, [0.9] * 7)
    for _ in range(200):
        p.observe(1, 3, [0], 0.1, 1.0)  # every first draft rejected
    assert p.acceptance[0] < 0.01
    ks = [p.choose(1) for _ in range(2 * PROBE_EVERY)]
    assert ks.count(0) >= 2 * PROBE_EVERY - 2 and max(ks) > 0  # off, with probes
    for _ in range(200):
        p.observe(1, 3, [3], 0.1, 1.0)  # everything accepted again
    assert p.choose(1) > 0


def test_measured_costs_update_the_model():
    p = DraftPolicy()
    p.observe(2, 3, [1, 2], t_draft=0.3, t_verify=2.0)
    assert p.verify_time[8] == 2.0 and p.draft_time[2] == pytest.approx(0.1)
    assert p.t_verify(4) == 2.0  # one point: flat below it
    p.record_profile(2, 1.0)
    assert p.t_verify(5) == pytest.approx(1.0 + 1.0 * 3 / 6)  # interpolated
    assert p.t_verify(16) > 2.0  # extended with the last slope


def test_stats_acceptance_is_conditional():
    from gemma4_mlx.speculative.loop import SpecStats

    s = SpecStats()
    s.record(3, [0, 3, 1], emitted=1 + 4 + 2)
    assert s.acceptance() == [2 / 3, 1 / 2, 1.0]  # judged only after accepted prefixes
    assert s.reach() == [2 / 3, 1 / 3, 1 / 3]  # P(A >= j + 1)
    assert s.tokens_per_round == 7 / 3


def test_plain_step_cost_is_probed_while_speculating():
    p = policy_with(lambda T: 1.0 + 0.01 * T, 0.02, [0.9] * 7)
    ks = [p.choose(1) for _ in range(PROBE_EVERY + 1)]  # round 1 switched to speculating
    assert ks.count(0) == 1 and ks[-1] == 0 and set(ks[:-1]) == {6, 7}  # 6: a neighbour re-measured
    assert ks.count(6) <= PROBE_EVERY // NEIGHBOUR_EVERY


def test_probes_back_off_while_they_confirm_the_choice():
    p = policy_with(lambda T: 1.0 + 0.01 * T, 0.02, [0.9] * 7)
    ks = [p.choose(1) for _ in range(400)]
    probes = [i + 1 for i, k in enumerate(ks) if k == 0]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert probes[0] == PROBE_EVERY + 1 and gaps[:4] == [32, 64, 128, 128]


def test_auto_learns_from_live_rounds_without_a_profile():
    """Round 1 (the cold one) drafts start_k(B), round 2 is a plain step, then the model decides."""
    p = DraftPolicy.for_setting("auto")
    assert not p.needs_profile(1) and DraftPolicy(profile_on_start=True).needs_profile(1)
    assert p.choose(1) == start_k(1) == 2
    p.observe(1, 2, [2], 0.2, 1.05)  # memory-bound verify, both drafts accepted
    assert p.acceptance[0] == pytest.approx(0.85)  # the prior weighs as one observation
    assert p.choose(1) == 0
    p.observe(1, 0, [0], 0.0, 1.0)
    assert p.choose(1) == 3  # climbs: one draft beyond the deepest block measured


def test_compute_bound_verify_turns_speculation_off_at_once():
    p = DraftPolicy.for_setting("auto")
    ks = []
    for _ in range(100):
        K = p.choose(8)
        ks.append(K)
        p.observe(8, K, [min(K, 1)] * 8, 0.01 * K, 0.1 * 8 * (K + 1))  # t_verify proportional to T
    # start_k (cold), plain, at most one optimistic step deeper and one re-run of each regime
    # measured in a single round (K = 1 breaks even here), then off but for backed-off probes
    assert ks[:2] == [1, 0] and ks[5:20] == [0] * 15 and sum(k > 0 for k in ks) <= 5, ks


# -- simulated generations on measured costs ------------------------------------------------------
# In-loop verify and draft times (ms per round) of the grid of the quiet `make bench-spec` in
# bench/RESULTS-speculative-cpu.txt (2026-12-06, eleventh session: ragged commits copy moved rows
# only): verify per B for K + 1 = 1, 2, 3, 4, 6, 8 tokens per row (K = 0 is the plain baseline);
# draft per B for K = 1, 2, 3, 5, 7 (a round's first draft step is dearer than the later ones, so
# it is not K times one step).
COLS = [1, 2, 3, 4, 6, 8]
MEASURED = {
    "dense": (
        {
            1: [97.5, 110.0, 123.6, 133.0, 138.7, 150.7],
            2: [110.8, 122.4, 122.7, 126.8, 145.8, 136.5],
            4: [107.4, 121.0, 188.4, 183.9, 252.1, 197.7],
            8: [133.0, 168.9, 247.9, 245.3, 311.1, 346.0],
        },
        {
            1: [16.0, 29.8, 43.5, 68.7, 102.7],
            2: [17.4, 29.2, 42.6, 61.6, 84.4],
            4: [18.4, 39.3, 60.8, 102.5, 113.5],
            8: [25.0, 52.8, 71.5, 112.7, 139.4],
        },
    ),
    "moe": (
        {
            1: [95.4, 115.9, 143.4, 158.3, 228.3, 235.9],
            2: [147.3, 194.8, 237.0, 257.6, 329.3, 380.2],
            4: [212.4, 327.7, 448.7, 422.7, 534.7, 578.6],
            8: [361.4, 457.9, 569.4, 587.8, 666.3, 733.1],
        },
        {
            1: [13.4, 25.6, 38.5, 66.9, 92.7],
            2: [17.3, 33.3, 48.0, 76.2, 107.4],
            4: [24.1, 48.9, 57.5, 99.7, 148.1],
            8: [25.9, 50.3, 65.9, 109.9, 147.5],
        },
    ),
}
ACCEPT = [0.844, 0.71, 0.64, 0.70, 0.7, 0.7, 0.7]  # docs/speculative.md §14.2
# Cold calls (docs/speculative.md §12.1): a generation's first round costs COLD_FIRST times a
# later one of the same K (bench targets, B = 4-8: 1.1x when the batch was seen before, up to
# 1.55x the first time in a process); a new (B, K) shape later on costs COLD_CELL times
# (measured 1.00-1.03); a first draft call was not measurably dearer.  The first-round excess was
# later traced to the bench's restored caches (§12.1): real generations do not pay it, so these
# cases are pessimistic.
COLD_FIRST, COLD_CELL = 1.25, 1.03


def simulate(kind, B, N, setting, seed, spikes=False, cold=True):
    """Seconds to generate N tokens per row (first from the prefill), rows finishing
    on their own.  Timings carry +-10% noise; with spikes, one round in ten is also
    slowed 1.5-2x (other processes on a shared machine); with cold, the first round
    and the first call of every (live rows, K) cell are dearer (COLD_FIRST, COLD_CELL)."""
    verify, draft = MEASURED[kind]
    rng, policy, seen = random.Random(seed), DraftPolicy.for_setting(setting), set()

    def noisy(seconds):
        slow = 1.5 + 0.5 * rng.random() if spikes and rng.random() < 0.1 else 1.0
        return seconds * 1e-3 * slow * (1 + 0.1 * (2 * rng.random() - 1))

    left, total = [N - 1] * B, 0.0
    while any(left):
        live = [i for i, n in enumerate(left) if n]
        b = min(verify, key=lambda x: (abs(x - len(live)), x))  # nearest measured batch size
        K = max(0, min(policy.choose(len(live), max(left)), max(left) - 1))
        warmth = 1.0
        if cold and (len(live), K) not in seen:
            warmth = COLD_CELL if seen else COLD_FIRST
            seen.add((len(live), K))
        t_d = noisy(float(np.interp(K + 1, COLS[1:], draft[b])) if K else 0.0)
        t_v = noisy(warmth * float(np.interp(K + 1, COLS, verify[b])))
        accepted = []
        for i in live:
            a = 0
            while a < K and rng.random() < ACCEPT[a]:
                a += 1
            accepted.append(a)
            left[i] = max(0, left[i] - a - 1)
        total += t_d + t_v
        policy.observe(len(live), K, accepted, t_d, t_v)
    return total


@pytest.mark.parametrize("kind", list(MEASURED))
@pytest.mark.parametrize("B", [1, 2, 4, 8])
def test_auto_never_loses_and_nears_the_best_fixed_k(kind, B):
    """Targets of docs/speculative.md §12.2 on the measured costs with cold first calls,
    mean over 8 seeds: auto >= 0.97x plain decoding for 32 and 256 tokens per row, and
    >= 0.9x the best fixed K (in hindsight) for 256.  At 32 tokens the bound on the
    best K is 0.85x (worst: 0.873x, MoE B = 4, where hindsight's K = 3 rests on a
    verify cell measured cheaper than the smaller one before it, 422.7 against
    448.7 ms, which a policy climbing from K = 1 in a short generation has no reason
    to try); issue #15 asks only 0.9x plain there.  With contention spikes (one round
    in ten 1.5-2x slower) the bounds are 0.95x plain and 0.85x the best K."""
    for spikes, vs_plain, vs_best in ((False, 0.97, 0.9), (True, 0.95, 0.85)):
        for N in (32, 256):
            mean = {
                s: np.mean([simulate(kind, B, N, s, seed, spikes) for seed in range(8)]) for s in ["auto", *range(8)]
            }
            best = min(mean[k] for k in range(8))
            assert mean[0] / mean["auto"] >= vs_plain, (spikes, N, mean)
            assert best / mean["auto"] >= (vs_best if N > 32 else 0.85), (spikes, N, mean)


def cold_start(costs, B, accepted, rounds=31):
    """K per round of a fresh auto policy fed measured (verify, draft) costs of batch B
    without noise, the first round COLD_FIRST times dearer; accepted(K) -> drafts
    accepted per row."""
    verify, draft = costs
    policy, ks = DraftPolicy.for_setting("auto"), []
    for r in range(rounds):
        K = policy.choose(B, rounds - r)
        t_v = 1e-3 * float(np.interp(K + 1, COLS, verify[B])) * (COLD_FIRST if r == 0 else 1.0)
        t_d = 1e-3 * float(np.interp(K + 1, COLS[1:], draft[B])) if K else 0.0
        policy.observe(B, K, accepted(K), t_d, t_v)
        ks.append(K)
    return ks


# The dense target at B = 8 before ragged commits copied only the moved rows (2026-12-05):
# a case where every K loses to plain decoding.
EVERY_K_LOSES = ({8: [108.8, 186.4, 229.6, 247.0, 274.7, 311.3]}, {8: [33.1, 54.5, 70.5, 98.8, 124.4]})


def test_a_cold_first_round_does_not_switch_speculation_on():
    """Every K loses to plain decoding (K = 1: 219.5 ms a round for 1.875 tokens per
    row, plain 108.8 ms), but a plain step measured cold in round 1 (136 ms) made
    drafting win until the first probe (docs/speculative.md §12.1)."""
    ks = cold_start(EVERY_K_LOSES, 8, lambda K: [min(K, 1)] * 7 + [0])
    assert sum(k > 0 for k in ks) <= 2, ks


def test_a_cold_first_round_does_not_switch_speculation_off():
    """MoE B = 4: K = 1 wins by 6% (351.8 ms for 1.75 tokens per row vs 212.4 ms), but
    not as measured in the cold round 1: that single round is re-run once."""
    ks = cold_start(MEASURED["moe"], 4, lambda K: [min(K, 1)] * 3 + [0])
    assert ks[:3] == [1, 0, 1] and sum(k > 0 for k in ks) >= 26, ks
