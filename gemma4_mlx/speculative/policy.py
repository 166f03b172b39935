"""How many tokens to draft each round (docs/speculative.md §11-§12).

Fixed K, or "auto": choose K in 0..K_max maximising predicted throughput

    Theta(K) = B * E[A + 1](K) / (K * t_draft(B) + t_verify(B * (K + 1)))

from costs *measured on live rounds* — a target forward over T tokens (its curve
is what makes the choice MoE-aware: an MoE verify block reads every distinct
expert its tokens route to, so t_verify(T) rises much faster than for a dense
target) and one drafter step — and per-position conditional acceptances.

Every round the policy runs is useful work, so it learns without a start-up
profile (docs/speculative.md §12.1): the first round, which is always measured
cold, drafts a little (t_draft, t_verify(B * (K + 1)), acceptance), the second is a
plain step (t_verify(B)), and from then on the model picks K, climbing at most one
draft beyond the deepest block measured so far.  K = 0 wins as soon as
verification turns out compute-bound.  A regime (K = 0 or K > 0) measured in a
single round and beaten by less than a cold round's excess runs once more.  The
regime not taken is probed now and then (K = 0 while speculating, the best K while
not), less often each time a probe confirms the choice, and not when too few
tokens are left to profit; K +- 1 are re-measured when the model rates them nearly
as good.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

PROFILE_KS = (0, 1, 3, 7)  # verify sizes of the optional start-up profile (T = B * (K + 1))
PRIOR_ACCEPTANCE = 0.7  # per position, before anything was observed (weighs as one observation)
# Weight of one observation in the acceptance averages once past the first 1/EMA (a running
# mean until then).  At 0.1 the estimate of a 0.7 acceptance swung by +-0.1 (one standard
# deviation), enough to move K between near-tied choices every few rounds on the bench's dense
# target (a_2 read 0.42-0.80 within 20 rounds of one generation); at 0.03 it is +-0.06 and still
# follows a change of text within ~30 observations (rows x rounds).
EMA = 0.03
# Weights of one live round in the cost averages: contention on a shared machine only
# ever slows a round, so a faster measurement is believed more than a slower one.
COST_EMA_DOWN, COST_EMA_UP = 0.5, 0.2
NEIGHBOUR_EVERY = 8  # while speculating, re-measure K +- 1 every this many rounds ...
NEIGHBOUR_WITHIN = 0.9  # ... if predicted within this fraction of the current K's throughput
HYSTERESIS = 1.03  # switch K only for a predicted gain above 3%
PROBE_EVERY = 16  # rounds before the first probe of the other regime (K = 0 vs K > 0)
PROBE_MAX = 128  # the probe interval doubles while probes confirm the regime, up to this
# Beyond the largest verify block measured, t_verify is extended with this fraction of
# the last measured slope: optimistic, so that a cost curve that flattens (memory-bound
# GPUs, MoE blocks whose experts saturate) is found; one round there measures it.
OPTIMISM = 0.5
# A generation's first round is cold: 1.05-1.55x a later round of the same K on the bench
# targets (docs/speculative.md §12.1).  A regime (K = 0 or K > 0) measured in one round
# only and beaten by less than this factor runs once more before it is set aside.
COLD = 1.25


def expected_tokens(acceptance) -> float:
    """E[A + 1] for conditional per-position acceptances a_1..a_K (docs/speculative.md §7)."""
    total, run = 1.0, 1.0
    for a in acceptance:
        run *= a
        total += run
    return total


def _average(table: dict, counts: dict, key: int, seconds: float) -> None:
    n, old = counts.get(key, 0), table.get(key)
    counts[key] = n + 1
    if old is None:
        table[key] = seconds
    elif n == 1:  # the first may have been cold: of the first two, believe the faster
        table[key] = min(old, seconds)
    else:
        table[key] = old + (COST_EMA_DOWN if seconds < old else COST_EMA_UP) * (seconds - old)


def is_auto(setting) -> bool:
    """Whether a `draft_tokens` setting asks for the cost-aware policy."""
    return setting == "auto" or setting is None


def start_k(B: int) -> int:
    """The first speculative round's depth: small, so that a losing setting costs
    little; larger batches verify B * (K + 1) tokens, so they start shallower."""
    return 2 if B <= 2 else 1


@dataclass
class DraftPolicy:
    k_max: int = 7
    fixed: int | None = None  # a fixed K; None = auto
    acceptance: list = field(default_factory=list)  # a_j, j = 1..k_max
    verify_time: dict = field(default_factory=dict)  # T -> seconds (moving average)
    draft_time: dict = field(default_factory=dict)  # B -> seconds per draft step
    verify_n: dict = field(default_factory=dict)  # T -> live rounds measured (profiles: 0)
    draft_n: dict = field(default_factory=dict)  # B -> live rounds that drafted
    current: int = 0
    rounds: int = 0
    profiled: bool = False
    profile_on_start: bool = False  # time `profile_ks` before the first round (the old warm start)
    seen: list = field(default_factory=list)  # rounds in which position j was reached
    probe_every: int = PROBE_EVERY
    next_probe: int = PROBE_EVERY

    def __post_init__(self):
        if not self.acceptance:
            self.acceptance = [PRIOR_ACCEPTANCE] * self.k_max
        if not self.seen:
            self.seen = [0] * self.k_max

    @classmethod
    def for_setting(cls, setting, k_max: int = 7) -> DraftPolicy:
        """`draft_tokens` as users give it: an int K (0 = off) or "auto"."""
        if is_auto(setting):
            return cls(k_max=k_max)
        try:
            k = int(setting)
        except (TypeError, ValueError):
            raise ValueError(f"draft tokens {setting!r}: expected a number or 'auto'") from None
        if not 0 <= k <= 32:
            raise ValueError(f"draft tokens {k}: expected 0..32 or 'auto'")
        return cls(k_max=max(k, 1), fixed=k)

    # -- costs ---------------------------------------------------------------
    def needs_profile(self, B: int) -> bool:
        """Only with profile_on_start (once per policy): by default the costs are
        learned from the rounds themselves, which are useful work."""
        return self.fixed is None and self.profile_on_start and not self.profiled

    def profile_ks(self) -> list[int]:
        return [k for k in PROFILE_KS if k <= self.k_max]

    def t_verify(self, T: int) -> float:
        """Cost of a T-token target forward: linear between measured sizes, extended
        with the slope of the outer two beyond them (never below proportional
        scaling from the smallest; one point: flat below it, proportional above)."""
        pts = sorted(self.verify_time.items())
        if not pts:
            return 1.0
        if len(pts) == 1:
            return pts[0][1] * max(1.0, T / pts[0][0])
        (t0, c0), (t1, c1) = pts[0], pts[1]
        if T < t0:
            return max(c0 - max(0.0, (c1 - c0) / (t1 - t0)) * (t0 - T), c0 * T / t0)
        for (t0, c0), (t1, c1) in zip(pts, pts[1:]):
            if T <= t1:
                return c0 + (c1 - c0) * (T - t0) / (t1 - t0)
        (t0, c0), (t1, c1) = pts[-2], pts[-1]
        return c1 + OPTIMISM * max(0.0, (c1 - c0) / (t1 - t0)) * (T - t1)

    def t_draft(self, B: int) -> float:
        if B in self.draft_time:
            return self.draft_time[B]
        if self.draft_time:  # nearest measured batch size
            return self.draft_time[min(self.draft_time, key=lambda b: abs(b - B))]
        return 0.1 * self.t_verify(B)

    def estimates(self) -> list[float]:
        """a_j for the model: positions never reached take the prior, capped by the
        deepest reached position's estimate (a weak drafter stays weak deeper)."""
        out, last = [], None
        for a, n in zip(self.acceptance, self.seen):
            if n:
                last = a
            out.append(a if n or last is None else min(a, last))
        return out

    def throughput(self, B: int, K: int) -> float:
        cost = K * self.t_draft(B) + self.t_verify(B * (K + 1))
        return B * expected_tokens(self.estimates()[:K]) / cost

    # -- decisions -----------------------------------------------------------
    def deepest(self, B: int) -> int:
        """The largest K the model may pick at batch size B: one draft beyond the
        deepest verify block measured (extrapolating further is a guess)."""
        return min(self.k_max, max(1, max(self.verify_time) // B))

    def choose(self, B: int, left: int | None = None) -> int:
        if self.fixed is not None:
            return self.fixed
        self.rounds += 1
        if not self.draft_time:  # round 1, the cold one (docs/speculative.md §12.1): better drafting
            return min(start_k(B), self.k_max)  # drafting's cost and first acceptances
        if self.rounds == 2 and B not in self.verify_time:
            return 0  # a warm plain step: the cost every other choice is compared with
        ks = range(1, self.deepest(B) + 1)
        spec = max(ks, key=lambda k: self.throughput(B, k))
        best = spec if self.throughput(B, spec) > self.throughput(B, 0) else 0
        cur = min(self.current, self.deepest(B))
        if self.throughput(B, best) > HYSTERESIS * self.throughput(B, cur):
            if (best == 0) != (cur == 0):  # a new regime: probe the old one soon
                self.probe_every, self.next_probe = PROBE_EVERY, self.rounds + PROBE_EVERY
            cur = best
        self.current = cur
        alt = self.unconfirmed(B, cur)
        if alt is not None:
            return alt
        # Probe the road not taken now and then, so neither estimate goes stale:
        # acceptance and drafting cost while speculation is off, the plain step's
        # cost while it is on (a noisy moment would otherwise stick).  Not with
        # `left` (the most tokens a row may still emit) this short: too few rounds
        # would remain to profit from what a probe finds (a 32-token generation).
        if self.rounds >= self.next_probe and (left is None or left > PROBE_EVERY):
            self.probe_every = min(2 * self.probe_every, PROBE_MAX)
            self.next_probe = self.rounds + self.probe_every
            return spec if cur == 0 else 0
        return self.neighbour(B, cur) if cur and self.rounds % NEIGHBOUR_EVERY == 0 else cur

    def unconfirmed(self, B: int, cur: int) -> int | None:
        """The other regime's best K, if its cost rests on one round (maybe the cold
        first one) and it loses to `cur` by less than a cold round's excess."""
        once = [k for k in range(self.deepest(B) + 1) if (k == 0) != (cur == 0) and self.verify_n.get(B * (k + 1)) == 1]
        alt = max(once, key=lambda k: self.throughput(B, k), default=None)
        if alt is not None and COLD * self.throughput(B, alt) > self.throughput(B, cur):
            return alt
        return None

    def neighbour(self, B: int, cur: int) -> int:
        """K + 1 and K - 1 in turn, when the model rates it nearly as good: one noisy
        round must not fix a neighbour's cost (or the current K's) for good."""
        k = cur + 1 if (self.rounds // NEIGHBOUR_EVERY) % 2 else cur - 1
        if 1 <= k <= self.deepest(B) and self.throughput(B, k) >= NEIGHBOUR_WITHIN * self.throughput(B, cur):
            return k
        return cur

    def observe(self, B: int, K: int, accepted, t_draft: float, t_verify: float) -> None:
        """Fold one round in: acceptance per position, and the measured costs."""
        for a in accepted:
            for j in range(min(a + 1, K)):  # position j was reached; accepted iff j < a
                self.seen[j] += 1
                w = max(EMA, 1.0 / (self.seen[j] + 1))  # the prior counts as one observation
                self.acceptance[j] += w * ((1.0 if j < a else 0.0) - self.acceptance[j])
        if self.fixed is not None:
            return
        _average(self.verify_time, self.verify_n, B * (K + 1), t_verify)
        if K:
            _average(self.draft_time, self.draft_n, B, t_draft / K)

    def record_profile(self, T: int, seconds: float) -> None:
        self.verify_time[T] = seconds


# id(drafter) -> (drafter, target as weak references, the pair's "auto" policy)
_PAIR_POLICIES: dict[int, tuple] = {}


def pair_policy(target, drafter) -> DraftPolicy:
    """The "auto" policy of a (target, drafter) pair, kept while the drafter lives.

    Calls of `api.generate` / `stream_generate` with the same pair go on learning
    where the last one stopped, as chat turns and the server's rounds do, instead of
    paying the warm start (a drafting round, then a plain one) and the first rounds'
    exploration again: a short generation is too short to learn in
    (docs/speculative.md §12.1).  Keyed by identity, not kept alive by this table; a
    new target for the drafter starts over."""
    key = id(drafter)
    held = _PAIR_POLICIES.get(key)
    if held is None or held[0]() is not drafter or held[1]() is not target:

        def forget(_ref, key=key):
            _PAIR_POLICIES.pop(key, None)

        held = (weakref.ref(drafter, forget), weakref.ref(target), DraftPolicy())
        _PAIR_POLICIES[key] = held
    return held[2]
