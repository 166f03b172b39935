"""How many tokens to draft each round (docs/speculative.md §11-§12).

Fixed K, or "auto": choose K in 0..K_max maximising predicted throughput

    Theta(K) = B * E[A + 1](K) / (K * t_draft(B) + t_verify(B * (K + 1)))

from *measured* costs — a target forward over T tokens (its curve is what makes
the choice MoE-aware: an MoE verify block reads every distinct expert its tokens
route to, so t_verify(T) rises much faster than for a dense target) and one
drafter step — and per-position conditional acceptances tracked as moving
averages.  K = 0 (plain decoding) wins when speculation would lose.  Every
PROBE_EVERY rounds the other regime runs once, so that both its cost and the
acceptance estimates stay fresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

PROFILE_KS = (0, 1, 3, 7)  # verify sizes measured once at start-up (T = B * (K + 1))
PRIOR_ACCEPTANCE = 0.7  # per position, before anything was observed
EMA = 0.1  # weight of one observation in the acceptance averages
HYSTERESIS = 1.03  # switch K only for a predicted gain above 3%
PROBE_EVERY = 16  # rounds between probes of the other regime (K = 0 vs K > 0)


def expected_tokens(acceptance) -> float:
    """E[A + 1] for conditional per-position acceptances a_1..a_K (docs/speculative.md §7)."""
    total, run = 1.0, 1.0
    for a in acceptance:
        run *= a
        total += run
    return total


@dataclass
class DraftPolicy:
    k_max: int = 7
    fixed: int | None = None  # a fixed K; None = auto
    acceptance: list = field(default_factory=list)  # a_j, j = 1..k_max
    verify_time: dict = field(default_factory=dict)  # T -> seconds (moving average)
    draft_time: dict = field(default_factory=dict)  # B -> seconds per draft step
    current: int = 2
    rounds: int = 0
    profiled: bool = False

    def __post_init__(self):
        if not self.acceptance:
            self.acceptance = [PRIOR_ACCEPTANCE] * self.k_max

    @classmethod
    def for_setting(cls, setting, k_max: int = 7) -> DraftPolicy:
        """`draft_tokens` as users give it: an int K (0 = off) or "auto"."""
        if setting == "auto" or setting is None:
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
        """Once per policy (a chat session keeps its policy across turns): later
        batch sizes, as rows finish, are learned from the rounds themselves."""
        return self.fixed is None and not self.profiled

    def profile_ks(self) -> list[int]:
        return [k for k in PROFILE_KS if k <= self.k_max]

    def t_verify(self, T: int) -> float:
        """Measured cost of a T-token target forward, interpolated linearly between
        measured sizes (and extended with the slope of the last two beyond them)."""
        pts = sorted(self.verify_time.items())
        if not pts:
            return 1.0
        if len(pts) == 1:
            return pts[0][1] * max(1.0, T / pts[0][0])
        for (t0, c0), (t1, c1) in zip(pts, pts[1:]):
            if T <= t1:
                if T <= t0:
                    return c0
                return c0 + (c1 - c0) * (T - t0) / (t1 - t0)
        (t0, c0), (t1, c1) = pts[-2], pts[-1]
        return c1 + max(0.0, (c1 - c0) / (t1 - t0)) * (T - t1)

    def t_draft(self, B: int) -> float:
        if B in self.draft_time:
            return self.draft_time[B]
        if self.draft_time:  # nearest measured batch size
            return self.draft_time[min(self.draft_time, key=lambda b: abs(b - B))]
        return 0.1 * self.t_verify(B)

    def throughput(self, B: int, K: int) -> float:
        cost = K * self.t_draft(B) + self.t_verify(B * (K + 1))
        return B * expected_tokens(self.acceptance[:K]) / cost

    # -- decisions -----------------------------------------------------------
    def choose(self, B: int) -> int:
        if self.fixed is not None:
            return self.fixed
        best = max(range(self.k_max + 1), key=lambda k: self.throughput(B, k))
        cur = min(self.current, self.k_max)
        if self.throughput(B, best) > HYSTERESIS * self.throughput(B, cur):
            self.current = best
        else:
            self.current = cur
        # Probe the road not taken now and then, so neither estimate goes stale:
        # acceptance while speculation is off, the plain step's cost while it is on
        # (a start-up profile taken under a noisy moment would otherwise stick).
        self.rounds += 1
        if self.rounds % PROBE_EVERY == 0:
            return min(2, self.k_max) if self.current == 0 else 0
        return self.current

    def observe(self, B: int, K: int, accepted, t_draft: float, t_verify: float) -> None:
        """Fold one round in: acceptance per position, and the measured costs."""
        for a in accepted:
            for j in range(min(a + 1, K)):  # position j was reached; accepted iff j < a
                self.acceptance[j] += EMA * ((1.0 if j < a else 0.0) - self.acceptance[j])
        if self.fixed is not None:
            return
        T = B * (K + 1)
        old = self.verify_time.get(T)
        self.verify_time[T] = t_verify if old is None else old + 0.2 * (t_verify - old)
        if K:
            step = t_draft / K
            old = self.draft_time.get(B)
            self.draft_time[B] = step if old is None else old + 0.2 * (step - old)

    def record_profile(self, T: int, seconds: float) -> None:
        self.verify_time[T] = seconds
