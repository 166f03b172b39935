"""A thinking budget in tokens: once a reply has written `tokens` tokens inside thought
channels, the open thought is closed (`<channel|>` is the only token allowed) and no
new one opens (`<|channel>` is banned), so the model goes on with its answer in the
same turn (docs/serving.md §2.3; Anthropic's `thinking.budget_tokens`).

It acts on the picks, not on the text: each row and each verified position gets its
own count (the job's accepted tokens, then the drafts before that position), so plain,
batched and speculative decoding close the thought at the same token, and a row whose
budget is not spent keeps the one-argmax path of greedy rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

NEG_INF = float("-inf")


@dataclass(frozen=True)
class ThoughtCount:
    """Where a reply stands: inside a thought or not, and thinking tokens written so far."""

    inside: bool = False
    used: int = 0


@dataclass(frozen=True)
class ThinkingBudget:
    """tokens: thinking tokens allowed in one reply; open_id / close_id: the tokenizer's
    `<|channel>` and `<channel|>`."""

    tokens: int
    open_id: int
    close_id: int

    def __post_init__(self):
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens < 0:
            raise ValueError(f"thinking budget {self.tokens!r}: expected an integer >= 0")

    def at_start(self, prompt: Sequence[int]) -> ThoughtCount:
        """The count where the reply starts: inside when the prompt ends in an open
        thought (a template that opens the channel for the model)."""
        opened = max((i for i, t in enumerate(prompt) if t == self.open_id), default=-1)
        closed = max((i for i, t in enumerate(prompt) if t == self.close_id), default=-1)
        return ThoughtCount(inside=opened > closed)

    def after(self, count: ThoughtCount, tokens: Sequence[int]) -> ThoughtCount:
        inside, used = count.inside, count.used
        for t in tokens:
            if t == self.open_id:
                inside = True
            elif t == self.close_id:
                inside = False
            elif inside:
                used += 1
        return ThoughtCount(inside, used)

    def rule(self, count: ThoughtCount) -> str | None:
        """What the next pick must obey: "close" (only `<channel|>`), "no_open" (not
        `<|channel>`), or None while the budget lasts."""
        if count.used < self.tokens:
            return None
        return "close" if count.inside else "no_open"

    def masks(self, count: ThoughtCount, drafts: Sequence[int], positions: int, vocab: int) -> mx.array | None:
        """Additive masks [positions, vocab] for a row whose position t follows
        `drafts[:t]`; None when no position is bound by the budget."""
        rules = []
        for t in range(positions):
            rules.append(self.rule(count))
            if t < len(drafts):
                count = self.after(count, drafts[t : t + 1])
        if not any(rules):
            return None
        ids = mx.arange(vocab)
        free = mx.zeros((vocab,))
        rows = {
            "close": mx.where(ids == self.close_id, 0.0, NEG_INF),
            "no_open": mx.where(ids == self.open_id, NEG_INF, 0.0),
            None: free,
        }
        return mx.stack([rows[r] for r in rules])
