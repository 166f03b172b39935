"""The cost-aware draft-length policy (docs/speculative.md §11-§12) on synthetic costs."""

from __future__ import annotations

import pytest

from gemma4_mlx.speculative.policy import PROBE_EVERY, DraftPolicy, expected_tokens


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
    ks = [p.choose(1) for _ in range(PROBE_EVERY)]
    assert ks.count(0) == 1 and ks[-1] == 0 and set(ks[:-1]) == {7}
