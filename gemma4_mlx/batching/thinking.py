"""A thinking budget in tokens: once a reply has written `tokens` tokens inside a
thought channel, the thought is closed (`<channel|>` is the only token allowed), so
the model goes on with its answer in the same turn (docs/serving.md §2.3;
Anthropic's `thinking.budget_tokens`). A thought opened after that is closed at once;
a budget of 0 is thinking off, which the server renders as such (no thought opens).

It acts on the picks, not on the text: each row and each verified position gets its
own count (the job's accepted tokens, then the drafts before that position), so plain,
batched and speculative decoding close the thought at the same token. A row is masked
only at positions where the budget binds; otherwise it keeps the one-argmax path of
greedy rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from gemma4_mlx.prompt.tokens import ends_in_open_thought

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
        for name in ("tokens", "open_id", "close_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"thinking budget {name} {value!r}: expected an integer >= 0")

    def at_start(self, prompt: Sequence[int]) -> ThoughtCount:
        """The count where the reply starts: inside when the prompt ends in an open
        thought (the template opens one for the model after a tool result)."""
        return ThoughtCount(inside=ends_in_open_thought(prompt, self.open_id, self.close_id))

    def after(self, count: ThoughtCount, tokens: Sequence[int]) -> ThoughtCount:
        """The count once `tokens` follow."""
        inside, used = count.inside, count.used
        for t in tokens:
            if t == self.open_id:  # inside a thought already, it is one more of its tokens
                used, inside = used + inside, True
            elif t == self.close_id:
                inside = False
            elif inside:
                used += 1
        return ThoughtCount(inside, used)

    def binds(self, count: ThoughtCount) -> bool:
        """Whether the next pick must be `<channel|>`."""
        return count.inside and count.used >= self.tokens

    def masks(self, count: ThoughtCount, drafts: Sequence[int], positions: int, vocab: int) -> mx.array | None:
        """Additive masks [positions, vocab] for a row whose position t follows
        `drafts[:t]`: only `<channel|>` where the budget binds, nothing elsewhere;
        None when it binds at no position."""
        bound = []
        for t in range(positions):
            bound.append(self.binds(count))
            if t < len(drafts):
                count = self.after(count, drafts[t : t + 1])
        if not any(bound):
            return None
        only_close = mx.where(mx.arange(vocab) == self.close_id, 0.0, NEG_INF)
        return mx.where(mx.array(bound)[:, None], only_close[None], 0.0)
