"""Logits processors: what changes a row's logits before its token is picked.

A processor is `processor(history, logits [1, V]) -> logits`, where `history` is the
row's `History`: its tokens, prompt then output, as a list, and where the output
starts.  Every decoding loop (plain, batched, speculative, the server's jobs) keeps
one `History` per row; at a speculative verify position it is the history plus the
drafts before that position, which count as output (`History.__add__`).

Why the history knows its prompt: OpenAI defines presence and frequency penalties
over the tokens *sampled* so far — a word the prompt used freely is not penalised
in the answer (vLLM counts the same way).  The repetition penalty (Keskar et al.,
as transformers, vLLM and mlx-lm apply it) reads prompt and output alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

import mlx.core as mx


class History(list):
    """A row's tokens, prompt then output; `start` is where the output begins."""

    __slots__ = ("start",)

    def __init__(self, tokens: Iterable[int] = (), start: int | None = None):
        super().__init__(tokens)
        self.start = len(self) if start is None else start

    def __add__(self, more: Iterable[int]) -> History:
        """The history followed by more output (a verify position's drafts)."""
        out = History(self, self.start)
        out.extend(more)
        return out

    @property
    def output(self) -> list[int]:
        return self[self.start :]


class Penalties:
    """Repetition, presence and frequency penalties of one set of options.

    repetition: logits of the last `repetition_window` tokens (prompt and output) are
    divided by it when positive, multiplied when negative.  presence: subtracted once
    from every token the output holds; frequency: subtracted once per occurrence —
    over the whole output, or its last `window` tokens when a window is given.
    """

    def __init__(
        self,
        repetition: float | None = None,
        repetition_window: int = 64,
        presence: float | None = None,
        frequency: float | None = None,
        window: int | None = None,
    ):
        # 0 is off, as mlx-lm's processors read it (dividing by it would make every
        # seen token's logit infinite)
        self.repetition, self.repetition_window = repetition or None, repetition_window
        self.presence, self.frequency, self.window = presence or 0.0, frequency or 0.0, window

    def __bool__(self) -> bool:
        return bool(self.repetition is not None or self.presence or self.frequency)

    def __call__(self, history: History, logits: mx.array) -> mx.array:
        if self.repetition is not None and self.repetition_window and history:
            ids = mx.array(history[-self.repetition_window :])
            chosen = logits[:, ids]
            logits[:, ids] = mx.where(chosen < 0, chosen * self.repetition, chosen / self.repetition)
        if self.presence or self.frequency:
            out = history.output
            counts = Counter(out[-self.window :] if self.window else out)
            if counts:
                amounts = [self.presence + self.frequency * n for n in counts.values()]
                ids = mx.array(list(counts), dtype=mx.int32)
                logits = logits.at[:, ids].subtract(mx.array(amounts, dtype=logits.dtype))
        return logits


class LogitBias:
    """OpenAI's `logit_bias`: adds each bias to its token's logit (stateless, so one
    instance may serve every row of a batch)."""

    reads_history = False  # (`generate_tokens` may then queue a step before its token is read)

    def __init__(self, bias: Mapping[int, float]):
        self.bias, self.top = bias, max(bias)
        self.ids = mx.array(list(bias), dtype=mx.int32)
        self.values = mx.array(list(bias.values()), dtype=mx.float32)

    @staticmethod
    def check(bias: Mapping[int, float] | None, vocab_size: int) -> None:
        """ValueError unless every biased token id is in the vocabulary."""
        if bias and max(bias) >= vocab_size:  # MLX would scatter outside the row
            raise ValueError(f"logit_bias: token id {max(bias)} is not in the vocabulary (0 .. {vocab_size - 1})")

    def __call__(self, history, logits: mx.array) -> mx.array:
        if self.top >= logits.shape[-1]:  # every step, every row: compared, not searched again
            self.check(self.bias, logits.shape[-1])
        return logits.at[:, self.ids].add(self.values.astype(logits.dtype))


def apply_processors(logits: mx.array, histories: list[History], processors) -> mx.array:
    """logits [N, V] with one `History` per row; each row goes through the processors
    in order (a processor reads one row's history)."""
    rows = []
    for b in range(logits.shape[0]):
        row, h = logits[b : b + 1], histories[b]
        for p in processors:
            row = p(h, row)
        rows.append(row)
    return mx.concatenate(rows)
