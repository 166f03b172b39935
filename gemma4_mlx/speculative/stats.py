"""What a speculative run is told (`MTPSettings`) and what it measured (`SpecStats`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MTPSettings:
    """Where the drafter's query sits (docs/speculative.md §4).

    position: "last_committed" (p = L - 1; vLLM, SGLang, mlx-vlm) or "bonus" (p = L;
        transformers).  The training convention is undocumented; both are offered.
    sliding_keys: keys the drafter sees on sliding layers: None = the window W,
        or W + 1 as transformers passes them.
    """

    position: str = "last_committed"
    sliding_keys: int | None = None

    def __post_init__(self):
        if self.position not in ("last_committed", "bonus"):
            raise ValueError(f"mtp position {self.position!r}: expected 'last_committed' or 'bonus'")


@dataclass
class SpecStats:
    rounds: int = 0  # batched rounds
    row_rounds: int = 0  # sum over rounds of live rows
    tokens: int = 0  # tokens emitted by rounds (the first token comes from the prefill)
    drafted_at: list = field(default_factory=list)  # per position j: drafts judged (all before accepted)
    accepted_at: list = field(default_factory=list)  # ... of which accepted
    reached_at: list = field(default_factory=list)  # per position j: rounds that drafted it
    k_used: dict = field(default_factory=dict)  # K -> rounds
    draft_time: float = 0.0
    verify_time: float = 0.0

    def record(self, K: int, accepted: list[int], emitted: int) -> None:
        self.rounds += 1
        self.row_rounds += len(accepted)
        self.tokens += emitted
        self.k_used[K] = self.k_used.get(K, 0) + 1
        while len(self.drafted_at) < K:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
            self.reached_at.append(0)
        for a in accepted:
            for j in range(K):
                self.reached_at[j] += 1
                if j <= a:  # draft j is judged only if drafts 0..j-1 were accepted
                    self.drafted_at[j] += 1
                    self.accepted_at[j] += j < a

    @property
    def tokens_per_round(self) -> float:
        return self.tokens / self.row_rounds if self.row_rounds else 0.0

    def acceptance(self) -> list[float]:
        """Conditional acceptance per draft position: P(draft j accepted | drafts
        before it accepted) — the a_j of docs/speculative.md §11 and of `DraftPolicy`."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def reach(self) -> list[float]:
        """P(A >= j + 1): the share of drafted positions j that ended up accepted."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_at, self.reached_at)]

    def line(self) -> str:
        if not self.rounds:  # e.g. -n 1, or a one-token reply: nothing to report as rates
            return "speculative: no draft rounds ran (the output ended at its first token, which the prefill gives)"
        if not any(k for k in self.k_used):
            return (
                f"speculative: nothing drafted in {self.rounds} rounds (K=0: too few tokens left to draft, "
                "or the cost-aware policy found drafting slower here)"
            )
        acc = " ".join(f"{a:.2f}" for a in self.acceptance()) or "-"
        ks = ",".join(f"K={k}:{n}" for k, n in sorted(self.k_used.items()))
        return (
            f"speculative: {self.tokens_per_round:.2f} tokens/round over {self.rounds} rounds "
            f"({ks}) | acceptance by position: {acc}"
        )
